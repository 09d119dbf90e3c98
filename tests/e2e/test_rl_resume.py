"""An online RL run (PPO: policy and critic) stopped after k steps and resumed continues exactly
where it stopped. The reward is a sequence classifier, and the critic starts from it (its
score head kept), so both model-based paths run inside a full RL loop here."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from orchestrator import RunConfig, train
from orchestrator.reward_model import build_reward_model

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("shared_ray")]
STEPS, STOP = 4, 2


def _config(assets, run_dir, reward_model) -> RunConfig:
    return RunConfig.from_dict({
        "algorithm": "ppo", "run_dir": str(run_dir),
        "model": {"path": assets["model"]}, "data": {"train": assets["train"]},
        "policy": {"actors": 1, "cpus": 1, "zero_stage": 2},
        "critic": {"actors": 1, "cpus": 0.5, "zero_stage": 2, "lr": 1e-3,
                   "model_path": str(reward_model)},
        "reference": {"actors": 1, "cpus": 0.5, "colocate_with": "policy"},
        "reward": {"actors": 1, "cpus": 0.5, "kind": "model", "model_path": str(reward_model)},
        "rollout": {"actors": 1, "cpus": 1, "kv_cache_gib": 0.25, "max_model_len": 256},
        "rl": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 8, "kl_coef": 0.01,
               "kl_mode": "reward"},
        "optim": {"lr": 2e-3},
        "train": {"batch_size": 16, "micro_batch_size": 16, "max_steps": STEPS},
        "checkpoint": {"every": STOP, "keep": 3},
        "cluster": {"num_cpus": 4},
        "log": {"progress_bar": False, "trackers": []},
    })


def _rows(run_dir) -> dict[int, list[int]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["batch/rows"] for r in map(json.loads, lines) if "batch/rows" in r}


def test_rl_resume_matches_uninterrupted_run(assets, tmp_path):
    reward_model = build_reward_model(tmp_path / "reward-model", "tiny", seed=1)
    full = train(_config(assets, tmp_path / "full", reward_model))
    part = tmp_path / "part"
    shutil.copytree(full.run_dir, part)
    shutil.rmtree(part / "checkpoints" / f"step-{STEPS:07d}")

    resumed = train(_config(assets, part, reward_model))
    assert resumed.resumed_from == part / "checkpoints" / f"step-{STOP:07d}"
    assert _rows(part) == _rows(full.run_dir)
    assert sorted(_rows(part)) == list(range(1, STEPS + 1))
    for sub in ("model", "critic/model"):  # the policy, and the critic
        a = load_file(str(full.checkpoint / sub / "model.safetensors"))
        b = load_file(str(resumed.checkpoint / sub / "model.safetensors"))
        mid = load_file(str(part / "checkpoints" / f"step-{STOP:07d}" / sub / "model.safetensors"))
        assert any(not torch.allclose(mid[n], a[n]) for n in a), sub  # steps 3-4 changed it
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=f"{sub} {name}")
