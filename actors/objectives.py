"""The offline objectives the trainer serves, one micro-batch loss each, chosen by algorithm.

Each objective takes (trainer, micro-batch, the replica's whole batch for this step) and
returns the loss to back-propagate and per-batch sums for the metrics: the driver adds the
sums of all replicas and divides each by the count the objective names (``pairs`` for DPO and
the reward model, trained tokens for SFT); ``tokens`` (every token through the model) is
summed for tokens/s.
"""
from __future__ import annotations

from typing import Callable

import torch

from actors.logprobs import (build_inputs, pair_inputs, sequence_logprobs, sequence_scores,
                             token_logprobs_and_hits)
from orchestrator.batches import PreferenceBatch, SFTBatch
from orchestrator.dpo_losses import preference_loss
from orchestrator.rm_losses import bradley_terry_loss

OBJECTIVES: dict[str, Callable] = {}


def objective(name: str):
    def wrap(fn):
        OBJECTIVES[name] = fn
        return fn
    return wrap


def _pair_inputs(trainer, pairs):
    """Chosen then rejected sequences of ``pairs`` in one packed forward's inputs, and their
    tokens (the prompt counted with each response)."""
    tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    return pair_inputs(pairs, trainer.cfg.packing, trainer.pad_id), tokens


@objective("dpo")
def dpo(trainer, mb: PreferenceBatch, whole: PreferenceBatch) -> tuple[torch.Tensor, dict]:
    """The configured preference loss against the batch's reference log-probs."""
    d = trainer.cfg.dpo
    inputs, tokens = _pair_inputs(trainer, mb.pairs)
    logps, counts = sequence_logprobs(trainer.engine, inputs)
    n = len(mb)
    loss, stats = preference_loss(
        d.loss, logps[:n], logps[n:], mb.ref_chosen, mb.ref_rejected, d.beta, d.label_smoothing,
        d.nll_weight, counts[:n], counts[n:], average_logratios=d.loss == "ipo" and d.ipo_average,
        weights=mb.weights)
    real = n if mb.weights is None else int((mb.weights > 0).sum())
    return loss, {**stats, "pairs": real, "tokens": tokens}


OBJECTIVES["online_dpo"] = dpo  # pairs sampled by the run itself (orchestrator/online_pairs.py)


@objective("rm")
def reward_model(trainer, mb: PreferenceBatch, whole: PreferenceBatch) -> tuple[torch.Tensor, dict]:
    """Bradley-Terry on the scores of chosen and rejected, read at their last tokens."""
    cfg = trainer.cfg
    inputs, tokens = _pair_inputs(trainer, mb.pairs)
    scores = sequence_scores(trainer.engine, inputs)
    n = len(mb)
    margin = (torch.tensor([p.margin for p in mb.pairs], dtype=scores.dtype)
              if cfg.data.margin_key else None)
    loss, stats = bradley_terry_loss(scores[:n], scores[n:], margin, cfg.rm_loss.center_coef)
    return loss, {**stats, "loss": loss.item() * n, "pairs": n, "tokens": tokens}


@objective("sft")
def sft(trainer, mb: SFTBatch, whole: SFTBatch) -> tuple[torch.Tensor, dict]:
    """Negative log-likelihood of the trained tokens, averaged over all trained tokens of the
    replica's step (not per micro-batch, so long replies weigh by their length)."""
    inputs = build_inputs([e.segments for e in mb.examples], trainer.cfg.packing,
                          trainer.pad_id)
    logp, hits = token_logprobs_and_hits(trainer.engine, inputs)
    total = sum(e.target_tokens for e in whole.examples)
    nll = -logp.sum()
    # DeepSpeed divides each micro-batch's loss by the accumulation steps; undo that here
    loss = nll * (trainer.engine.gradient_accumulation_steps() / total)
    return loss, {"loss": nll.item(), "token_accuracy": hits.sum().item(),
                  "target_tokens": len(logp), "sequences": len(mb),
                  "tokens": sum(len(e) for e in mb.examples)}
