"""Preference losses for DPO and its relatives, registered by name.

Inputs are per-pair summed response log-probs of the policy (pi) and the reference (ref).
With the log-ratio difference

    h = (log pi(y_w|x) - log pi(y_l|x)) - (log ref(y_w|x) - log ref(y_l|x))

each loss is a function of h (per pair, averaged over the batch by the caller):

    sigmoid  (DPO, Rafailov et al. 2023):      -log sigmoid(beta * h)
    cdpo     (conservative DPO, eps smoothing): -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    ipo      (IPO, Azar et al. 2023, tau=beta): (h - 1 / (2 tau))^2
    hinge    (SLiC-style):                      max(0, 1 - beta * h)

With ``average_logratios`` each response's log-ratio is averaged over its tokens instead:

    h = (log pi(y_w|x) - log ref(y_w|x)) / |y_w| - (log pi(y_l|x) - log ref(y_l|x)) / |y_l|

which is how IPO's authors computed the results of their paper (TRL's IPO does the same); the
summed form makes IPO's squared loss grow with response length.

An optional NLL term on chosen responses (RPO) adds nll_weight * (-log pi(y_w|x) / |y_w|).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

DPO_LOSSES: dict[str, Callable[..., torch.Tensor]] = {}


def register(name: str):
    def wrap(fn):
        DPO_LOSSES[name] = fn
        return fn
    return wrap


@register("sigmoid")
def sigmoid_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """-log sigmoid(beta h)."""
    return -F.logsigmoid(beta * h)


@register("cdpo")
def conservative_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)."""
    eps = label_smoothing
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


@register("ipo")
def ipo_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """(h - 1/(2 tau))^2 with tau = beta."""
    return (h - 1.0 / (2.0 * beta)) ** 2


@register("hinge")
def hinge_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """max(0, 1 - beta h)."""
    return torch.relu(1.0 - beta * h)


def preference_loss(name: str, pi_chosen: torch.Tensor, pi_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float,
                    label_smoothing: float = 0.0, nll_weight: float = 0.0,
                    chosen_tokens: torch.Tensor | None = None,
                    rejected_tokens: torch.Tensor | None = None,
                    average_logratios: bool = False,
                    weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Mean loss over the pairs and the per-batch statistics that go into the metrics.

    Implicit rewards are beta * (log pi - log ref) for each response; accuracy counts a pair
    as right when the chosen reward is higher, and a tie as half right. ``chosen_tokens`` /
    ``rejected_tokens``: response lengths, needed by the NLL term and ``average_logratios``.
    ``weights``: per-pair factors of the loss (online DPO pads a step's pairs to a fixed count
    with weight-0 copies); the statistics (the loss's unweighted sum among them) sum over the
    pairs of weight > 0 only.
    """
    if average_logratios:
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("average_logratios needs chosen_tokens and rejected_tokens")
        h = ((pi_chosen - ref_chosen) / chosen_tokens.clamp(min=1)
             - (pi_rejected - ref_rejected) / rejected_tokens.clamp(min=1))
    else:
        h = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)
    per_pair = DPO_LOSSES[name](h, beta, label_smoothing)
    if nll_weight:
        if chosen_tokens is None:
            raise ValueError("nll_weight > 0 needs chosen_tokens (response lengths) for the NLL term")
        per_pair = per_pair + nll_weight * (-pi_chosen / chosen_tokens.clamp(min=1))
    keep = slice(None) if weights is None else weights > 0
    with torch.no_grad():
        pi_chosen, pi_rejected = pi_chosen[keep], pi_rejected[keep]
        ref_chosen, ref_rejected = ref_chosen[keep], ref_rejected[keep]
        r_c = beta * (pi_chosen - ref_chosen)
        r_r = beta * (pi_rejected - ref_rejected)
        stats = {
            "rewards/chosen": r_c.sum().item(),
            "rewards/rejected": r_r.sum().item(),
            "rewards/margin": (r_c - r_r).sum().item(),
            "rewards/accuracy": ((r_c > r_r).float() + 0.5 * (r_c == r_r).float()).sum().item(),
            "logps/chosen": pi_chosen.sum().item(),
            "logps/rejected": pi_rejected.sum().item(),
            "loss": per_pair[keep].sum().item(),  # unweighted, over the pairs kept
        }
    if weights is not None:
        per_pair = per_pair * weights
    return per_pair.mean(), stats
