"""Shared memory for weight sync between the processes of one node.

When engines of a trainer<->engines group run on the trainer's node, their bytes need not
cross a socket: the group maps one file in ``/dev/shm`` holding two slots, the trainer packs
each chunk of a bucket into a slot, and gloo carries only a chunk header (its number) and the
members' acknowledgement that the slot may be written again. A bucket larger than a slot goes
through in several chunks. The slots are fixed at the group's start, so nothing is resized or
mapped again during a sync.

Which member reads shared memory is decided when the group opens (:func:`agree`): the trainer
creates the file with a random token in it and broadcasts the token; each member maps the file
and checks the token. A member that cannot (on another node, or in a container with its own
``/dev/shm``) gets every chunk from the trainer over the group's socket instead (a point-to-
point send next to the slot), in the same chunk sequence, so one group serves both kinds of
engine. If the trainer's config turns shared memory off (``weight_sync.shared_memory:
false``), or no engine can map the file, the group broadcasts the buckets over gloo as before.
The file is unlinked as soon as every member has tried to map it, so a killed process leaves
nothing behind in ``/dev/shm``.
"""
from __future__ import annotations

import logging
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SLOT_BYTES = 16 << 20


class Slots:
    """Two slots of ``size`` bytes in one shared mapping (``data``; None on a member that
    could not map it)."""

    def __init__(self, data: torch.Tensor, size: int):
        self.data, self.size = data, size

    def slot(self, j: int) -> torch.Tensor:
        """Chunk ``j``'s slot (chunks alternate between the two)."""
        return self.data[(j % 2) * self.size:(j % 2 + 1) * self.size]


def _map(path: Path, nbytes: int) -> torch.Tensor:
    return torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8)


def _path(token: int) -> Path:
    return SHM_DIR / f"rayalign-weights-{token:016x}"


def _stamp(token: int) -> torch.Tensor:
    return torch.tensor([token], dtype=torch.int64).view(torch.uint8)


def agree(pg, rank: int, wanted: bool, slot_bytes: int | None = None) -> ShmChannel | None:
    """Decide with every member of the freshly opened group ``pg`` how the weights travel; all
    members call this at once. Returns this member's side of the shared-memory chunk protocol,
    or None where the group broadcasts the bytes over gloo. ``wanted`` and ``slot_bytes``
    (default :data:`SLOT_BYTES`) matter on rank 0 (the trainer), which tells the others."""
    slot_bytes = slot_bytes or SLOT_BYTES
    data, path = None, None
    head = torch.zeros(2, dtype=torch.int64)  # [token, slot bytes]; token 0: no shared memory
    if rank == 0 and wanted and SHM_DIR.is_dir():
        token = secrets.randbits(62) + 1
        path = _path(token)
        try:
            with open(path, "wb") as f:
                f.truncate(2 * slot_bytes)
            data = _map(path, 2 * slot_bytes)
            data[:8].copy_(_stamp(token))
            head[0], head[1] = token, slot_bytes
        except (OSError, RuntimeError) as exc:
            log.info("weight sync: no shared memory on this node (%s); gloo carries the bytes",
                     exc)
            data = None
    pg.broadcast([head], dist.BroadcastOptions()).wait()
    token, size = int(head[0]), int(head[1])
    if token and rank != 0:
        try:
            data = _map(_path(token), 2 * size)
            if not torch.equal(data[:8], _stamp(token)):
                data = None
        except (OSError, RuntimeError):  # another node, or a /dev/shm of its own
            data = None
    votes = [torch.zeros(1, dtype=torch.int32) for _ in range(pg.size())]
    pg.allgather([votes], [torch.tensor([1 if data is not None else 0], dtype=torch.int32)]).wait()
    if path is not None:
        path.unlink(missing_ok=True)  # every member has mapped it (or given up) by now
    mapped = [r for r, v in enumerate(votes) if int(v) and r != 0]
    remote = [r for r, v in enumerate(votes) if not int(v)]
    if not token or not mapped:
        return None
    if rank == 0:
        log.info("weight sync: ranks %s read shared memory%s", mapped,
                 f", ranks {remote} the socket" if remote else "")
    return ShmChannel(pg, Slots(data, size), remote)


class ShmChannel:
    """One group member's side of the chunk protocol over ``slots``: per chunk, the sender
    writes the slot and broadcasts the chunk's number; every receiver copies the slot out and
    all members then all-reduce an acknowledgement, after which the slot may be written
    again. Chunks are numbered from 0 in each sync (:meth:`begin`)."""

    def __init__(self, pg, slots: Slots, remote: list[int]):
        self.pg, self.slots, self.remote = pg, slots, remote  # remote: ranks served by socket
        self.chunk = 0
        # (work, tensor) of the last two chunks' acknowledgements, and of the sender's headers
        # (the tensors live until their work is done)
        self.acks: list = [None, None]
        self.headers: list = [None, None]
        self._worker: ThreadPoolExecutor | None = None

    def worker(self) -> ThreadPoolExecutor:
        """The one thread a receiver copies chunks in (chunks stay in order)."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="rayalign-weights-shm")
        return self._worker

    def begin(self) -> None:
        for pending in self.acks + self.headers:
            if pending is not None:
                pending[0].wait()
        for pending in self.headers:
            for send in (pending[2] if pending is not None else ()):
                send.wait()
        self.chunk, self.acks, self.headers = 0, [None, None], [None, None]

    def _ack(self, j: int) -> None:
        flag = torch.ones(1, dtype=torch.int32)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.acks[j % 2] = (self.pg.allreduce([flag], opts), flag)

    def next_slot(self) -> torch.Tensor:
        """The slot the next chunk goes into, once free: the trainer packs a bucket that fits
        there directly, and :meth:`send` then copies nothing."""
        j = self.chunk
        if self.acks[j % 2] is not None:  # its previous chunk must have been copied out
            self.acks[j % 2][0].wait()
        return self.slots.slot(j)

    def send(self, buffer: torch.Tensor):
        """Put ``buffer`` through the slots (trainer side); returns when its last chunk is in
        a slot, with the work (its acknowledgement) that ends when every receiver has it."""
        for off in range(0, max(buffer.numel(), 1), self.slots.size):
            j, slot = self.chunk, self.next_slot()
            self.chunk += 1
            part = buffer[off:off + self.slots.size]
            if part.data_ptr() != slot.data_ptr():  # not packed in place
                slot[:part.numel()].copy_(part)
            header = torch.tensor([j], dtype=torch.int64)
            # the header's and the sends' tensors live until the chunk's acknowledgement
            self.headers[j % 2] = (self.pg.broadcast([header], dist.BroadcastOptions()), header,
                                   [self.pg.send([slot[:part.numel()]], r, j)
                                    for r in self.remote])
            self._ack(j)
        return self.acks[(self.chunk - 1) % 2][0]

    def receive(self, buffer: torch.Tensor) -> None:
        """Fill ``buffer`` from the slots (engine side), chunk by chunk."""
        for off in range(0, max(buffer.numel(), 1), self.slots.size):
            j, self.chunk = self.chunk, self.chunk + 1
            header = torch.zeros(1, dtype=torch.int64)
            self.pg.broadcast([header], dist.BroadcastOptions()).wait()
            if int(header) != j:
                raise RuntimeError(f"weight sync over shared memory: chunk {int(header)} "
                                   f"arrived where chunk {j} was due; the group is out of step")
            part = buffer[off:off + self.slots.size]
            if self.slots.data is None:  # this member cannot map the slots: the socket
                self.pg.recv([part], 0, j).wait()
            else:
                part.copy_(self.slots.slot(j)[:part.numel()])
            self._ack(j)


class Receiving:
    """A bucket on its way through shared memory, copied in on the channel's own thread from
    the moment it is posted, so that the engine loads bucket k while bucket k+1 arrives (as
    gloo receives in its own thread); ``wait()`` as on the gloo path's broadcast work."""

    def __init__(self, channel: ShmChannel, buffer: torch.Tensor):
        self.future = channel.worker().submit(channel.receive, buffer)

    def wait(self) -> None:
        self.future.result()
