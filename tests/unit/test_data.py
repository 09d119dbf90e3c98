"""Preference and prompt loading: file formats, chat templates, row checks and reports."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.data import DataError, load_preferences, load_prompts, read_rows
from orchestrator.tiny_model import build_tokenizer

pytestmark = pytest.mark.unit

ROWS = [
    {"prompt": "Describe the sea in a few words.", "chosen": "sun gold river",
     "rejected": "ash dust fog"},
    {"prompt": "List words about a city.", "chosen": "bright warm joy market",
     "rejected": "gray slate"},
    {"prompt": "Give me words for the desert.", "chosen": "amber glow",
     "rejected": "cold dim drab void stone"},
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(512)


def write_jsonl(path: Path, rows: list) -> Path:
    with path.open("w") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def ids(examples):
    return [(e.prompt_ids, e.chosen_ids, e.rejected_ids, e.row) for e in examples]


def prompt_ids(tok, messages):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def response_ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


# ---- formats --------------------------------------------------------------------------------------
def test_jsonl_tokenization(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    examples, report = load_preferences(path, tok, max_length=128)
    assert report.kept == 3 and not report.skipped
    assert [e.row for e in examples] == [1, 2, 3]
    for ex, row in zip(examples, ROWS):
        assert ex.prompt_ids == prompt_ids(tok, [{"role": "user", "content": row["prompt"]}])
        assert ex.chosen_ids == response_ids(tok, row["chosen"])
        assert ex.rejected_ids == response_ids(tok, row["rejected"])
        assert ex.chosen_ids[-1] == tok.eos_token_id
        assert ex.rejected_ids[-1] == tok.eos_token_id
        assert ex.prompt_text == row["prompt"]


def test_prompt_ids_are_the_chat_template_text(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[:1])
    (ex,), _ = load_preferences(path, tok, max_length=128)
    text = "<|user|>" + ROWS[0]["prompt"] + "<|end|><|assistant|>"
    assert tok.decode(ex.prompt_ids) == text
    assert ex.prompt_ids == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ex.chosen_ids) == ROWS[0]["chosen"] + "<|end|>"


def test_parquet_same_as_jsonl(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write_jsonl(tmp_path / "d.jsonl", ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    a, _ = load_preferences(jsonl, tok, max_length=128)
    b, _ = load_preferences(tmp_path / "d.parquet", tok, max_length=128)
    assert ids(a) == ids(b)


def test_arrow_stream_same_as_jsonl(tmp_path, tok):
    import pyarrow as pa

    table = pa.Table.from_pylist(ROWS)
    path = tmp_path / "d.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    a, _ = load_preferences(write_jsonl(tmp_path / "d.jsonl", ROWS), tok, max_length=128)
    b, _ = load_preferences(path, tok, max_length=128)
    assert ids(a) == ids(b)


def test_arrow_file_format_same_as_jsonl(tmp_path, tok):
    import pyarrow as pa

    table = pa.Table.from_pylist(ROWS)
    path = tmp_path / "d.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    a, _ = load_preferences(write_jsonl(tmp_path / "d.jsonl", ROWS), tok, max_length=128)
    b, _ = load_preferences(path, tok, max_length=128)
    assert ids(a) == ids(b)


def test_datasets_save_to_disk_arrow(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    out = tmp_path / "ds"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(out))
    (arrow,) = sorted(out.glob("*.arrow"))
    a, _ = load_preferences(write_jsonl(tmp_path / "d.jsonl", ROWS), tok, max_length=128)
    b, _ = load_preferences(arrow, tok, max_length=128)
    assert ids(a) == ids(b)


def test_unknown_suffix(tmp_path, tok):
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataError, match="unknown file type"):
        load_preferences(path, tok, max_length=128)


def test_blank_lines_keep_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    assert [n for n, _ in read_rows(path)] == [1, 3]


# ---- chat messages --------------------------------------------------------------------------------
def test_chat_message_prompt_and_responses(tmp_path, tok):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Describe the sea."}]
    row = {"prompt": messages,
           "chosen": [{"role": "user", "content": "Describe the sea."},
                      {"role": "assistant", "content": "sun gold"}],
           "rejected": [{"role": "assistant", "content": "ash fog"}]}
    (ex,), _ = load_preferences(write_jsonl(tmp_path / "d.jsonl", [row]), tok, max_length=128)
    expected_text = "<|system|>Be brief.<|end|><|user|>Describe the sea.<|end|><|assistant|>"
    assert ex.prompt_ids == tok(expected_text, add_special_tokens=False)["input_ids"]
    assert ex.prompt_ids == prompt_ids(tok, messages)
    assert ex.chosen_ids == response_ids(tok, "sun gold")
    assert ex.rejected_ids == response_ids(tok, "ash fog")
    assert ex.prompt_text == "Describe the sea."


def test_response_messages_must_end_with_assistant(tmp_path, tok):
    row = dict(ROWS[0], chosen=[{"role": "assistant", "content": "x"},
                                {"role": "user", "content": "y"}])
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(DataError, match="row 1.*'chosen'.*assistant"):
        load_preferences(path, tok, max_length=128)


# ---- malformed rows -------------------------------------------------------------------------------
BAD = [
    # (bad row, field named in message, skip reason)
    ({"prompt": "p", "rejected": "ash"}, "chosen", "missing field"),
    ({"prompt": "p", "chosen": 5, "rejected": "ash"}, "chosen", "wrong type"),
    ({"prompt": "p", "chosen": "sun", "rejected": "   "}, "rejected", "empty"),
    ({"prompt": "p", "chosen": "sun " * 200, "rejected": "ash"}, "chosen", "too long"),
    ('{"prompt": "p", "chosen": "sun", ', "<line>", "unparsable"),
    ({"prompt": [], "chosen": "sun", "rejected": "ash"}, "prompt", "wrong type"),
    ({"prompt": [{"role": "user"}], "chosen": "sun", "rejected": "ash"}, "prompt", "wrong type"),
    ({"prompt": "", "chosen": "sun", "rejected": "ash"}, "prompt", "empty"),
    ({"prompt": "p", "chosen": "sun", "rejected": None}, "rejected", "missing field"),
    ([1, 2, 3], "<row>", "wrong type"),
]


@pytest.mark.parametrize("bad, field, reason", BAD, ids=[f"{b[2]}-{b[1]}" for b in BAD])
def test_bad_row_raises_naming_file_row_and_field(tmp_path, tok, bad, field, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], ROWS[1], bad, ROWS[2]])
    with pytest.raises(DataError) as info:
        load_preferences(path, tok, max_length=64)
    msg = str(info.value)
    assert str(path) in msg
    assert "row 3" in msg
    assert f"'{field}'" in msg
    assert "on_bad_row" in msg  # says how to get past it


def test_too_long_names_longer_response(tmp_path, tok):
    row = {"prompt": "p", "chosen": "sun", "rejected": "ash " * 200}
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(DataError, match=r"row 1: field 'rejected': too long.*max_length=64"):
        load_preferences(path, tok, max_length=64)


def test_max_length_is_inclusive(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[:1])
    (ex,), _ = load_preferences(path, tok, max_length=1000)
    exact = len(ex.prompt_ids) + max(len(ex.chosen_ids), len(ex.rejected_ids))
    load_preferences(path, tok, max_length=exact)
    with pytest.raises(DataError, match="too long"):
        load_preferences(path, tok, max_length=exact - 1)


def test_bad_row_numbers_in_parquet(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [ROWS[0], {"prompt": "p", "chosen": None, "rejected": "ash"}, ROWS[1]]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=r"row 2: field 'chosen': missing"):
        load_preferences(path, tok, max_length=128)


def test_skip_mode_counts_by_reason(tmp_path, tok):
    rows = [ROWS[0]] + [b for b, _, _ in BAD] + [ROWS[1], ROWS[2]]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    examples, report = load_preferences(path, tok, max_length=64, on_bad_row="skip")
    n_bad = len(BAD)
    assert [e.row for e in examples] == [1, n_bad + 2, n_bad + 3]
    assert report.kept == 3
    expected = {}
    for _, _, reason in BAD:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(report.skipped) == expected
    assert sum(report.skipped.values()) == n_bad
    assert len(report.first_skips) == 5
    assert report.first_skips[0].startswith(f"{path}: row 2: field 'chosen'")
    summary = report.summary()
    assert f"3 rows kept, {n_bad} skipped" in summary
    # the kept rows are tokenized as they would be alone
    alone, _ = load_preferences(write_jsonl(tmp_path / "good.jsonl", ROWS), tok, max_length=64)
    assert [e.chosen_ids for e in examples] == [e.chosen_ids for e in alone]


def test_only_bad_rows_raise_even_when_skipping(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [b for b, _, _ in BAD[:3]])
    with pytest.raises(DataError) as info:
        load_preferences(path, tok, max_length=64, on_bad_row="skip")
    msg = str(info.value)
    assert str(path) in msg and "no usable rows" in msg
    assert "3 skipped" in msg


def test_custom_keys(tmp_path, tok):
    rows = [{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in ROWS]
    a, _ = load_preferences(write_jsonl(tmp_path / "a.jsonl", ROWS), tok, max_length=128)
    b, _ = load_preferences(write_jsonl(tmp_path / "b.jsonl", rows), tok, max_length=128,
                            keys=("q", "good", "bad"))
    assert ids(a) == ids(b)
    bad = write_jsonl(tmp_path / "c.jsonl", [{"q": "p", "good": "x"}])
    with pytest.raises(DataError, match="field 'bad'"):
        load_preferences(bad, tok, max_length=128, keys=("q", "good", "bad"))


# ---- prompts --------------------------------------------------------------------------------------
def test_load_prompts_keeps_extra_fields(tmp_path, tok):
    rows = [{"prompt": "Describe the sea.", "id": 7, "meta": {"topic": "sea"}},
            {"prompt": [{"role": "user", "content": "List words."}], "answer": "x"}]
    prompts, report = load_prompts(write_jsonl(tmp_path / "p.jsonl", rows), tok, 64)
    assert report.kept == 2
    assert prompts[0].extra == {"id": 7, "meta": {"topic": "sea"}}
    assert prompts[1].extra == {"answer": "x"}
    assert prompts[0].prompt_ids == prompt_ids(tok, [{"role": "user", "content": "Describe the sea."}])
    assert prompts[0].prompt_text == "Describe the sea."
    assert prompts[1].prompt_ids == prompt_ids(tok, rows[1]["prompt"])
    assert [p.row for p in prompts] == [1, 2]


def test_load_prompts_bad_rows(tmp_path, tok):
    rows = [{"prompt": "ok"}, {"text": "no prompt"}, "not json", {"prompt": "word " * 100}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError, match=r"row 2: field 'prompt': missing"):
        load_prompts(path, tok, 32)
    prompts, report = load_prompts(path, tok, 32, on_bad_row="skip")
    assert [p.row for p in prompts] == [1]
    assert dict(report.skipped) == {"missing field": 1, "unparsable": 1, "too long": 1}
