"""Held-out measurements: preference accuracy, SFT loss, reward-model accuracy and rank
correlation with a gold reward, and the reward of sampled responses."""
from __future__ import annotations

import importlib
import math
from statistics import mean
from typing import Callable

from orchestrator.progress import pad_to_multiple
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


def win(margin: float) -> float:
    """A pair ranked by ``margin`` (chosen minus rejected): right 1, tie 0.5, wrong 0."""
    return 1.0 if margin > 0 else 0.5 if margin == 0 else 0.0


def preference_accuracy(logps: list[tuple[float, float]], ref: list[tuple[float, float]],
                        beta: float) -> dict:
    """Share of held-out pairs whose chosen implicit reward beats the rejected (ties: half),
    from the policy's and the reference's (chosen, rejected) log-probs of each pair."""
    wins, margins = [], []
    for (pc, pr), (rc, rr) in zip(logps, ref):
        margin = beta * ((pc - rc) - (pr - rr))
        margins.append(margin)
        wins.append(win(margin))
    return {"eval/accuracy": mean(wins), "eval/margin": mean(margins)}


def sampled_reward(policy, tokenizer, pairs, reward_fn, eval_cfg, seed: int) -> dict:
    """Sample one response per held-out prompt and score it with the ground-truth reward."""
    prompts = pairs[:eval_cfg.num_prompts]
    ids = policy.run("sample_responses", pad_to_multiple([p.prompt_ids for p in prompts], len(policy)),
                     eval_cfg.max_new_tokens, eval_cfg.temperature, seed)[:len(prompts)]
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    rewards = [float(reward_fn(p.prompt_text, t)) for p, t in zip(prompts, texts)]
    return {"eval/reward": mean(rewards), "eval/response_tokens": mean(len(i) for i in ids),
            "eval/sample": texts[0]}


def sft_heldout(scores: list[tuple[float, int, int]]) -> dict:
    """Held-out loss (mean NLL per trained token), its perplexity and token accuracy, from
    each example's (summed NLL, trained tokens, tokens predicted right)."""
    tokens = sum(n for _, n, _ in scores)
    loss = sum(nll for nll, _, _ in scores) / tokens
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)),
            "eval/token_accuracy": sum(right for _, _, right in scores) / tokens}


def reward_model_accuracy(scores: list[tuple[float, float]], pairs, tokenizer,
                          gold_fn=None) -> dict:
    """Share of held-out pairs the reward model ranks right (ties: half) by its (chosen,
    rejected) ``scores`` and the mean score margin; with a gold reward function, the Spearman
    correlation between the model's scores and the gold rewards of every held-out response
    (chosen and rejected alike)."""
    diffs = [c - r for c, r in scores]
    out = {"eval/accuracy": mean(win(d) for d in diffs),
           "eval/margin": mean(diffs)}
    if gold_fn is not None:
        texts = tokenizer.batch_decode([p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs],
                                       skip_special_tokens=True)
        prompts = [p.prompt_text for p in pairs] * 2
        gold = [float(gold_fn(p, t)) for p, t in zip(prompts, texts)]
        model = [c for c, _ in scores] + [r for _, r in scores]
        out["eval/gold_spearman"] = spearman(model, gold)
    return out


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks (ties averaged); 0
    when either side is constant."""
    ra, rb = ranks(a), ranks(b)
    ma, mb = mean(ra), mean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var else 0.0
