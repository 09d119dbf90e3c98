"""The varlen attention (actors/packed_attention.py): sequences packed into one row without
padding give what each sequence gives alone, values and gradients; a preference pair's prompt
laid out once serves both responses; anything else falls back to sdpa."""
from __future__ import annotations

import pytest
import torch

from actors import packed_attention
from actors.logprobs import (build_inputs, pair_inputs, pair_sequences, sequence_logprobs,
                             sequence_scores)
from orchestrator.data import PreferenceExample

pytestmark = pytest.mark.unit

VOCAB = 64
SEQS = [([5, 6, 7], [8, 9]), ([10], [11, 12, 13, 14, 15]), ([1, 2, 3, 4, 5, 6, 7, 8], [9]),
        ([20, 21], [22, 23, 24])]
PAIRS = [PreferenceExample([5, 6, 7], [8, 9, 1], [30, 1], row=1),
         PreferenceExample([10, 11], [12, 1], [40, 41, 42, 43, 1], row=2),
         PreferenceExample([3], [4, 5, 6, 1], [7, 1], row=3)]


def config(**extra):
    from transformers import LlamaConfig
    # 4 query heads over 2 key/value heads: grouped-query attention on the varlen path too
    return LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=32, max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
                       bos_token_id=None, **extra)


def twins(cls, **extra):
    """The same random weights loaded twice: with varlen and with sdpa attention."""
    torch.manual_seed(0)
    a = cls(config(**extra))
    b = cls(config(**extra))
    b.load_state_dict(a.state_dict())
    a.config._attn_implementation, b.config._attn_implementation = "varlen", "sdpa"
    return a.eval(), b.eval()


@pytest.fixture(scope="module")
def lms():
    from transformers import LlamaForCausalLM
    return twins(LlamaForCausalLM)


def alone(model, seqs):
    """Each sequence in a forward of its own: summed response log-probs."""
    out = []
    with torch.no_grad():
        for p, r in seqs:
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + r])).logits[0], -1)
            out.append(sum(logp[len(p) + j - 1, t].item() for j, t in enumerate(r)))
    return out


def test_one_row_has_no_padding_and_restarts_positions():
    inp = build_inputs(SEQS, "one_row")
    assert inp.input_ids.shape == (1, sum(len(p) + len(r) for p, r in SEQS))
    assert inp.position_ids.tolist()[0][:5] == [0, 1, 2, 3, 4] and inp.attention_mask is None
    assert inp.position_ids.tolist()[0][5:11] == list(range(6))


def test_one_row_equals_each_sequence_alone(lms):
    varlen, sdpa = lms
    with torch.no_grad():
        packed, _ = sequence_logprobs(varlen, build_inputs(SEQS, "one_row"))
        rows, _ = sequence_logprobs(sdpa, build_inputs(SEQS, True))
    assert packed.tolist() == pytest.approx(alone(sdpa, SEQS), abs=1e-5)
    assert packed.tolist() == pytest.approx(rows.tolist(), abs=1e-5)


def test_one_row_gradients_equal_padded_ones(lms):
    varlen, sdpa = lms
    for model, inputs in ((varlen, build_inputs(SEQS, "one_row")), (sdpa, build_inputs(SEQS, False))):
        model.zero_grad(set_to_none=True)
        sequence_logprobs(model, inputs)[0].sum().backward()
    for (name, a), (_, b) in zip(varlen.named_parameters(), sdpa.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
    varlen.zero_grad(set_to_none=True)
    sdpa.zero_grad(set_to_none=True)


# sampled groups: responses of one prompt side by side (its prompt laid out once, the rest
# branches off it), some of one length; then whole sequences of one length, prompts apart
EQUAL = [([5, 6, 7], [8, 9]), ([5, 6, 7], [10, 11]), ([5, 6, 7], [12, 13]), ([1], [2, 3]),
         ([4, 5], [6, 7, 8]), ([4, 5], [9, 9, 9]), ([1, 2], [3, 4]), ([2, 1], [3, 4]),
         ([3], [4, 5, 6])]


def test_one_row_lays_a_shared_prompt_out_once():
    inp = build_inputs(EQUAL[:3] + [([5, 6, 7], [])] + [([5, 6, 7], [1])], "one_row")
    # the first sample whole, the next two as branches; a sample with no response is laid
    # out whole (nothing to branch) and the sample after it branches off that one
    assert inp.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 5, 6, 7, 1]]
    assert inp.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 3, 4, 0, 1, 2, 3]]
    # each branch's first token is predicted from the prompt's last position (2, or 11)
    assert inp.keep.tolist() == [2, 3, 2, 5, 2, 7, 11]
    assert inp.targets.tolist() == [8, 9, 10, 11, 12, 13, 1]
    assert inp.owner.tolist() == [0, 0, 1, 1, 2, 2, 4] and inp.last.tolist() == [4, 6, 8, 11, 12]


def test_runs_of_equal_sequences():
    inp = build_inputs(EQUAL, "one_row")
    pieces = packed_attention._pieces(inp.position_ids)
    assert pieces == [(5, 0, 0), (2, 0, 3), (2, 0, 3), (3, 3, 0), (5, 4, 0), (3, 4, 2),
                      (4, 6, 0), (4, 7, 0), (4, 8, 0)]
    # branches of one prompt batch together, and whole sequences that no branch continues
    assert packed_attention._runs(pieces) == [(0, 1), (1, 2), (3, 1), (4, 1), (5, 1), (6, 3)]
    # a sequence that a branch continues stays alone, even beside one of its own length
    assert packed_attention._runs([(4, 0, 0), (4, 1, 0), (2, 1, 2), (2, 1, 2), (4, 4, 0)]) == \
        [(0, 1), (1, 1), (2, 2), (4, 1)]


def test_equal_sequences_in_one_call_equal_each_alone_with_gradients(lms):
    varlen, sdpa = lms
    with torch.no_grad():
        packed, _ = sequence_logprobs(varlen, build_inputs(EQUAL, "one_row"))
    assert packed.tolist() == pytest.approx(alone(sdpa, EQUAL), abs=1e-5)
    for model, inputs in ((varlen, build_inputs(EQUAL, "one_row")),
                          (sdpa, build_inputs(EQUAL, False))):
        model.zero_grad(set_to_none=True)
        (sequence_logprobs(model, inputs)[0] * torch.arange(1.0, 10.0)).sum().backward()
    for (name, a), (_, b) in zip(varlen.named_parameters(), sdpa.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
    varlen.zero_grad(set_to_none=True)
    sdpa.zero_grad(set_to_none=True)


def test_pair_layout_shares_the_prompt():
    inp = pair_inputs(PAIRS[:1], "one_row")
    # prompt, chosen, rejected; the rejected positions continue from the prompt's
    assert inp.input_ids.tolist() == [[5, 6, 7, 8, 9, 1, 30, 1]]
    assert inp.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 3, 4]]
    # chosen from positions 2-4; rejected's first token from the prompt's last (2), then 6
    assert inp.keep.tolist() == [2, 3, 4, 2, 6]
    assert inp.targets.tolist() == [8, 9, 1, 30, 1]
    assert inp.owner.tolist() == [0, 0, 0, 1, 1] and inp.last.tolist() == [5, 7]


def test_shared_prompt_logprobs_equal_each_sequence_alone(lms):
    varlen, sdpa = lms
    with torch.no_grad():
        shared, counts = sequence_logprobs(varlen, pair_inputs(PAIRS, "one_row"))
    assert counts.tolist() == [len(p.chosen_ids) for p in PAIRS] + [len(p.rejected_ids) for p in PAIRS]
    assert shared.tolist() == pytest.approx(alone(sdpa, pair_sequences(PAIRS)), abs=1e-5)


def test_shared_prompt_gradients_equal_padded_ones(lms):
    """The prompt's last position predicts both responses' first tokens: it is in ``keep``
    twice, and the last block's parts that run on ``keep`` alone must run on it once (twice
    doubled its share of their gradients)."""
    varlen, sdpa = lms
    weights = torch.arange(1.0, 2 * len(PAIRS) + 1)
    for model, inputs in ((varlen, pair_inputs(PAIRS, "one_row")), (sdpa, pair_inputs(PAIRS, False))):
        model.zero_grad(set_to_none=True)
        (sequence_logprobs(model, inputs)[0] * weights).sum().backward()
    for (name, a), (_, b) in zip(varlen.named_parameters(), sdpa.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
    varlen.zero_grad(set_to_none=True)
    sdpa.zero_grad(set_to_none=True)


def test_shared_prompt_reward_scores_and_gradients():
    from transformers import LlamaForSequenceClassification
    varlen, sdpa = twins(LlamaForSequenceClassification, num_labels=1)
    a = sequence_scores(varlen, pair_inputs(PAIRS, "one_row"))
    b = sequence_scores(sdpa, pair_inputs(PAIRS, False))
    with torch.no_grad():
        own = [sdpa(input_ids=torch.tensor([p + r])).logits[0, 0].item()
               for p, r in pair_sequences(PAIRS)]
    assert a.tolist() == pytest.approx(own, abs=1e-5)
    (a[0] - 2 * a[4]).backward()
    (b[0] - 2 * b[4]).backward()
    for (name, x), (_, y) in zip(varlen.named_parameters(), sdpa.named_parameters()):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_pieces_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 3, 2, 3, 4, 0, 1, 1]])
    # a sequence of 4, a branch after its first 2 tokens, a new sequence, a branch after 1
    assert packed_attention._pieces(pos) == [(4, 0, 0), (3, 0, 2), (2, 2, 0), (1, 2, 1)]
    with pytest.raises(ValueError, match="continues 3 tokens of a sequence whose first run has 2"):
        packed_attention._pieces(torch.tensor([[0, 1, 3, 4]]))


def test_generation_falls_back_to_sdpa(lms):
    varlen, sdpa = lms
    prompt = torch.tensor([[5, 6, 7, 8]])
    kwargs = dict(do_sample=False, max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    assert varlen.generate(prompt, **kwargs).tolist() == sdpa.generate(prompt, **kwargs).tolist()
    # a left-padded batch (two rows, a padding mask) as well
    ids = torch.tensor([[0, 0, 5, 6], [9, 8, 7, 6]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert (varlen.generate(ids, attention_mask=mask, **kwargs).tolist()
            == sdpa.generate(ids, attention_mask=mask, **kwargs).tolist())


def test_sliding_window_longer_than_every_sequence_keeps_the_varlen_path(tmp_path):
    """A Mistral-style window (4096 in Mistral 7B v0.1) never cuts a short sequence, so rows
    with shared prompts still take the varlen path; a window that would cut one sends the
    row to transformers' mask, which cannot show a branch its prompt: refused, not wrong."""
    from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM
    for window in (4096, 4):
        cfg = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                            head_dim=32, max_position_embeddings=128, pad_token_id=0,
                            eos_token_id=1, bos_token_id=None, sliding_window=window)
        torch.manual_seed(0)
        MistralForCausalLM(cfg).save_pretrained(tmp_path / str(window))
        varlen, sdpa = (AutoModelForCausalLM.from_pretrained(tmp_path / str(window),
                                                             attn_implementation=a).eval()
                        for a in ("varlen", "sdpa"))
        with torch.no_grad():
            # no branches: transformers' own path (window 4) or ours (4096), both right
            plain, _ = sequence_logprobs(varlen, build_inputs(SEQS, "one_row"))
            assert plain.tolist() == pytest.approx(
                sequence_logprobs(sdpa, build_inputs(SEQS, False))[0].tolist(), abs=1e-5)
            if window == 4:
                with pytest.raises(ValueError, match="sliding window of 4 tokens.*sdpa"):
                    sequence_logprobs(varlen, pair_inputs(PAIRS, "one_row"))
                continue
            shared, _ = sequence_logprobs(varlen, pair_inputs(PAIRS, "one_row"))
            padded, _ = sequence_logprobs(sdpa, pair_inputs(PAIRS, False))
        assert shared.tolist() == pytest.approx(padded.tolist(), abs=1e-5)


def test_a_decoding_step_attends_like_sdpa():
    """One query per row over cached keys (grouped heads, left padding, no mask, a bool or an
    additive mask): the varlen function's two-product path gives sdpa's output."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    q, k, v = torch.randn(3, 4, 1, 16), torch.randn(3, 2, 7, 16), torch.randn(3, 2, 7, 16)
    keep = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7, [0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    for mask in (None, keep[:, None, None], torch.where(keep, 0.0, float("-inf"))[:, None, None]):
        want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
        got, _ = packed_attention.varlen_attention(module, q, k, v, mask, scaling=0.3)
        assert got.shape == want.shape == (3, 1, 4, 16)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
