"""Recovery in place: a dead or hung replica of any role is replaced while the run goes on, up
to ``fault.max_restarts`` times per role.

A rollout engine lost while generating the step's batch: that engine alone is replaced
(orchestrator/elastic.py; same rank and seed) and only its share of the prompts is generated
again (orchestrator/rollouts.py). Any other loss of an engine, reward or reference replica: its
group is replaced and the step under way is taken again from its start (the same prompts, drawn
again from the sampler position before it; the same sampling seed), so at depth 0 it samples
what it would have sampled; a batch generated ahead (``rl.async_rollout``) is dropped and
generated again with the current weights. New engines get the trainer's current weights before
they serve.

A trainer rank (policy, critic): its state is gone and its peers' is past any step a run could
go on from, so the role's world is rebuilt (new group, new DeepSpeed world) and every trainer
group loads the newest complete checkpoint (none yet: all are built afresh, as at the start);
the sampler, metrics and ledger go back to that step (:meth:`RunSession.rewind`), and
:class:`Rewound` tells the loop to train the steps after it again. Those redone steps replace
the abandoned ones, so the trained stream is the one an uninterrupted run sees.

``fault.inject`` (tests) kills a rank of a role as a step starts: the actor ends its own
process with SIGKILL, a real death that the driver only learns of from Ray.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager

import ray

from actors.group import RoleFailure

log = logging.getLogger(__name__)

REPLACEABLE = ("rollout", "reward", "reference")


class Rewound(Exception):
    """A trainer role was rebuilt and the run went back to the end of step ``step``."""

    def __init__(self, step: int):
        self.step = step
        super().__init__(f"rewound to step {step}")


class Recovery:
    """The replacements a run may still make, and the record of those it made. A trainer
    replacement rewinds through ``session`` (orchestrator/session.py) and ``sampler``."""

    def __init__(self, cfg, roles, session=None, sampler=None):
        self.roles = roles
        self.budget = cfg.fault.max_restarts if cfg.fault.enabled else 0
        self.session, self.sampler = session, sampler
        self.used: dict[str, int] = {}
        self.killed: dict[str, float] = {}  # role -> time.time() of a kill by fault.inject
        self.made: list[dict] = []  # for the metrics row of the next completed step
        self.logged: list[tuple[int, dict]] = []  # (step whose row holds it, record)

    def recover(self, failure: RoleFailure, step: int) -> None:
        """Replace ``failure``'s role, or re-raise the failure when it may not be (its budget
        spent, said in the message). A trainer role's replacement ends in :class:`Rewound`."""
        role = failure.role
        trainers = [g.role for g in self.roles.trainables]
        if role not in REPLACEABLE and role not in trainers:
            raise failure
        if self.used.get(role, 0) >= self.budget:
            why = (f"its {self.budget} replacement(s) (fault.max_restarts) are spent"
                   if self.budget else "no replacements in place (fault.enabled false, or "
                   "fault.max_restarts 0)")
            raise RoleFailure(failure.role, failure.rank, failure.node, failure.pid,
                              f"{failure.cause}; {why}", failure.method) from None
        self.used[role] = self.used.get(role, 0) + 1
        log.warning("%s; replacing role %s in place (%d of %d) at step %d", failure, role,
                    self.used[role], self.budget, step)
        t0 = time.perf_counter()
        record = {"role": role, "rank": failure.rank, "step": step, "cause": failure.cause}
        if role in self.killed:  # benchmarks/recovery.py times kill -> next completed step
            record["killed_at"] = self.killed.pop(role)
        if role in trainers:
            ckpt = self.session.rewind_point()
            self.roles.replace_trainers([role] if ckpt is not None else trainers, failure.method)
            rebuilt = time.perf_counter()
            back = self.session.rewind(ckpt, self.roles.trainables, self.sampler)
            record.update(seconds=time.perf_counter() - t0, rewound_to=back,
                          rebuild_seconds=rebuilt - t0, load_seconds=time.perf_counter() - rebuilt)
            # the rows of the abandoned steps are gone: what they recorded goes in a later one
            self.made = [r for s, r in self.logged if s > back] + self.made + [record]
            self.logged = [(s, r) for s, r in self.logged if s <= back]
            log.warning("role %s rebuilt in %.1fs from %s; steps %d.. are trained again", role,
                        record["seconds"], ckpt or "the run's start", back + 1)
            raise Rewound(back)
        self.roles.replace(role, failure)
        record["seconds"] = time.perf_counter() - t0
        self.made.append(record)
        log.warning("role %s replaced in %.1fs; step %d goes on", role, record["seconds"], step)

    @contextmanager
    def trainers(self, step: int):
        """Around a step: a trainer role's failure that no finer handler took (in a save, an
        evaluation) is recovered too, ending in :class:`Rewound`."""
        try:
            yield
        except RoleFailure as failure:
            if failure.role not in {g.role for g in self.roles.trainables}:
                raise
            self.recover(failure, step)

    def pop(self, step: int) -> dict:
        """The replacements not yet in a metrics row, as step ``step``'s metrics (none: an
        empty dict)."""
        if not self.made:
            return {}
        out = {"recovery": self.made,
               "recovery/seconds": sum(r["seconds"] for r in self.made)}
        self.logged += [(step, r) for r in self.made]
        self.made = []
        return out


class Injector:
    """``fault.inject``: kill a rank of a role (its process, with SIGKILL) as a step starts."""

    def __init__(self, cfg, roles, recovery: Recovery | None = None):
        self.roles, self.plan, self.recovery = roles, cfg.fault.injections(), recovery

    def before(self, step: int) -> None:
        for role, rank, at in self.plan:
            if at != step:
                continue
            group = getattr(self.roles, role)
            if group is None:
                log.warning("fault.inject: role %s is not running at step %d (a DPO reference "
                            "stops after its precompute); nothing killed", role, step)
                continue
            actor = group.actors[rank]
            log.warning("fault.inject: killing role %s rank %d at step %d", role, rank, step)
            if self.recovery is not None:
                self.recovery.killed[role] = time.time()
            ref = actor.die.remote()
            ray.wait([ref], timeout=30)  # it answers with its death
        self.plan = [p for p in self.plan if p[2] != step]  # once, even if the step is redone
