"""Driver side of trainer => engine weight sync: build the group, run a sync."""
from __future__ import annotations

import logging
import time

import ray

from actors.group import ActorGroup, wait_calls
from actors.weight_sync import DEFAULT_BUCKET_BYTES

log = logging.getLogger(__name__)


def backend_for(rollout_gpus: float) -> str:
    """The weight-transfer backend of engines with that many GPUs each: vLLM's ``nccl`` on GPU,
    our ``rayalign_gloo`` on CPU (the config makes sure the policy is on the same kind)."""
    return "nccl" if rollout_gpus > 0 else "rayalign_gloo"


def connect(trainers, engines, timeout_s: float = 300.0, backend: str = "rayalign_gloo",
            bucket_bytes: int = DEFAULT_BUCKET_BYTES, shared_memory: bool = True) -> None:
    """Build the trainer<->engines group: trainers and engines are ActorGroups (or lists of
    actor handles) whose classes mix in :class:`WeightSender` / are ``RolloutEngine``; the
    engines must have been built for ``backend``. With ``shared_memory`` the bytes go through
    shared memory to every engine that can map the trainer's (those on its node)."""
    t_actors = getattr(trainers, "actors", trainers)
    e_actors = getattr(engines, "actors", engines)
    tp = ray.get([e.workers.remote() for e in e_actors])
    world_size = 1 + sum(tp)
    addr, port = ray.get(t_actors[0].weight_sync_address.remote())
    offsets = [1 + sum(tp[:i]) for i in range(len(e_actors))]
    refs = [e.init_weight_sync.remote(addr, port, off, world_size, timeout_s, bucket_bytes)
            for e, off in zip(e_actors, offsets)]
    refs += [t.open_weight_sync.remote(addr, port, world_size, timeout_s, backend, bucket_bytes,
                                       shared_memory) for t in t_actors]
    ray.get(refs)
    log.info("weight sync group up (%s): 1 trainer sender, %d engine workers", backend,
             world_size - 1)


def sync_weights(trainers, engines, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 exclude: tuple[str, ...] = ()) -> dict:
    """One sync: every engine receives the trainer's parameters (all but ``exclude``d name
    prefixes); raises :class:`WeightSyncError` if an engine lacks one afterwards."""
    t_actors = getattr(trainers, "actors", trainers)
    e_actors = getattr(engines, "actors", engines)
    groups = isinstance(engines, ActorGroup) and isinstance(trainers, ActorGroup)

    def wait(group, method: str, refs: list) -> list:
        """Results in order; under the role's deadline when the side is an ActorGroup."""
        return wait_calls([(group, method, refs)])[0] if groups else ray.get(refs)

    t0 = time.perf_counter()
    info = wait(trainers, "weight_update_info",
                [t_actors[0].weight_update_info.remote(bucket_bytes, tuple(exclude))])[0]
    wait(engines, "check_update", [e.check_update.remote(info) for e in e_actors])  # NCCL
    receive = [e.update_weights.remote(info) for e in e_actors]
    send = [t.send_weights.remote(info) for t in t_actors]
    if groups:
        # both sides watched together, each to its role's deadline: a dead or hung member is
        # named (RoleFailure) instead of the others waiting on it
        reports, sent = wait_calls([(engines, "update_weights", receive),
                                    (trainers, "send_weights", send)], keep_errors=True)
    else:
        reports, sent = [], None
        for ref in receive:  # every engine's outcome, so that no failure goes unreported
            try:
                reports.append(ray.get(ref))
            except Exception as e:  # noqa: BLE001  (re-raised below, after the other engines)
                reports.append(e)
    failed = [r for r in reports if isinstance(r, Exception)]
    for extra in failed[1:]:
        log.error("weight sync: %s", getattr(extra, "cause", extra))  # without Ray's traceback
    if failed:
        # the trainer has sent everything unless an engine broke off mid-stream; then its
        # broadcast ends with the group's timeout
        raise failed[0]
    stats = ray.get(send)[0] if sent is None else sent[0]
    if isinstance(stats, Exception):
        raise stats
    stats["send_seconds"] = stats.pop("seconds")  # the trainer's own packing + sending
    stats["seconds"] = time.perf_counter() - t0  # the whole sync, as the driver saw it
    stats["engines"] = reports
    return stats
