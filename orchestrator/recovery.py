"""Recovery in place for the online loop: a dead or hung rollout engine, reward or reference
replica is replaced while the run goes on, up to ``fault.max_restarts`` times per role.

What a replacement costs the run: the step under way is taken again from its start (the same
prompts, drawn again from the sampler position before it; the same sampling seed), so at
depth 0 it samples what it would have sampled; a batch generated ahead (``rl.async_rollout``)
is dropped and generated again with the current weights. New engines get the trainer's current
weights before they serve. A trainer rank (policy, critic) is not replaced here: its failure
ends the run as before (orchestrator/session.py), as does a role whose budget is spent.

``fault.inject`` (tests) kills rank 0 of a role as a step starts: the actor ends its own
process with SIGKILL, a real death that the driver only learns of from Ray.
"""
from __future__ import annotations

import logging
import time

import ray

from actors.group import RoleFailure

log = logging.getLogger(__name__)

REPLACEABLE = ("rollout", "reward", "reference")


class Recovery:
    """The replacements a run may still make, and the record of those it made."""

    def __init__(self, cfg, roles):
        self.roles, self.budget = roles, cfg.fault.max_restarts
        self.used: dict[str, int] = {}
        self.made: list[dict] = []  # this step's, for its metrics row

    def recover(self, failure: RoleFailure, step: int) -> None:
        """Replace ``failure``'s role, or re-raise the failure when it cannot be (a trainer
        role) or may not be (its budget spent, said in the message)."""
        role = failure.role
        if role not in REPLACEABLE:
            raise failure
        if self.used.get(role, 0) >= self.budget:
            raise RoleFailure(failure.role, failure.rank, failure.node, failure.pid,
                              f"{failure.cause}; its {self.budget} replacement(s) "
                              f"(fault.max_restarts) are spent", failure.method) from None
        self.used[role] = self.used.get(role, 0) + 1
        log.warning("%s; replacing role %s in place (%d of %d) at step %d", failure, role,
                    self.used[role], self.budget, step)
        t0 = time.perf_counter()
        self.roles.replace(role)
        seconds = time.perf_counter() - t0
        log.warning("role %s replaced in %.1fs; step %d goes on", role, seconds, step)
        self.made.append({"role": role, "rank": failure.rank, "step": step,
                          "cause": failure.cause, "seconds": seconds})

    def pop(self) -> dict:
        """This step's replacements as metrics (none: an empty dict)."""
        if not self.made:
            return {}
        out = {"recovery": self.made,
               "recovery/seconds": sum(r["seconds"] for r in self.made)}
        self.made = []
        return out


class Injector:
    """``fault.inject``: kill rank 0 of a role (its process, with SIGKILL) as a step starts."""

    def __init__(self, cfg, roles):
        self.roles, self.plan = roles, cfg.fault.injections()

    def before(self, step: int) -> None:
        for role, at in self.plan:
            if at != step:
                continue
            actor = getattr(self.roles, role).actors[0]
            log.warning("fault.inject: killing role %s rank 0 at step %d", role, step)
            ref = actor.die.remote()
            ray.wait([ref], timeout=30)  # it answers with its death
        self.plan = [(r, s) for r, s in self.plan if s != step]  # once, even if the step is redone
