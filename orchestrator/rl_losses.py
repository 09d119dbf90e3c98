"""Losses of the online RL loop: policy (registered by name), value, entropy and KL terms.

Tensors are [B, T] over response tokens with a mask [B, T] (1 on real tokens; see
advantages.py). Padding is never read: inputs are zeroed there before any arithmetic, so
gradients stay finite whatever padding holds. Every loss reduces its per-token values with
an aggregation chosen by name (`agg`), with l the per-token loss and m the mask:

    token_mean           sum_{b,t} l m / sum_{b,t} m
    seq_mean_token_mean  (1/B) sum_b [sum_t l m / sum_t m]     (a row without tokens gives 0)
    seq_mean_token_sum   (1/B) sum_b sum_t l m

Statistics are Python floats, token means over the real tokens of the batch.
"""
from __future__ import annotations

from typing import Callable

import torch

from orchestrator.advantages import masked_mean, masked_sum, zero_pad
from orchestrator.kl import KL_ESTIMATORS, kl_per_token

AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}
POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict]]] = {}


def _register(registry: dict, name: str):
    def wrap(fn):
        registry[name] = fn
        return fn
    return wrap


@_register(AGGREGATIONS, "token_mean")
def token_mean(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_{b,t} l m / sum_{b,t} m."""
    return masked_mean(loss, mask)


@_register(AGGREGATIONS, "seq_mean_token_mean")
def seq_mean_token_mean(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(1/B) sum_b [sum_t l m / sum_t m]."""
    return masked_mean(loss, mask, dim=-1).mean()


@_register(AGGREGATIONS, "seq_mean_token_sum")
def seq_mean_token_sum(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(1/B) sum_b sum_t l m."""
    return masked_sum(loss, mask, dim=-1).mean()


def aggregate(loss: torch.Tensor, mask: torch.Tensor, agg: str = "token_mean") -> torch.Tensor:
    """AGGREGATIONS[agg](loss, mask), with a clear error for an unknown name."""
    if agg not in AGGREGATIONS:
        raise KeyError(f"unknown aggregation {agg!r}; known: {sorted(AGGREGATIONS)}")
    return AGGREGATIONS[agg](loss, mask)


def truncated_is_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor,
                         mask: torch.Tensor, cap: float = 2.0) -> torch.Tensor:
    """w_t = min(exp(old_logp_t - rollout_logp_t), cap), detached, 0 on padding.

    old_logp comes from the trainer, rollout_logp from the engine that sampled the tokens
    (vLLM); they differ through kernels, precision and stale weights. w corrects the policy
    gradient for that gap (truncated importance sampling); pass it as `is_weights`.
    """
    r = zero_pad(old_logp, mask) - zero_pad(rollout_logp, mask)
    return zero_pad(torch.exp(r).clamp(max=cap), mask).detach()


@_register(POLICY_LOSSES, "ppo")
def ppo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
             mask: torch.Tensor, *, agg: str = "token_mean", eps_low: float = 0.2,
             eps_high: float | None = None, dual_clip: float | None = None,
             is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped PPO surrogate (Schulman et al. 2017), per token, then aggregated.

    rho = exp(logp - old_logp),
    l = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))     (eps_high defaults to eps_low)
    dual clip c > 1 (Ye et al. 2020), for A < 0:  l = min(l, c |A|)
    truncated IS: l <- w l with w = is_weights (see truncated_is_weights).

    stats: clip_frac (tokens where the clipped term was chosen), dual_clip_frac (tokens
    capped at c |A|), approx_kl (mean k3 estimate of KL(old || new): rho - 1 - log rho),
    ratio_mean.
    """
    eps_high = eps_low if eps_high is None else eps_high
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1; got {dual_clip}")
    logp, old_logp = zero_pad(logp, mask), zero_pad(old_logp, mask)
    adv = zero_pad(advantages, mask)
    ratio = torch.exp(logp - old_logp)
    surr = -adv * ratio
    surr_clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(surr, surr_clipped)
    capped = torch.zeros_like(mask, dtype=torch.bool)
    if dual_clip is not None:
        capped = (adv < 0) & (loss > -dual_clip * adv)
        loss = torch.where(capped, -dual_clip * adv, loss)
    if is_weights is not None:
        loss = loss * zero_pad(is_weights, mask).detach()
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((surr_clipped > surr).float(), mask).item(),
            "dual_clip_frac": masked_mean(capped.float(), mask).item(),
            "approx_kl": masked_mean(KL_ESTIMATORS["k3"](old_logp, logp), mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
        }
    return aggregate(loss, mask, agg), stats


def policy_loss(name: str, *args, **kwargs) -> tuple[torch.Tensor, dict]:
    """POLICY_LOSSES[name](*args, **kwargs), with a clear error for an unknown name."""
    if name not in POLICY_LOSSES:
        raise KeyError(f"unknown policy loss {name!r}; known: {sorted(POLICY_LOSSES)}")
    return POLICY_LOSSES[name](*args, **kwargs)


def entropy_loss(entropy: torch.Tensor, mask: torch.Tensor, coef: float,
                 agg: str = "token_mean") -> torch.Tensor:
    """-coef * agg(H_t): add it to the loss to reward entropy."""
    return -coef * aggregate(zero_pad(entropy, mask), mask, agg)


def kl_loss(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, coef: float,
            estimator: str = "k3", agg: str = "token_mean") -> torch.Tensor:
    """coef * agg(k(logp, ref_logp)): KL to the reference as a loss term, not a reward."""
    return coef * aggregate(kl_per_token(estimator, logp, ref_logp, mask), mask, agg)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, *, clip: float | None = 0.2,
               agg: str = "token_mean") -> tuple[torch.Tensor, dict]:
    """Clipped value loss (PPO2 baselines).

    v_clip = old_v + clamp(v - old_v, -clip, clip),
    l = 0.5 max((v - R)^2, (v_clip - R)^2);  clip=None gives l = 0.5 (v - R)^2.
    stats: vf_clip_frac (tokens where the clipped term was the larger).
    """
    v, old_v, ret = zero_pad(values, mask), zero_pad(old_values, mask), zero_pad(returns, mask)
    unclipped = (v - ret) ** 2
    if clip is None:
        loss, chosen = 0.5 * unclipped, torch.zeros_like(mask, dtype=torch.bool)
    else:
        clipped = (old_v + (v - old_v).clamp(-clip, clip) - ret) ** 2
        loss, chosen = 0.5 * torch.maximum(unclipped, clipped), clipped > unclipped
    stats = {"vf_clip_frac": masked_mean(chosen.float(), mask).item()}
    return aggregate(loss, mask, agg), stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over real tokens (1: perfect critic, <= 0: no better than a
    constant); nan when Var(R) = 0."""
    with torch.no_grad():
        v, ret = zero_pad(values, mask), zero_pad(returns, mask)
        var_r = masked_mean((ret - masked_mean(ret, mask)) ** 2, mask)
        err = ret - v
        var_err = masked_mean((err - masked_mean(err, mask)) ** 2, mask)
        return float("nan") if var_r.item() == 0 else (1 - var_err / var_r).item()
