"""The last block's per-position parts (query and output projections, MLP) run on the read
positions only (actors/logprobs.py last_block_on_positions): the log-probs, reward scores and
gradients equal those of the full forward in every supported family, and each part sees only
those positions."""
from __future__ import annotations

import pytest
import torch

from actors import logprobs
from actors.logprobs import (build_inputs, last_block_parts, pair_inputs, sequence_scores,
                             token_logprobs)
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
    """Turn the trick off: no part is picked, so every position runs every part."""
    monkeypatch.setattr(logprobs, "last_block_parts", lambda model: [])


def watch(model) -> tuple[dict, list]:
    """Positions each last-block part ran on, by the part's name; and the hook handles."""
    names = {m: n for n, m in model.named_modules()}
    seen, handles = {}, []
    for part in last_block_parts(model):
        handles.append(part.register_forward_hook(
            lambda m, a, o: seen.setdefault(names[m], []).append(a[0].shape[:-1].numel())))
    return seen, handles


# The parts each family's last block runs on the read positions alone.
PARTS = {"gpt_neox": ["attention.dense", "mlp"]}
DEFAULT_PARTS = ["self_attn.q_proj", "self_attn.o_proj", "mlp"]


def grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("pack", [True, False])
def test_logprobs_and_grads_equal_the_full_forward(arch, pack, monkeypatch):
    model = build(arch, "ForCausalLM")
    inputs = build_inputs(SEQS, pack)
    seen, handles = watch(model)
    fast = token_logprobs(model, inputs)
    fast.sum().backward()
    for h in handles:
        h.remove()
    fast_grads = grads(model)
    assert sorted(n.split(".", 3)[-1] for n in seen) == sorted(PARTS.get(arch, DEFAULT_PARTS))
    for name, counts in seen.items():        # each part ran on the read positions alone
        assert counts == [len(inputs.keep)], name
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
    seen, _ = watch(model)
    fast = sequence_scores(model, inputs)
    assert len(seen) == len(PARTS.get(arch, DEFAULT_PARTS))
    assert all(counts == [len(inputs.last)] for counts in seen.values()), seen
    with monkeypatch.context() as m:
        full_forward(m)
        slow = sequence_scores(model, inputs)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)


def test_left_off_under_gradient_checkpointing():
    model = build("llama", "ForCausalLM").train()
    model.gradient_checkpointing_enable()
    inputs = build_inputs(SEQS, True)
    seen, _ = watch(model)
    token_logprobs(model, inputs).sum().backward()
    assert seen and all(n == inputs.input_ids.numel() for c in seen.values() for n in c)
