"""Online DPO on the synthetic task: the run samples groups with its own policy, the reward role
picks the best and worst of each, and DPO steps on those pairs must raise the held-out reward;
the same by rounds (iterative DPO, rl.rounds: sample a preference set, label it, train offline
DPO on it, repeat), whose re-run must skip every round."""
from __future__ import annotations

import json
import math

import pytest

from orchestrator import RunConfig, train

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("shared_ray")]

REWARD_GAIN = 0.1  # ground-truth reward of held-out samples, on a scale of [-1, 1]


def online_dpo(grpo_config, assets, run_dir, **sections) -> RunConfig:
    """The online DPO run of these tests: the shared GRPO set-up with online DPO's algorithm,
    held-out prompts and sizes, sections updated by ``sections``."""
    data = grpo_config(
        run_dir, algorithm="online_dpo", data={"eval": assets["eval"]},
        rl={"prompts_per_step": 16, "group_size": 8, "max_new_tokens": 16},
        dpo={"beta": 0.1}, optim={"lr": 2e-3},
        train={"batch_size": 16, "micro_batch_size": 16, "max_steps": 20},
        eval={"num_prompts": 32, "max_pairs": 64, "reward_fn": "orchestrator.synthetic:reward",
              "max_new_tokens": 16})
    for key, value in sections.items():
        data[key] = {**data[key], **value}
    return RunConfig.from_dict(data)


def test_online_dpo_raises_held_out_reward(grpo_config, assets, tmp_path):
    cfg = online_dpo(grpo_config, assets, tmp_path / "run")
    result = train(cfg)
    assert result.after["eval/reward"] >= result.before["eval/reward"] + REWARD_GAIN, result.summary()
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert len(steps) == cfg.train.max_steps
    for key in ("loss", "rewards/accuracy", "rewards/margin", "reward/chosen", "reward/rejected",
                "kl", "grad_norm", "timing/generate", "timing/train", "timing/sync"):
        assert all(key in r and math.isfinite(r[key]) for r in steps), key
    for r in steps:  # every prompt gave a pair or was counted as a tie
        assert r["pairs"] + r["pairs/ties"] == cfg.rl.prompts_per_step
        assert r["reward/chosen"] > r["reward/rejected"]


def test_two_rounds_raise_held_out_reward_and_rerun_skips(grpo_config, assets, tmp_path, caplog):
    cfg = online_dpo(grpo_config, assets, tmp_path / "run", reference={"cpus": 1},
                     rl={"rounds": 2})
    result = train(cfg)
    assert result.after["eval/reward"] >= result.before["eval/reward"] + REWARD_GAIN, result.summary()
    root = tmp_path / "run"
    for i in (1, 2):
        record = json.loads((root / f"dpo_r{i}_pairs" / "pairs.done.json").read_text())
        rows = (root / f"dpo_r{i}_pairs" / "pairs.jsonl").read_text().splitlines()
        assert record["prompts"] == 160 and record["pairs"] == len(rows) > 100
        assert record["pairs"] + record["ties"] == 160  # a tie: no two usable samples differ
        assert all(r["reward_chosen"] > r["reward_rejected"] for r in map(json.loads, rows))
    # round 2 sampled with round 1's model, which learned: its pairs' samples score higher
    first, second = (json.loads((root / f"dpo_r{i}_pairs" / "pairs.done.json").read_text())
                     for i in (1, 2))
    assert second["reward_mean"] > first["reward_mean"]
    assert {"policy", "reference", "rollout", "reward"} <= set(result.usage)
    caplog.clear()
    with caplog.at_level("INFO"):
        again = train(cfg)
    assert again.model_dir == result.model_dir
    assert caplog.text.count("done before, skipped") == 4
