"""The reward role: scores (prompt, response) pairs with a model, a Python function or an endpoint.

Three kinds behind one interface, ``score(samples) -> list[float]`` (one reward per sample, in
order):

    model     a sequence classifier (``AutoModelForSequenceClassification``, one label) from a
              local Hugging Face dir. The prompt and response are rendered with the tokenizer's
              chat template (user turn, assistant turn) when it has one, else concatenated;
              batches are right-padded, ``micro_batch`` sequences per forward, and the score is
              the model's own pooled logit (that of the last token that is not padding).
    function  ``"module:function"``, called once per sample as ``fn(prompt, response, **extra)``
              where ``extra`` holds the fields of the sample's dataset row that ``fn`` accepts:
              all of them if it takes ``**kwargs``, else those it names as parameters after the
              first two; a function with exactly two parameters gets ``fn(prompt, response)``.
    http      POST ``{"prompts": [...], "responses": [...], "extra": [...]}`` (JSON, at most
              ``micro_batch`` samples per request) to ``url``; the answer must be
              ``{"rewards": [...]}``, one number per sample. Connection errors, timeouts and HTTP
              408/429/5xx are retried ``retries`` times after the first attempt, waiting
              ``backoff_s * 2**k`` in between, so one request gives up within about
              ``(retries + 1) * timeout_s + backoff_s * (2**retries - 1)`` seconds.

Whatever the kind, a reward that cannot be had (the function raises, a value is not a finite
number, the endpoint stays down or answers the wrong number of rewards) raises
:class:`RewardError` naming the function, URL or model dir, and the sample: never a silent 0.
For an endpoint, ``on_failure: drop`` instead scores the samples of a failed request NaN; the
driver drops them from the step (orchestrator/rollouts.py ``drop_failed``) and counts them.
"""
from __future__ import annotations

import importlib
import inspect
import json
import logging
import math
import numbers
import os
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.client import HTTPException

from actors.group import SCATTER, Measured, dispatch

log = logging.getLogger(__name__)

KINDS = ("model", "function", "http")
RETRY_HTTP = frozenset({408, 429, 500, 502, 503, 504})


class RewardError(RuntimeError):
    """No reward for a sample; the message names the source (function, URL, model dir) and sample."""


@dataclass
class RewardSample:
    prompt: str                                 # prompt text, before any chat template
    response: str                               # the policy's response text
    extra: dict = field(default_factory=dict)   # other fields of the dataset row (e.g. the answer)
    index: int | None = None                    # position in the step's batch, for error messages
                                                # (default: position in the list scored)


@dataclass
class RewardSettings:
    """How one reward replica scores. ``check`` tells a bad combination; ranges belong to the schema."""
    kind: str                       # "model", "function" or "http"
    model_path: str | None = None   # kind model: local Hugging Face dir of a sequence classifier
    function: str | None = None     # kind function: "module:function"
    url: str | None = None          # kind http: endpoint that takes the POST described above
    timeout_s: float = 10.0         # kind http: seconds per attempt
    retries: int = 3                # kind http: attempts after the first one
    backoff_s: float = 0.5          # kind http: wait before the first retry, doubled each time
    on_failure: str = "fail"        # kind http: a request that gives up fails the call, or
                                    # ("drop") its samples score NaN, for the driver to drop
    auth_env: str | None = None     # kind http: environment variable holding the value of the
                                    # Authorization header (read where the request is made)
    ca_bundle: str | None = None    # kind http: PEM of the CAs to trust (default: the system's)
    micro_batch: int = 16           # model: sequences per forward; http: samples per request
    dtype: str = "float32"          # kind model: weights and activations
    cpus: float = 1.0               # CPUs per replica (torch threads for kind model)
    gpus: float = 0.0               # GPUs per replica (kind model runs on CUDA when > 0)
    trust_remote_code: bool = False  # kind model: run the modelling code the checkpoint ships

    def check(self) -> None:
        """Raise ValueError naming the field when the combination cannot work."""
        if self.kind not in KINDS:
            raise ValueError(f"reward.kind: got {self.kind!r}, allowed: {', '.join(KINDS)}")
        needs = {"model": "model_path", "function": "function", "http": "url"}
        for kind, name in needs.items():
            value = getattr(self, name)
            if kind == self.kind and not value:
                raise ValueError(f"reward.{name}: required when reward.kind is {kind!r}")
            if kind != self.kind and value:
                raise ValueError(f"reward.{name}: set, but only reward.kind {kind!r} reads it "
                                 f"(kind is {self.kind!r})")
        if self.function and not all(self.function.partition(":")[::2]):
            raise ValueError(f"reward.function: got {self.function!r}, expected 'module:function'")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"reward.dtype: got {self.dtype!r}, allowed: float32, bfloat16, float16")
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"reward.url: got {self.url!r}, expected an http:// or https:// URL")
        for name, low in (("timeout_s", 0), ("micro_batch", 0), ("cpus", 0)):
            if not getattr(self, name) > low:
                raise ValueError(f"reward.{name}: got {getattr(self, name)}, allowed: > {low}")
        if self.auth_env and self.kind != "http":
            raise ValueError(f"reward.auth_env: set, but only reward.kind 'http' reads it "
                             f"(kind is {self.kind!r})")
        if self.on_failure not in ("fail", "drop"):
            raise ValueError(f"reward.on_failure: got {self.on_failure!r}, allowed: fail, drop")
        if self.on_failure == "drop" and self.kind != "http":
            raise ValueError(f"reward.on_failure: 'drop' is for kind 'http' (an endpoint that may "
                             f"be down); kind {self.kind!r} fails the call (a dead actor is "
                             f"replaced by fault.max_restarts)")
        for name in ("retries", "backoff_s", "gpus"):
            if getattr(self, name) < 0:
                raise ValueError(f"reward.{name}: got {getattr(self, name)}, allowed: >= 0")


def _label(sample: RewardSample, position: int) -> str:
    index = position if sample.index is None else sample.index
    prompt = str(sample.prompt)
    excerpt = prompt if len(prompt) <= 40 else prompt[:40] + "..."
    return f"sample {index} (prompt {excerpt!r})"


def _reward(value, source: str, sample: RewardSample, position: int) -> float:
    """``value`` as a finite float, or a RewardError naming ``source`` and the sample."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()  # numpy / torch scalars
    if not isinstance(value, numbers.Real):
        raise RewardError(f"{source}: {_label(sample, position)}: got {repr(value)[:80]} "
                          f"({type(value).__name__}), not a number")
    if not math.isfinite(value):
        raise RewardError(f"{source}: {_label(sample, position)}: got {value}, not a finite number")
    return float(value)


def _chunks(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


class FunctionReward:
    """Kind function: a Python callable named ``module:function``."""

    def __init__(self, spec: str):
        self.source = f"reward function {spec}"
        module, _, name = spec.partition(":")
        try:
            self.fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise RewardError(f"{self.source}: cannot import ({exc})") from None
        if not callable(self.fn):
            raise RewardError(f"{self.source}: not callable")
        self.accepts, self.taken = _keywords(self.fn)

    def score(self, samples: list[RewardSample]) -> list[float]:
        out = []
        for i, s in enumerate(samples):
            extra = {k: v for k, v in s.extra.items()
                     if k not in self.taken and (self.accepts is None or k in self.accepts)}
            try:
                value = self.fn(s.prompt, s.response, **extra)
            except Exception as exc:
                raise RewardError(f"{self.source}: {_label(s, i)}: raised "
                                  f"{type(exc).__name__}: {exc}") from exc
            out.append(_reward(value, self.source, s, i))
        return out


def _keywords(fn) -> tuple[set[str] | None, set[str]]:
    """(names of extras ``fn`` accepts, None for all; names of its prompt/response parameters)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # some builtins have no signature: prompt and response only
        return set(), set()
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    taken = {p.name for p in positional[:2]}
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None, taken
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named - taken, taken


class HttpReward:
    """Kind http: a remote endpoint, retried with backoff."""

    def __init__(self, url: str, timeout_s: float, retries: int, backoff_s: float, micro_batch: int,
                 on_failure: str = "fail", auth_env: str | None = None,
                 ca_bundle: str | None = None):
        self.url, self.timeout_s, self.retries = url, timeout_s, retries
        # certificates and host names are always checked; a private CA is added, never a bypass
        self.tls = ssl.create_default_context(cafile=ca_bundle)
        self.backoff_s, self.micro_batch, self.on_failure = backoff_s, micro_batch, on_failure
        self.source = f"reward endpoint {url}"
        self.headers = {"Content-Type": "application/json"}
        if auth_env:  # the secret stays out of config files, run dirs and logs
            value = os.environ.get(auth_env)
            if not value:
                raise RewardError(f"{self.source}: reward.auth_env names {auth_env}, which is not "
                                  f"set in the reward actor's environment; export it before the "
                                  f"run (a Ray job: in the runtime env's env_vars)")
            self.headers["Authorization"] = value

    def score(self, samples: list[RewardSample]) -> list[float]:
        """One reward per sample; with ``on_failure: drop`` the samples of a request that
        failed (after its retries, or with an answer that cannot be read) score NaN: never a
        reward the policy would learn from."""
        out = []
        for part in _chunks(len(samples), self.micro_batch):
            batch = [samples[i] for i in part]
            try:
                out += self._score_request(batch, part)
            except RewardError as exc:
                if self.on_failure != "drop":
                    raise
                log.warning("%s; samples %d-%d dropped (reward.on_failure: drop)", exc,
                            part.start, part.stop - 1)
                out += [math.nan] * len(batch)
        return out

    def _score_request(self, batch: list[RewardSample], part: range) -> list[float]:
        try:
            body = json.dumps({"prompts": [s.prompt for s in batch],
                               "responses": [s.response for s in batch],
                               "extra": [s.extra for s in batch]}).encode()
        except (TypeError, ValueError) as exc:
            raise RewardError(f"{self.source}: samples {part.start}-{part.stop - 1} cannot be "
                              f"sent as JSON ({exc})") from None
        answer = self._post(body)
        rewards = answer.get("rewards") if isinstance(answer, dict) else None
        if not isinstance(rewards, list):
            raise RewardError(f"{self.source}: answer has no 'rewards' list: {str(answer)[:200]}")
        if len(rewards) != len(batch):
            raise RewardError(f"{self.source}: answered {len(rewards)} rewards for {len(batch)} "
                              f"samples ({_label(batch[0], part.start)} onwards)")
        return [_reward(r, self.source, s, i) for r, s, i in zip(rewards, batch, part)]

    def _post(self, body: bytes):
        attempts, cause = self.retries + 1, ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, method="POST",
                                             headers=self.headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s,
                                            context=self.tls) as reply:
                    data = reply.read()
            except urllib.error.HTTPError as exc:
                cause = f"HTTP {exc.code} {exc.reason}: {exc.read()[:200]!r}"
                if exc.code not in RETRY_HTTP:
                    raise RewardError(f"{self.source}: {cause}") from None
                continue
            except (OSError, HTTPException) as exc:  # refused, reset, timed out, bad DNS...
                reason = getattr(exc, "reason", None) or exc
                if isinstance(reason, ssl.SSLCertVerificationError):  # no retry mends that
                    raise RewardError(f"{self.source}: its TLS certificate is not trusted "
                                      f"({reason.verify_message}); if it comes from a private CA, "
                                      f"give that CA's PEM file as reward.ca_bundle") from None
                cause = f"{type(reason).__name__}: {reason}"
                continue
            try:
                return json.loads(data)
            except ValueError:
                raise RewardError(f"{self.source}: answer is not JSON: {data[:200]!r}") from None
        raise RewardError(f"{self.source}: no answer after {attempts} attempt(s) "
                          f"(timeout {self.timeout_s:g}s each); last cause: {cause}")


class ModelReward:
    """Kind model: a sequence classifier with one label, scored in micro batches."""

    def __init__(self, path: str, micro_batch: int, dtype: str, device: str,
                 trust_remote_code: bool = False):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from actors.runtime import DTYPES
        self.source, self.micro_batch, self.device = f"reward model {path}", micro_batch, device
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=DTYPES[dtype], output_loading_info=True,
            trust_remote_code=trust_remote_code)
        if info.get("missing_keys"):
            raise RewardError(f"{self.source}: not a trained reward model, weights missing for "
                              f"{sorted(info['missing_keys'])[:4]} (a causal LM dir?)")
        if model.config.num_labels != 1:
            raise RewardError(f"{self.source}: num_labels is {model.config.num_labels}, "
                              f"a reward model has 1")
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id or 0
        text_cfg = model.config.get_text_config()
        if text_cfg.pad_token_id is None:  # the pooling finds the last token by the pad id
            text_cfg.pad_token_id = self.pad_id
        self.max_len = getattr(text_cfg, "max_position_embeddings", None)
        self.model = model.to(device).eval().requires_grad_(False)

    def _ids(self, s: RewardSample) -> list[int]:
        tok = self.tokenizer
        if not tok.chat_template:
            return tok(str(s.prompt) + s.response)["input_ids"]
        turns = s.prompt if isinstance(s.prompt, list) else [{"role": "user", "content": s.prompt}]
        text = tok.apply_chat_template(list(turns) + [{"role": "assistant", "content": s.response}],
                                       tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]

    def score(self, samples: list[RewardSample]) -> list[float]:
        import torch
        ids = [self._ids(s) for s in samples]
        for i, (s, seq) in enumerate(zip(samples, ids)):
            if not seq or (self.max_len and len(seq) > self.max_len):
                raise RewardError(f"{self.source}: {_label(s, i)}: {len(seq)} tokens, allowed "
                                  f"1 to {self.max_len} (max_position_embeddings)")
        out = []
        for part in _chunks(len(samples), self.micro_batch):
            width = max(len(ids[i]) for i in part)
            input_ids = torch.full((len(part), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(part), width), dtype=torch.long)
            for row, i in enumerate(part):
                input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
                mask[row, :len(ids[i])] = 1
            with torch.no_grad():
                logits = self.model(input_ids=input_ids.to(self.device),
                                    attention_mask=mask.to(self.device)).logits
            values = logits[:, 0].float().cpu().tolist()
            out += [_reward(v, self.source, samples[i], i) for v, i in zip(values, part)]
        return out


def make_reward(settings: RewardSettings):
    """The scorer of ``settings.kind`` (FunctionReward, HttpReward or ModelReward)."""
    settings.check()
    if settings.kind == "function":
        return FunctionReward(settings.function)
    if settings.kind == "http":
        return HttpReward(settings.url, settings.timeout_s, settings.retries, settings.backoff_s,
                          settings.micro_batch, settings.on_failure, settings.auth_env,
                          settings.ca_bundle)
    import torch
    device = "cuda" if settings.gpus > 0 and torch.cuda.is_available() else "cpu"
    return ModelReward(settings.model_path, settings.micro_batch, settings.dtype, device,
                       settings.trust_remote_code)


class RewardScorer(Measured):
    """One reward replica (a Ray actor through ``ActorGroup``)."""

    def __init__(self, rank: int, world_size: int, settings: RewardSettings):
        if settings.kind == "model":
            from actors.runtime import set_threads
            set_threads(settings.cpus)
        self.rank, self.world_size = rank, world_size
        self.reward = make_reward(settings)

    def ready(self) -> bool:
        return True

    @dispatch(SCATTER)
    def score(self, samples: list[RewardSample]) -> list[float]:
        """One finite reward per sample, in order; RewardError when one cannot be had."""
        return self.reward.score(samples)
