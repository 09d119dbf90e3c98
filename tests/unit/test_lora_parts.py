"""LoRA (actors/lora.py): what leaves a trainer with adapters is the plain model's view of its
weights (each adapted layer merged, under the plain layer's name, in the plain model's order);
the adapters switched off give back the starting model; the config's rules around it."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from actors import lora
from actors.weight_sync import checkpoint_names, describe, full_parameters
from orchestrator.config import LoraConfig, RunConfig
from orchestrator.schema import ConfigError
from orchestrator.tiny_model import build_model

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt_neox"])
def model_dir(request, tmp_path_factory):
    return build_model(tmp_path_factory.mktemp(request.param) / "model", "tiny",
                       arch=request.param)


def trained_adapters(model, seed: int = 0):
    """Give every adapter a random update (peft starts B at zero: the merge would be a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def adapted(model_dir, kind="causal", **lora_kw):
    cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    kw = {} if kind == "causal" else {"num_labels": 1}
    base = cls.from_pretrained(model_dir, dtype=torch.float32, **kw)
    cfg = LoraConfig(rank=4, alpha=8.0, **lora_kw)
    return trained_adapters(lora.apply_lora(base, cfg, kind))


def test_merged_parameters_are_the_plain_model_with_adapters_merged(model_dir):
    model = adapted(model_dir)
    inner = lora.plain_model(model)
    assert lora.is_lora(model) and lora.has_adapters(inner)
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        expected_logits = model(input_ids=ids).logits
    ours = dict(lora.plain_parameters(inner, zero3=False))
    shapes = lora.plain_shapes(inner)
    # peft's own merge gives the plain model these weights should equal
    merged = model.merge_and_unload()
    plain = dict(merged.named_parameters())
    assert [n for n, _, _ in shapes] == list(ours) == list(plain)
    for name, dtype, shape in shapes:
        assert torch.allclose(ours[name], plain[name], atol=1e-6), name
        assert list(plain[name].shape) == shape and plain[name].dtype == dtype
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, expected_logits, atol=1e-5)


def test_weight_sync_sends_checkpoint_names_in_order(model_dir):
    """What an engine loads by: the names of the model's own checkpoint, every one of them,
    in the order the metadata announces them."""
    inner = lora.plain_model(adapted(model_dir))
    info = describe(inner)
    tied = inner.config.get_text_config().tie_word_embeddings
    assert set(info.names) == checkpoint_names(str(model_dir), tied)
    assert [n for n, _ in full_parameters(inner, zero3=False)] == info.names


def test_adapters_off_give_the_starting_model(model_dir):
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        start = base(input_ids=ids).logits
        model = adapted(model_dir)
        with lora.base_weights(model):
            off = model(input_ids=ids).logits
        on = model(input_ids=ids).logits
    assert torch.equal(off, start)
    assert not torch.allclose(on, start, atol=1e-4)  # the adapters do move it


def test_only_adapters_train_and_the_output_head_is_left_alone(model_dir):
    model = adapted(model_dir)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert not any("lm_head" in n or "embed_out" in n for n in trained)


def test_classifier_head_trains_in_full_and_is_saved_plain(model_dir):
    model = adapted(model_dir, "classifier")
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("base_model.model.score.modules_to_save") for n in trained)
    inner = lora.plain_model(model)
    ours = dict(lora.plain_parameters(inner, zero3=False))
    head = model.base_model.model.score.modules_to_save["default"].weight
    assert torch.equal(ours["score.weight"], head.detach())
    assert [n for n, _, _ in lora.plain_shapes(inner)] == list(ours)
    assert list(ours) == [n for n, _ in model.merge_and_unload().named_parameters()]


@pytest.mark.parametrize("kind", ["causal", "classifier"])
def test_saved_adapter_dir_loads_back_to_the_same_model(model_dir, kind, tmp_path):
    """What a checkpoint's step-N/adapter holds (trained_state through peft's save_pretrained)
    is the whole trained part: peft loads it onto a fresh base as the same model, a
    classifier's fully trained head included."""
    from peft import PeftModel
    targets = ["all-linear", "embed_in" if "neox" in str(model_dir) else "embed_tokens"]
    model = adapted(model_dir, kind, target_modules=targets)
    model.save_pretrained(str(tmp_path / "adapter"), save_embedding_layers=False,
                          state_dict=lora.trained_state(model, zero3=False, rank=0))
    cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    fresh = cls.from_pretrained(model_dir, dtype=torch.float32,
                                **({} if kind == "causal" else {"num_labels": 1}))
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    lora.tie_head_to_embedding(loaded)
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits,
                              atol=1e-5)


def test_named_target_modules(model_dir):
    model = adapted(model_dir, target_modules=["v_proj"]) if "neox" not in str(model_dir) \
        else adapted(model_dir, target_modules=["query_key_value"])
    adapted_layers = {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted_layers and all(n.endswith(("v_proj", "query_key_value"))
                                  for n in adapted_layers)


def test_adapters_on_the_embedding_table_are_what_a_merged_copy_holds(model_dir):
    """Adapters on the input embedding table (tied to the output head in llama and qwen2, not
    in gpt_neox): the model that trains computes what the merged weights compute, head
    included, and gets gradients from the head side as well."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    table = next(n for n, m in base.named_modules() if m is base.get_input_embeddings())
    tied = base.config.get_text_config().tie_word_embeddings
    model = adapted(model_dir, target_modules=["all-linear", table.rsplit(".", 1)[-1]])
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_embedding_A" in n for n in trained)
    assert any(n.endswith("proj.lora_A.default.weight") or "dense" in n for n in trained)
    ids = torch.randint(0, 100, (2, 12))
    logits = model(input_ids=ids).logits
    # a plain model holding the merged weights computes the same logits
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    merged = dict(lora.plain_parameters(lora.plain_model(model), zero3=False))
    plain.load_state_dict(merged, strict=not tied)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, logits, atol=1e-5)
        with lora.base_weights(model):
            assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    if tied:  # the head's own term carries gradient into the table's adapters: token 7's
        # logit, on inputs without token 7, reaches them through the head alone
        ids = torch.randint(8, 100, (2, 12))
        model(input_ids=ids).logits[:, -1, 7].sum().backward()
        grad = lora.plain_model(model).get_input_embeddings().lora_embedding_A["default"].grad
        assert grad is not None and grad[:, 7].abs().sum() > 0


def test_tied_head_takes_no_adapters_of_its_own(tmp_path):
    tied = build_model(tmp_path / "llama", "tiny", arch="llama")
    untied = build_model(tmp_path / "mistral", "tiny", arch="mistral")
    (tmp_path / "t.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    with pytest.raises(ConfigError, match=r"policy.lora.target_modules: lm_head .*\(tied\); name "
                                          r"the table instead \(embed_tokens\)"):
        RunConfig.from_dict({"model": {"path": str(tied)}, "data": {"train": str(tmp_path / "t.jsonl")}},
                            ["policy.lora.rank=8", "policy.lora.target_modules=[lm_head]"]
                            ).check_paths()
    for model, targets in ((tied, "[all-linear, embed_tokens]"), (untied, "[lm_head]")):
        RunConfig.from_dict({"model": {"path": str(model)}, "data": {"train": str(tmp_path / "t.jsonl")}},
                            ["policy.lora.rank=8", f"policy.lora.target_modules={targets}"]
                            ).check_paths()


def run_config(tmp_path, *overrides):
    return RunConfig.from_dict({"model": {"path": str(tmp_path)},
                                "data": {"train": str(tmp_path / "t.jsonl")}}, list(overrides))


def test_reference_from_policy_base_needs_adapters(tmp_path):
    with pytest.raises(ConfigError, match=r"reference.from: policy_base .* policy.lora.rank"):
        run_config(tmp_path, "reference.from=policy_base")
    cfg = run_config(tmp_path, "reference.from=policy_base", "policy.lora.rank=8")
    assert cfg.reference.source == "policy_base" and cfg.roles() == ["policy"]
    assert cfg.to_dict()["reference"]["from"] == "policy_base"
    assert RunConfig.from_dict(cfg.to_dict()).reference.source == "policy_base"
    assert run_config(tmp_path).roles() == ["policy", "reference"]
    grpo = run_config(tmp_path, "algorithm=grpo", "reference.from=policy_base",
                      "policy.lora.rank=8", "train.batch_size=16", "rl.prompts_per_step=2",
                      "reward.function=orchestrator.synthetic:reward")
    assert "reference" not in grpo.roles() and "policy" in grpo.roles()
    with pytest.raises(ConfigError, match="reference.from: got 'base'"):
        run_config(tmp_path, "reference.from=base")


def test_value_model_with_adapters_keeps_its_head_whole(model_dir):
    """critic.lora: the token-level value head trains in full, the transformer by adapters."""
    from actors.critic import load_value_model
    model = load_value_model(str(model_dir), "float32", "sdpa")
    model = trained_adapters(lora.apply_lora(model, LoraConfig(rank=4), "classifier"))
    trained = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad}
    assert trained & {"score", "classifier"}
    inner = lora.plain_model(model)
    ours = dict(lora.plain_parameters(inner, zero3=False))
    assert list(ours) == [n for n, _ in model.merge_and_unload().named_parameters()]
