"""SFT rows (prompt/response or whole conversations), truncation to max_length, margins."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.data import DataError, fit_segments, load_preferences, load_sft
from orchestrator.tiny_model import build_tokenizer

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(512)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def render_ids(tok, messages, generation=False):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    return tok(text, add_special_tokens=False)["input_ids"]


CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Describe the sea."},
                {"role": "assistant", "content": "sun gold river"},
                {"role": "user", "content": "And a city?"},
                {"role": "assistant", "content": "bright warm market"}]


def test_prompt_response_row_is_prompt_then_response_with_eos(tmp_path, tok):
    rows = [{"prompt": "Describe the sea.", "response": "sun gold river"}]
    (ex,), report = load_sft(write_jsonl(tmp_path / "s.jsonl", rows), tok, 128)
    user = [{"role": "user", "content": "Describe the sea."}]
    assert ex.segments == (render_ids(tok, user, generation=True),
                           tok("sun gold river", add_special_tokens=False)["input_ids"]
                           + [tok.eos_token_id])
    assert ex.prompt_text == "Describe the sea." and ex.row == 1
    assert ex.target_tokens == len(ex.segments[1]) and report.kept == 1


def test_conversation_trains_every_assistant_turn_and_renders_as_the_template(tmp_path, tok):
    (ex,), _ = load_sft(write_jsonl(tmp_path / "s.jsonl", [{"messages": CONVERSATION}]), tok, 128)
    assert len(ex.segments) == 4
    flat = [t for seg in ex.segments for t in seg]
    assert flat == render_ids(tok, CONVERSATION)   # nothing lost or added between the turns
    for reply, content in zip(ex.segments[1::2], ("sun gold river", "bright warm market")):
        assert reply == tok(content, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # the second context is the user turn and the next generation prompt, nothing of the reply
    assert ex.segments[2] == tok("<|user|>And a city?<|end|><|assistant|>",
                                 add_special_tokens=False)["input_ids"]
    assert ex.prompt_ids == render_ids(tok, CONVERSATION[:4], generation=True)
    assert ex.prompt_text == "And a city?"


def test_single_turn_conversation_equals_prompt_response_row(tmp_path, tok):
    a, _ = load_sft(write_jsonl(tmp_path / "a.jsonl", [{"messages": CONVERSATION[:3]}]), tok, 128)
    b, _ = load_sft(write_jsonl(tmp_path / "b.jsonl", [
        {"prompt": CONVERSATION[:2], "response": "sun gold river"}]), tok, 128)
    assert a[0].segments == b[0].segments


@pytest.mark.parametrize("row, field, what", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant message"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages", "first message"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
     "messages", "empty assistant reply"),
    ({"messages": "hello"}, "messages", "list of chat messages"),
    ({"prompt": "hi"}, "response", "missing"),
    ({"prompt": "hi", "response": ""}, "response", "empty response"),
    ({"response": "sun"}, "prompt", "missing"),
])
def test_bad_sft_rows_name_row_and_field(tmp_path, tok, row, field, what):
    good = {"prompt": "p", "response": "sun"}
    path = write_jsonl(tmp_path / "s.jsonl", [good, row])
    with pytest.raises(DataError, match=rf"row 2: field '{field}': .*{what}"):
        load_sft(path, tok, 128)
    kept, report = load_sft(path, tok, 128, on_bad_row="skip")
    assert [e.row for e in kept] == [1] and sum(report.skipped.values()) == 1


def test_template_that_changes_the_reply_is_refused(tmp_path):
    tok = build_tokenizer(512)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | upper }}"
                         "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    path = write_jsonl(tmp_path / "s.jsonl", [{"messages": CONVERSATION[1:3]}])
    with pytest.raises(DataError, match="row 1: field 'messages': the chat template does not"):
        load_sft(path, tok, 128)


# ---- too long: error, skip or truncate ---------------------------------------------------------
def test_fit_segments_cuts_the_end_and_keeps_the_prompt():
    segs = ([1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12])
    assert fit_segments(segs, 12, False, ("p", "r")) == (segs, False)
    assert fit_segments(segs, 5, True, ("p", "r")) == (([1, 2, 3], [4, 5]), True)
    # a context with no room left for its reply goes with it
    assert fit_segments(segs, 9, True, ("p", "r")) == (([1, 2, 3], [4, 5, 6, 7]), True)
    assert fit_segments(segs, 10, True, ("p", "r")) == (([1, 2, 3], [4, 5, 6, 7], [8, 9], [10]),
                                                        True)


def test_sft_truncate_mode_counts_cut_rows(tmp_path, tok):
    rows = [{"prompt": "p", "response": "sun " * 50}, {"prompt": "p", "response": "sun"}]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    with pytest.raises(DataError, match=r"row 1: field 'response': too long.*max_length=20"):
        load_sft(path, tok, 20)
    kept, report = load_sft(path, tok, 20, on_bad_row="truncate")
    assert [len(e) for e in kept][0] == 20
    assert kept[0].segments[1][-1] != tok.eos_token_id      # the end was cut, EOS with it
    assert kept[1].segments == load_sft(path, tok, 20, on_bad_row="skip")[0][0].segments
    assert report.truncated == 1 and report.kept == 2
    assert report.summary().endswith("2 rows kept (1 truncated to data.max_length)")


def test_truncate_never_cuts_the_prompt(tmp_path, tok):
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "word " * 40, "response": "sun"}])
    with pytest.raises(DataError, match=r"row 1: field 'prompt': too long.*cut only after its prompt"):
        load_sft(path, tok, 20, on_bad_row="truncate")


def test_truncate_mode_still_stops_at_other_bad_rows(tmp_path, tok):
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "p", "response": ""}])
    with pytest.raises(DataError, match="empty response"):
        load_sft(path, tok, 20, on_bad_row="truncate")


def test_preference_truncate_cuts_both_responses(tmp_path, tok):
    rows = [{"prompt": "p", "chosen": "sun " * 40, "rejected": "ash " * 30},
            {"prompt": "p", "chosen": "sun", "rejected": "ash"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    (a, b), report = load_preferences(path, tok, 24, on_bad_row="truncate")
    assert len(a.prompt_ids) + len(a.chosen_ids) == 24
    assert len(a.prompt_ids) + len(a.rejected_ids) == 24
    assert b.chosen_ids[-1] == tok.eos_token_id and report.truncated == 1
    assert "1 truncated" in report.summary()


def test_preference_margin_column(tmp_path, tok):
    rows = [{"prompt": "p", "chosen": "sun", "rejected": "ash", "m": 1.5},
            {"prompt": "p", "chosen": "sun", "rejected": "ash", "m": "big"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"row 2: field 'm': expected a finite number"):
        load_preferences(path, tok, 64, margin_key="m")
    kept, _ = load_preferences(path, tok, 64, on_bad_row="skip", margin_key="m")
    assert [e.margin for e in kept] == [1.5]
    assert load_preferences(path, tok, 64)[0][0].margin == 0.0  # no margin column: 0
