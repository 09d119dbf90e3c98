"""Streamed generation (``rollout.stream_groups``): the engines hand back each prompt's group
as it finishes and the driver scores it at once. What is trained on must not change: a GRPO
run with async rollouts and a vLLM engine, streamed one prompt at a time, ends with the
weights of the same run scored a batch at a time (one engine, seeded sampling: the same
samples either way)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from orchestrator import RunConfig, train

pytestmark = pytest.mark.e2e


def step_rows(run_dir) -> dict[int, dict]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text()
            .splitlines() if line.strip()]
    return {r["step"]: r for r in rows if "timing/step" in r}


def test_streamed_scoring_trains_as_whole_batches_do(grpo_config, tmp_path):
    def run(name: str, groups: int):
        return train(RunConfig.from_dict(grpo_config(
            tmp_path / name, train={"max_steps": 4}, rl={"async_rollout": True},
            rollout={"backend": "vllm", "kv_cache_gib": 0.25, "stream_groups": groups})))
    whole, streamed = run("whole", 0), run("streamed", 1)
    a, b = step_rows(whole.run_dir), step_rows(streamed.run_dir)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step]["rollout/stream_parts"] == 8  # one part per prompt
        assert "rollout/stream_parts" not in a[step]
        assert a[step]["batch/rows"] == b[step]["batch/rows"]
        assert abs(a[step]["reward/mean"] - b[step]["reward/mean"]) < 1e-6
        assert abs(a[step]["kl"] - b[step]["kl"]) < 1e-5
    wa = load_file(str(whole.model_dir / "model.safetensors"))
    wb = load_file(str(streamed.model_dir / "model.safetensors"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
