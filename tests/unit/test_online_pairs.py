"""Online DPO's pairing and padding, its config rules, and iterative DPO's round stages (no Ray:
nothing runs)."""
from __future__ import annotations

import pytest
import torch

from orchestrator.batches import PreferenceBatch
from orchestrator.config import RunConfig
from orchestrator.data import PreferenceExample
from orchestrator.online_pairs import best_worst, padded_batch
from orchestrator.pipelines import build_pipeline
from orchestrator.roles import merge_usage
from orchestrator.schema import ConfigError

pytestmark = pytest.mark.unit


def test_best_and_worst_of_each_group_ties_dropped():
    rewards = [0.1, 0.9, 0.5,   # best 1, worst 0
               0.3, 0.3, 0.3,   # a tie: no pair
               0.2, 0.7, 0.7,   # equal bests: the first
               0.5, -1.0, 0.4]  # best 0, worst 1
    assert best_worst(rewards, 3) == [(1, 0), None, (1, 0), (0, 1)]


def test_unusable_samples_leave_the_group():
    rewards = [5.0, 0.1, 0.2, 0.0, 1.0, 2.0]
    usable = [False, True, True, True, False, False]  # e.g. skipped prompts: no response
    assert best_worst(rewards, 3, usable) == [(2, 1), None]  # group 2 has one usable sample


def pair(i: int) -> PreferenceExample:
    return PreferenceExample([1, 2], [3 + i], [4 + i], row=i + 1)


def test_padding_keeps_the_mean_over_real_pairs():
    batch = padded_batch([pair(0), pair(1), pair(2)], [(-1.0, -2.0), (-3.0, -4.0), (-5.0, -6.0)], 8)
    assert len(batch) == 8 and isinstance(batch, PreferenceBatch)
    assert batch.weights.tolist() == pytest.approx([8 / 3] * 3 + [0.0] * 5)
    # any per-pair losses: the batch mean of weighted losses is the real pairs' mean
    losses = torch.tensor([1.0, 2.0, 6.0, 9.0, 9.0, 9.0, 9.0, 9.0])
    assert (losses * batch.weights).mean().item() == pytest.approx(3.0)
    assert batch.ref_chosen.tolist()[:3] == [-1.0, -3.0, -5.0]
    # split over two replicas, the weights go with their rows
    halves = batch.split(2)
    assert [len(h) for h in halves] == [4, 4] and halves[1].weights.sum().item() == 0.0


def config(**over) -> dict:
    data = {"algorithm": "online_dpo", "model": {"path": "m"}, "data": {"train": "t.jsonl"},
            "reward": {"kind": "function", "function": "orchestrator.synthetic:reward"},
            "rl": {"prompts_per_step": 8, "group_size": 4}, "train": {"batch_size": 8}}
    for key, value in over.items():
        data[key] = {**data.get(key, {}), **value}
    return data


def test_online_dpo_config_rules():
    RunConfig.from_dict(config())
    with pytest.raises(ConfigError, match="train.batch_size: 16.*rl.prompts_per_step \\(8\\)"):
        RunConfig.from_dict(config(train={"batch_size": 16}))
    with pytest.raises(ConfigError, match="rl.group_size.*at least 2"):
        RunConfig.from_dict(config(rl={"group_size": 1}))
    with pytest.raises(ConfigError, match="dpo.label_smoothing"):
        RunConfig.from_dict(config(dpo={"loss": "cdpo"}))
    with pytest.raises(ConfigError, match="rl.rounds: 2 is for algorithm online_dpo"):
        RunConfig.from_dict(config(rl={"rounds": 2}) | {"algorithm": "grpo"})
    with pytest.raises(ConfigError, match="train.max_steps: 10 .* rl.rounds=3"):
        RunConfig.from_dict(config(rl={"rounds": 3}, train={"max_steps": 10}))


def test_rounds_become_pipeline_stages(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "prompts.jsonl").write_text("{}\n")
    spec = {"run_dir": str(tmp_path / "run"),
            "stages": [{"name": "it", **config(rl={"rounds": 2}, train={"max_steps": 10})},
                       {"name": "after", "from": "it", "algorithm": "sft",
                        "data": {"train": str(tmp_path / "prompts.jsonl")}}]}
    spec["stages"][0]["model"] = {"path": str(tmp_path / "model")}
    spec["stages"][0]["data"] = {"train": str(tmp_path / "prompts.jsonl")}
    root, stages = build_pipeline(spec)
    assert [(s.name, s.kind, s.cfg.algorithm) for s in stages] == [
        ("it_r1_pairs", "pairs", "online_dpo"), ("it_r1", "train", "dpo"),
        ("it_r2_pairs", "pairs", "online_dpo"), ("it_r2", "train", "dpo"),
        ("after", "train", "sft")]
    p1, d1, p2, d2, after = stages
    assert d1.cfg.data.train == str(p1.output) and p1.output.name == "pairs.jsonl"
    assert p1.cfg.model.path == d1.cfg.model.path == str(tmp_path / "model")
    assert p2.cfg.model.path == d2.cfg.model.path == str(d1.output)  # round 2 starts from round 1
    assert d1.cfg.train.max_steps == d2.cfg.train.max_steps == 5
    assert after.cfg.model.path == str(d2.output)  # `from: it` reads the last round's model
    assert not p1.done() and p2.pending == ("model.path",)


def test_usage_of_rounds_adds_seconds():
    a = {"policy": {"actors": 1, "cpus": 1.0, "gpus": 0.0, "seconds": 10.0, "peak_rss_mib": 500.0}}
    b = {"policy": {"actors": 1, "cpus": 1.0, "gpus": 0.0, "seconds": 5.0, "peak_rss_mib": 700.0},
         "rollout": {"actors": 1, "cpus": 1.0, "gpus": 0.0, "seconds": 3.0, "peak_rss_mib": None}}
    out = merge_usage([a, b])
    assert out["policy"] == {"actors": 1, "cpus": 1.0, "gpus": 0.0, "seconds": 15.0,
                             "peak_rss_mib": 700.0}
    assert out["rollout"]["seconds"] == 3.0
