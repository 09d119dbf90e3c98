"""One abstraction for every role: N replicas of an actor class in a placement group.

How a call fans out is declared where the method is defined, with :func:`dispatch`:

    ALL      every replica gets the same arguments; a list of results comes back
    SCATTER  the first argument (a list) is split into N contiguous shards, one per
             replica; the results (lists) are joined back in input order
    SHARDS   the first argument is already a list of N per-replica values

The driver then writes ``group.run("train_step", shards)`` without caring which.

Every wait on a group has a deadline (``deadline_s``, plus ``deadline_per_row_s`` for each row a
call carries): a replica that dies, or does not answer in time, is named in a
:class:`RoleFailure` (role, rank, node, pid, cause) as soon as it is seen, instead of a raw
Ray traceback or an endless wait.
"""
from __future__ import annotations

import logging
import re
import time
from typing import Any, Callable

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

log = logging.getLogger(__name__)

ALL, SCATTER, SHARDS = "all", "scatter", "shards"


def dispatch(mode: str) -> Callable:
    """Mark an actor method with how a group call is split over replicas."""
    if mode not in (ALL, SCATTER, SHARDS):
        raise ValueError(f"unknown dispatch mode {mode!r}")

    def mark(fn):
        fn.dispatch_mode = mode
        return fn
    return mark


def split_even(items: list, n: int) -> list[list]:
    """Split into n contiguous shards whose sizes differ by at most one."""
    q, r = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + q + (i < r)
        out.append(items[start:end])
        start = end
    return out


class RoleFailure(RuntimeError):
    """A replica of a role died, or did not answer one call within its deadline."""

    def __init__(self, role: str, rank: int, node: str, pid, cause: str, method: str):
        self.role, self.rank, self.node, self.pid = role, rank, node, pid
        self.cause, self.method = cause, method
        super().__init__(f"role {role} rank {rank} (node {node}, pid {pid}): {cause}, "
                         f"during {method}")


def death_cause(exc: Exception) -> str:
    """A short cause of an actor's death from Ray's error."""
    text = str(exc)
    if isinstance(exc, getattr(ray.exceptions, "OutOfMemoryError", ())) or "low on memory" in text:
        return "killed for lack of memory (OOM)"
    detail = re.search(r"Worker exit detail: (.*?)(?:\. There are|\n|$)", text)
    return "process died" + (f" ({detail.group(1).strip()})" if detail else "")


class Measured:
    """Base of every role's actor class: what the driver reads about the process itself."""

    def die(self) -> None:
        """End this process as ``kill -9`` would (fault injection: ``fault.inject``)."""
        import os
        import signal
        os.kill(os.getpid(), signal.SIGKILL)

    def where(self) -> tuple[str, int]:
        """(node IP, pid) of this replica."""
        import os
        return ray.util.get_node_ip_address(), os.getpid()

    def peak_rss_mib(self) -> float:
        """The most resident memory this process (or a process it started) has held, in MiB."""
        import resource
        peaks = [resource.getrusage(who).ru_maxrss
                 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        return max(peaks) / 1024.0  # Linux reports KiB


class ActorGroup:
    """N replicas of ``cls`` (a plain class; made remote here), one per placement bundle."""

    def __init__(self, role: str, cls: type, placement_group, num_actors: int, cpus: float,
                 gpus: float, init_args: tuple = (), env: dict | None = None,
                 deadline_s: float = 900.0, deadline_per_row_s: float = 1.0):
        self.role, self.cls = role, cls
        self.cpus, self.gpus, self.started = cpus, gpus, time.monotonic()
        self.deadline_s, self.deadline_per_row_s = deadline_s, deadline_per_row_s
        self._rows: dict = {}  # ref -> rows its call carried (for its deadline)
        self.final_usage: dict | None = None
        self._remote, self._init_args, self._env = ray.remote(cls), init_args, env
        self.actors, self._where = [], []
        for rank in range(num_actors):
            self.add(rank, num_actors, placement_group, rank)

    def add(self, rank: int, world_size: int, placement_group, bundle_index: int):
        """Start one more replica (constructed with ``rank, world_size, *init_args``) in that
        bundle, last in the group; the handle. (Elastic rollout engines: orchestrator/elastic.py.)"""
        strategy = PlacementGroupSchedulingStrategy(placement_group=placement_group,
                                                    placement_group_bundle_index=bundle_index)
        actor = self._remote.options(
            num_cpus=self.cpus, num_gpus=self.gpus, scheduling_strategy=strategy, name=None,
            runtime_env={"env_vars": dict(self._env)} if self._env else None,
        ).remote(rank, world_size, *self._init_args)
        self.actors.append(actor)
        # read when one fails (a class without Measured, e.g. a test's stand-in, says nothing)
        if hasattr(self.cls, "where"):
            self._where.append(actor.where.remote())
        return actor

    def drop(self, actor) -> None:
        """Kill one replica and take it out of the group (later calls go to the others)."""
        i = self.actors.index(actor)
        ray.kill(actor, no_restart=True)
        del self.actors[i]
        if self._where:
            del self._where[i]

    def __len__(self) -> int:
        return len(self.actors)

    def mode(self, method: str) -> str:
        fn = getattr(self.cls, method, None)
        if fn is None:
            raise AttributeError(f"role {self.role}: {self.cls.__name__} has no method {method}")
        return getattr(fn, "dispatch_mode", ALL)

    def submit(self, method: str, *args, **kwargs) -> list:
        """Start a group call; returns the object refs, one per replica."""
        mode = self.mode(method)
        if mode == ALL:
            return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]
        first, rest = args[0], args[1:]
        shards = split_even(list(first), len(self)) if mode == SCATTER else list(first)
        if len(shards) != len(self):
            raise ValueError(f"role {self.role}: {method} needs {len(self)} shards, got {len(shards)}")
        refs = [getattr(a, method).remote(s, *rest, **kwargs) for a, s in zip(self.actors, shards)]
        for ref, shard in zip(refs, shards):
            self._rows[ref] = len(shard) if hasattr(shard, "__len__") else 1
        return refs

    def call(self, actor, method: str, shard, *args, **kwargs):
        """One replica's part of a SCATTER call, started on ``actor`` (a member): its ref, whose
        deadline counts the rows of ``shard``."""
        ref = getattr(actor, method).remote(shard, *args, **kwargs)
        self._rows[ref] = len(shard)
        return ref

    def stream(self, actor, method: str, shard, *args, **kwargs):
        """One replica's part of a SCATTER call to a generator method, started on ``actor``:
        Ray's ``ObjectRefGenerator`` of what it yields (orchestrator/streams.py waits on it)."""
        return getattr(actor, method).remote(shard, *args, **kwargs)

    def deadline(self, refs: list) -> float:
        """Seconds a wait on ``refs`` may take: the role's base plus its per-row share."""
        return self.deadline_s + self.deadline_per_row_s * max(
            (self._rows.get(r, 0) for r in refs), default=0)

    def failure(self, rank: int, cause: str, method: str) -> RoleFailure:
        try:
            node, pid = ray.get(self._where[rank], timeout=2)
        except Exception:  # none asked, or the replica died (or hangs) before it answered
            node, pid = "?", "?"
        return RoleFailure(self.role, rank, node, pid, cause, method)

    def gather(self, method: str, refs: list) -> Any:
        """Wait for a group call started by :meth:`submit` and combine as its mode says."""
        results = wait_calls([(self, method, refs)])[0]
        if self.mode(method) == SCATTER:
            return [item for part in results for item in part]
        return results

    def forget(self, refs: list) -> None:
        for ref in refs:
            self._rows.pop(ref, None)

    def run(self, method: str, *args, **kwargs) -> Any:
        return self.gather(method, self.submit(method, *args, **kwargs))

    def usage(self) -> dict:
        """The resources the group has held and for how long, and its replicas' peak memory:
        {"actors", "cpus", "gpus" (per replica), "seconds", "peak_rss_mib" (None when a replica
        did not answer)}. After :meth:`kill`, the figures of that moment."""
        if self.final_usage is not None:
            return self.final_usage
        try:
            peak = max(ray.get([a.peak_rss_mib.remote() for a in self.actors], timeout=3))
        except Exception:  # a dead or hung replica: its memory is not known
            peak = None
        return {"actors": len(self.actors), "cpus": self.cpus, "gpus": self.gpus,
                "seconds": time.monotonic() - self.started, "peak_rss_mib": peak}

    def kill(self) -> None:
        if self.actors:
            self.final_usage = self.usage()
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []


PEER_GRACE_S = 5.0  # how long a failed call's peers get to show a death behind its error


def _dead_peer(call: tuple, peers: list) -> RoleFailure | None:
    """The death of a replica among ``peers`` ((ref, (call, index, rank)) of the same call),
    seen within :data:`PEER_GRACE_S`. When a rank of a collective dies, its peers' calls
    fail too (a connection reset by the dead peer), often before Ray reports the death; the
    death is the cause to name, not the survivor's error."""
    group, method = call[:2]
    rank_of = {ref: k[2] for ref, k in peers}
    left, end = list(rank_of), time.monotonic() + PEER_GRACE_S
    while left:
        ready, left = ray.wait(left, num_returns=1, timeout=max(0.0, end - time.monotonic()),
                               fetch_local=False)
        if not ready:
            return None
        try:
            ray.get(ready[0])
        except ray.exceptions.RayActorError as exc:
            return group.failure(rank_of[ready[0]], death_cause(exc), method)
        except Exception:  # noqa: BLE001  (another survivor's error)
            pass
    return None


def wait_calls(calls: list[tuple[ActorGroup, str, list]], keep_errors: bool = False) -> list[list]:
    """Wait for several group calls together, each (group, method, refs in rank order) or
    (group, method, refs, the rank of each ref's replica); their results. Raises
    :class:`RoleFailure` for the first replica seen dead, or the first call not done within its
    group's deadline (a hung replica). A method's own exception propagates at once (its peers
    in a collective would wait for it), or with ``keep_errors`` takes its result's place;
    unless a peer of the same call turns out dead within :data:`PEER_GRACE_S`, whose death
    is then the failure raised (see :func:`_dead_peer`)."""
    start, owner = time.monotonic(), {}
    results = [[None] * len(call[2]) for call in calls]
    for c, call in enumerate(calls):
        ranks = call[3] if len(call) > 3 else range(len(call[2]))
        for i, (ref, rank) in enumerate(zip(call[2], ranks)):
            owner[ref] = (c, i, rank)
    ends = [start + call[0].deadline(call[2]) for call in calls]
    pending = list(owner)
    try:
        while pending:
            now = time.monotonic()
            late = [ref for ref in pending if ends[owner[ref][0]] <= now]
            if late:
                c, _, rank = owner[late[0]]
                group, method = calls[c][:2]
                raise group.failure(rank, f"no answer within {ends[c] - start:.0f}s (hung, or "
                                          f"slower than {group.role}.deadline_s allows)", method)
            wait = min(ends[owner[ref][0]] for ref in pending) - now
            ready, pending = ray.wait(pending, num_returns=1, timeout=wait, fetch_local=False)
            for ref in ready:
                c, i, rank = owner[ref]
                group, method = calls[c][:2]
                try:
                    results[c][i] = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    raise group.failure(rank, death_cause(exc), method) from None
                except ray.exceptions.RayTaskError as exc:
                    if not keep_errors:
                        peers = [(r, k) for r, k in owner.items() if k[0] == c and r != ref]
                        dead = _dead_peer(calls[c], peers)
                        if dead is not None:
                            raise dead from None
                        raise
                    results[c][i] = exc
    finally:
        for call in calls:
            call[0].forget(call[2])
    return results
