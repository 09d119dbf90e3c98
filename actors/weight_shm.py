"""Shared memory for weight sync between the processes of one node.

When engines of a trainer<->engines group run on the trainer's node, their bytes need not
cross a socket: the group maps one file in ``/dev/shm`` holding two slots and a few control
words, the trainer packs each chunk of a bucket into a slot and counts it posted, and each
engine copies it out and counts it taken, the trainer writing a slot again once every engine
has taken what was in it (:class:`ShmChannel`). No message crosses a socket per chunk (an
earlier version sent a gloo header and acknowledgement for each, about half the transport's
time). A bucket larger than a slot goes through in several chunks. The slots are fixed at the
group's start, so nothing is resized or mapped again during a sync.

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

import ctypes
import logging
import os
import platform
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SLOT_BYTES = 16 << 20


class Slots:
    """Two slots of ``size`` bytes in one shared mapping (``data``; None on a member that
    could not map it), followed by the control words (``ctrl``, int64, one per group rank:
    rank 0's counts the chunks posted, another rank's the chunks it has taken)."""

    def __init__(self, data: torch.Tensor | None, size: int):
        self.data, self.size = data, size
        words = None if data is None else data[2 * size:].view(torch.int64).view(3, -1)
        # per rank: its count, its pid and its pid namespace (whether the pid means anything
        # here; see ShmChannel.alive)
        self.ctrl, self.pids, self.ns = (None, None, None) if words is None else tuple(words)

    def sign(self, rank: int) -> None:
        """Note this process as ``rank``'s."""
        self.pids[rank], self.ns[rank] = os.getpid(), _pid_namespace()

    def slot(self, j: int) -> torch.Tensor:
        """Chunk ``j``'s slot (chunks alternate between the two)."""
        return self.data[(j % 2) * self.size:(j % 2 + 1) * self.size]


def ordered_memory() -> bool:
    """Whether this machine's CPU keeps one core's stores in order for the others and its
    loads in order (x86's total store order), which the counts rely on: a receiver that sees
    a chunk posted sees its bytes. Elsewhere (Arm, POWER) the bytes go over gloo."""
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


def _file_bytes(slot_bytes: int, world_size: int) -> int:
    return 2 * slot_bytes + 3 * 8 * world_size  # the slots, then Slots' control words


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _map(path: Path, nbytes: int) -> torch.Tensor:
    return torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8)


def _path(token: int) -> Path:
    return SHM_DIR / f"rayalign-weights-{token:016x}"


def _stamp(token: int) -> torch.Tensor:
    return torch.tensor([token], dtype=torch.int64).view(torch.uint8)


def agree(pg, rank: int, wanted: bool, slot_bytes: int | None = None,
          timeout_s: float = 300.0) -> ShmChannel | None:
    """Decide with every member of the freshly opened group ``pg`` how the weights travel; all
    members call this at once. Returns this member's side of the shared-memory chunk protocol,
    or None where the group broadcasts the bytes over gloo. ``wanted`` and ``slot_bytes``
    (default :data:`SLOT_BYTES`) matter on rank 0 (the trainer), which tells the others;
    ``timeout_s`` bounds each wait of the protocol."""
    slot_bytes = slot_bytes or SLOT_BYTES
    data, path, nbytes = None, None, _file_bytes(slot_bytes, pg.size())
    head = torch.zeros(2, dtype=torch.int64)  # [token, slot bytes]; token 0: no shared memory
    if rank == 0 and wanted and SHM_DIR.is_dir() and ordered_memory():
        token = secrets.randbits(62) + 1
        path = _path(token)
        try:
            with open(path, "wb") as f:
                f.truncate(nbytes)  # zeros: the counts start at 0
            data = _map(path, nbytes)
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
            data = _map(_path(token), _file_bytes(size, pg.size()))
            if not torch.equal(data[:8], _stamp(token)):
                data = None
        except (OSError, RuntimeError):  # another node, or a /dev/shm of its own
            data = None
    if data is not None:  # before the votes: a peer that counts on this one sees its pid
        Slots(data, size).sign(rank)
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
    return ShmChannel(pg, Slots(data, size), remote, rank, timeout_s)


class ShmChannel:
    """One group member's side of the chunk protocol over ``slots``.

    Chunks are numbered from 0 over the channel's life (sync after sync). The sender writes
    chunk j into slot j % 2 and then raises the posted count in the control words to j + 1;
    a receiver that maps the file waits for that count, copies the slot out and raises its own
    taken count to j + 1; the sender writes slot j % 2 again only once every such receiver
    has taken chunk j - 2. No socket message is involved: each side polls the other's count,
    sleeping between looks (the receiver polls on its own thread, and a sleep lets the
    engine's main thread run). Plain aligned 8-byte stores and loads, ordered as x86 orders
    them (see :func:`ordered_memory`). A member that cannot map the file (``remote``) gets each
    chunk by a point-to-point send from the slot; the slot is not written again before that
    send is done. Every wait ends after ``timeout_s`` with an error naming who did not move.
    """

    POLL_S = 20e-6  # sleep between looks at a count (the kernel adds its timer slack)
    ALIVE_EVERY_S = 0.2  # how often a waiting member checks that its peer's process lives

    def __init__(self, pg, slots: Slots, remote: list[int], rank: int = 0,
                 timeout_s: float = 300.0):
        self.pg, self.slots, self.remote = pg, slots, remote  # remote: ranks served by socket
        self.rank, self.timeout_s = rank, timeout_s
        self.mapped = [r for r in range(1, pg.size()) if r not in remote]
        self.chunk = 0
        self.sends: list = [[], []]  # the socket sends from each slot, still under way
        self._worker: ThreadPoolExecutor | None = None

    def worker(self) -> ThreadPoolExecutor:
        """The one thread a receiver copies chunks in (chunks stay in order)."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="rayalign-weights-shm")
        return self._worker

    def _count(self, who: int) -> int:
        """Rank 0: chunks posted; any other rank: chunks it has taken."""
        return int(self.slots.ctrl[who])

    def _wait(self, ready, peer: int, what: str) -> None:
        """Poll ``ready()`` until it holds; raise naming ``what`` if group rank ``peer``'s
        process ends first (looked at every :data:`ALIVE_EVERY_S`), or after ``timeout_s``
        (a peer that hangs)."""
        if ready():
            return
        start = time.monotonic()
        looked = start
        while not ready():
            now = time.monotonic()
            if now - looked > self.ALIVE_EVERY_S:
                looked = now
                if not self.alive(peer):
                    raise RuntimeError(f"weight sync over shared memory: the process of group "
                                       f"rank {peer} (pid {int(self.slots.pids[peer])}) ended "
                                       f"while this one waited for {what}")
            if now - start > self.timeout_s:
                raise TimeoutError(f"weight sync over shared memory: waited {self.timeout_s:g}s "
                                   f"for {what}; the peer is hung or gone")
            time.sleep(self.POLL_S)

    def alive(self, rank: int) -> bool:
        """False only where ``rank``'s process is known to have ended: it shares this pid
        namespace and its pid is gone or a zombie (a socket peer would see its connection
        close; over shared memory nothing else tells)."""
        pid = int(self.slots.pids[rank])
        if not pid or int(self.slots.ns[rank]) != _pid_namespace():
            return True
        try:
            with open(f"/proc/{pid}/stat") as fh:
                return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False

    def _taken(self, n: int, slot: int | None = None) -> None:
        """Wait until every shared-memory receiver has taken the first ``n`` chunks, and the
        socket sends from ``slot`` (both slots if None) are done."""
        for r in self.mapped:
            self._wait(lambda r=r: self._count(r) >= n, r,
                       f"group rank {r} (an engine) to take chunk {n - 1}")
        for k in ((0, 1) if slot is None else (slot,)):
            for send in self.sends[k]:
                send.wait()
            self.sends[k] = []

    def begin(self) -> None:
        """Start of a sync: the sender waits until everything sent before is taken."""
        if self.rank == 0:
            self._taken(self.chunk)

    def next_slot(self) -> torch.Tensor:
        """The slot the next chunk goes into, once free: the trainer packs a bucket that fits
        there directly, and :meth:`send` then copies nothing."""
        j = self.chunk
        if j >= 2:  # the chunk before in this slot must have been taken
            self._taken(j - 1, j % 2)
        return self.slots.slot(j)

    def send(self, buffer: torch.Tensor) -> "Taken":
        """Put ``buffer`` through the slots (trainer side); returns when its last chunk is in
        a slot, with a handle whose ``wait()`` ends when every receiver has it."""
        for off in range(0, max(buffer.numel(), 1), self.slots.size):
            j, slot = self.chunk, self.next_slot()
            part = buffer[off:off + self.slots.size]
            if part.data_ptr() != slot.data_ptr():  # not packed in place
                slot[:part.numel()].copy_(part)
            self.chunk += 1
            self.slots.ctrl[0] = self.chunk  # posted: after the bytes
            self.sends[j % 2] = [self.pg.send([slot[:part.numel()]], r, j) for r in self.remote]
        return Taken(self, self.chunk)

    def receive(self, buffer: torch.Tensor) -> None:
        """Fill ``buffer`` from the slots (engine side), chunk by chunk."""
        for off in range(0, max(buffer.numel(), 1), self.slots.size):
            j, self.chunk = self.chunk, self.chunk + 1
            part = buffer[off:off + self.slots.size]
            if self.slots.data is None:  # this member cannot map the slots: the socket
                self.pg.recv([part], 0, j).wait()
                continue
            self._wait(lambda: self._count(0) > j, 0, f"the trainer to post chunk {j}")
            _copy(part, self.slots.slot(j))
            self.slots.ctrl[self.rank] = j + 1  # taken: after the copy


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy the first ``dst.numel()`` bytes of ``src`` into ``dst`` (both contiguous uint8)
    with C's memmove, not torch. A torch copy on this (non-main) thread would start an OpenMP
    thread team of its own; libgomp, seeing more threads than CPUs, then stops its threads
    spinning between parallel regions, and the process's main thread (generation) ran on one
    thread after every sync: 140-240 ms a generate call instead of about 100 (tiny GRPO
    benchmark, hf engine). ctypes lets go of the GIL during the call."""
    ctypes.memmove(dst.data_ptr(), src.data_ptr(), dst.numel())


class Taken:
    """The sender's handle on chunks sent: ``wait()`` until every receiver has taken them."""

    def __init__(self, channel: ShmChannel, n: int):
        self.channel, self.n = channel, n

    def wait(self) -> None:
        self.channel._taken(self.n)


class Receiving:
    """A bucket on its way through shared memory, copied in on the channel's own thread from
    the moment it is posted, so that the engine loads bucket k while bucket k+1 arrives (as
    gloo receives in its own thread); ``wait()`` as on the gloo path's broadcast work."""

    def __init__(self, channel: ShmChannel, buffer: torch.Tensor):
        self.future = channel.worker().submit(channel.receive, buffer)

    def wait(self) -> None:
        self.future.result()
