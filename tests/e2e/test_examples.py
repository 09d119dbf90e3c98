"""The example driver scripts run as a user runs them (``python examples/X.py``), small.

Both run at once, each on an embedded local Ray of its own, and must leave a run dir with
metrics and a complete checkpoint holding a Hugging Face model dir.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.checkpoint import read_driver_state

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
STEPS = 2
TIMEOUT_S = 300
# script -> (its extra arguments, a key of a training row); the RL script runs its PPO variant
EXAMPLES = {"dpo_driver.py": ((), "loss"), "rl_driver.py": (("--algorithm", "ppo"), "reward/mean")}


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM first, so the script's Ray shuts down with it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_example_drivers_train_and_checkpoint(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # embedded Ray, not a cluster
    procs = {}
    try:
        for script, (extra, _) in EXAMPLES.items():
            root, log = tmp_path / Path(script).stem, tmp_path / f"{Path(script).stem}.log"
            with open(log, "w") as out:  # the child keeps its own handle
                procs[script] = (root, log, subprocess.Popen(
                    [sys.executable, str(REPO / "examples" / script), "--root", str(root),
                     "--steps", str(STEPS), *extra], cwd=tmp_path, env=env, stdout=out,
                    stderr=subprocess.STDOUT))
        for script, (root, log, proc) in procs.items():
            try:
                proc.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                _stop(proc)
            output = log.read_text(errors="replace")
            assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{output[-6000:]}"

            run = root / "run"
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            assert [r["step"] for r in rows if EXAMPLES[script][1] in r] == list(range(1, STEPS + 1))
            ckpt = run / "checkpoints" / f"step-{STEPS:07d}"
            assert read_driver_state(ckpt)["step"] == STEPS  # raises unless complete
            for part in ("config.json", "model.safetensors", "tokenizer.json"):
                assert (ckpt / "model" / part).is_file(), part
            assert f"model in {ckpt / 'model'}" in output  # the script's own report
        assert (procs["rl_driver.py"][0] / "run" / "checkpoints" / f"step-{STEPS:07d}" / "critic"
                / "model" / "model.safetensors").is_file()  # the PPO variant trained a critic
    finally:
        for _, _, proc in procs.values():
            _stop(proc)
