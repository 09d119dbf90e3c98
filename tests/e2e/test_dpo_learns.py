"""DPO on the synthetic task with 2 policy actors under ZeRO-2 must learn the preference."""
from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from orchestrator import train

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("shared_ray")]

ACCURACY_AFTER = 0.7   # held-out preference accuracy starts at 0.5 (policy == reference)
REWARD_GAIN = 0.15     # ground-truth reward of samples, on a scale of [-1, 1]


def test_dpo_raises_accuracy_and_sampled_reward(make_config, wandb_run, mlflow_run):
    cfg = make_config("log.trackers=[tensorboard, wandb, mlflow]", "log.wandb_mode=offline")
    result = train(cfg)

    assert result.before["eval/accuracy"] == pytest.approx(0.5)
    assert result.after["eval/accuracy"] >= ACCURACY_AFTER, result.summary()
    assert result.after["eval/reward"] >= result.before["eval/reward"] + REWARD_GAIN, result.summary()

    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, cfg.train.max_steps + 1))
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
                "grad_norm", "lr", "pairs_per_s", "tokens_per_s", "timing/train"):
        assert all(key in r for r in steps), key
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert any((result.run_dir / "tensorboard").iterdir())
    # W&B (offline files) and MLflow (sqlite store in the run dir) hold every step's numbers
    ids = json.loads((result.run_dir / "trackers.json").read_text())
    wandb = wandb_run(result.run_dir)[ids["wandb"]]
    mlflow = mlflow_run(f"sqlite:///{result.run_dir}/mlflow.db", ids["mlflow"])
    for key in ("loss", "rewards/accuracy", "grad_norm", "timing/train"):
        logged = [(r["step"], r[key]) for r in steps]
        assert [(h["step"], h[key]) for h in wandb["history"] if key in h] == logged, key
        assert mlflow["metrics"][key] == logged, key
    assert wandb["summary"]["eval/accuracy"] == result.after["eval/accuracy"]
    assert mlflow["metrics"]["summary/eval/accuracy"] == [(0, result.after["eval/accuracy"])]
    assert wandb["config"]["dpo"]["beta"] == 0.1 and mlflow["params"]["dpo.beta"] == "0.1"
    assert mlflow["status"] == "FINISHED"
    # the final checkpoint holds a Hugging Face model dir
    AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert (result.model_dir / "tokenizer.json").is_file()
