"""The hybrid engine (``rollout.colocate_with: policy``, backend hf): generation inside the
policy trainer's actors with their own module, no rollout actors and no weight sync. Seeded and
on-policy, it samples what a separate transformers engine given the same weights samples, so a
GRPO run ends with the same weights; under ZeRO-3 over two ranks the parameters are gathered for
each generate call."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from orchestrator import RunConfig, train

pytestmark = pytest.mark.e2e


def step_rows(run_dir) -> list[dict]:
    return [r for r in (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text()
                        .splitlines() if line.strip()) if "timing/step" in r]


def test_hybrid_engine_samples_as_a_separate_engine(grpo_config, tmp_path):
    separate = train(RunConfig.from_dict(grpo_config(tmp_path / "separate",
                                                     train={"max_steps": 4})))
    hybrid = train(RunConfig.from_dict(grpo_config(
        tmp_path / "hybrid", train={"max_steps": 4}, rollout={"colocate_with": "policy"},
        cluster={"num_cpus": 2})))
    assert "rollout" not in hybrid.usage and "rollout" in separate.usage  # no engine actors
    a, b = step_rows(separate.run_dir), step_rows(hybrid.run_dir)
    assert [r["reward/mean"] for r in a] == pytest.approx([r["reward/mean"] for r in b])
    assert all(r["timing/sync"] < 0.01 for r in b)  # nothing to copy
    wa = load_file(str(separate.model_dir / "model.safetensors"))
    wb = load_file(str(hybrid.model_dir / "model.safetensors"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_hybrid_engine_under_zero3_gathers_for_generation(grpo_config, tmp_path):
    result = train(RunConfig.from_dict(grpo_config(
        tmp_path / "run", train={"max_steps": 2, "batch_size": 32, "micro_batch_size": 16},
        policy={"actors": 2, "cpus": 0.5, "zero_stage": 3}, rollout={"colocate_with": "policy"},
        cluster={"num_cpus": 2})))
    rows = step_rows(result.run_dir)
    assert len(rows) == 2 and all(r["response/length"] > 0 for r in rows)
    assert "rollout" not in result.usage
