"""The last block's MLP run on the read positions only (actors/logprobs.py
last_mlp_on_positions): the log-probs, reward scores and gradients equal those of the full
forward in every supported family, and the MLP sees only those positions."""
from __future__ import annotations

import pytest
import torch

from actors import logprobs
from actors.logprobs import build_inputs, last_mlp, pair_inputs, sequence_scores, token_logprobs
from orchestrator.data import PreferenceExample
from orchestrator.tiny_model import ARCHS, arch_config

pytestmark = pytest.mark.unit

SEQS = [([5, 6, 7, 8], [9, 10]), ([11], [12, 13, 14]), ([15, 16], [17])]
PAIRS = [PreferenceExample([5, 6, 7], [8, 9], [10, 11, 12], row=0),
         PreferenceExample([13], [14, 15, 16], [17], row=1)]


def build(arch: str, cls_suffix: str):
    import transformers
    cfg, _ = arch_config(arch, "tiny", max_positions=64)
    cfg.num_labels = 1
    torch.manual_seed(0)
    name = ARCHS[arch][1].replace("ForCausalLM", cls_suffix)
    return getattr(transformers, name)(cfg).eval()


def full_forward(monkeypatch):
    """Turn the trick off: last_mlp finds no MLP, so every position runs it."""
    monkeypatch.setattr(logprobs, "last_mlp", lambda model: None)


def grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("pack", [True, False])
def test_logprobs_and_grads_equal_the_full_forward(arch, pack, monkeypatch):
    model = build(arch, "ForCausalLM")
    inputs = build_inputs(SEQS, pack)
    seen = []
    handle = last_mlp(model).register_forward_hook(
        lambda m, a, o: seen.append(a[0].shape[:-1].numel()))
    fast = token_logprobs(model, inputs)
    fast.sum().backward()
    handle.remove()
    fast_grads = grads(model)
    assert seen == [len(inputs.keep)]        # the MLP ran on the read positions alone
    model.zero_grad(set_to_none=True)
    with monkeypatch.context() as m:
        full_forward(m)
        slow = token_logprobs(model, inputs)
        slow.sum().backward()
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)
    slow_grads = grads(model)
    assert fast_grads.keys() == slow_grads.keys()
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], slow_grads[name], rtol=1e-4, atol=1e-6,
                                   msg=name)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_reward_scores_equal_the_full_forward(arch, monkeypatch):
    model = build(arch, "ForSequenceClassification")
    inputs = pair_inputs(PAIRS, pack=True)
    fast = sequence_scores(model, inputs)
    with monkeypatch.context() as m:
        full_forward(m)
        slow = sequence_scores(model, inputs)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)


def test_left_off_under_gradient_checkpointing():
    model = build("llama", "ForCausalLM").train()
    model.gradient_checkpointing_enable()
    inputs = build_inputs(SEQS, True)
    seen = []
    last_mlp(model).register_forward_hook(
        lambda m, a, o: seen.append(a[0].shape[:-1].numel()))
    token_logprobs(model, inputs).sum().backward()
    assert seen and all(n == inputs.input_ids.numel() for n in seen)
