"""Preference, SFT and prompt datasets: read, validate, apply the chat template, tokenize.

Rows come from JSONL (read line by line so that a bad line is named exactly), Parquet
(pyarrow) or Arrow (the IPC files `datasets` writes). Every row is checked before training
starts; a bad one raises :class:`DataError` naming file, row and field, or, with
``on_bad_row: skip``, is counted under its reason in :class:`DataReport`. With
``on_bad_row: truncate`` a row longer than ``max_length`` is cut instead (the end of the
response goes, the prompt stays; both responses of a pair are cut) and counted; any other bad
row stops the run as with ``error``.
Prompt and response tokens stay apart so that losses can cover response tokens only.
"""
from __future__ import annotations

import json
import math
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
    margin: float = 0.0  # how much more the chosen is preferred (reward-model training)


@dataclass
class SFTExample:
    """One tokenized SFT row. ``segments`` alternate context and trained tokens: (prompt,
    response) for a single turn, (context, reply, context, reply, ...) for a conversation
    whose every assistant turn is trained. ``prompt_text``: the last user message before the
    last reply."""
    segments: tuple[list[int], ...]
    row: int
    prompt_text: str = ""

    @property
    def prompt_ids(self) -> list[int]:
        """Everything before the last reply (what generation is conditioned on)."""
        return [t for seg in self.segments[:-1] for t in seg]

    @property
    def target_tokens(self) -> int:
        return sum(len(seg) for seg in self.segments[1::2])

    def __len__(self) -> int:
        return sum(len(seg) for seg in self.segments)


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
    truncated: int = 0  # kept rows cut to max_length (on_bad_row: truncate)

    def skip(self, message: str, reason: str) -> None:
        self.skipped[reason] += 1
        if len(self.first_skips) < 5:
            self.first_skips.append(message)

    def summary(self) -> str:
        kept = f"{self.path}: {self.kept} rows kept"
        if self.truncated:
            kept += f" ({self.truncated} truncated to data.max_length)"
        if not self.skipped:
            return kept
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items()))
        return f"{kept}, {sum(self.skipped.values())} skipped ({reasons})"


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
    """Chat template plus tokenizer: prompt ids and response ids apart, the response ending as
    the template ends an assistant turn (so that prompt + response ids are the template's
    rendering of the whole conversation)."""

    PROBE = "Probe reply"

    def __init__(self, tokenizer):
        self.tok = tokenizer
        if tokenizer.eos_token_id is None:
            raise DataError("tokenizer has no eos_token; set one in tokenizer_config.json")
        self.turn_end = self._turn_end()

    def _turn_end(self) -> str:
        """What the chat template writes after an assistant reply's text: ``<|im_end|>`` and a
        newline for ChatML, ``<end_of_turn>`` and a newline for Gemma, ``<|eot_id|>`` for Llama
        3. Without a template, or where the template writes no special token there (nothing
        would stop generation), the tokenizer's EOS follows."""
        end = ""
        if self.tok.chat_template:
            whole = self.render([{"role": "user", "content": "Probe prompt"},
                                 {"role": "assistant", "content": self.PROBE}], generation=False)
            if whole.count(self.PROBE) == 1:
                end = whole[whole.index(self.PROBE) + len(self.PROBE):]
        specials = set(self.tok.all_special_ids) | set(self.tok.added_tokens_decoder)
        if not any(i in specials for i in self.ids(end)):
            end += self.tok.eos_token
        return end

    def render(self, messages: list[dict], generation: bool) -> str:
        if self.tok.chat_template:
            return self.tok.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=generation)
        if len(messages) == 1:
            return messages[0]["content"]
        raise DataError("the tokenizer has no chat_template, so multi-message prompts cannot "
                        "be rendered; add one to tokenizer_config.json")

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def prompt(self, messages: list[dict]) -> tuple[str, list[int]]:
        text = self.render(messages, generation=True)
        return text, self.ids(text)

    def response(self, text: str) -> list[int]:
        return self.ids(text + self.turn_end)

    def conversation(self, messages: list[dict], fld: str) -> tuple[list[int], ...]:
        """(context, reply, context, reply, ...) ids: every assistant turn is a reply, and
        the text the template puts between turns is context. Each reply is tokenized as
        :meth:`response` does, so a single-turn conversation gives :meth:`prompt` +
        :meth:`response`."""
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns:
            raise _RowError(fld, "no assistant message to train on", "no reply")
        if turns[0] == 0:
            raise _RowError(fld, "the first message is the assistant's; a reply needs context "
                                 "before it", "wrong type")
        segments, done = [], ""
        for a in turns:
            context = self.render(messages[:a], generation=True)
            content = messages[a]["content"]
            if not content.strip():
                raise _RowError(fld, f"message {a}: empty assistant reply", "empty")
            whole = self.render(messages[:a + 1], generation=False)
            if not (context.startswith(done) and whole.startswith(context + content)):
                raise _RowError(fld, "the chat template does not render an assistant turn as "
                                     "its generation prompt followed by the reply; cannot tell "
                                     "which tokens to train", "template")
            if len(context) > len(done):
                segments.append(self.ids(context[len(done):]))
            else:  # two assistant turns in a row: the second continues the first
                segments.append([])
            segments.append(self.response(content))
            rest = whole[len(context) + len(content):]
            done = context + content + (self.turn_end if rest.startswith(self.turn_end) else "")
        return tuple(segments)


def _fail_or_skip(report: DataReport, path, row: int, err: _RowError, on_bad_row: str) -> None:
    message = f"{path}: row {row}: field '{err.field}': {err.what}"
    if on_bad_row != "skip":
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


def _too_long(fld: str, length: int, max_length: int, truncating: bool) -> _RowError:
    hint = " (with on_bad_row=truncate a row is cut only after its prompt)" if truncating else ""
    return _RowError(fld, f"too long: prompt+response is {length} tokens, over "
                          f"data.max_length={max_length}{hint}", "too long")


def fit_segments(segments: tuple[list[int], ...], max_length: int, truncate: bool,
                 fields: tuple[str, str]) -> tuple[tuple[list[int], ...], bool]:
    """``segments`` (context, reply, ...) within ``max_length`` tokens: as they are, or with
    ``truncate`` cut at the end, keeping the first context whole and at least one token of a
    reply; (segments, whether cut). ``fields``: (prompt field, response field) for errors."""
    total = sum(len(s) for s in segments)
    if total <= max_length:
        return segments, False
    if not truncate or len(segments[0]) >= max_length:
        raise _too_long(fields[1] if not truncate else fields[0], total, max_length, truncate)
    out, used = [], 0
    for k, seg in enumerate(segments):
        room = max_length - used
        if room <= 0 or (k % 2 == 0 and len(seg) >= room):
            break  # a context with no room for its reply is dropped with it
        out.append(seg[:room])
        used += len(out[-1])
    if len(out) % 2:
        out.pop()
    return tuple(out), True


def _load(path: str | Path, on_bad_row: str, parse) -> tuple[list, DataReport]:
    """Every row of ``path`` through ``parse(row_no, row) -> (example, whether cut)``; a
    row it refuses (_RowError) stops the load or is skipped and counted, as ``on_bad_row``
    says."""
    report = DataReport(str(path))
    out = []
    for row_no, row in read_rows(path):
        try:
            example, cut = parse(row_no, row)
        except _RowError as err:
            _fail_or_skip(report, path, row_no, err, on_bad_row)
            continue
        report.truncated += cut
        out.append(example)
    report.kept = len(out)
    if not out:
        raise DataError(f"{path}: no usable rows ({report.summary()})")
    return out, report


def load_preferences(path: str | Path, tokenizer, max_length: int, on_bad_row: str = "error",
                     keys: tuple[str, str, str] = ("prompt", "chosen", "rejected"),
                     margin_key: str | None = None,
                     ) -> tuple[list[PreferenceExample], DataReport]:
    """Read, check and tokenize a preference file (``margin_key``: a numeric column read as
    the pair's margin)."""
    pkey, ckey, rkey = keys
    tok, truncate = Tokenize(tokenizer), on_bad_row == "truncate"

    def parse(row_no: int, row) -> tuple[PreferenceExample, bool]:
        msgs = prompt_messages(_get(row, pkey), pkey)
        chosen = response_text(_get(row, ckey), ckey)
        rejected = response_text(_get(row, rkey), rkey)
        margin = _margin(_get(row, margin_key), margin_key) if margin_key else 0.0
        _, p_ids = tok.prompt(msgs)
        (_, c_ids), cut_c = fit_segments((p_ids, tok.response(chosen)), max_length, truncate,
                                         (pkey, ckey))
        (_, r_ids), cut_r = fit_segments((p_ids, tok.response(rejected)), max_length, truncate,
                                         (pkey, rkey))
        return (PreferenceExample(p_ids, c_ids, r_ids, row_no, msgs[-1]["content"], margin),
                cut_c or cut_r)

    return _load(path, on_bad_row, parse)


def _margin(value: Any, fld: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _RowError(fld, f"expected a finite number, got {value!r}", "wrong type")
    return float(value)


def load_sft(path: str | Path, tokenizer, max_length: int, on_bad_row: str = "error",
             keys: tuple[str, str, str] = ("prompt", "response", "messages"),
             ) -> tuple[list[SFTExample], DataReport]:
    """Read, check and tokenize an SFT file: each row holds a prompt and a response, or a
    conversation (a list of chat messages) under the messages key."""
    pkey, rkey, mkey = keys
    tok, truncate = Tokenize(tokenizer), on_bad_row == "truncate"

    def parse(row_no: int, row) -> tuple[SFTExample, bool]:
        if isinstance(row, dict) and row.get(mkey) is not None:
            msgs = _messages(row[mkey], mkey)
            segments, fields = tok.conversation(msgs, mkey), (mkey, mkey)
        else:
            msgs = prompt_messages(_get(row, pkey), pkey)
            reply = response_text(_get(row, rkey), rkey)
            segments, fields = (tok.prompt(msgs)[1], tok.response(reply)), (pkey, rkey)
            msgs = msgs + [{"role": "assistant", "content": reply}]
        segments, cut = fit_segments(segments, max_length, truncate, fields)
        last_reply = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        users = [m["content"] for m in msgs[:last_reply] if m["role"] == "user"]
        return SFTExample(segments, row_no, users[-1] if users else ""), cut

    return _load(path, on_bad_row, parse)


def load_prompts(path: str | Path, tokenizer, max_prompt_length: int, on_bad_row: str = "error",
                 key: str = "prompt") -> tuple[list[PromptExample], DataReport]:
    """Read, check and tokenize a prompt file; other fields are kept in ``extra``. A prompt
    is never cut here (``on_bad_row: truncate`` stops at a long one; ``rollout.long_prompt``
    can keep its last tokens instead)."""
    tok = Tokenize(tokenizer)

    def parse(row_no: int, row) -> tuple[PromptExample, bool]:
        text, ids = tok.prompt(prompt_messages(_get(row, key), key))
        if len(ids) > max_prompt_length:
            raise _RowError(key, f"too long: {len(ids)} tokens, over {max_prompt_length}",
                            "too long")
        extra = {k: v for k, v in row.items() if k != key}
        return PromptExample(ids, row_no, row[key] if isinstance(row[key], str) else text,
                             extra), False

    return _load(path, on_bad_row, parse)
