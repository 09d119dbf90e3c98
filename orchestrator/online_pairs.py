"""Online DPO's update in the RL loop: pairs from the run's own samples, one preference step.

Each prompt's group of ``rl.group_size`` samples gives at most one pair: the sample the reward
role scored highest is chosen, the lowest rejected; a group whose scores are all equal (or
that has fewer than two responses) gives none and is counted as a tie. The reference's
log-probs of the two responses (summed over their tokens) come from the step's scoring, and
the policy takes one step of the configured preference loss (``dpo.loss``, ``dpo.beta``).

A step's batch has a fixed size (``train.batch_size`` = ``rl.prompts_per_step`` pairs), so
that DeepSpeed's accumulation and every replica's forwards stay as configured: the pairs a
step found are followed by weight-0 copies, and the real pairs weigh P / W each (P pairs in the
batch, W real), which makes the loss the mean over the real pairs.
"""
from __future__ import annotations

import logging

import torch

from orchestrator.batches import PreferenceBatch, pad_tokens
from orchestrator.data import PreferenceExample
from orchestrator.kl import kl_per_token
from orchestrator.metrics import combine_replicas

log = logging.getLogger(__name__)


def best_worst(rewards: list[float], group: int, usable: list[bool] | None = None
               ) -> list[tuple[int, int] | None]:
    """Per group of ``group`` consecutive samples, (index of the highest reward, index of the
    lowest), both within the group and the first one on equal scores; None for a tie (all
    usable samples score the same) or fewer than two usable samples."""
    out = []
    for start in range(0, len(rewards), group):
        idx = [i for i in range(start, start + group) if usable is None or usable[i]]
        if len(idx) < 2:
            out.append(None)
            continue
        hi = max(idx, key=lambda i: rewards[i])
        lo = min(idx, key=lambda i: rewards[i])
        out.append(None if rewards[hi] == rewards[lo] else (hi - start, lo - start))
    return out


def padded_batch(pairs: list[PreferenceExample], ref: list[tuple[float, float]],
                 size: int) -> PreferenceBatch:
    """``pairs`` followed by weight-0 copies of the first up to ``size`` rows; the real pairs
    weigh size / len(pairs), so the batch's mean loss is the real pairs' mean."""
    fill = size - len(pairs)
    batch = PreferenceBatch.build(pairs + [pairs[0]] * fill, ref + [ref[0]] * fill)
    batch.weights = torch.tensor([size / len(pairs)] * len(pairs) + [0.0] * fill)
    return batch


class PairUpdate:
    """One online-DPO step built from a scored rollout (see the module docstring)."""

    def __init__(self, cfg, roles, ro, rewards: torch.Tensor, ref_lp: list[list[float]]):
        self.cfg, self.roles, k = cfg, roles, cfg.rl.group_size
        scores = rewards.tolist()
        usable = [s.finish_reason not in ("skipped", "dropped") for s in ro.samples]
        dropped = sum(ro.samples[g * k].finish_reason == "dropped" for g in range(len(ro.prompts)))
        pairs, ref, chosen_r, rejected_r = [], [], [], []
        for g, pick in enumerate(best_worst(scores, k, usable)):
            if pick is None:
                continue
            c, r = g * k + pick[0], g * k + pick[1]
            p = ro.prompts[g]
            pairs.append(PreferenceExample(p.prompt_ids, ro.samples[c].response_ids,
                                           ro.samples[r].response_ids, p.row, p.prompt_text))
            ref.append((sum(ref_lp[c]), sum(ref_lp[r])))
            chosen_r.append(scores[c])
            rejected_r.append(scores[r])
        self.batch = padded_batch(pairs, ref, cfg.train.batch_size) if pairs else None
        # the sampling policy's KL to the reference, per token, on every sample of the step
        mask = pad_tokens([[1.0] * len(s.response_ids) for s in ro.samples]).bool()
        engine_lp = pad_tokens([s.logprobs for s in ro.samples], mask.shape[1])
        kl = kl_per_token(cfg.rl.kl_estimator, engine_lp, pad_tokens(ref_lp, mask.shape[1]), mask)
        self.stats = {"pairs/ties": len(ro.prompts) - len(pairs) - dropped,
                      "kl": (kl.sum() / mask.sum().clamp(min=1)).item()}
        if pairs:
            self.stats.update({"reward/chosen": sum(chosen_r) / len(pairs),
                               "reward/rejected": sum(rejected_r) / len(pairs)})

    def submit(self) -> list:
        if self.batch is None:
            log.warning("online_dpo: every prompt of this step was a tie (all %d samples scored "
                        "alike); no update", self.cfg.rl.group_size)
            return []
        return self.roles.policy.submit("train_step", self.batch.split(len(self.roles.policy)))

    def gather(self, refs: list) -> dict:
        row = dict(self.stats)
        if refs:
            parts = self.roles.policy.gather("train_step", refs)
            stats = combine_replicas(parts, "pairs", same=("grad_norm", "lr"),
                                     totals=("tokens", "train_seconds"))
            stats["timing/in_actor"] = stats.pop("train_seconds") / len(parts)
            row.update(stats)
        else:
            row["pairs"] = 0
        return row
