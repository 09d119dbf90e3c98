"""The reward-model loss: Bradley-Terry on preference pairs.

With r_w and r_l the model's scores of the chosen and the rejected response of a pair, and m
the pair's margin (0 unless the data gives one),

    loss = -log sigmoid(r_w - r_l - m)  +  c * (r_w + r_l)^2

averaged over the pairs. The second term (reward centering, coefficient c, 0 is off) keeps
the scores near zero mean, since the Bradley-Terry term only sees their differences.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                       margin: torch.Tensor | None = None, center_coef: float = 0.0,
                       ) -> tuple[torch.Tensor, dict]:
    """Mean loss over the pairs, and per-batch sums for the metrics (accuracy counts a tie as
    half right; ``rewards/sq_sum`` with ``rewards/sum`` gives the std of all scores)."""
    diff = r_chosen - r_rejected
    per_pair = -F.logsigmoid(diff - margin if margin is not None else diff)
    if center_coef:
        per_pair = per_pair + center_coef * (r_chosen + r_rejected) ** 2
    with torch.no_grad():
        both = torch.cat([r_chosen, r_rejected]).double()
        stats = {
            "accuracy": ((diff > 0).float() + 0.5 * (diff == 0).float()).sum().item(),
            "margin": diff.sum().item(),
            "rewards/chosen": r_chosen.sum().item(),
            "rewards/rejected": r_rejected.sum().item(),
            "rewards/sum": both.sum().item(),
            "rewards/sq_sum": (both ** 2).sum().item(),
        }
    return per_pair.mean(), stats
