"""A run stopped after k steps and resumed sees the same samples and ends at the same weights."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from orchestrator import train

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("shared_ray")]

STEPS, STOP = 8, 4
RUN = ("train.max_steps=8", "checkpoint.every=4", "checkpoint.keep=3", "eval.reward_fn=null",
       "train.batch_size=8", "train.micro_batch_size=2")
# per algorithm: extra overrides (the sft and rm data come from the assets) and the metrics
# every step must carry
ALGORITHMS = {
    "dpo": ((), ("loss", "rewards/accuracy", "grad_norm", "lr", "pairs_per_s", "tokens_per_s")),
    "sft": (("algorithm=sft", "policy.zero_stage=3", "data.max_length=128", "eval.max_pairs=32"),
            ("loss", "token_accuracy", "perplexity", "grad_norm", "lr", "tokens_per_s",
             "sequences_per_s")),
    "rm": (("algorithm=rm", "eval.max_pairs=32"),
           ("loss", "accuracy", "margin", "rewards/mean", "rewards/std", "grad_norm", "lr",
            "pairs_per_s", "tokens_per_s")),
}


def _rows(run_dir) -> dict[int, list[int]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["batch/rows"] for r in map(json.loads, lines) if "batch/rows" in r}


def _weights(model_dir) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.parametrize("algorithm", [
    "dpo", pytest.param("sft", marks=pytest.mark.smoke), "rm"])
def test_resume_matches_uninterrupted_run(make_config, assets, tmp_path, algorithm):
    extra, keys = ALGORITHMS[algorithm]
    if algorithm == "sft":
        extra += (f"data.train={assets['sft']}", f"data.eval={assets['sft_eval']}")

    def config(run_dir):
        return make_config(*RUN, *extra, run_dir=run_dir)

    full = train(config(tmp_path / "full"))
    assert full.steps == STEPS
    steps = [r for r in map(json.loads, (full.run_dir / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for key in keys:
        assert all(isinstance(r[key], float) for r in steps), key

    # The interrupted run: the uninterrupted run's dir as it stood after step 4, plus debris
    # of a crash during the next save (a half-written temp dir and a dir with no marker).
    part = tmp_path / "part"
    shutil.copytree(full.run_dir, part)
    ckpts = part / "checkpoints"
    shutil.rmtree(ckpts / f"step-{STEPS:07d}")
    (ckpts / f".tmp-step-{STEPS:07d}").mkdir()
    (ckpts / "step-0000006").mkdir()
    lines = (part / "metrics.jsonl").read_text().splitlines()
    (part / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # died before logging 'final'

    resumed = train(config(part))
    assert resumed.resumed_from == ckpts / f"step-{STOP:07d}"
    assert resumed.steps == STEPS
    assert not (ckpts / f".tmp-step-{STEPS:07d}").exists()

    assert _rows(part) == _rows(full.run_dir)
    assert sorted(_rows(part)) == list(range(1, STEPS + 1))
    a, b = _weights(full.model_dir), _weights(resumed.model_dir)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    # and the weights did move during steps 5..8, so the comparison means something
    mid = _weights(ckpts / f"step-{STOP:07d}" / "model")
    assert any(not torch.allclose(mid[n], a[n]) for n in a)
