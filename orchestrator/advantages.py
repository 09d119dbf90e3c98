"""Advantage estimators of the online RL loop, registered by name.

Batch conventions (shared with kl.py and rl_losses.py):

- response tensors are padded [B, T] over response tokens only; `mask` [B, T] (bool or 0/1
  float) is 1 on real response tokens. Padding values are never read: they may hold anything.
- `rewards` [B] is the outcome reward of each sequence; `token_rewards` [B, T] puts it on the
  last real token, minus a per-token KL penalty if used (build them with `token_rewards`).
- group methods (grpo, rloo): the n samples of one prompt sit next to each other in the
  batch, rows [k*n, (k+1)*n) form group k, so B must be divisible by `group_size` n.

Every estimator takes keyword arguments only, ignores the ones it does not use, and returns
(advantages [B, T], returns [B, T] or None); returns are value targets, None without a critic.

    gae          A_t = delta_t + gamma lam A_{t+1},  delta_t = r_t + gamma V_{t+1} - V_t
    grpo         A_i = (r_i - mean_group r) / (std_group r + eps)   (Dr.GRPO: no division)
    rloo         A_i = r_i - mean_{j != i} r_j
    reinforce_pp A_t = whiten(G_t),  G_t = sum_{k >= t} gamma^(k-t) r_k
"""
from __future__ import annotations

from typing import Callable

import torch

Estimator = Callable[..., tuple[torch.Tensor, "torch.Tensor | None"]]
ADVANTAGE_ESTIMATORS: dict[str, Estimator] = {}


def register(name: str):
    def wrap(fn):
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn
    return wrap


# masked helpers, shared by kl.py and rl_losses.py

def zero_pad(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x on real tokens, 0 on padding (whatever padding held, inf and nan included)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum of x over real tokens (all of them, or along dim)."""
    x = zero_pad(x, mask)
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x m) / sum(m), the count clamped to >= 1 so an empty mask gives 0."""
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mu) / (sigma + eps) over real tokens, 0 on padding.

    mu and sigma^2 = mean((x - mu)^2) are the masked mean and population variance of x.
    """
    mu = masked_mean(x, mask)
    sigma = masked_mean((x - mu) ** 2, mask).sqrt()
    return zero_pad((x - mu) / (sigma + eps), mask)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """[B] index of the last real token of each row (0 for a row without any)."""
    pos = torch.arange(mask.shape[-1], device=mask.device)
    return (mask.bool().long() * pos).argmax(-1)


def token_rewards(outcome: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None,
                  kl_coef: float = 0.0) -> torch.Tensor:
    """r_t = -kl_coef * kl_t + [t = last real token] * outcome, 0 on padding.

    outcome [B] sequence rewards; kl [B, T] per-token KL estimates (kl.py), or None.
    """
    r = torch.zeros(mask.shape, dtype=outcome.dtype, device=outcome.device)
    if kl is not None and kl_coef:
        r = r - kl_coef * zero_pad(kl.to(outcome.dtype), mask)
    rows = torch.arange(mask.shape[0], device=mask.device)
    r[rows, last_token_index(mask)] += outcome
    return zero_pad(r, mask)


def _discounted_sum(r: torch.Tensor, mask: torch.Tensor, gamma: float,
                    values: torch.Tensor | None = None, lam: float = 1.0) -> torch.Tensor:
    """Backward recursion over T: with values, GAE; without, the discounted return.

    x_t = d_t + gamma lam x_{t+1}, d_t = r_t + gamma V_{t+1} - V_t (d_t = r_t without V);
    V and x after the last real token (on padding) are 0.
    """
    m = mask.bool()
    r = zero_pad(r, m)
    v = zero_pad(values, m) if values is not None else torch.zeros_like(r)
    out = torch.zeros_like(r)
    nxt_x = torch.zeros_like(r[:, 0])
    nxt_v = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * nxt_v - v[:, t]
        x = torch.where(m[:, t], delta + gamma * lam * nxt_x, torch.zeros_like(delta))
        out[:, t] = x
        nxt_x, nxt_v = x, v[:, t]
    return out


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B] -> [B / n, n], adjacent rows forming one group."""
    if group_size < 2 or rewards.shape[0] % group_size:
        raise ValueError(f"group_size must be >= 2 and divide the batch size "
                         f"{rewards.shape[0]}; got {group_size}")
    return rewards.reshape(-1, group_size)


def _broadcast(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sequence advantages [B] onto every real token of [B, T]."""
    return zero_pad(adv[:, None].expand(mask.shape), mask)


@register("gae")
def gae(*, token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
        gamma: float = 1.0, lam: float = 0.95, whiten: bool = False, **_):
    """PPO with a critic (Schulman et al. 2016).

    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1},
    V_{T_last + 1} = 0;  returns R_t = A_t + V_t (computed before any whitening).
    whiten: A <- (A - mean A) / (std A + eps) over the real tokens of the batch.
    """
    adv = _discounted_sum(token_rewards, mask, gamma, values=values, lam=lam)
    returns = zero_pad(adv + values, mask)
    return (masked_whiten(adv, mask) if whiten else adv), returns


@register("grpo")
def grpo(*, rewards: torch.Tensor, mask: torch.Tensor, group_size: int,
         scale_by_std: bool = True, eps: float = 1e-6, **_):
    """GRPO (Shao et al. 2024): A_i = (r_i - mean_g r) / (std_g r + eps) on every token.

    std_g is the sample standard deviation (Bessel, n - 1) of the group, as in veRL and
    OpenRLHF. scale_by_std=False gives Dr.GRPO (Liu et al. 2025): A_i = r_i - mean_g r.
    """
    g = _groups(rewards, group_size)
    adv = g - g.mean(-1, keepdim=True)
    if scale_by_std:
        adv = adv / (g.std(-1, keepdim=True) + eps)
    return _broadcast(adv.reshape(-1), mask), None


@register("rloo")
def rloo(*, rewards: torch.Tensor, mask: torch.Tensor, group_size: int, **_):
    """RLOO (Ahmadian et al. 2024): A_i = r_i - (sum_g r - r_i) / (n - 1) on every token."""
    g = _groups(rewards, group_size)
    baseline = (g.sum(-1, keepdim=True) - g) / (group_size - 1)
    return _broadcast((g - baseline).reshape(-1), mask), None


@register("reinforce_pp")
def reinforce_pp(*, token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                 eps: float = 1e-8, **_):
    """REINFORCE++ (Hu 2025): G_t = sum_{k >= t} gamma^(k-t) r_k, A = whiten(G).

    r_t are token rewards with the KL penalty in them (`token_rewards(..., kl, kl_coef)`);
    whitening uses the mean and population std of G over all real tokens of the batch.
    """
    ret = _discounted_sum(token_rewards, mask, gamma)
    return masked_whiten(ret, mask, eps), None


def compute_advantages(name: str, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ADVANTAGE_ESTIMATORS[name](**kwargs), with a clear error for an unknown name."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise KeyError(f"unknown advantage estimator {name!r}; known: {sorted(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name](**kwargs)
