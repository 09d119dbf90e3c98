"""Generate from a model or checkpoint dir with the rollout group (for evaluation, or on its own).

    rayalign generate runs/x/checkpoints/step-0000060 prompts.jsonl --out samples.jsonl --n 4

Each output line holds the prompt's file row, the prompt, one sampled response (text and token
ids), the engine's log-prob of every sampled token and the finish reason; with a reward
function, its score too.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import ray

from actors.runtime import load_tokenizer
from orchestrator.config import ClusterConfig, ModelConfig, RolloutConfig
from orchestrator.data import load_prompts
from orchestrator.evaluate import load_reward_fn
from orchestrator.roles import connect, start_rollout, stop_group
from orchestrator.schema import ConfigError

log = logging.getLogger(__name__)


@dataclass
class GenerateResult:
    out: Path
    rows: list[dict] = field(default_factory=list)
    data: str = ""

    @property
    def mean_reward(self) -> float | None:
        scores = [r["reward"] for r in self.rows if "reward" in r]
        return sum(scores) / len(scores) if scores else None


def model_dir_of(path: str | Path) -> Path:
    """A model dir as given, or the ``model/`` dir inside a checkpoint dir."""
    path = Path(path)
    if (path / "model" / "config.json").is_file():
        return path / "model"
    if (path / "config.json").is_file():
        return path
    raise ConfigError(f"{path}: neither a Hugging Face model dir nor a checkpoint dir with model/")


def generate(model: str | Path, prompts: str | Path, out: str | Path, sampling: dict | None = None,
             rollout: RolloutConfig | None = None, cluster: ClusterConfig | None = None,
             reward_fn: str | None = None, on_bad_row: str = "error") -> GenerateResult:
    """Sample responses to every prompt in ``prompts`` and write them to ``out`` (JSONL)."""
    rollout = rollout or RolloutConfig()
    rollout.check()
    cluster = cluster or ClusterConfig()
    model_cfg = ModelConfig(path=str(model_dir_of(model)))
    scorer = load_reward_fn(reward_fn)
    tokenizer = load_tokenizer(model_cfg.path, model_cfg.trust_remote_code)
    # an over-long prompt is a data error unless the engines are told to cut or skip it
    limit = rollout.max_model_len - 1 if rollout.long_prompt == "error" else 1 << 30
    examples, report = load_prompts(prompts, tokenizer, limit, on_bad_row)
    started = connect(cluster)
    try:
        group = start_rollout(model_cfg, rollout, cluster.placement_timeout_s, cluster)
        try:
            samples = group.run("generate", [e.prompt_ids for e in examples], sampling or {})
        finally:
            stop_group(group)
    finally:
        if started:
            ray.shutdown()
    per_prompt = len(samples) // len(examples)
    rows = []
    for i, s in enumerate(samples):
        ex = examples[i // per_prompt]
        text = tokenizer.decode(s.response_ids, skip_special_tokens=True)
        row = {"row": ex.row, "sample": i % per_prompt, "prompt": ex.prompt_text, "response": text,
               "response_ids": s.response_ids, "logprobs": s.logprobs,
               "finish_reason": s.finish_reason}
        if scorer is not None:
            row["reward"] = float(scorer(ex.prompt_text, text))
        rows.append(row)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = GenerateResult(out, rows, report.summary())
    log.info("%d samples for %d prompts written to %s%s", len(rows), len(examples), out,
             f" (mean reward {result.mean_reward:.3f})" if scorer else "")
    return result
