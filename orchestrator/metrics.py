"""Per-step metrics: one JSON line per step in metrics.jsonl, TensorBoard, and phase timing."""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path


class MetricsLog:
    def __init__(self, run_dir: str | Path, tensorboard: bool, resume_step: int = 0):
        """A fresh run (``resume_step`` 0) starts the file anew; a resumed one keeps its past."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self._truncate_after(resume_step)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        """Drop lines past the resumed step (written by a run that died before its checkpoint)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines() if step > 0 else []:
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line torn by a crash mid-write
                continue
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, "time": time.time(), **metrics}
        with self.path.open("a") as fh:
            fh.write(json.dumps(row, allow_nan=True) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


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
