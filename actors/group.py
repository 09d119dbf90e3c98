"""One abstraction for every role: N replicas of an actor class in a placement group.

How a call fans out is declared where the method is defined, with :func:`dispatch`:

    ALL      every replica gets the same arguments; a list of results comes back
    SCATTER  the first argument (a list) is split into N contiguous shards, one per
             replica; the results (lists) are joined back in input order
    SHARDS   the first argument is already a list of N per-replica values

The driver then writes ``group.run("train_step", shards)`` without caring which.
"""
from __future__ import annotations

import logging
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


class Measured:
    """Base of every role's actor class: what the driver reads about the process itself."""

    def peak_rss_mib(self) -> float:
        """The most resident memory this process (or a process it started) has held, in MiB."""
        import resource
        peaks = [resource.getrusage(who).ru_maxrss
                 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        return max(peaks) / 1024.0  # Linux reports KiB


class ActorGroup:
    """N replicas of ``cls`` (a plain class; made remote here), one per placement bundle."""

    def __init__(self, role: str, cls: type, placement_group, num_actors: int, cpus: float,
                 gpus: float, init_args: tuple = (), env: dict | None = None):
        self.role, self.cls = role, cls
        self.cpus, self.gpus, self.started = cpus, gpus, time.monotonic()
        self.final_usage: dict | None = None
        remote_cls = ray.remote(cls)
        self.actors = []
        for rank in range(num_actors):
            strategy = PlacementGroupSchedulingStrategy(placement_group=placement_group,
                                                        placement_group_bundle_index=rank)
            actor = remote_cls.options(
                num_cpus=cpus, num_gpus=gpus, scheduling_strategy=strategy,
                name=None, runtime_env={"env_vars": dict(env or {})} if env else None,
            ).remote(rank, num_actors, *init_args)
            self.actors.append(actor)

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
        return [getattr(a, method).remote(s, *rest, **kwargs) for a, s in zip(self.actors, shards)]

    def gather(self, method: str, refs: list) -> Any:
        """Wait for a group call started by :meth:`submit` and combine as its mode says."""
        results = ray.get(refs)
        if self.mode(method) == SCATTER:
            return [item for part in results for item in part]
        return results

    def run(self, method: str, *args, **kwargs) -> Any:
        return self.gather(method, self.submit(method, *args, **kwargs))

    def usage(self) -> dict:
        """The resources the group has held and for how long, and its replicas' peak memory:
        {"actors", "cpus", "gpus" (per replica), "seconds", "peak_rss_mib" (None when a replica
        did not answer)}. After :meth:`kill`, the figures of that moment."""
        if self.final_usage is not None:
            return self.final_usage
        try:
            peak = max(ray.get([a.peak_rss_mib.remote() for a in self.actors], timeout=10))
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
