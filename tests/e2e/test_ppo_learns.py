"""PPO with a critic on the synthetic task, over all five roles (rollout, policy, critic,
reference colocated with the policy, reward colocated with the critic), must learn; with LoRA
adapters on the policy and the critic too (the reference then being the policy's base weights,
no actor of its own)."""
from __future__ import annotations

import json
import math

import pytest

from orchestrator import RunConfig, train

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("shared_ray")]

REWARD_GAIN = 0.1  # ground-truth reward of held-out samples, on a scale of [-1, 1]


# adapters on every linear layer and the (tied) embedding table, as in tests/e2e/test_lora.py
LORA = ["policy.lora.rank=32", "policy.lora.alpha=64", "reference.from=policy_base",
        "policy.lora.target_modules=[all-linear, embed_tokens]", "optim.lr=3e-3",
        "critic.lora.rank=8", "critic.lora.alpha=16"]


@pytest.mark.parametrize("lora", [[], LORA], ids=["full", "lora"])
def test_ppo_raises_held_out_reward(assets, tmp_path, lora):
    cfg = RunConfig.from_dict({
        "algorithm": "ppo", "run_dir": str(tmp_path / "run"),
        "model": {"path": assets["model"]},
        "data": {"train": assets["train"], "eval": assets["eval"]},
        "policy": {"actors": 1, "cpus": 1, "zero_stage": 0},
        "critic": {"actors": 1, "cpus": 1, "zero_stage": 2, "lr": 1e-3},
        "reference": {"actors": 1, "cpus": 0.5, "colocate_with": "policy"},
        "reward": {"actors": 1, "cpus": 0.5, "kind": "function", "colocate_with": "critic",
                   "function": "orchestrator.synthetic:reward"},
        "rollout": {"actors": 1, "cpus": 1, "kv_cache_gib": 0.25, "max_model_len": 256},
        "rl": {"prompts_per_step": 8, "group_size": 8, "max_new_tokens": 16, "kl_coef": 0.01,
               "kl_mode": "reward", "lam": 0.95},
        "optim": {"lr": 2e-3},
        "train": {"batch_size": 64, "micro_batch_size": 32, "max_steps": 20},
        "eval": {"num_prompts": 32},
        "cluster": {"num_cpus": 4},
        "log": {"progress_bar": False, "trackers": []},
    }, lora)
    result = train(cfg)
    assert result.after["eval/reward"] >= result.before["eval/reward"] + REWARD_GAIN, result.summary()
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert len(steps) == cfg.train.max_steps
    for key in ("kl", "entropy", "clip_frac", "value_loss", "explained_variance", "vf_clip_frac",
                "logprob_gap", "grad_norm", "critic_grad_norm", "response/length",
                "timing/generate", "timing/score", "timing/train", "timing/sync"):
        assert all(key in r and math.isfinite(r[key]) for r in steps), key
    assert max(r["logprob_gap"] for r in steps) < 1e-3
    assert (result.checkpoint / "critic" / "model" / "model.safetensors").is_file()
    if lora:
        assert "reference" not in result.usage, result.usage
        for adapter in (result.checkpoint / "adapter", result.checkpoint / "critic" / "adapter"):
            assert (adapter / "adapter_model.safetensors").is_file(), adapter
