"""Model families beyond Llama (``rayalign tiny-model --arch``): Qwen2 (qkv biases), Mistral
(untied head), Gemma (scaled embeddings, GeLU) and GPT-NeoX (fused query_key_value, partial
rotary, a head transformers renames on load). Each trains DPO, and GRPO with a vLLM engine
whose sampling log-probs equal the trainer's before the first update and after each weight
sync (``logprob_gap``), which a sync that missed or misnamed a tensor would break."""
from __future__ import annotations

import json

import pytest

from orchestrator import RunConfig, train
from orchestrator.tiny_model import build_model

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("shared_ray")]

FAMILIES = ("qwen2", "mistral", "gemma", "gpt_neox")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    arch = request.param
    return arch, str(build_model(tmp_path_factory.mktemp(arch) / "model", "tiny", arch=arch))


def steps(run_dir) -> list[dict]:
    return [r for r in (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text()
                        .splitlines()) if "timing/step" in r]


def test_family_trains_dpo_and_grpo_with_synced_vllm(family, make_config, grpo_config,
                                                    tmp_path):
    arch, model = family
    dpo = train(make_config(f"model.path={model}", "train.max_steps=2", "eval.reward_fn=null",
                            "eval.max_pairs=16", run_dir=tmp_path / "dpo"))
    rows = steps(dpo.run_dir)
    assert len(rows) == 2 and all(r["loss"] == r["loss"] for r in rows), arch
    grpo = train(RunConfig.from_dict(grpo_config(
        tmp_path / "grpo", model={"path": model}, train={"max_steps": 3},
        rollout={"backend": "vllm", "kv_cache_gib": 0.25}, optim={"lr": 1e-2})))
    rows = steps(grpo.run_dir)
    assert len(rows) == 3
    # the engine samples with the trainer's weights: at the start, and after each sync
    assert all(r["logprob_gap"] < 1e-3 for r in rows), (arch, [r["logprob_gap"] for r in rows])
    # the policy was updated (a group whose samples all score alike has no gradient, so one
    # step may have none; every step none would leave the syncs above nothing to carry)
    assert max(r["grad_norm"] for r in rows[:-1]) > 0, (arch, [r["grad_norm"] for r in rows])


def test_family_with_shipped_code_trains_with_trust_remote_code(shipped_model, grpo_config,
                                                                tmp_path):
    """A checkpoint whose modelling code ships beside its weights (config.json auto_map): the
    policy, reference and rollout engine load it with ``model.trust_remote_code``."""
    grpo = train(RunConfig.from_dict(grpo_config(
        tmp_path / "grpo", model={"path": str(shipped_model), "trust_remote_code": True},
        train={"max_steps": 2})))
    rows = steps(grpo.run_dir)
    assert len(rows) == 2 and rows[-1]["grad_norm"] > 0
    saved = json.loads((grpo.model_dir / "config.json").read_text())
    assert saved["model_type"] == "rayalign_shipped" and "auto_map" in saved
