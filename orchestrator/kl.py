"""Per-token estimators of KL(pi || ref), registered by name (Schulman, "Approximating KL
divergence", 2020).

With tokens sampled from pi and the log-ratio r = log pi - log ref:

    k1  r                    unbiased, high variance, can be negative
    k2  0.5 r^2              biased (low for small r), non-negative
    k3  exp(-r) - 1 + r      unbiased, non-negative (x - 1 >= log x with x = ref / pi)

Used as a reward penalty (advantages.token_rewards) or as a loss (rl_losses.kl_loss).
"""
from __future__ import annotations

from typing import Callable

import torch

from orchestrator.advantages import zero_pad

KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}


def register(name: str):
    def wrap(fn):
        KL_ESTIMATORS[name] = fn
        return fn
    return wrap


@register("k1")
def k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """r = logp - ref_logp."""
    return logp - ref_logp


@register("k2")
def k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """0.5 r^2."""
    return 0.5 * (logp - ref_logp) ** 2


@register("k3")
def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """exp(-r) - 1 + r."""
    r = logp - ref_logp
    return torch.expm1(-r) + r


def kl_per_token(name: str, logp: torch.Tensor, ref_logp: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
    """KL_ESTIMATORS[name] on real tokens, 0 on padding (padding inputs are never read)."""
    if name not in KL_ESTIMATORS:
        raise KeyError(f"unknown KL estimator {name!r}; known: {sorted(KL_ESTIMATORS)}")
    return zero_pad(KL_ESTIMATORS[name](zero_pad(logp, mask), zero_pad(ref_logp, mask)), mask)
