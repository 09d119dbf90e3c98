"""The synthetic preference task and the locally built tiny model/tokenizer."""
from __future__ import annotations

import json

import pytest

from orchestrator import synthetic
from orchestrator.synthetic import (BRIGHT, DULL, NEUTRAL, make_pairs, make_sft, reward,
                                   write_dataset)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("response, expected", [
    ("sun gold ash river", (2 - 1) / 4),
    ("sun", 1.0),
    ("ash", -1.0),
    ("river table", 0.0),
    ("", 0.0),
    ("   ", 0.0),
    ("Sun, GOLD! ash. dust; fog? river", (2 - 3) / 6),  # punctuation and case ignored
    ("sunny golden", 0.0),                              # whole words only
    ("ash ash ash sun", (1 - 3) / 4),
])
def test_reward_by_hand(response, expected):
    assert reward("any prompt", response) == pytest.approx(expected)


def test_word_lists_disjoint():
    assert not set(BRIGHT) & set(DULL)
    assert not (set(BRIGHT) | set(DULL)) & set(NEUTRAL)


def test_make_pairs_rows():
    rows = make_pairs(200, seed=3, min_words=4, max_words=9)
    assert len(rows) == 200
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}
        assert row["chosen_reward"] > row["rejected_reward"]
        assert row["chosen_reward"] == pytest.approx(reward(row["prompt"], row["chosen"]))
        assert row["rejected_reward"] == pytest.approx(reward(row["prompt"], row["rejected"]))
        for key in ("chosen", "rejected"):
            assert 4 <= len(row[key].split()) <= 9
            assert set(row[key].split()) <= set(BRIGHT) | set(DULL) | set(NEUTRAL)
        assert row["prompt"].strip()


def test_make_pairs_seeded():
    assert make_pairs(20, seed=1) == make_pairs(20, seed=1)
    assert make_pairs(20, seed=1) != make_pairs(20, seed=2)


def test_write_dataset(tmp_path):
    paths = write_dataset(tmp_path / "d", n_train=12, n_eval=5, seed=0, min_words=2, max_words=5)
    train = [json.loads(x) for x in paths["train"].read_text().splitlines()]
    ev = [json.loads(x) for x in paths["eval"].read_text().splitlines()]
    assert len(train) == 12 and len(ev) == 5
    assert train == make_pairs(12, 0, 2, 5)
    assert ev != train[:5]
    sft = [json.loads(x) for x in paths["sft"].read_text().splitlines()]
    sft_eval = [json.loads(x) for x in paths["sft_eval"].read_text().splitlines()]
    assert len(sft) == 12 and len(sft_eval) == 5 and sft != sft_eval[:5]
    assert len(write_dataset(tmp_path / "e", 4, 2, n_sft=9)["sft"].read_text().splitlines()) == 9


def test_sft_rows_lean_towards_the_preferred_style_with_noise():
    rows = make_sft(2000, seed=0, min_words=4, max_words=16)
    turns = [r for r in rows if "messages" in r]
    assert 0.05 < len(turns) / len(rows) < 0.15            # some two-turn conversations
    for r in turns:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"] * 2
    replies = [r["response"] for r in rows if "response" in r]
    replies += [m["content"] for r in turns for m in r["messages"] if m["role"] == "assistant"]
    scores = [reward("", t) for t in replies]
    mean = sum(scores) / len(scores)
    assert 0.2 < mean < 0.45                                 # leaning bright on average
    assert min(scores) < 0 and sum(s <= 0 for s in scores) > len(scores) * 0.05  # with noise
    for r in rows:
        assert not {"reward", "chosen_reward"} & set(r)      # no ground truth to train on
    assert make_sft(50, seed=1) == make_sft(50, seed=1) != make_sft(50, seed=2)


def test_corpus_covers_words():
    text = " ".join(synthetic.corpus())
    for word in BRIGHT + DULL + NEUTRAL:
        assert word in text


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from orchestrator.tiny_model import build_model

    return build_model(tmp_path_factory.mktemp("tiny"), "tiny")


def test_tiny_model_loads(tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (tiny_dir / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.head_dim == 64
    assert cfg.hidden_size // cfg.num_attention_heads == 64
    assert cfg.vocab_size >= len(tok)
    assert tok.eos_token == "<|end|>" and cfg.eos_token_id == tok.eos_token_id
    assert tok.pad_token_id == cfg.pad_token_id
    ids = tok("sun gold river", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size)
    assert torch.isfinite(logits).all()


def test_tiny_tokenizer_chat_template(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "Describe the sea."}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>Describe the sea.<|end|><|assistant|>"
    # special tokens are single ids
    for special in ("<|user|>", "<|end|>", "<|assistant|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_build_model_rejects_unknown_size(tmp_path):
    from orchestrator.tiny_model import build_model

    with pytest.raises(ValueError, match="size"):
        build_model(tmp_path, "huge")
