"""The classic RLHF pipeline end to end: configs/rlhf-tiny.yaml on the tiny model and the
synthetic task. SFT on the SFT set, a reward model trained on the preference pairs, PPO driven
by that reward model only (the ground truth is the evaluation reward, never the training one),
and DPO from the same SFT model. The pipeline is killed during its PPO stage and re-run: the
re-run skips the finished stages and resumes PPO from its checkpoint; a third run skips all.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from orchestrator import pipeline
from orchestrator.evaluate import spearman
from orchestrator.synthetic import make_pairs, reward

pytestmark = pytest.mark.e2e

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "rlhf-tiny.yaml"
SFT_LOSS_DROP = 1.0     # held-out loss per trained token starts near log(512) = 6.2
SFT_GOLD_GAIN = 0.1     # gold reward of sampled responses, on a scale of [-1, 1]; base ~0.0
RM_ACCURACY = 0.8       # held-out pair accuracy of the reward model
RM_SPEARMAN = 0.6       # rank correlation of its scores with the gold reward, fresh samples
PPO_GOLD_GAIN = 0.1     # PPO's held-out gold reward over the SFT model's, same sampling


def _overrides(assets, run_dir: Path) -> list[str]:
    data = [f"sft.data.train={assets['sft']}", f"sft.data.eval={assets['sft_eval']}"]
    for stage in ("rm", "ppo", "dpo"):
        data += [f"{stage}.data.train={assets['train']}", f"{stage}.data.eval={assets['eval']}"]
    return [f"run_dir={run_dir}", f"model.path={assets['model']}", "log.progress_bar=false",
            *data]


def _stop_during_ppo(overrides: list[str], run_dir: Path, log_file: Path) -> None:
    """Run the pipeline in a process of its own and SIGKILL it (with its local Ray) once the
    PPO stage has written its first checkpoint."""
    marker = run_dir / "ppo" / "checkpoints" / "step-0000010" / "COMPLETE"
    with log_file.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "pipeline", str(CONFIG),
                                 *overrides], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.monotonic() + 900
        while not marker.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"pipeline ended or hung before PPO's first checkpoint:\n"
                                     f"{log_file.read_text()[-3000:]}")
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def rlhf(assets, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rlhf") / "run"
    overrides = _overrides(assets, run_dir)
    _stop_during_ppo(overrides, run_dir, run_dir.parent / "first.log")
    final = run_dir / "ppo" / "checkpoints" / "step-0000030"
    assert not final.exists(), "the kill came after PPO had finished: not a mid-stage stop"
    resumed = pipeline(CONFIG, overrides)
    again = pipeline(CONFIG, overrides)
    return {"run_dir": run_dir, "resumed": resumed, "again": again}


def test_rerun_resumes_the_interrupted_stage_and_skips_finished_ones(rlhf):
    resumed, again = rlhf["resumed"], rlhf["again"]
    assert [(s.name, s.status) for s in resumed.stages] == [
        ("sft", "skipped"), ("rm", "skipped"), ("ppo", "resumed"), ("dpo", "ran")]
    assert [s.status for s in again.stages] == ["skipped"] * 4
    table = again.table().splitlines()
    assert len(table) == 6 and all(" skipped " in line for line in table[2:])
    for name in ("sft", "rm", "ppo", "dpo"):
        assert again.stage(name).after == resumed.stage(name).after
        assert (rlhf["run_dir"] / name / "checkpoints").is_dir()
    # PPO's metrics hold each step once: the steps after the kill were redone, not doubled
    rows = [json.loads(x) for x in
            (rlhf["run_dir"] / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 31))
    summary = (rlhf["run_dir"] / "summary.txt").read_text()
    assert all(name in summary for name in ("sft", "rm", "ppo", "dpo"))


def test_sft_lowers_heldout_loss_and_raises_gold_reward(rlhf):
    sft = rlhf["again"].stage("sft")
    assert sft.after["eval/loss"] <= sft.before["eval/loss"] - SFT_LOSS_DROP, sft
    assert sft.after["eval/perplexity"] < sft.before["eval/perplexity"]
    assert sft.after["eval/reward"] >= sft.before["eval/reward"] + SFT_GOLD_GAIN, sft


def _sft_samples(model_dir: Path, prompts: list[str]) -> list[str]:
    """One sampled response per prompt from the SFT model (plain transformers, seeded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(0)
    out = []
    for prompt in prompts:
        ids = tok(tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                          add_generation_prompt=True),
                  add_special_tokens=False, return_tensors="pt")["input_ids"]
        gen = model.generate(ids, do_sample=True, top_k=0, max_new_tokens=16,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def test_reward_model_ranks_like_the_gold_reward(rlhf):
    from actors.reward import ModelReward, RewardSample
    rm, sft = rlhf["again"].stage("rm"), rlhf["again"].stage("sft")
    assert rm.after["eval/accuracy"] >= RM_ACCURACY, rm
    # the model dir as `reward.kind: model` loads it, on samples it never saw: new synthetic
    # responses, and responses of the SFT policy (what PPO starts from)
    scorer = ModelReward(str(rm.model_dir), 16, "float32", "cpu")
    fresh = make_pairs(100, seed=4242, min_words=4, max_words=16)
    samples = [RewardSample(r["prompt"], r[k]) for r in fresh for k in ("chosen", "rejected")]
    prompts = [r["prompt"] for r in fresh[:64]]
    samples += [RewardSample(p, t) for p, t in zip(prompts, _sft_samples(sft.model_dir, prompts))]
    for part in (samples[:200], samples[200:]):
        scores = scorer.score(part)
        gold = [reward(s.prompt, s.response) for s in part]
        assert spearman(scores, gold) >= RM_SPEARMAN


def test_ppo_on_the_trained_reward_model_raises_gold_reward(rlhf):
    ppo = rlhf["again"].stage("ppo")
    import yaml
    cfg = yaml.safe_load((rlhf["run_dir"] / "ppo" / "config.yaml").read_text())
    rm_dir = str(rlhf["again"].stage("rm").model_dir)
    assert cfg["reward"] == {**cfg["reward"], "kind": "model", "model_path": rm_dir,
                             "function": None, "url": None}
    assert cfg["critic"]["model_path"] == rm_dir
    assert cfg["model"]["path"] == str(rlhf["again"].stage("sft").model_dir)
    # step 0's evaluation is the SFT model, sampled by the same engine with the same settings
    assert ppo.after["eval/gold_reward"] >= ppo.before["eval/gold_reward"] + PPO_GOLD_GAIN, ppo
    assert ppo.after["eval/reward"] > ppo.before["eval/reward"]  # the proxy rose too


def test_dpo_from_the_same_sft_model_learns_the_preference(rlhf):
    dpo = rlhf["again"].stage("dpo")
    assert dpo.before["eval/accuracy"] == pytest.approx(0.5)
    assert dpo.after["eval/accuracy"] >= 0.7, dpo
