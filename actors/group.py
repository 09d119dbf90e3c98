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


class ActorGroup:
    """N replicas of ``cls`` (a plain class; made remote here), one per placement bundle."""

    def __init__(self, role: str, cls: type, placement_group, num_actors: int, cpus: float,
                 gpus: float, init_args: tuple = (), env: dict | None = None):
        self.role, self.cls = role, cls
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

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
