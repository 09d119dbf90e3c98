"""What every training loop does around its steps, offline or online: find where to resume,
restore or evaluate the starting model, log each step (metrics.jsonl, the trackers, progress
bar), evaluate and checkpoint on schedule, and at the end evaluate, save and report.

A loop owns its steps and hands each finished one to :meth:`RunSession.end_step`::

    session = RunSession(cfg, storage)
    step = session.restore(trainables, sampler)
    session.begin(evaluate)
    with session.steps():                          # a role failure: checkpoint if it can, explain
        while step < cfg.train.max_steps:
            ...                                    # one step of the algorithm
            session.update_started()               # just before the trainers' update
            ...
            step += 1
            session.end_step(step, row, sampler.state_dict(), postfix)
        return session.finish(sampler.state_dict(), data_notes)

A stop request (SIGTERM, SIGINT, ``fault.preempt_file``) ends the run after the current step
with a checkpoint and :class:`RunStopped`; a role failure ends it with :class:`RunFailed`.
"""
from __future__ import annotations

import gc
import logging
import math
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from orchestrator.checkpoint import CheckpointManager, restore_run, resume_dir, save_run
from orchestrator.metrics import MetricsLog
from orchestrator.progress import bar, shown
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


class RunStopped(Exception):
    """The run was asked to stop (SIGTERM, SIGINT, a preemption file) and stopped cleanly after
    a step, with a checkpoint of it: re-running the same command resumes there."""

    def __init__(self, step: int, checkpoint: Path, why: str):
        self.step, self.checkpoint, self.why = step, checkpoint, why
        super().__init__(f"stopped on {why} after step {step}; checkpoint {checkpoint}; run the "
                         f"same command again to resume from it")


class RunFailed(RuntimeError):
    """A role failed (died, or hung past its deadline); what was saved and where to resume."""

    def __init__(self, failure: Exception, resume_from: Path | None, saved: bool):
        self.failure, self.resume_from, self.saved = failure, resume_from, saved
        where = ("checkpoint of the last completed step written: " if saved
                 else "resume point: the newest checkpoint, ") if resume_from else ""
        tail = (f"{where}{resume_from}; run the same command again to resume from it"
                if resume_from else "no checkpoint yet; running the same command again starts over")
        super().__init__(f"{failure}. {tail}")


class RunSession:
    """The run dir, its checkpoints and metrics, and the schedule of evals and saves."""

    def __init__(self, cfg, storage: RunStorage | None = None):
        self.cfg = cfg
        self.storage = storage or RunStorage(cfg.run_dir)
        self.storage.progress = shown(cfg)  # a bar on checkpoint uploads
        self.run_dir = self.storage.local_dir
        self.ckpts = CheckpointManager(self.run_dir, cfg.checkpoint.keep, self.storage)
        self.ckpts.clear_partial()
        self.resume = resume_dir(cfg.checkpoint.resume, self.ckpts)
        self.step, self.last_ckpt = 0, None
        self.sampler_state: dict | None = None  # the sampler as a checkpoint of self.step needs
        self.updating = False     # a trainer update past self.step has begun (state not at step)
        self.pending: tuple | None = None  # (step, sampler state) of an update not yet ended
        self.stop_why: str | None = None
        self._handlers: dict = {}

    def restore(self, trainables: list, sampler) -> int:
        """Load the resume checkpoint (if any) into the trainer groups and the sampler; the
        step to continue after (0 for a fresh run)."""
        self.trainables, self.before = trainables, None
        if self.resume is not None:
            self.step, self.before = restore_run(self.resume, trainables, sampler, self.ckpts)
            self.last_ckpt = self.resume
        self.sampler_state = sampler.state_dict()
        self.start_state = (self.step, self.sampler_state)  # where a rewind without checkpoints goes
        return self.step

    def rewind_point(self) -> Path | None:
        """The checkpoint a run that lost a trainer rank goes back to: the newest complete one
        (this run's, else the one it resumed from); None: the run's start."""
        self.ckpts.clear_partial()  # a save the failure broke off
        return self.ckpts.latest() or self.resume

    def rewind(self, ckpt: Path | None, trainables: list, sampler) -> int:
        """Go back to ``ckpt`` (:meth:`rewind_point`): its state into every trainer group (the
        replaced and the surviving ones) and the sampler, the metrics and the ledger cut back
        to its step; None: the run's start (the groups are then freshly built). The steps
        after it are trained again, replacing the abandoned ones. Returns its step."""
        if ckpt is not None:
            step, _ = restore_run(ckpt, trainables, sampler, self.ckpts)
        else:
            step, state = self.start_state
            sampler.load_state_dict(state)
        self.trainables = trainables
        self.step, self.sampler_state, self.last_ckpt = step, sampler.state_dict(), ckpt
        self.updating, self.pending = False, None
        self.metrics.rewind(step)
        self.bar.n = step
        self.bar.refresh()
        return step

    def begin(self, evaluate: Callable[[int], dict]) -> None:
        """Open the metrics (a resumed run keeps its past lines) and evaluate the starting
        model, unless the resumed checkpoint holds that evaluation already."""
        self.evaluate = evaluate
        self.metrics = MetricsLog(self.run_dir, self.cfg.log.trackers, resume_step=self.step,
                                  storage=self.storage, config=self.cfg.to_dict(),
                                  log_cfg=self.cfg.log)
        if self.before is None:
            self.before = evaluate(0)
            self.metrics.log(0, self.before)
        # named by the run dir too: a pipeline's stage runs in <pipeline>/<stage name>
        self.bar = bar(self.cfg, self.cfg.train.max_steps,
                       f"{self.run_dir.name} ({self.cfg.algorithm})", "step", initial=self.step)
        # what exists now (imported libraries, the data) lives for the whole run: keep it out
        # of the garbage collector's full passes, each of which would otherwise walk it and
        # stall the driver for a few hundred ms in the middle of a step
        gc.collect()
        gc.freeze()
        self._catch_signals()

    # ---- stopping on request ---------------------------------------------------------------
    def _catch_signals(self) -> None:
        """SIGTERM (``ray job stop``, preemption, a scheduler's limit) and SIGINT ask for a
        clean stop after the current step; a second one stops at once."""
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only (a run inside a task or a thread)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.stop_why is not None:  # the second: stop now, as without the handler
            self._restore_signals()
            log.warning("%s again: stopping at once, without a checkpoint", name)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.stop_why = name
        log.warning("%s: stopping after the current step (with a checkpoint); send it again to "
                    "stop at once", name)

    def _restore_signals(self) -> None:
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)
        self._handlers = {}

    def _stop_requested(self) -> str | None:
        preempt = self.cfg.fault.preempt_file
        if self.stop_why is None and preempt and Path(preempt).exists():
            self.stop_why = f"preemption notice {preempt}"
        if self.stop_why is None and self.cfg.fault.stop_on_drain:
            self.stop_why = self._drain_notice()
        return self.stop_why

    def _drain_notice(self) -> str | None:
        """Why to stop when Ray drains a node that holds the driver or a trainer rank (whose
        state a replacement could not keep); engines, reward and reference are replaced in
        place when their node goes, as for any other failure."""
        import ray

        from orchestrator.placement import draining, nodes_of
        if not ray.is_initialized():
            return None
        found = draining(lambda: nodes_of(getattr(self, "trainables", [])))
        if not found:
            return None
        node, left = sorted(found.items())[0]
        when = "no deadline given" if left is None else f"deadline in {left:.0f}s"
        log.warning("Ray is draining node %s (%s), which holds this run's driver or trainers: "
                    "stopping after the current step (with a checkpoint)", node, when)
        return f"node {node} is being drained ({when})"

    # ---- failures ----------------------------------------------------------------------------
    def update_started(self) -> None:
        """A trainer update past the last completed step has begun: until it is done, a failure
        cannot checkpoint the trainers as they were at that step."""
        self.updating = True

    def update_done(self, step: int, sampler_state: dict, rows: list | None = None,
                    samples_per_row: int = 1, dropped: list | None = None) -> None:
        """The trainers finished step ``step``'s update on dataset ``rows`` (before its weight
        sync and its :meth:`end_step`): the ledger records the rows now (and those drawn but
        ``dropped``), and a failure from here on checkpoints that step."""
        self.updating, self.pending = False, (step, sampler_state)
        if rows is not None:
            self.metrics.log_rows(step, rows, samples_per_row, dropped)

    @contextmanager
    def steps(self):
        """Around a loop's steps: a role failure ends the run with a checkpoint of the last
        completed step where the trainers still hold it (not after a trainer died, or while an
        update was under way), else with the newest checkpoint on disk as the resume point;
        :class:`RunFailed` says which, with the role at fault."""
        from actors.group import RoleFailure
        ended = "failed"
        try:
            yield
            ended = "finished"
        except RunStopped:
            ended = "stopped"
            raise
        except RoleFailure as failure:
            log.error("%s", failure)
            trainer_roles = {g.role for g in self.trainables}
            if self.pending is not None:  # the update of a step whose sync or eval failed
                self.step, self.sampler_state = self.pending
            saved = False
            if failure.role not in trainer_roles and not self.updating and self.step > 0 \
                    and not self._saved_at(self.step):
                try:
                    self.save(self.sampler_state)
                    saved = True
                except Exception as exc:  # noqa: BLE001  (the failure below is the news)
                    log.error("checkpoint after the failure failed too: %s", exc)
            resume = self.last_ckpt if saved else self.ckpts.latest()
            raise RunFailed(failure, resume, saved) from None
        finally:
            self._restore_signals()  # whatever ended the steps, the handlers were this run's
            self.metrics.close(ended)  # (done already where finish or a stop closed it)

    def _saved_at(self, step: int) -> bool:
        return self.last_ckpt is not None and self.last_ckpt.name.endswith(f"{step:07d}")

    def end_step(self, step: int, row: dict, sampler_state: dict, postfix: dict) -> None:
        """Evaluate (on schedule, not at the last step: :meth:`finish` does), log the step's
        row, advance the bar, checkpoint on schedule with ``sampler_state`` (the sampler as a
        resume must find it)."""
        cfg, self.step = self.cfg, step
        self.sampler_state, self.updating, self.pending = sampler_state, False, None
        if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.max_steps:
            row.update(self.evaluate(step))
        self.metrics.log(step, row)
        self.bar.update(1)
        self.bar.set_postfix(postfix)
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            self.save(sampler_state)
        why = self._stop_requested()
        if why is not None and step < cfg.train.max_steps:
            if not self._saved_at(step):
                self.save(sampler_state)
            self.bar.close()
            self.metrics.close("stopped")
            self._restore_signals()
            gc.unfreeze()
            raise RunStopped(step, self.last_ckpt, why)

    def save(self, sampler_state: dict) -> Path:
        self.last_ckpt = save_run(self.ckpts, self.trainables, self.step, sampler_state,
                                  self.before)
        self.metrics.sync()
        return self.last_ckpt

    def finish(self, sampler_state: dict, data_notes: list[str]) -> TrainResult:
        """Evaluate the trained model, save the final checkpoint unless the last step's is
        it, and report."""
        self.bar.close()
        self._restore_signals()
        gc.unfreeze()  # the next run in this process (a pipeline's next stage) freezes its own
        after = self.evaluate(self.step)
        self.metrics.log(self.step, {f"final/{k}": v for k, v in after.items()})
        self.metrics.summary(after)
        self.metrics.close()
        if self.last_ckpt is None or not self.last_ckpt.name.endswith(f"{self.step:07d}"):
            self.save(sampler_state)
        result = TrainResult(self.run_dir, self.step, self.last_ckpt, self.last_ckpt / "model",
                             self.before, after, data_notes, self.resume)
        log.info("%s", result.summary())
        return result
