"""Elastic rollout engines: the number of engines of an online run may change while it runs.

The engines wanted are ``rollout.actors`` at the start; ``rayalign scale RUN_DIR --rollout N``
(or :func:`scale` from Python) writes a new count to ``RUN_DIR/scale.json``, which the run reads
as each step starts. Each engine sits in a slot: one bundle of the role's placement group for
the first ``rollout.actors``, a placement group of its own for each engine added later (removed
with it). Growing fills free slots and asks Ray for new bundles; shrinking removes the engines
added last first. A change drops a batch generated ahead (it is drawn and generated again, so no
sample is lost) and rebuilds the weight-sync group with the engines now present, which get the
trainer's current weights.

A dead engine (outside a weight sync, which replaces all of them: orchestrator/roles.py) is
taken out alone and a new one started in its slot, with its rank (and so its sampling seed).
When no capacity is left for it (a lost node), the run goes on with the engines it has, logged
as degraded; the bundle asked for stays pending, which is what Ray's autoscaler acts on, and
the engine joins as the first step starts after the bundle is held.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group

log = logging.getLogger(__name__)

SCALE_FILE = "scale.json"


def scale(run_dir: str | Path, rollout: int) -> Path:
    """Ask the run in ``run_dir`` for ``rollout`` engines from its next step on; the file."""
    if not isinstance(rollout, int) or rollout < 1:
        raise ValueError(f"rollout: {rollout!r}; a run needs at least 1 engine")
    if not Path(run_dir).is_dir():
        raise ValueError(f"{run_dir}: no such run dir (give the run's run_dir as its driver "
                         f"sees it)")
    path = Path(run_dir) / SCALE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rollout": rollout}) + "\n")
    os.replace(tmp, path)  # whole or not at all for a reader
    return path


def wanted(run_dir: Path, default: int) -> int:
    """The engine count ``scale.json`` asks for, else ``default``; a file it cannot read is
    logged and ignored."""
    path = Path(run_dir) / SCALE_FILE
    if not path.is_file():
        return default
    try:
        n = json.loads(path.read_text())["rollout"]
        if isinstance(n, int) and n >= 1:
            return n
        raise ValueError(f"rollout must be an integer >= 1, got {n!r}")
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("%s: ignored (%s); write it with `rayalign scale RUN_DIR --rollout N`",
                    path, exc)
        return default


def _held(pg, wait_s: float) -> bool:
    """Whether the placement group's bundles are reserved, waiting up to ``wait_s``. (Read from
    the placement group table: ``pg.ready()`` starts a task in the bundle each time it is
    called, whose worker may take longer to start than a step.)"""
    from ray.util import placement_group_table
    deadline = time.monotonic() + wait_s
    while True:
        if placement_group_table(pg).get("state") == "CREATED":
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


@dataclass
class Slot:
    """Where one engine runs: a bundle of a placement group, and the engine's rank (its
    sampling seed). ``own``: the placement group is this slot's alone."""
    pg: object
    bundle: int
    rank: int
    own: bool
    actor: object | None = None
    lost: object | None = None  # the engine this slot held before it was lost


class ElasticRollout:
    """The rollout group's slots and its reconciliation with the wanted engine count."""

    def __init__(self, cfg, roles, run_dir: Path, fresh: bool = True):
        """``fresh``: a run from step 0, for which a scale.json left by an earlier run in the
        same dir does not count (a resumed run keeps the count it was scaled to)."""
        self.cfg, self.roles, self.run_dir = cfg, roles, Path(run_dir)
        if fresh:
            (self.run_dir / SCALE_FILE).unlink(missing_ok=True)
        self.want = cfg.rollout.actors
        self.slots: list[Slot] = []
        self.next_rank = cfg.rollout.actors
        self._said: tuple | None = None
        self.fixed = getattr(roles, "hybrid", False)  # the policy's ranks generate
        self.adopt()

    def adopt(self) -> None:
        """Take the rollout group as it is now (started, or replaced whole): its engines in the
        role's bundles; slots of added engines are emptied (their placement is kept)."""
        if self.fixed:
            return
        group = self.roles.rollout
        own = [s for s in self.slots if s.own]
        for s in own:
            s.actor = None
        self.slots = [Slot(group.placement_group, i, i, False, a)
                      for i, a in enumerate(group.actors)] + own

    def lose(self, rank: int) -> None:
        """Take out the engine at ``rank`` of the group (dead or hung); its slot is free."""
        group = self.roles.rollout
        actor = group.actors[rank]
        group.drop(actor)
        for s in self.slots:
            if s.actor is actor:
                s.actor, s.lost = None, actor

    def successor(self, actor):
        """The engine started in the slot that ``actor`` (lost) held; None if none yet."""
        for s in self.slots:
            if s.lost is actor and s.actor is not None:
                return s.actor
        return None

    def metrics(self) -> dict:
        if self.fixed:
            return {}
        return {"rollout/engines": len(self.roles.rollout), "rollout/engines_wanted": self.want}

    def reconcile(self, wait_s: float = 0.0) -> bool:
        """Start or stop engines toward the wanted count (waiting up to ``wait_s`` for a bundle
        to be held); True if the engines changed (the caller drops batches generated ahead)."""
        cfg, group = self.cfg, self.roles.rollout
        if self.fixed:
            if wanted(self.run_dir, self.want) != self.want:
                self._say(("fixed",), "rollout: the hybrid engine generates on the policy's "
                          "%d rank(s); rayalign scale does not apply", len(group))
            return False
        self.want = wanted(self.run_dir, self.want)
        live = [s for s in self.slots if s.actor is not None]
        if self.want != len(live) and getattr(cfg.rollout, "colocate_with", None):
            self._say(("colocated",), "rollout: %d engine(s) wanted, %d run; engines colocated "
                      "with %s keep their count", self.want, len(live), cfg.rollout.colocate_with)
            return False
        stopped = self._shrink(live) if self.want < len(live) else 0
        started = self._grow(self.want - len(live), wait_s) if self.want > len(live) else []
        if started:
            try:
                ray.get([a.workers.remote() for a in started],
                        timeout=cfg.fault.deadline_s)  # the engines are up
            except Exception as exc:  # noqa: BLE001  (a new engine that cannot start)
                for slot in self.slots:
                    if slot.actor in started:
                        group.drop(slot.actor)
                        slot.actor = None
                log.error("rollout: new engine(s) failed to start (%s); going on with %d",
                          exc, len(group))
                started = []
        if not (started or stopped):
            self._report()
            return False
        self.roles.connect_engines(group)
        self.roles.sync()
        log.info("rollout: %d engine(s) now (%d started, %d stopped; %d wanted)", len(group),
                 len(started), stopped, self.want)
        self._report()
        return True

    def _shrink(self, live: list[Slot]) -> int:
        """Stop the engines added last first (their placement groups go with them)."""
        extra = len(live) - self.want
        for slot in sorted(live, key=lambda s: (s.own, s.rank), reverse=True)[:extra]:
            self.roles.rollout.drop(slot.actor)
            slot.actor = None
        for slot in [s for s in self.slots if s.own and s.actor is None]:
            remove_placement_group(slot.pg)  # unused, or pending: the request is withdrawn
            self.slots.remove(slot)
        return extra

    def _grow(self, missing: int, wait_s: float) -> list:
        """Fill free slots, asking for new bundles where none is free; the engines started
        (those whose bundle is held within ``wait_s``)."""
        rc = self.cfg.rollout
        free = [s for s in self.slots if s.actor is None]
        while len(free) < missing:
            bundle = {"CPU": rc.cpus, **({"GPU": rc.gpus} if rc.gpus else {})}
            pg = placement_group([bundle], strategy="PACK", name=f"rayalign-rollout-{self.next_rank}")
            slot = Slot(pg, 0, self.next_rank, True)
            self.next_rank += 1
            self.slots.append(slot)
            free.append(slot)
        started = []
        for slot in free[:missing]:
            if not _held(slot.pg, wait_s):
                continue
            slot.actor = self.roles.rollout.add(slot.rank, self.want, slot.pg, slot.bundle)
            started.append(slot.actor)
        return started

    def _report(self) -> None:
        have = len(self.roles.rollout)
        if have < self.want:
            self._say(("degraded", have, self.want), "rollout: degraded, %d of %d engine(s) "
                      "running; the missing bundles are asked for (an autoscaler may add "
                      "nodes) and their engines join as a step starts once they are held",
                      have, self.want)
        else:
            self._said = None

    def _say(self, key: tuple, msg: str, *args) -> None:
        if self._said != key:  # once per state, not every step
            log.warning(msg, *args)
            self._said = key

    def release(self) -> None:
        """Remove the placement groups of added engines (at the end of the run)."""
        for slot in self.slots:
            if slot.own:
                remove_placement_group(slot.pg)
        self.slots = [s for s in self.slots if not s.own]
