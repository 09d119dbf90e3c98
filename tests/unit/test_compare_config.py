"""`rayalign compare` configs: arms x sweep points x seeds as pipeline stages, the budget in
steps or samples, the rules checked before anything runs, and spike detection (no Ray)."""
from __future__ import annotations

import pytest

from orchestrator.compare import build_comparison, models_held, spike_steps
from orchestrator.schema import ConfigError

pytestmark = pytest.mark.unit


@pytest.fixture
def files(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    for name in ("sft", "pairs"):
        (tmp_path / f"{name}.jsonl").write_text("{}\n")
    return tmp_path


def spec(root, **over) -> dict:
    out = {
        "run_dir": str(root / "cmp"), "seeds": [0, 1], "budget": {"steps": 6},
        "eval": {"prompts": str(root / "pairs.jsonl"), "gold": "orchestrator.synthetic:reward"},
        "defaults": {"model": {"path": str(root / "model")},
                     "data": {"train": str(root / "pairs.jsonl")}},
        "stages": [{"name": "sft", "algorithm": "sft", "data": {"train": str(root / "sft.jsonl")}},
                   {"name": "rm", "from": "sft", "algorithm": "rm"}],
        "arms": [{"name": "sft", "baseline": True, "from": "sft"},
                 {"name": "dpo", "from": "sft", "algorithm": "dpo",
                  "sweep": {"dpo.beta": [0.1, 0.5]}},
                 {"name": "ppo", "from": ["sft", "rm"], "algorithm": "ppo",
                  "rl": {"prompts_per_step": 4, "group_size": 4},
                  "train": {"batch_size": 16, "micro_batch_size": 16}}],
    }
    out.update(over)
    return out


def test_arms_expand_into_stages(files):
    comp = build_comparison(spec(files))
    assert [s.name for s in comp.shared] == ["sft", "rm"]
    assert [(r.label, r.seed) for r in comp.runs] == [
        ("sft", 0), ("sft", 1), ("dpo beta=0.1", 0), ("dpo beta=0.1", 1),
        ("dpo beta=0.5", 0), ("dpo beta=0.5", 1), ("ppo", 0), ("ppo", 1)]
    sft_model = comp.shared[0].output
    assert comp.reference == sft_model and comp.reward_model == comp.shared[1].output
    base, dpo = comp.runs[0], comp.runs[4]
    assert base.stage is None and base.model_dir == sft_model
    assert dpo.stage.cfg.dpo.beta == 0.5 and dpo.stage.cfg.train.seed == 0
    assert dpo.stage.cfg.model.path == str(sft_model) and dpo.run_dir == files / "cmp" / dpo.stage.name
    assert all(r.stage.cfg.train.max_steps == 6 and r.stage.cfg.eval.every == 1
               for r in comp.runs if r.stage)
    ppo = comp.runs[-1].stage.cfg
    assert ppo.reward.model_path == str(comp.shared[1].output) and models_held(ppo) == 5
    assert models_held(dpo.stage.cfg) == 2


def test_budget_in_samples_gives_each_arm_its_steps(files):
    comp = build_comparison(spec(files, budget={"samples": 100}))
    steps = {r.arm: r.stage.cfg.train.max_steps for r in comp.runs if r.stage}
    # dpo: 2 responses x 8 pairs a step -> ceil(100 / 16); ppo: 4 prompts x 4 -> ceil(100 / 16)
    assert steps == {"dpo": 7, "ppo": 7}
    assert "100 sampled or dataset responses" in comp.budget["text"]


@pytest.mark.parametrize("change, message", [
    (dict(budget={"epochs": 2}), "budget: expected"),
    (dict(seeds=[]), "seeds: expected a list"),
    (dict(arms=[{"name": "sft", "from": "sft", "algorithm": "dpo"}]), "exactly one arm needs"),
    (dict(arms=[{"name": "sft", "baseline": True, "from": "sft"},
                {"name": "d", "from": "sft", "algorithm": "dpo", "sweep": {"dpo.beta": 0.1}}]),
     "sweep: expected a mapping"),
    (dict(arms=[{"name": "sft", "baseline": True, "from": "sft"},
                {"name": "d", "from": "sft", "algorithm": "dpo", "dpo": {"beta": -1}}]),
     "dpo.beta"),
    (dict(eval={"prompts": "nowhere.jsonl"}), "eval.prompts: file nowhere.jsonl not found"),
    (dict(colour="blue"), "unknown key"),
])
def test_bad_comparisons_fail_before_anything_runs(files, change, message):
    with pytest.raises(ConfigError, match=message):
        build_comparison(spec(files, **change))


def test_spikes_are_jumps_above_the_recent_median():
    flat = [(i, 1.0 + 0.01 * (i % 3)) for i in range(1, 30)]
    assert spike_steps(flat) == []
    jumpy = flat[:20] + [(21, 5.0)] + flat[21:]
    assert spike_steps(jumpy) == [21]
    assert spike_steps([(1, 9.0), (2, 1.0)]) == []  # too little history to judge


def test_an_iterative_dpo_arm_stays_one_run_whose_model_is_its_last_round(files):
    arms = spec(files)["arms"][:1] + [{
        "name": "it", "from": ["sft", "rm"], "algorithm": "online_dpo",
        "rl": {"prompts_per_step": 8, "group_size": 4, "rounds": 2},
        "train": {"batch_size": 8, "micro_batch_size": 8}}]
    comp = build_comparison(spec(files, arms=arms))
    run = comp.runs[-1]
    assert run.stage.name == "it_s1" and run.stage.cfg.rl.rounds == 2
    assert run.model_dir == run.run_dir / "dpo_r2" / "checkpoints" / "step-0000003" / "model"
