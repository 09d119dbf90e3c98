"""Trainer => rollout-engine weight sync on CPU: the wire and the trainer side.

Three parts, one per process that takes part in a sync:

- **trainer side** (this module; trainer rank 0, and every rank under ZeRO-3):
  :func:`open_group`, :func:`describe` and :func:`send_weights`, wrapped for actor classes by
  :class:`WeightSender`.
- **engine side** (``actors/vllm_weight_engine.py``, inside vLLM's worker process): the
  ``rayalign_gloo`` engine registered in vLLM's ``WeightTransferEngineFactory``.
- **driver side** (``orchestrator/weight_sync.py``): ``connect`` and ``sync_weights``.

The wire: one gloo process group built directly from a ``TCPStore`` (trainer rank 0 is rank 0
and hosts the store; engine ``e``'s worker ``w`` is rank ``1 + e * tp + w``). It never touches
torch's default process group, which the trainer keeps for DeepSpeed. Parameters travel in
buckets: several tensors are laid out byte by byte (64-byte aligned) in one flat buffer, one
broadcast per bucket. Names, dtypes, shapes and the bucket plan travel as the metadata of
vLLM's ``update_weights`` call, so both sides agree on the layout before any byte moves.
Engines on the trainer's node get the buckets through shared memory instead, with gloo
carrying only the signals (actors/weight_shm.py); the group decides that per engine when it
opens.

The receiver checks completeness: every tensor of the checkpoint the engine started from must
arrive in each sync. A skipped parameter would otherwise go unnoticed (vLLM keeps a layer's
old weights when none of them arrive, and processes a half-loaded layer as if it were whole).
"""
from __future__ import annotations

import datetime
import json
import logging
import re
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from actors.weight_shm import Receiving, ShmChannel, agree

log = logging.getLogger(__name__)

BACKEND = "rayalign_gloo"
ALIGN = 64  # byte alignment of each tensor inside a bucket, so views of any dtype are legal
DEFAULT_BUCKET_BYTES = 16 << 20


class WeightSyncError(RuntimeError):
    """A sync left an engine with weights that are not the trainer's; says which are off."""


# ---- the wire: group, metadata, buckets ------------------------------------------------------
def _own_address(peer: str, port: int) -> str:
    """The local IP from which ``peer`` is reached (what gloo should listen on)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((peer, port))
        return s.getsockname()[0]


@dataclass
class WeightGroup:
    """A gloo process group outside torch's default group; ``store`` must outlive ``pg``."""
    pg: dist.ProcessGroupGloo
    store: dist.Store
    rank: int
    world_size: int

    buffers: list = field(default_factory=list)  # the sender's two reusable bucket buffers
    shm: ShmChannel | None = None  # the bytes go through shared memory (actors/weight_shm.py)

    @property
    def transport(self) -> str:
        """How this member's bytes travel: "shm", "gloo", or on the trainer "shm+gloo" (some
        engines read shared memory, others the socket)."""
        if self.shm is None:
            return "gloo"
        if self.rank == 0:
            return "shm+gloo" if self.shm.remote else "shm"
        return "shm" if self.shm.slots.data is not None else "gloo"

    def begin(self) -> None:
        """Called by every member at the start of each sync."""
        if self.shm is not None:
            self.shm.begin()

    def broadcast(self, buffer: torch.Tensor, wait: bool = True):
        """Broadcast from rank 0; with ``wait=False`` returns the work handle to wait on later
        (on a receiver, over shared memory, the bytes arrive in that ``wait()``)."""
        if self.shm is not None:
            work = self.shm.send(buffer) if self.rank == 0 else Receiving(self.shm, buffer)
        else:
            work = self.pg.broadcast([buffer], dist.BroadcastOptions())
        if not wait:
            return work
        work.wait()
        return None

    def send_buffer(self, k: int, size: int) -> torch.Tensor:
        """Where bucket k is packed: the next shared-memory slot where it fits in one, else
        buffer k % 2, grown to ``size`` bytes if needed (reused across buckets and syncs)."""
        if self.shm is not None and size <= self.shm.slots.size:
            return self.shm.next_slot()[:size]
        while len(self.buffers) < 2:
            self.buffers.append(torch.empty(0, dtype=torch.uint8))
        if self.buffers[k % 2].numel() < size:
            self.buffers[k % 2] = torch.empty(size, dtype=torch.uint8)
        return self.buffers[k % 2][:size]


def open_group(master_address: str, master_port: int, rank: int, world_size: int,
               timeout_s: float = 300.0, shared_memory: bool = True) -> WeightGroup:
    """Join the trainer<->engines group; rank 0 hosts the TCP store. All ranks call it at once.
    Members that can map the trainer's shared memory get the bytes through it, the others over
    the socket (see actors/weight_shm.py); rank 0's ``shared_memory=False`` keeps them all on
    gloo broadcasts."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_address, master_port, world_size, is_master=rank == 0,
                          timeout=timeout, wait_for_workers=False)
    store = dist.PrefixStore("rayalign/weights", store)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    opts._devices = [dist.ProcessGroupGloo.create_device(
        hostname=_own_address(master_address, master_port))]
    pg = dist.ProcessGroupGloo(store, rank, world_size, opts)
    return WeightGroup(pg, store, rank, world_size,
                       shm=agree(pg, rank, shared_memory, timeout_s=timeout_s))


def _nbytes(dtype_name: str, shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=getattr(torch, dtype_name)).element_size()


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def bucket_layout(dtype_names: list[str], shapes: list[list[int]]) -> tuple[list[int], int]:
    """Byte offset of each tensor of one bucket, and the bucket's size."""
    offsets, size = [], 0
    for dtype_name, shape in zip(dtype_names, shapes):
        offsets.append(size)
        size += _aligned(_nbytes(dtype_name, shape))
    return offsets, size


def plan_buckets(sizes: list[int], bucket_bytes: int) -> list[list[int]]:
    """[start, end) ranges over the tensors, each at most ``bucket_bytes`` (or one tensor)."""
    buckets, start, used = [], 0, 0
    for i, n in enumerate(sizes):
        n = _aligned(n)
        if i > start and used + n > bucket_bytes:
            buckets.append([start, i])
            start, used = i, 0
        used += n
    if start < len(sizes):
        buckets.append([start, len(sizes)])
    return buckets


@dataclass
class UpdateInfo:
    """What one sync carries, in order: parameter names, dtypes, shapes, and the bucket plan.

    This is the payload of vLLM's ``update_weights``; :meth:`payload` gives the plain dict.
    """
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    buckets: list[list[int]] = field(default_factory=list)

    def __post_init__(self):
        if not (len(self.names) == len(self.dtype_names) == len(self.shapes)):
            raise ValueError(f"weight update: {len(self.names)} names, {len(self.dtype_names)} "
                             f"dtypes and {len(self.shapes)} shapes; they must match")
        covered = [i for s, e in self.buckets for i in range(s, e)]
        if covered != list(range(len(self.names))):
            raise ValueError("weight update: the buckets must cover every tensor once, in order")

    def payload(self) -> dict:
        return asdict(self)

    @property
    def total_bytes(self) -> int:
        return sum(_nbytes(d, s) for d, s in zip(self.dtype_names, self.shapes))


# ---- engine side (shared by every engine kind) ------------------------------------------------
def checkpoint_names(model_dir: str, tied_embeddings: bool) -> set[str] | None:
    """Tensor names of the safetensors checkpoint in ``model_dir``; None if there is none.

    These are the names every sync must deliver (a tied LM head is the embedding's tensor)."""
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        names = set(json.loads(index.read_text())["weight_map"])
    else:
        files = sorted(root.glob("*.safetensors"))
        if not files:
            return None
        from safetensors import safe_open
        names = set()
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                names.update(fh.keys())
    names = {n for n in names if not n.endswith("rotary_emb.inv_freq")}
    if tied_embeddings:
        names.discard("lm_head.weight")
    return names


@dataclass
class SyncTally:
    """What one sync delivered to an engine, against the names it expects (None: unchecked)."""
    expected: set[str] | None
    received: set[str] = field(default_factory=set)
    unexpected: set[str] = field(default_factory=set)
    t0: float = field(default_factory=time.perf_counter)

    def accept(self, name: str) -> bool:
        """Count a tensor that arrived; False for a name the engine does not expect (left out:
        loading it could fail mid-stream)."""
        if self.expected is not None and name not in self.expected:
            self.unexpected.add(name)
            return False
        self.received.add(name)
        return True

    def report(self) -> dict:
        missing = sorted(self.expected - self.received) if self.expected is not None else []
        return {"received": len(self.received), "missing": missing,
                "unexpected": sorted(self.unexpected), "checked": self.expected is not None,
                "seconds": time.perf_counter() - self.t0}


def receive_buckets(group: WeightGroup | None, info: UpdateInfo,
                    tally: SyncTally) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Receive the buckets of one sync; yield each as (name, tensor) views of a fresh buffer.

    Bucket k+1 is already arriving while the caller loads bucket k. Names the engine does not
    expect are left out (loading them could fail mid-stream) and counted in ``tally``.
    """
    if group is None:
        raise RuntimeError("weight update before the trainer<->engine group was set up")

    def post(k: int):
        start, end = info.buckets[k]
        _, size = bucket_layout(info.dtype_names[start:end], info.shapes[start:end])
        buffer = torch.empty(size, dtype=torch.uint8)  # fresh: an engine may keep views of it
        return buffer, group.broadcast(buffer, wait=False)

    group.begin()
    pending = post(0) if info.buckets else None
    for k, (start, end) in enumerate(info.buckets):
        buffer, work = pending
        work.wait()
        pending = post(k + 1) if k + 1 < len(info.buckets) else None
        dtypes, shapes = info.dtype_names[start:end], info.shapes[start:end]
        offsets, _ = bucket_layout(dtypes, shapes)
        batch = []
        for name, dtype, shape, off in zip(info.names[start:end], dtypes, shapes, offsets):
            if tally.accept(name):
                raw = buffer[off:off + _nbytes(dtype, shape)]
                batch.append((name, raw.view(getattr(torch, dtype)).view(shape)))
        yield batch


# ---- trainer side ----------------------------------------------------------------------------
def full_shape(param: torch.Tensor) -> list[int]:
    """A parameter's full shape, also when ZeRO-3 has partitioned it (``ds_shape``)."""
    return list(getattr(param, "ds_shape", param.shape))


def checkpoint_namer(module: torch.nn.Module) -> Callable[[str], str]:
    """A parameter's name as the model's checkpoint files have it, which is what an engine
    loads by. transformers 5 renames some parameters on load (GPT-NeoX's ``embed_out`` is
    ``lm_head`` in the module) and back on save: the renamings are undone here. A family
    whose load does more than rename (fusing or splitting tensors) cannot be synced name by
    name: WeightSyncError naming it."""
    from transformers.conversion_mapping import WeightRenaming
    back = []
    for conv in getattr(module, "_weight_conversions", None) or []:
        if not isinstance(conv, WeightRenaming):
            raise WeightSyncError(f"{type(module).__name__}: transformers converts its checkpoint "
                                  f"tensors on load ({type(conv).__name__}), which weight sync "
                                  f"cannot undo; this model family is not supported")
        for src, tgt in zip(conv.source_patterns, conv.target_patterns):
            anchored = src.startswith("^")
            literal = src.removeprefix("^").replace("\\.", ".")
            back.append((re.compile(("^" if anchored else "") + re.escape(tgt)), literal))

    def name(n: str) -> str:
        for pattern, literal in back:
            n = pattern.sub(literal, n)
        return n
    return name


def describe(module: torch.nn.Module, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
             exclude: tuple[str, ...] = ()) -> UpdateInfo:
    """The metadata of a sync of ``module``'s parameters; reads no parameter data.

    ``exclude``: name prefixes left out (a partial sync, e.g. of frozen parts: the receiver
    reports what it did not get).
    """
    names, dtypes, shapes, saved = [], [], [], checkpoint_namer(module)
    for name, dtype, shape in _plain_shapes(module):
        if name.startswith(tuple(exclude)):
            continue
        names.append(saved(name))
        dtypes.append(str(dtype).removeprefix("torch."))
        shapes.append(shape)
    sizes = [_nbytes(d, s) for d, s in zip(dtypes, shapes)]
    return UpdateInfo(names, dtypes, shapes, plan_buckets(sizes, bucket_bytes))


def _plain_shapes(module: torch.nn.Module) -> list[tuple[str, torch.dtype, list[int]]]:
    """(name, dtype, full shape) of the parameters a plain copy of ``module`` has (a module
    with LoRA adapters: its layers merged, see actors/lora.py)."""
    from actors import lora
    if lora.has_adapters(module):
        return lora.plain_shapes(module)
    return [(n, p.dtype, full_shape(p)) for n, p in module.named_parameters()]


def full_parameters(module: torch.nn.Module, zero3: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, full tensor) in ``named_parameters`` order.

    Under ZeRO-3 each module's own parameters are gathered with DeepSpeed's
    ``GatheredParameters`` just before they are yielded and released when the next module is
    reached, so at most one module's worth (e.g. one attention projection) is whole at a time.
    The gather is a collective: every trainer rank must iterate this, in step.
    """
    saved = checkpoint_namer(module)
    from actors import lora
    if lora.has_adapters(module):  # each adapted layer merged with its adapters
        for name, tensor in lora.plain_parameters(module, zero3):
            yield saved(name), tensor
        return
    if not zero3:
        for name, p in module.named_parameters():
            yield saved(name), p.detach()
        return
    import deepspeed
    seen: set[int] = set()  # a tied parameter comes once, where named_parameters puts it
    for prefix, sub in module.named_modules():
        own = [(n, p) for n, p in sub.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in own)
        if not own:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=None):
            for name, p in own:
                yield saved(f"{prefix}.{name}" if prefix else name), p.detach()


def send_weights(tensors: Iterable[tuple[str, torch.Tensor]], info: UpdateInfo,
                 group: WeightGroup | None) -> dict:
    """Copy ``tensors`` into bucket buffers and broadcast each bucket from rank 0.

    ``tensors`` must yield ``info.names`` in order (checked); names not in ``info`` are passed
    over. Each tensor is copied into its bucket before the next one is requested, so a
    generator may free it then (as :func:`full_parameters` does under ZeRO-3). With
    ``group=None`` (trainer ranks other than 0 under ZeRO-3) the tensors are only iterated, to
    keep the gathers in step.
    """
    wanted = set(info.names)
    t0, it = time.perf_counter(), ((n, t) for n, t in tensors if n in wanted)
    if group is not None:
        group.begin()
    in_flight: list = [None, None]  # bucket k is packed while bucket k-1 is on the wire
    for k, (start, end) in enumerate(info.buckets):
        offsets, size = bucket_layout(info.dtype_names[start:end], info.shapes[start:end])
        buffer = None
        if group is not None:
            if in_flight[k % 2] is not None:  # this buffer's previous bucket must be out first
                in_flight[k % 2].wait()
            buffer = group.send_buffer(k, size)
        for i, offset in zip(range(start, end), offsets):
            name, tensor = next(it, (None, None))
            if name != info.names[i]:
                raise WeightSyncError(f"weight send: expected parameter {info.names[i]!r} at "
                                      f"position {i}, the trainer yielded {name!r}")
            if list(tensor.shape) != info.shapes[i]:
                raise WeightSyncError(f"weight send: {name} has shape {list(tensor.shape)}, "
                                      f"the metadata says {info.shapes[i]}")
            if buffer is not None:
                raw = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8)
                buffer[offset:offset + raw.numel()].copy_(raw)
        if group is not None:
            in_flight[k % 2] = group.broadcast(buffer, wait=False)
    for work in in_flight:
        if work is not None:
            work.wait()
    seconds = time.perf_counter() - t0
    return {"tensors": len(info.names), "buckets": len(info.buckets),
            "bytes": info.total_bytes, "seconds": seconds,
            "transport": group.transport if group is not None else None}


class WeightSender:
    """Trainer-actor methods for weight sync; a trainer class mixes this in.

    The class provides ``weights_module()`` (the full-precision HF model, e.g.
    ``self.engine.module``) and ``weights_zero3()`` (True under ZeRO-3), and has ``self.rank``.
    The driver calls these on every trainer rank (dispatch ALL); only rank 0 talks to engines.
    """
    weight_group = None  # rank 0: a WeightGroup (gloo), or a vLLM PyNcclCommunicator (nccl)
    weight_backend = BACKEND
    weight_bucket_bytes = DEFAULT_BUCKET_BYTES

    def weights_module(self) -> torch.nn.Module:
        raise NotImplementedError

    def weights_zero3(self) -> bool:
        return False

    def weight_sync_address(self) -> tuple[str, int]:
        from actors.runtime import node_address
        return node_address()

    def open_weight_sync(self, master_address: str, master_port: int, world_size: int,
                         timeout_s: float = 300.0, backend: str = BACKEND,
                         bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                         shared_memory: bool = True) -> None:
        """Join the trainer<->engines group over ``backend``: ``rayalign_gloo`` (CPU; the bytes
        through shared memory where every engine can map it and ``shared_memory`` allows) or
        ``nccl`` (GPU, vLLM's engine; ``bucket_bytes`` is then fixed for the group's life)."""
        self.weight_backend, self.weight_bucket_bytes = backend, bucket_bytes
        if self.rank != 0:
            return
        if backend == BACKEND:
            self.weight_group = open_group(master_address, master_port, 0, world_size, timeout_s,
                                           shared_memory)
        else:
            from actors import weight_sync_nccl
            self.weight_group = weight_sync_nccl.open_sender(master_address, master_port,
                                                             world_size, timeout_s)

    def weight_update_info(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                           exclude: tuple[str, ...] = ()) -> dict:
        return describe(self.weights_module(), bucket_bytes, tuple(exclude)).payload()

    def send_weights(self, info: dict) -> dict:
        params = full_parameters(self.weights_module(), self.weights_zero3())
        group = self.weight_group if self.rank == 0 else None
        with torch.no_grad():
            if self.weight_backend == BACKEND:
                stats = send_weights(params, UpdateInfo(**info), group)
            else:
                from actors import weight_sync_nccl
                own = describe(self.weights_module()).payload() if group is not None else None
                stats = weight_sync_nccl.send(params, info, group, self.weight_bucket_bytes, own)
                stats["bytes"] = UpdateInfo(**info).total_bytes
        if self.rank == 0:
            log.info("sent %d tensors (%.1f MB) in %d buckets in %.2fs (%s)", stats["tensors"],
                     stats["bytes"] / 1e6, stats["buckets"], stats["seconds"],
                     stats.get("transport") or self.weight_backend)
        return stats
