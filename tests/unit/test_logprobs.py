"""Response log-probs: packed == padded == a plain per-sequence reference; prompts excluded."""
from __future__ import annotations


import pytest
import torch

from actors.logprobs import build_inputs, pack_rows, pair_logprobs, pair_sequences, sequence_logprobs
from orchestrator.data import PreferenceExample

pytestmark = pytest.mark.unit

VOCAB = 64

# (prompt ids, response ids) of different lengths, including a 1-token prompt and response
SEQS = [
    ([5, 6, 7], [8, 9]),
    ([10], [11, 12, 13, 14, 15]),
    ([1, 2, 3, 4, 5, 6, 7, 8], [9]),
    ([20, 21], [22, 23, 24]),
]


def make_model(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=1, num_key_value_heads=1,
                      head_dim=64, max_position_embeddings=128, tie_word_embeddings=False,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None)
    cfg._attn_implementation = attn
    model = LlamaForCausalLM(cfg).float().eval()
    return model


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return make_model(request.param)


def reference_logprobs(model, seqs):
    """Each sequence alone, full forward, log_softmax, sum over response-token predictions."""
    out = []
    with torch.no_grad():
        for p, r in seqs:
            ids = torch.tensor([p + r])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            total = 0.0
            for j, tok in enumerate(r):
                total += logp[len(p) + j - 1, tok].item()
            out.append(total)
    return out


def test_build_inputs_packed_layout():
    # lengths 4, 2, 2: rows as wide as the longest; the two short ones share the second row
    inp = build_inputs([([1, 2], [3, 4]), ([5], [6]), ([7], [8])], pack=True)
    assert inp.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert inp.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 0, 1]]
    assert inp.attention_mask is None
    # flat positions: 1 predicts 3, 2 predicts 4, 4 predicts 6, 6 predicts 8
    assert inp.keep.tolist() == [1, 2, 4, 6]
    assert inp.targets.tolist() == [3, 4, 6, 8]
    assert inp.owner.tolist() == [0, 0, 1, 2]
    assert inp.num_sequences == 3


def test_pack_rows_fills_rows_first_fit_decreasing():
    width, rows = pack_rows([5, 3, 2, 4, 1])
    assert width == 5
    assert rows == [[0], [3, 4], [1, 2]]
    assert sorted(s for r in rows for s in r) == list(range(5))


def test_build_inputs_padded_layout():
    inp = build_inputs([([1, 2], [3, 4]), ([5], [6])], pack=False, pad_id=0)
    assert inp.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 0, 0]]
    assert inp.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    # positions of real tokens count from 0 in each row (padding positions are masked out)
    assert inp.position_ids.tolist()[0] == [0, 1, 2, 3]
    assert inp.position_ids.tolist()[1][:2] == [0, 1]
    assert inp.keep.tolist() == [1, 2, 4]
    assert inp.targets.tolist() == [3, 4, 6]
    assert inp.owner.tolist() == [0, 0, 1]


def test_packed_equals_padded_equals_reference(model):
    with torch.no_grad():
        packed, n_packed = sequence_logprobs(model, build_inputs(SEQS, pack=True))
        padded, n_padded = sequence_logprobs(model, build_inputs(SEQS, pack=False))
    ref = torch.tensor(reference_logprobs(model, SEQS), dtype=torch.float32)
    assert n_packed.tolist() == n_padded.tolist() == [len(r) for _, r in SEQS]
    assert torch.allclose(packed, padded, atol=1e-5, rtol=0), (packed, padded)
    assert torch.allclose(packed, ref, atol=1e-5, rtol=0), (packed, ref)
    assert torch.allclose(padded, ref, atol=1e-5, rtol=0), (padded, ref)
    assert (packed < 0).all()


def test_single_sequence_both_layouts(model):
    seqs = SEQS[1:2]
    with torch.no_grad():
        packed, _ = sequence_logprobs(model, build_inputs(seqs, pack=True))
        padded, _ = sequence_logprobs(model, build_inputs(seqs, pack=False))
    ref = reference_logprobs(model, seqs)
    assert packed.item() == pytest.approx(ref[0], abs=1e-5)
    assert padded.item() == pytest.approx(ref[0], abs=1e-5)


def test_gradients_flow(model):
    out, _ = sequence_logprobs(model, build_inputs(SEQS[:2], pack=True))
    out.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)


def test_entropy_is_a_figure_unless_asked_to_carry_gradients(model):
    """The RL update's entropy: the same values either way; with ``entropy_grad`` an entropy
    term in the loss reaches the weights."""
    from actors.logprobs import token_logprobs
    inputs = build_inputs(SEQS[:2], pack=True)
    logp, entropy = token_logprobs(model, inputs, entropy=True)
    logp_g, entropy_g = token_logprobs(model, inputs, entropy=True, entropy_grad=True)
    assert not entropy.requires_grad and entropy_g.requires_grad and logp.requires_grad
    assert torch.allclose(logp, logp_g, atol=1e-5)
    assert torch.allclose(entropy, entropy_g, atol=1e-5)
    assert (entropy > 0).all() and (entropy <= torch.log(torch.tensor(float(VOCAB))) + 1e-5).all()
    entropy_g.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("pack", [True, False])
def test_lm_head_sees_only_response_positions(model, pack):
    """Prompt and padding positions never reach the LM head, so they cannot count."""
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda _m, args, _out: seen.append(args[0].shape))
    try:
        with torch.no_grad():
            sequence_logprobs(model, build_inputs(SEQS, pack=pack))
    finally:
        handle.remove()
    assert seen == [torch.Size([1, sum(len(r) for _, r in SEQS), model.config.hidden_size])]


def test_prompt_tokens_excluded_from_sum(model):
    # the sum has exactly len(response) terms: equal to the per-response-token reference,
    # and different from a sum that also counts the prompt tokens
    p, r = SEQS[2]
    with torch.no_grad():
        out, counts = sequence_logprobs(model, build_inputs([(p, r)], pack=True))
        logp = torch.log_softmax(model(input_ids=torch.tensor([p + r])).logits[0], -1)
    full = p + r
    response_only = sum(logp[t - 1, full[t]].item() for t in range(len(p), len(full)))
    with_prompt = sum(logp[t - 1, full[t]].item() for t in range(1, len(full)))
    assert counts.tolist() == [len(r)]
    assert out.item() == pytest.approx(response_only, abs=1e-5)
    assert abs(out.item() - with_prompt) > 1e-2


def _pairs():
    return [
        PreferenceExample([5, 6, 7], [8, 9, 1], [30, 1], row=1),
        PreferenceExample([10, 11], [12, 1], [40, 41, 42, 43, 1], row=2),
        PreferenceExample([3], [4, 5, 6, 1], [7, 1], row=3),
    ]


def test_pair_sequences_order():
    pairs = _pairs()
    seqs = pair_sequences(pairs)
    assert seqs[:3] == [(p.prompt_ids, p.chosen_ids) for p in pairs]
    assert seqs[3:] == [(p.prompt_ids, p.rejected_ids) for p in pairs]


@pytest.mark.parametrize("pack, micro_batch", [(True, 2), (False, 2), (True, 8)])
def test_pair_logprobs_chosen_rejected_in_order(model, pack, micro_batch):
    pairs = _pairs()
    out = pair_logprobs(model, pairs, micro_batch=micro_batch, pack=pack)
    assert len(out) == len(pairs)
    chosen = reference_logprobs(model, [(p.prompt_ids, p.chosen_ids) for p in pairs])
    rejected = reference_logprobs(model, [(p.prompt_ids, p.rejected_ids) for p in pairs])
    for (c, r), ec, er in zip(out, chosen, rejected):
        assert c == pytest.approx(ec, abs=1e-5)
        assert r == pytest.approx(er, abs=1e-5)
    assert isinstance(out[0], tuple) and isinstance(out[0][0], float)


def test_response_logprobs_packed_rows_come_back_in_sequence_order(model):
    # packing reorders sequences into rows by length; per-token results must not follow it
    from actors.logprobs import response_logprobs
    packed = response_logprobs(model, SEQS, micro_batch=8, pack=True)
    padded = response_logprobs(model, SEQS, micro_batch=2, pack=False)
    ref = []
    with torch.no_grad():
        for p, r in SEQS:
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + r])).logits[0], -1)
            full = p + r
            ref.append([logp[t - 1, full[t]].item() for t in range(len(p), len(full))])
    assert [len(x) for x in packed] == [len(r) for _, r in SEQS]
    for a, b, c in zip(packed, padded, ref):
        assert a == pytest.approx(c, abs=1e-5)
        assert b == pytest.approx(c, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_target_logprobs_match_autograd_through_log_softmax(dtype):
    """The fused log-prob of a target (values, gradient, the row's best log-prob) against the
    plain autograd form, including a row whose logits are far from 0, a target repeated across
    rows and rows whose target is the most likely token; with and without a backward."""
    from actors.logprobs import target_logprobs
    torch.manual_seed(0)
    logits = torch.randn(6, VOCAB, dtype=dtype) * 3
    logits[2] += 80.0
    targets = torch.tensor([0, 5, 5, VOCAB - 1, 7, 5])
    targets[1] = int(logits[1].argmax())
    targets[4] = int(logits[4].argmax())
    ours_in = logits.clone().requires_grad_(True)
    ref_in = logits.clone().requires_grad_(True)
    ours, top, none = target_logprobs(ours_in, targets)
    assert none.numel() == 0
    ref_all = torch.log_softmax(ref_in, -1)
    ref = ref_all.gather(-1, targets[:, None]).squeeze(-1)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(ours, ref, atol=tol, rtol=0)
    assert torch.allclose(top, ref_all.amax(-1), atol=tol, rtol=0)
    assert (ours >= top).tolist() == (targets == logits.argmax(-1)).tolist()
    assert (ours >= top).tolist() == [False, True, False, False, True, False]
    with torch.no_grad():  # scoring: the same figures without the autograd function
        plain, plain_top, _ = target_logprobs(ours_in, targets)
    assert torch.allclose(plain, ours, atol=tol, rtol=0) and torch.equal(plain_top, top)
    ref_entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            _, _, entropy = target_logprobs(ours_in, targets, with_entropy=True)
        assert not entropy.requires_grad
        assert torch.allclose(entropy, ref_entropy, atol=tol, rtol=0)
    weights = torch.randn(6, dtype=dtype)
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    assert torch.allclose(ours_in.grad, ref_in.grad, atol=tol, rtol=0)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda x: target_logprobs(x, targets)[0],
                                        (ref_in.detach().requires_grad_(True),))
