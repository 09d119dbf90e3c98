"""Generating from a checkpoint-style dir with the rollout group, through the CLI."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_cli_generate_from_checkpoint_dir(assets, tmp_path):
    ckpt = tmp_path / "step-0000001"
    shutil.copytree(assets["model"], ckpt / "model")  # the layout of a training checkpoint
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "Describe the sea in a few words.", "topic": "sea"},
            {"prompt": [{"role": "user", "content": "List words about a train."}]},
            {"prompt": "word " * 300}]  # longer than max_model_len: skipped, kept in place
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "samples.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "generate", str(ckpt), str(prompts), "--out", str(out),
         "--n", "3", "--max-new-tokens", "12", "--seed", "7",
         "--reward-fn", "orchestrator.synthetic:reward", "rollout.cpus=1", "rollout.kv_cache_gib=0.25",
         "rollout.max_model_len=128", "rollout.long_prompt=skip", "cluster.num_cpus=2"],
        capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(s["row"], s["sample"]) for s in samples] == [(r, i) for r in (1, 2, 3) for i in range(3)]
    for s in samples[:6]:
        assert 1 <= len(s["response_ids"]) <= 12
        assert len(s["logprobs"]) == len(s["response_ids"])
        assert all(lp <= 0 for lp in s["logprobs"])
        assert s["finish_reason"] in ("stop", "length")
        assert -1 <= s["reward"] <= 1
    assert all(s["finish_reason"] == "skipped" and s["response_ids"] == [] for s in samples[6:])
    assert "1 prompt(s) longer than 127 tokens skipped" in proc.stderr
