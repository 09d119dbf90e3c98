"""What every training loop does around its steps, offline or online: find where to resume,
restore or evaluate the starting model, log each step (metrics.jsonl, TensorBoard, progress
bar), evaluate and checkpoint on schedule, and at the end evaluate, save and report.

A loop owns its steps and hands each finished one to :meth:`RunSession.end_step`::

    session = RunSession(cfg, storage)
    step = session.restore(trainables, sampler)
    session.begin(evaluate)
    while step < cfg.train.max_steps:
        ...                                        # one step of the algorithm
        step += 1
        session.end_step(step, row, sampler.state_dict(), postfix)
    return session.finish(sampler.state_dict(), data_notes)
"""
from __future__ import annotations

import gc
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from orchestrator.checkpoint import CheckpointManager, restore_run, resume_dir, save_run
from orchestrator.metrics import MetricsLog
from orchestrator.storage import RunStorage

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished run hands back to a driver script."""
    run_dir: Path
    steps: int
    checkpoint: Path
    model_dir: Path
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    data: list[str] = field(default_factory=list)
    resumed_from: Path | None = None
    # per role: replicas, CPUs and GPUs per replica, seconds held, peak resident MiB
    usage: dict = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"run {self.run_dir}: {self.steps} steps, model in {self.model_dir}"]
        for key, value in self.after.items():
            if key in self.before and isinstance(value, (int, float)) and math.isfinite(value):
                lines.append(f"  {key:<22} {self.before[key]:8.3f} -> {value:8.3f}")
        if "eval/sample" in self.after:
            lines.append(f"  sample after training: {self.after['eval/sample'][:120]!r}")
        lines += [f"  data {d}" for d in self.data]
        return "\n".join(lines)


class RunSession:
    """The run dir, its checkpoints and metrics, and the schedule of evals and saves."""

    def __init__(self, cfg, storage: RunStorage | None = None):
        self.cfg = cfg
        self.storage = storage or RunStorage(cfg.run_dir)
        self.run_dir = self.storage.local_dir
        self.ckpts = CheckpointManager(self.run_dir, cfg.checkpoint.keep, self.storage)
        self.ckpts.clear_partial()
        self.resume = resume_dir(cfg.checkpoint.resume, self.ckpts)
        self.step, self.last_ckpt = 0, None

    def restore(self, trainables: list, sampler) -> int:
        """Load the resume checkpoint (if any) into the trainer groups and the sampler; the
        step to continue after (0 for a fresh run)."""
        self.trainables, self.before = trainables, None
        if self.resume is not None:
            self.step, self.before = restore_run(self.resume, trainables, sampler, self.ckpts)
        return self.step

    def begin(self, evaluate: Callable[[int], dict]) -> None:
        """Open the metrics (a resumed run keeps its past lines) and evaluate the starting
        model, unless the resumed checkpoint holds that evaluation already."""
        self.evaluate = evaluate
        self.metrics = MetricsLog(self.run_dir, self.cfg.log.tensorboard,
                                  resume_step=self.step, storage=self.storage)
        if self.before is None:
            self.before = evaluate(0)
            self.metrics.log(0, self.before)
        self.bar = tqdm(total=self.cfg.train.max_steps, initial=self.step, unit="step",
                        desc=self.cfg.algorithm, disable=not self.cfg.log.progress_bar,
                        dynamic_ncols=True)
        # what exists now (imported libraries, the data) lives for the whole run: keep it out
        # of the garbage collector's full passes, each of which would otherwise walk it and
        # stall the driver for a few hundred ms in the middle of a step
        gc.collect()
        gc.freeze()

    def end_step(self, step: int, row: dict, sampler_state: dict, postfix: dict) -> None:
        """Evaluate (on schedule, not at the last step: :meth:`finish` does), log the step's
        row, advance the bar, checkpoint on schedule with ``sampler_state`` (the sampler as a
        resume must find it)."""
        cfg, self.step = self.cfg, step
        if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.max_steps:
            row.update(self.evaluate(step))
        self.metrics.log(step, row)
        self.bar.update(1)
        self.bar.set_postfix(postfix)
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            self.save(sampler_state)

    def save(self, sampler_state: dict) -> Path:
        self.last_ckpt = save_run(self.ckpts, self.trainables, self.step, sampler_state,
                                  self.before)
        self.metrics.sync()
        return self.last_ckpt

    def finish(self, sampler_state: dict, data_notes: list[str]) -> TrainResult:
        """Evaluate the trained model, save the final checkpoint unless the last step's is
        it, and report."""
        self.bar.close()
        gc.unfreeze()  # the next run in this process (a pipeline's next stage) freezes its own
        after = self.evaluate(self.step)
        self.metrics.log(self.step, {f"final/{k}": v for k, v in after.items()})
        self.metrics.close()
        if self.last_ckpt is None or not self.last_ckpt.name.endswith(f"{self.step:07d}"):
            self.save(sampler_state)
        result = TrainResult(self.run_dir, self.step, self.last_ckpt, self.last_ckpt / "model",
                             self.before, after, data_notes, self.resume)
        log.info("%s", result.summary())
        return result
