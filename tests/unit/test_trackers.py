"""Experiment trackers: what MetricsLog hands W&B (offline files) and MLflow (a file store) is
read back from their own records; a resumed log continues the same tracker runs."""
from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from orchestrator import trackers
from orchestrator.config import LogConfig, RunConfig
from orchestrator.metrics import MetricsLog
from orchestrator.schema import ConfigError, build

# serial: beside an end-to-end module (make test's parallel part) the W&B offline file of a
# resumed run once came back without the resumed part's history; alone it always holds it
pytestmark = [pytest.mark.unit, pytest.mark.serial]

TINY = Path(__file__).resolve().parents[2] / "configs" / "dpo-tiny.yaml"

CONFIG = {"algorithm": "sft", "optim": {"lr": 5e-4}, "policy": {"zero_stage": 2}}


def rows(steps):
    return {s: {"loss": 1.0 / s, "timing/step": 0.25 * s, "lr": 5e-4, "grad_norm": math.nan,
                "batch/rows": [s, s + 10], "note": "text"} for s in steps}


def open_log(run_dir, kinds, resume_step=0):
    cfg = build(LogConfig, {"trackers": kinds, "wandb_mode": "offline", "project": "unit"})
    return MetricsLog(run_dir, kinds, resume_step=resume_step, config=CONFIG, log_cfg=cfg)


def test_mlflow_gets_config_every_step_and_summary_and_resumes_its_run(tmp_path, mlflow_run):
    m = open_log(tmp_path, ["mlflow"])
    for step, row in rows([1, 2, 3]).items():
        m.log(step, row)
    m.close("stopped")
    run_id = m.trackers[0].id
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = mlflow_run(uri, run_id)
    assert run["status"] == "KILLED"
    assert run["params"]["optim.lr"] == "0.0005" and run["params"]["algorithm"] == "sft"
    assert run["metrics"]["loss"] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert [s for s, _ in run["metrics"]["timing/step"]] == [1, 2, 3]
    assert "grad_norm" not in run["metrics"]  # NaN is left out, not logged as a number
    assert not any(k.startswith("batch") or k == "note" for k in run["metrics"])

    # the resumed run (checkpoint at step 2) continues the same MLflow run, redoing step 3
    m = open_log(tmp_path, ["mlflow"], resume_step=2)
    assert m.trackers[0].id == run_id
    for step, row in rows([3, 4]).items():
        m.log(step, row)
    m.summary({"eval/loss": 0.125, "eval/perplexity": 1.13, "eval/skipped": None})
    m.close()
    run = mlflow_run(uri, run_id)
    assert run["status"] == "FINISHED"
    assert [s for s, _ in run["metrics"]["loss"]] == [1, 2, 3, 3, 4]
    assert run["metrics"]["summary/eval/loss"] == [(0, 0.125)]
    summary = run["client"].download_artifacts(run_id, "summary.json", str(tmp_path))
    assert '"eval/perplexity": 1.13' in open(summary).read()


def test_wandb_offline_gets_config_every_step_and_summary_and_resumes_its_run(tmp_path,
                                                                             wandb_run):
    m = open_log(tmp_path, ["wandb", "tensorboard"])
    for step, row in rows([1, 2, 3]).items():
        m.log(step, row)
    m.close("stopped")
    run_id = m.trackers[0].id
    assert any((tmp_path / "tensorboard").iterdir())

    # W&B names an offline run's directory by the second it starts in, so a resume in the
    # same second as the start would reuse (and overwrite) the first part's file
    time.sleep(1.1)
    m = open_log(tmp_path, ["wandb"], resume_step=2)
    assert m.trackers[0].id == run_id
    for step, row in rows([3, 4]).items():
        m.log(step, row)
    m.summary({"eval/loss": 0.125})
    m.close()

    runs = wandb_run(tmp_path)
    assert list(runs) == [run_id]  # both parts went to one W&B run (two offline files)
    run = runs[run_id]
    assert run["config"]["optim"] == {"lr": 5e-4}, run["config"]
    logged = [(h["step"], h["loss"]) for h in run["history"]]
    assert logged == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3)), (3, pytest.approx(1 / 3)),
                      (4, 0.25)]
    assert not any("grad_norm" in h or "note" in h or "batch/rows" in h for h in run["history"])
    assert run["summary"]["eval/loss"] == 0.125


def test_trackers_are_checked_before_any_actor():
    assert build(LogConfig, {}).trackers == ["tensorboard"]
    with pytest.raises(ConfigError, match=r"log.trackers: got \['tensorboard', 'neptune'\]"):
        RunConfig.from_yaml(TINY, ["log.trackers=[tensorboard, neptune]"])
    assert trackers.missing(["tensorboard", "wandb", "mlflow"]) == []


def test_a_tracker_not_installed_is_named_with_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(trackers.PACKAGES, "wandb", "wandb_is_not_installed_here")
    with pytest.raises(ConfigError, match=r"log.trackers: wandb not installed here; install the "
                                          r"extra \(pip install 'rayalign\[wandb\]'\)"):
        RunConfig.from_yaml(TINY, ["log.trackers=[tensorboard, wandb]"])
    with pytest.raises(ConfigError, match="names a tracker twice"):
        RunConfig.from_yaml(TINY, ["log.trackers=[mlflow, mlflow]"])


def test_mlflow_metric_names_keep_what_the_store_allows():
    assert trackers._mlflow_key("eval/reward@gold (mean)") == "eval/reward_gold _mean_"
    assert trackers.flat({"a": {"b": [1, 2], "c": None}, "d": "x"}) == {
        "a.b": "[1, 2]", "a.c": "null", "d": "x"}
