"""Checkpoint directories: written atomically, rotated, found again on resume.

A checkpoint is written into ``<run>/checkpoints/.tmp-step-N``; only when every part is in
(model, optimizer, scheduler, RNG, sampler position, step) does the driver write the
``COMPLETE`` marker and rename the directory to ``step-N``. A directory without the marker
(a crash mid-write) is never resumed from and is cleared at the next start.

When ``run_dir`` is a URI (orchestrator/storage.py) the same happens in a local staging dir,
and each committed checkpoint is uploaded marker-last; trainer replicas on other nodes than
the driver's upload the files they wrote themselves, and fetch a checkpoint before loading.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from orchestrator.storage import MARKER, RunStorage

log = logging.getLogger(__name__)
DRIVER_STATE = "driver_state.json"


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep: int, storage: RunStorage | None = None):
        self.storage = storage or RunStorage(str(run_dir))
        self.root = self.storage.local_dir / "checkpoints"
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)

    def remote(self, ckpt: Path) -> tuple[str, str, str] | None:
        """What a trainer replica needs to upload or fetch ``ckpt`` itself: (run URI, the
        checkpoint's path in the run, the driver's node IP); None for a local run dir."""
        if not self.storage.remote:
            return None
        import ray
        final = f"step-{ckpt.name.rsplit('-', 1)[1]}"
        return self.storage.uri, f"checkpoints/{final}", ray.util.get_node_ip_address()

    def begin(self, step: int) -> Path:
        """A fresh temporary dir for the checkpoint of ``step``."""
        tmp = self.root / f".tmp-step-{step:07d}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, step: int, driver_state: dict) -> Path:
        """Write the driver state and the marker, then rename into place and rotate."""
        with open(tmp / DRIVER_STATE, "w") as fh:
            json.dump(driver_state, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        (tmp / MARKER).write_text(str(step))
        final = self.root / f"step-{step:07d}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        self.storage.commit_dir(f"checkpoints/{final.name}", MARKER)
        self._rotate()
        log.info("checkpoint saved: %s", final)
        return final

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        found = [p for p in self.root.glob("step-*") if (p / MARKER).is_file()]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def latest(self) -> Path | None:
        if self.storage.remote:
            self.storage.pull_latest("checkpoints", MARKER)
        done = self.complete()
        return done[-1] if done else None

    def clear_partial(self) -> None:
        for p in self.root.glob(".tmp-step-*"):
            log.warning("removing half-written checkpoint %s", p)
            shutil.rmtree(p, ignore_errors=True)
        if self.storage.remote:
            self.storage.clear_partial("checkpoints", MARKER)

    def _rotate(self) -> None:
        for old in self.complete()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        if self.storage.remote:
            self.storage.rotate("checkpoints", self.keep, MARKER)


def read_driver_state(ckpt: Path) -> dict:
    if not (ckpt / MARKER).is_file():
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint (no {MARKER} marker)")
    return json.loads((ckpt / DRIVER_STATE).read_text())


def resume_dir(spec: str, ckpts: CheckpointManager) -> Path | None:
    """Where ``checkpoint.resume`` says to continue from: 'never', 'auto' (newest complete
    checkpoint of the run) or a checkpoint dir."""
    from orchestrator.schema import ConfigError
    if spec == "never":
        return None
    if spec == "auto":
        return ckpts.latest()
    path = Path(spec)
    if not (path / MARKER).is_file():
        raise ConfigError(f"checkpoint.resume: {path} is not a complete checkpoint dir")
    return path


def save_run(ckpts: CheckpointManager, trainables: list, step: int, sampler_state: dict,
             before: dict) -> Path:
    """Everything a run needs to continue: the state of each trainable group (policy, critic:
    model, optimizer, scheduler, RNG, HF model dir) and the driver's (step, sampler position,
    first eval)."""
    tmp = ckpts.begin(step)
    for group in trainables:
        group.run("save", str(tmp), ckpts.remote(tmp))
    return ckpts.commit(tmp, step, {"step": step, "sampler": sampler_state,
                                    "before": before})


def restore_run(ckpt: Path, trainables: list, sampler,
                ckpts: CheckpointManager | None = None) -> tuple[int, dict | None]:
    """Load a checkpoint written by :func:`save_run`; returns (step, first eval)."""
    state = read_driver_state(ckpt)
    remote = ckpts.remote(ckpt) if ckpts is not None else None
    for group in trainables:
        group.run("load", str(ckpt), remote)
    sampler.load_state_dict(state["sampler"])
    log.info("resumed from %s at step %d", ckpt, state["step"])
    return state["step"], state.get("before")
