"""Preference and prompt datasets: read, validate, apply the chat template, tokenize.

Rows come from JSONL (read line by line so that a bad line is named exactly), Parquet
(pyarrow) or Arrow (the IPC files `datasets` writes). Every row is checked before training
starts; a bad one raises :class:`DataError` naming file, row and field, or, with
``on_bad_row: skip``, is counted under its reason in :class:`DataReport`.
Prompt and response tokens stay apart so that losses can cover response tokens only.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator


class DataError(ValueError):
    """A dataset row is malformed; the message names file, row and field."""


@dataclass
class PreferenceExample:
    """One tokenized pair. ``row`` is the 1-based row in the source file; ``prompt_text`` the
    last prompt message as written (what a reward function reads)."""
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    row: int
    prompt_text: str = ""


@dataclass
class PromptExample:
    prompt_ids: list[int]
    row: int
    prompt_text: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class DataReport:
    """What loading a file kept and skipped (by reason), for the end-of-run summary."""
    path: str
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_skips: list[str] = field(default_factory=list)

    def skip(self, message: str, reason: str) -> None:
        self.skipped[reason] += 1
        if len(self.first_skips) < 5:
            self.first_skips.append(message)

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.path}: {self.kept} rows kept"
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items()))
        return f"{self.path}: {self.kept} rows kept, {sum(self.skipped.values())} skipped ({reasons})"


# ---- reading rows ------------------------------------------------------------------------------
def read_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (1-based row number, row) from a .jsonl/.json, .parquet or .arrow file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        with path.open() as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield i, _Unparsable(str(exc))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq
        yield from enumerate(pq.read_table(path).to_pylist(), 1)
    elif suffix == ".arrow":
        yield from enumerate(_read_arrow(path).to_pylist(), 1)
    else:
        raise DataError(f"{path}: unknown file type '{suffix}'; use .jsonl, .parquet or .arrow")


def _read_arrow(path: Path):
    import pyarrow as pa
    try:
        with pa.memory_map(str(path)) as src:
            return pa.ipc.open_stream(src).read_all()
    except pa.ArrowInvalid:
        with pa.memory_map(str(path)) as src:
            return pa.ipc.open_file(src).read_all()


@dataclass
class _Unparsable:
    error: str


# ---- checking fields ---------------------------------------------------------------------------
class _RowError(Exception):
    def __init__(self, fld: str, what: str, reason: str):
        super().__init__(what)
        self.field, self.what, self.reason = fld, what, reason


def _messages(value: Any, fld: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _RowError(fld, "expected a non-empty list of chat messages", "wrong type")
    for j, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) \
                or not isinstance(msg.get("content"), str):
            raise _RowError(fld, f"message {j} needs string 'role' and 'content'", "wrong type")
    return value


def prompt_messages(value: Any, fld: str) -> list[dict]:
    """A prompt as chat messages: a string becomes one user message."""
    if isinstance(value, str):
        if not value.strip():
            raise _RowError(fld, "empty prompt", "empty")
        return [{"role": "user", "content": value}]
    return _messages(value, fld)


def response_text(value: Any, fld: str) -> str:
    """A response as text: a string, or chat messages whose last one is the assistant's."""
    if isinstance(value, list):
        msgs = _messages(value, fld)
        if msgs[-1]["role"] != "assistant":
            raise _RowError(fld, "last message must have role 'assistant'", "wrong type")
        value = msgs[-1]["content"]
    if not isinstance(value, str):
        raise _RowError(fld, f"expected a string or chat messages, got {type(value).__name__}",
                        "wrong type")
    if not value.strip():
        raise _RowError(fld, "empty response", "empty")
    return value


class Tokenize:
    """Chat template plus tokenizer: prompt ids and response ids (ending in EOS) apart."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        if tokenizer.eos_token_id is None:
            raise DataError("tokenizer has no eos_token; set one in tokenizer_config.json")

    def prompt(self, messages: list[dict]) -> tuple[str, list[int]]:
        if self.tok.chat_template:
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        elif len(messages) == 1:
            text = messages[0]["content"]
        else:
            raise DataError("the tokenizer has no chat_template, so multi-message prompts cannot "
                            "be rendered; add one to tokenizer_config.json")
        return text, self.tok(text, add_special_tokens=False)["input_ids"]

    def response(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]


def _fail_or_skip(report: DataReport, path, row: int, err: _RowError, on_bad_row: str) -> None:
    message = f"{path}: row {row}: field '{err.field}': {err.what}"
    if on_bad_row == "error":
        raise DataError(message + " (fix the row, or set data.on_bad_row=skip to skip such rows)")
    report.skip(message, err.reason)


def _get(row: Any, key: str) -> Any:
    if isinstance(row, _Unparsable):
        raise _RowError("<line>", f"not valid JSON ({row.error})", "unparsable")
    if not isinstance(row, dict):
        raise _RowError("<row>", "expected a JSON object", "wrong type")
    if key not in row or row[key] is None:
        raise _RowError(key, "missing", "missing field")
    return row[key]


def load_preferences(path: str | Path, tokenizer, max_length: int, on_bad_row: str = "error",
                     keys: tuple[str, str, str] = ("prompt", "chosen", "rejected"),
                     ) -> tuple[list[PreferenceExample], DataReport]:
    """Read, check and tokenize a preference file."""
    pkey, ckey, rkey = keys
    tok = Tokenize(tokenizer)
    report = DataReport(str(path))
    out = []
    for row_no, row in read_rows(path):
        try:
            msgs = prompt_messages(_get(row, pkey), pkey)
            chosen = response_text(_get(row, ckey), ckey)
            rejected = response_text(_get(row, rkey), rkey)
            text, p_ids = tok.prompt(msgs)
            c_ids, r_ids = tok.response(chosen), tok.response(rejected)
            longest = len(p_ids) + max(len(c_ids), len(r_ids))
            if longest > max_length:
                fld = ckey if len(c_ids) >= len(r_ids) else rkey
                raise _RowError(fld, f"too long: prompt+response is {longest} tokens, over "
                                     f"data.max_length={max_length}", "too long")
        except _RowError as err:
            _fail_or_skip(report, path, row_no, err, on_bad_row)
            continue
        out.append(PreferenceExample(p_ids, c_ids, r_ids, row_no, msgs[-1]["content"]))
    report.kept = len(out)
    if not out:
        raise DataError(f"{path}: no usable rows ({report.summary()})")
    return out, report


def load_prompts(path: str | Path, tokenizer, max_prompt_length: int, on_bad_row: str = "error",
                 key: str = "prompt") -> tuple[list[PromptExample], DataReport]:
    """Read, check and tokenize a prompt file; other fields are kept in ``extra``."""
    tok = Tokenize(tokenizer)
    report = DataReport(str(path))
    out = []
    for row_no, row in read_rows(path):
        try:
            text, ids = tok.prompt(prompt_messages(_get(row, key), key))
            if len(ids) > max_prompt_length:
                raise _RowError(key, f"too long: {len(ids)} tokens, over {max_prompt_length}",
                                "too long")
        except _RowError as err:
            _fail_or_skip(report, path, row_no, err, on_bad_row)
            continue
        extra = {k: v for k, v in row.items() if k != key}
        out.append(PromptExample(ids, row_no, row[key] if isinstance(row[key], str) else text, extra))
    report.kept = len(out)
    if not out:
        raise DataError(f"{path}: no usable rows ({report.summary()})")
    return out, report
