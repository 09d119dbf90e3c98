"""Trainer => rollout-engine weight sync on GPU, through vLLM's own NCCL weight-transfer engine.

When the policy and the engines hold GPUs, the engines are built with vLLM's NCCL
weight-transfer engine (registered as ``rayalign_nccl``: vLLM's, with the rendezvous waiting
``weight_sync.timeout_s`` instead of a fixed 300 s) and the trainer's rank 0 joins their NCCL
group as rank 0 (a ``PyNcclCommunicator``, as vLLM's ``trainer_init`` opens it); parameters go
out with vLLM's packed producer, in buffers of ``weight_sync.bucket_mb`` that the engines are
told about when the group is built (both sides must agree on them). Every trainer rank still
walks the parameters, so ZeRO-3's per-module gathers stay collective; only rank 0 broadcasts.

The payloads below are plain dicts, so the driver and the engine actor can build them
without CUDA; the functions that move bytes import vLLM lazily and need a GPU.
"""
from __future__ import annotations

import logging
import time
from typing import Iterable

import torch

BACKEND = "nccl"            # rayalign's name for this path (weight_sync.backend_for)
VLLM_BACKEND = "rayalign_nccl"  # vLLM's NCCL engine with our rendezvous timeout
NUM_BUFFERS = 2

log = logging.getLogger(__name__)


def engine_init_payload(master_address: str, master_port: int, rank_offset: int,
                        world_size: int, bucket_bytes: int, timeout_s: float = 300.0) -> dict:
    """What an engine's workers get in ``init_weight_transfer_engine`` for the NCCL backend:
    vLLM's payload and the rendezvous timeout (``weight_sync.timeout_s``)."""
    from vllm.distributed.weight_transfer.nccl_common import (NCCLWeightTransferInitInfo,
                                                               worker_init_payload)
    payload = worker_init_payload(NCCLWeightTransferInitInfo(
        master_address=master_address, master_port=master_port, rank_offset=rank_offset,
        world_size=world_size, packed=True, packed_buffer_size_bytes=bucket_bytes,
        packed_num_buffers=NUM_BUFFERS))
    return {**payload, "store_timeout_s": timeout_s}


def rendezvous(master_address: str, master_port: int, rank: int, world_size: int,
               timeout_s: float):
    """vLLM's stateless group (a TCP store; rank 0 hosts it) with ``timeout_s`` for the
    others to arrive, where vLLM's own NCCL engine waits a fixed 300 s. A member that is not
    there in time is an error naming the address and the setting."""
    from vllm.distributed.utils import StatelessProcessGroup

    from actors.weight_sync import WeightSyncError
    try:
        return StatelessProcessGroup.create(host=master_address, port=master_port, rank=rank,
                                            world_size=world_size,
                                            store_timeout=max(1, int(timeout_s)))
    except Exception as e:
        raise WeightSyncError(
            f"weight sync (nccl): rank {rank} of {world_size} could not meet the group at "
            f"{master_address}:{master_port} within weight_sync.timeout_s={timeout_s:g}s "
            f"({type(e).__name__}: {e})") from e


def join(init_info, rank: int):
    """An engine worker's end of the trainer<->engines NCCL group, as ``rank`` (the trainer is
    0), with the rendezvous timeout the init payload carries."""
    return _communicator(rendezvous(init_info.master_address, init_info.master_port, rank,
                                    init_info.world_size, init_info.store_timeout_s))


def _communicator(pg):
    """vLLM's NCCL communicator over a met group, on this process's current device."""
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.weight_transfer.nccl_common import unpinned_nccl_env
    with unpinned_nccl_env():
        return PyNcclCommunicator(pg, device=torch.accelerator.current_device_index())


def update_payload(info: dict) -> dict:
    """vLLM's NCCL update info (names, dtypes, shapes) out of our sync metadata, which also
    carries a bucket plan that only the gloo path reads."""
    return {k: info[k] for k in ("names", "dtype_names", "shapes")}


def open_sender(master_address: str, master_port: int, world_size: int,
                timeout_s: float = 300.0):
    """Trainer rank 0's end of the trainer<->engines NCCL group (the engines join at once).

    What vLLM's ``trainer_init`` does, but with the rendezvous store waiting
    ``weight_sync.timeout_s`` (vLLM's own waits a fixed 300 s; the engines' side, :func:`join`,
    waits the same setting)."""
    if not torch.cuda.is_available():
        raise RuntimeError("weight sync backend 'nccl' needs a GPU on the policy trainer; set "
                           "policy.gpus > 0 or run the engines on CPU (rollout.gpus: 0)")
    return _communicator(rendezvous(master_address, master_port, 0, world_size, timeout_s))


def check_plan(own: dict, info: dict) -> None:
    """Refuse an update plan that the trainer cannot send whole, before the first byte goes
    out (the engines would otherwise wait on a broadcast that stops part way): every entry
    names one of the trainer's parameters (``own``: the ``describe`` payload of its whole
    model), with the same dtype and shape, once, in the trainer's order."""
    from actors.weight_sync import WeightSyncError
    names, dtypes, shapes = info["names"], info["dtype_names"], info["shapes"]
    if not len(names) == len(dtypes) == len(shapes):
        raise WeightSyncError(f"weight send: the update lists {len(names)} names, {len(dtypes)} "
                              f"dtypes and {len(shapes)} shapes; they must match one to one")
    position = {n: i for i, n in enumerate(own["names"])}
    last = -1
    for i, (name, dtype, shape) in enumerate(zip(names, dtypes, shapes)):
        if name not in position:
            raise WeightSyncError(f"weight send: update entry {i}, {name!r}, is not a parameter "
                                  f"of the trainer's model")
        j = position[name]
        if (own["dtype_names"][j], list(own["shapes"][j])) != (dtype, list(shape)):
            raise WeightSyncError(f"weight send: {name} is {own['dtype_names'][j]} "
                                  f"{list(own['shapes'][j])} in the trainer, the update says "
                                  f"{dtype} {list(shape)}")
        if j <= last:
            raise WeightSyncError(f"weight send: {name} (update entry {i}) is repeated or out of "
                                  f"the trainer's parameter order")
        last = j


def send(params: Iterable[tuple[str, torch.Tensor]], info: dict, group, bucket_bytes: int,
         own: dict | None = None) -> dict:
    """Broadcast the parameters of ``info`` in its order (rank 0: ``group`` is its
    communicator); other ranks pass ``group=None`` and only walk the parameters. With ``own``
    (the trainer's whole parameter list, ``describe(module).payload()``) the plan is checked
    before anything is sent; parameters the plan leaves out (``exclude``) are passed over."""
    t0 = time.perf_counter()
    names = info["names"]
    if own is not None:
        check_plan(own, info)
    wanted = set(names)

    def checked():
        i = 0
        for name, tensor in params:
            if name not in wanted:
                continue
            if i >= len(names) or name != names[i]:
                raise RuntimeError(f"weight send: parameter {i} is {name}, the metadata says "
                                   f"{names[i] if i < len(names) else 'nothing more'}")
            i += 1
            yield name, tensor.detach().to("cuda", non_blocking=True).contiguous()

    if group is None:
        for _ in params:
            pass
    else:
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer
        packed_nccl_broadcast_producer(iterator=checked(), group=group, src=0,
                                       post_iter_func=lambda item: item[1],
                                       buffer_size_bytes=bucket_bytes, num_buffers=NUM_BUFFERS)
        torch.cuda.current_stream().synchronize()
    return {"tensors": len(names), "buckets": 0, "bytes": 0,
            "seconds": time.perf_counter() - t0}
