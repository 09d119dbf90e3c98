"""Per-step metrics: one JSON line per step in metrics.jsonl, the experiment trackers
(orchestrator/trackers.py), and phase timing."""
from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path

from orchestrator import trackers

log = logging.getLogger(__name__)


# what a run dir holds besides checkpoints (W&B's and MLflow's local files included)
FILES = ("metrics.jsonl", "ledger.jsonl", "tensorboard", trackers.IDS_FILE, "wandb", "mlflow.db",
         "mlruns")


class MetricsLog:
    """metrics.jsonl (one line per step), ledger.jsonl (the dataset rows each step trained
    on: step, rows, samples per row) and the trackers of ``log.trackers``."""

    def __init__(self, run_dir: str | Path, kinds: list[str] | tuple = (), resume_step: int = 0,
                 storage=None, config: dict | None = None, log_cfg=None):
        """A fresh run (``resume_step`` 0) starts the files anew; a resumed one keeps their
        past up to its step, so that steps redone after a resume replace the abandoned ones.
        With a remote ``storage`` (orchestrator/storage.py) the files are fetched on resume
        and uploaded by :meth:`sync`. ``kinds`` are the trackers to open (``config`` is the
        run config they record, ``log_cfg`` the ``log`` section that names their runs)."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self.ledger = Path(run_dir) / "ledger.jsonl"
        self.storage = storage if storage is not None and storage.remote else None
        if self.storage and resume_step > 0:
            for name in FILES:
                if self.storage.exists(name):
                    self.storage.download(name)
        for path in (self.path, self.ledger):
            if resume_step > 0:
                _truncate_after(path, resume_step)
            elif path.exists():
                path.write_text("")
        self.ledger_step = resume_step
        self.trackers = trackers.open_trackers(Path(run_dir), list(kinds), config or {},
                                               log_cfg, resume=resume_step > 0) if kinds else []
        self.closed = False

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, "time": time.time(), **metrics}
        with self.path.open("a") as fh:
            fh.write(json.dumps(row, allow_nan=True) + "\n")
        if "batch/rows" in metrics:
            self.log_rows(step, metrics["batch/rows"], metrics.get("batch/samples_per_row", 1),
                          metrics.get("batch/dropped_rows"))
        if self.trackers:
            values = trackers.numbers(metrics)
            for tracker in self.trackers:
                tracker.log(step, values)

    def summary(self, metrics: dict) -> None:
        """The run's final evaluation, as each tracker keeps a run's summary."""
        values = trackers.numbers(metrics)
        for tracker in self.trackers:
            tracker.summary(values)

    def log_rows(self, step: int, rows: list, samples_per_row: int = 1,
                 dropped: list | None = None) -> None:
        """The ledger line of a step (once: a step whose update is done may log it before its
        metrics row): the rows trained on, and those drawn but dropped (a failed reward)."""
        if step <= self.ledger_step:
            return
        self.ledger_step = step
        line = {"step": step, "rows": rows, "samples_per_row": samples_per_row}
        if dropped:
            line["dropped"] = dropped
        with self.ledger.open("a") as fh:
            fh.write(json.dumps(line) + "\n")

    def rewind(self, step: int) -> None:
        """Forget the steps after ``step`` (a run rewound to a checkpoint after losing a trainer
        rank trains them again): their metrics and ledger lines go, so that the files hold the
        trained stream once. The trackers keep theirs: the redone steps show beside them."""
        _truncate_after(self.path, step)
        _truncate_after(self.ledger, step)
        self.ledger_step = min(self.ledger_step, step)

    def sync(self) -> None:
        """Push what is written so far to the run's URI (nothing to do for a local run dir)."""
        for tracker in self.trackers:
            tracker.flush()
        if self.storage:
            for name in FILES:
                if (self.path.parent / name).exists():
                    self.storage.upload(name)

    def close(self, status: str = "finished") -> None:
        """End the trackers' runs as ``status`` (finished, stopped or failed) and push the
        files; once (later calls do nothing)."""
        if self.closed:
            return
        self.closed = True
        for tracker in self.trackers:
            try:
                tracker.close(status)
            except Exception as exc:  # noqa: BLE001  (one tracker's failure must not hide the run's)
                log.warning("closing tracker %s failed: %s", type(tracker).__name__, exc)
        self.sync()


def _truncate_after(path: Path, step: int) -> None:
    """Drop lines past the resumed step (written by a run that died before its checkpoint)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:  # a line torn by a crash mid-write
            continue
    path.write_text("".join(line + "\n" for line in kept))


class PhaseTimer:
    """Seconds spent per named phase within a step: ``with timer.phase("train"): ...``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def pop(self) -> dict:
        out = {f"timing/{k}": v for k, v in self.seconds.items()}
        self.seconds = {}
        return out


def combine_replicas(parts: list[dict], count: str, same: tuple = (), totals: tuple = ()) -> dict:
    """Join the per-replica sums a group call returned: keys in ``same`` hold one value for
    the whole group (read from replica 0), keys in ``totals`` are summed, every other key is
    summed and divided by the summed ``count`` (a per-sample mean); ``count`` keeps its sum."""
    totals = (*totals, count)
    n = sum(p[count] for p in parts)
    out = {k: sum(p[k] for p in parts) / n for k in parts[0] if k not in same and k not in totals}
    out.update({k: parts[0][k] for k in same}, **{k: sum(p[k] for p in parts) for k in totals})
    return out
