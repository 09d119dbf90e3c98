"""Held-out measurements: preference accuracy and the reward of sampled responses."""
from __future__ import annotations

import importlib
from statistics import mean
from typing import Callable

from orchestrator.schema import ConfigError


def load_reward_fn(spec: str | None) -> Callable[[str, str], float] | None:
    """Import ``module:function`` (checked before any actor starts)."""
    if spec is None:
        return None
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"eval.reward_fn: cannot import {spec!r} ({exc})") from None
    if not callable(fn):
        raise ConfigError(f"eval.reward_fn: {spec!r} is not callable")
    return fn


def pad_to_multiple(items: list, n: int) -> list:
    """Repeat the last item so every replica gets as many (ZeRO-3 needs equal forwards)."""
    extra = (-len(items)) % n
    return items + [items[-1]] * extra


def preference_accuracy(policy, pairs, ref: list[tuple[float, float]], beta: float) -> dict:
    """Share of held-out pairs whose chosen implicit reward beats the rejected (ties: half)."""
    logps = policy.run("logprobs", pad_to_multiple(pairs, len(policy)))[:len(pairs)]
    wins, margins = [], []
    for (pc, pr), (rc, rr) in zip(logps, ref):
        margin = beta * ((pc - rc) - (pr - rr))
        margins.append(margin)
        wins.append(1.0 if margin > 0 else 0.5 if margin == 0 else 0.0)
    return {"eval/accuracy": mean(wins), "eval/margin": mean(margins)}


def sampled_reward(policy, tokenizer, pairs, reward_fn, eval_cfg, seed: int) -> dict:
    """Sample one response per held-out prompt and score it with the ground-truth reward."""
    prompts = pairs[:eval_cfg.num_prompts]
    ids = policy.run("generate", pad_to_multiple([p.prompt_ids for p in prompts], len(policy)),
                     eval_cfg.max_new_tokens, eval_cfg.temperature, seed)[:len(prompts)]
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    rewards = [float(reward_fn(p.prompt_text, t)) for p, t in zip(prompts, texts)]
    return {"eval/reward": mean(rewards), "eval/response_tokens": mean(len(i) for i in ids),
            "eval/sample": texts[0]}
