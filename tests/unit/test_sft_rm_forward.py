"""Conversations with several trained replies, token accuracy, and reward-model scores read at
each sequence's last token: packed == padded == the model run on each sequence alone."""
from __future__ import annotations

import pytest
import torch

from actors.logprobs import (build_inputs, pair_sequences, sequence_logprobs, sequence_scores,
                             token_logprobs_and_hits)
from orchestrator.data import PreferenceExample

pytestmark = pytest.mark.unit

VOCAB = 64
# (context, reply, context, reply): a conversation with two trained replies, and single turns
CONVS = [
    ([5, 6, 7], [8, 9], [10, 11], [12, 13, 14]),
    ([20], [21, 22, 23]),
    ([30, 31, 32, 33], [34], [35], [36, 37]),
]


def config(**extra):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=1, num_key_value_heads=1,
                       head_dim=64, max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
                       bos_token_id=None, **extra)


@pytest.fixture(scope="module")
def lm():
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(config()).eval()


@pytest.fixture(scope="module")
def rm():
    from transformers import LlamaForSequenceClassification
    torch.manual_seed(0)
    return LlamaForSequenceClassification(config(num_labels=1)).eval()


def test_build_inputs_keeps_only_reply_positions():
    inp = build_inputs([CONVS[0]], pack=True)
    assert inp.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]
    # replies at offsets 3-4 and 7-9, predicted from positions 2-3 and 6-8
    assert inp.keep.tolist() == [2, 3, 6, 7, 8]
    assert inp.targets.tolist() == [8, 9, 12, 13, 14]
    assert inp.last.tolist() == [9]


def test_last_positions_in_sequence_order_when_packed():
    # lengths 4, 2, 2: the two short ones share row 1 (flat offset 4)
    inp = build_inputs([([1, 2], [3, 4]), ([5], [6]), ([7], [8])], pack=True)
    assert inp.last.tolist() == [3, 5, 7]
    padded = build_inputs([([1, 2], [3, 4]), ([5], [6])], pack=False)
    assert padded.last.tolist() == [3, 5]


@pytest.mark.parametrize("pack", [True, False])
def test_multi_reply_logprobs_equal_each_conversation_alone(lm, pack):
    with torch.no_grad():
        out, counts = sequence_logprobs(lm, build_inputs(CONVS, pack=pack))
        expected = []
        for conv in CONVS:
            flat = [t for seg in conv for t in seg]
            logp = torch.log_softmax(lm(input_ids=torch.tensor([flat])).logits[0], -1)
            total, offset = 0.0, 0
            for k, seg in enumerate(conv):
                if k % 2:
                    total += sum(logp[offset + j - 1, t].item() for j, t in enumerate(seg))
                offset += len(seg)
            expected.append(total)
    assert counts.tolist() == [5, 3, 3]
    assert out.tolist() == pytest.approx(expected, abs=1e-5)


def test_token_hits_are_argmax_matches(lm):
    inputs = build_inputs(CONVS, pack=True)
    with torch.no_grad():
        logp, hits = token_logprobs_and_hits(lm, inputs)
        full = lm(input_ids=inputs.input_ids, position_ids=inputs.position_ids).logits
    top = full.reshape(-1, VOCAB).argmax(-1)[inputs.keep]
    assert hits.tolist() == (top == inputs.targets).tolist()
    assert logp.shape == hits.shape == inputs.targets.shape


def _pairs():
    return [PreferenceExample([5, 6, 7], [8, 9, 1], [30, 1], row=1),
            PreferenceExample([10, 11], [12, 1], [40, 41, 42, 43, 1], row=2),
            PreferenceExample([3], [4, 5, 6, 1], [7, 1], row=3)]


@pytest.mark.parametrize("pack", [True, False])
def test_scores_equal_the_models_own_pooling_on_each_sequence(rm, pack):
    seqs = pair_sequences(_pairs())
    with torch.no_grad():
        scores = sequence_scores(rm, build_inputs(seqs, pack=pack))
        alone = [rm(input_ids=torch.tensor([p + r])).logits[0, 0].item() for p, r in seqs]
    assert scores.tolist() == pytest.approx(alone, abs=1e-5)


def test_scores_carry_gradients(rm):
    scores = sequence_scores(rm, build_inputs(pair_sequences(_pairs()), pack=True))
    (scores[0] - scores[3]).backward()
    assert rm.score.weight.grad is not None and rm.score.weight.grad.abs().sum() > 0
    rm.zero_grad(set_to_none=True)


def test_scores_need_a_score_head(lm):
    with pytest.raises(TypeError, match="has no 'score' head"):
        sequence_scores(lm, build_inputs(pair_sequences(_pairs()), pack=True))
