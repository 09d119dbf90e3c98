"""The hybrid engine (``rollout.colocate_with: policy``): generation inside the policy trainer's
actors, no rollout actors. With backend hf it samples with the trainer's own module (no weight
sync): seeded and on-policy, it samples what a separate transformers engine given the same
weights samples, so a GRPO run ends with the same weights; under ZeRO-3 over two ranks the
parameters are gathered for each generate call. With vLLM an engine in each trainer's process
gets the weights by an in-memory copy after each update and samples with exactly them."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from orchestrator import RunConfig, train

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("shared_ray")]


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


def test_hybrid_vllm_engine_in_each_zero3_trainer_samples_with_its_weights(grpo_config,
                                                                           tmp_path):
    """Each of two ZeRO-3 ranks holds an engine; after every update the ranks gather each
    layer in step and copy it into their engine, whose sampling log-probs then equal the
    trainer's (a missed or stale tensor would show as a gap)."""
    result = train(RunConfig.from_dict(grpo_config(
        tmp_path / "run", train={"max_steps": 3, "batch_size": 32, "micro_batch_size": 16},
        policy={"actors": 2, "cpus": 0.5, "zero_stage": 3},
        rollout={"colocate_with": "policy", "backend": "vllm", "kv_cache_gib": 0.25},
        optim={"lr": 1e-2}, cluster={"num_cpus": 2})))
    rows = step_rows(result.run_dir)
    assert len(rows) == 3 and "rollout" not in result.usage
    assert max(r["logprob_gap"] for r in rows) < 1e-3, [r["logprob_gap"] for r in rows]
    assert max(r["grad_norm"] for r in rows[:-1]) > 0  # the later copies carry new weights
