"""A step's generation handed back as it finishes (``rollout.stream_groups``).

Each engine gets its share of the step's prompts as a call to ``generate_stream`` (a generator
method, actors/rollout.py), which yields every ``stream_groups`` prompts whose samples are all
done. The driver reads the parts as they arrive, from whichever engine has one, and starts
their scoring at once (orchestrator/rollouts.py), so reward, reference and pre-update
log-probs of the prompts that finished early run while the engines sample the long ones.

The waits keep the rules of a group call (actors/group.py ``wait_calls``): an engine that
dies is named as soon as it is seen, one that does not finish its share within its deadline
(``rollout.deadline_s`` plus ``fault.deadline_per_row_s`` a prompt) is named for that, and an
engine's own error propagates. What an engine handed back before it failed is kept: only the
prompts it had not answered are given to another engine (:meth:`StreamedGeneration.reissue`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import ray

from actors.group import RoleFailure, death_cause, split_even

METHOD = "generate_stream"


@dataclass
class Share:
    """One engine's part of a step: the batch positions of its prompts and its stream."""
    engine: object
    positions: list[int]
    gen: object                       # Ray's ObjectRefGenerator of the call
    allowed: float                    # seconds it may take
    end: float                        # its deadline (time.monotonic)
    answered: set = field(default_factory=set)
    open: bool = True                 # the engine may yield more

    def unanswered(self) -> list[int]:
        return [p for p in self.positions if p not in self.answered]


class StreamedGeneration:
    """The streams of one step's batch: ``prompts`` (token ids, in batch order) split over the
    rollout group's engines. vLLM engines seed a prompt by its batch position, so a prompt
    sampled again by an engine of the same rank samples the same; the hf engine seeds a call
    as a whole, so a prompt sampled again in a smaller call samples anew."""

    def __init__(self, group, prompts: list[list[int]], sampling: dict, groups: int):
        self.group, self.prompts, self.sampling, self.groups = group, prompts, sampling, groups
        self.shares: list[Share] = []
        positions = list(range(len(prompts)))
        for engine, part in zip(group.actors, split_even(positions, len(group))):
            self.start(engine, part)

    def start(self, engine, positions: list[int]) -> None:
        """Give ``engine`` the prompts at ``positions``."""
        gen = self.group.stream(engine, METHOD, [self.prompts[p] for p in positions],
                                self.sampling, self.groups, positions)
        wait = self.group.deadline_s + self.group.deadline_per_row_s * len(positions)
        self.shares.append(Share(engine, positions, gen, wait, time.monotonic() + wait))

    def done(self) -> bool:
        return not any(s.open for s in self.shares)

    def parts(self, until: list = ()) -> Iterator[tuple[list[int], list]]:
        """``(positions, samples)`` as engines hand them back, until every share is done or,
        with ``until``, every ref of it is ready (more parts are read on a later call)."""
        waiting = list(until)
        while not self.done():
            if until:
                waiting = ray.wait(waiting, num_returns=len(waiting), timeout=0,
                                   fetch_local=False)[1]
                if not waiting:
                    return
            live, now = [s for s in self.shares if s.open], time.monotonic()
            # late: past its deadline with nothing to read (a part, or its end, may have come
            # in while the driver waited on something else)
            late = [s for s in live if s.end <= now]
            if late:
                ready = ray.wait([s.gen for s in late], num_returns=len(late), timeout=0,
                                 fetch_local=False)[0]
                late = [s for s in late if not any(r is s.gen for r in ready)]
            if late:
                raise self._failure(late[0], f"no answer within {late[0].allowed:.0f}s (hung, "
                                             f"or slower than rollout.deadline_s allows)")
            ready, _ = ray.wait([s.gen for s in live] + waiting, num_returns=1,
                                timeout=max(0.0, min(s.end for s in live) - now),
                                fetch_local=False)
            for share in (s for s in live if any(r is s.gen for r in ready)):
                try:
                    positions, samples = ray.get(next(share.gen))
                except StopIteration:
                    share.open = False
                    continue
                except ray.exceptions.RayActorError as exc:
                    raise self._failure(share, death_cause(exc)) from None
                share.answered.update(positions)
                yield positions, samples

    def reissue(self, heir_of) -> int:
        """After the rollout role was recovered: give the prompts that engines no longer in
        the group left unanswered to ``heir_of(engine)`` (its replacement), else to the
        engine now at the share's place; how many prompts that is."""
        moved, actors = 0, self.group.actors
        for k, share in enumerate(list(self.shares)):
            if share.engine in actors or not share.open:
                continue
            share.open = False
            todo = share.unanswered()
            if todo:
                self.start(heir_of(share.engine) or actors[k % len(actors)], todo)
                moved += len(todo)
        return moved

    def _failure(self, share: Share, cause: str) -> RoleFailure:
        if share.engine in self.group.actors:
            return self.group.failure(self.group.actors.index(share.engine), cause, METHOD)
        return RoleFailure(self.group.role, "?", "?", "?", f"{cause} (an engine since taken "
                                                           f"out of the group)", METHOD)
