"""One policy update of the online RL loop, run inside each policy-trainer replica.

For every micro-batch of this replica's share of the rollout: new log-probs of the sampled
tokens (with gradients), the clipped policy loss against the pre-update log-probs, an
optional KL-to-reference loss term, an optional entropy bonus, an optional truncated
importance weight for the engine/trainer log-prob gap; DeepSpeed steps the optimizer every
``train.batch_size`` samples (over all replicas).
"""
from __future__ import annotations

import torch

from actors.logprobs import build_inputs, by_sequence, token_logprobs
from orchestrator.batches import RolloutBatch
from orchestrator.kl import kl_per_token
from orchestrator.rl_losses import entropy_loss, kl_loss, policy_loss, truncated_is_weights


def rl_update(trainer, batch: RolloutBatch, cfg, pad_id: int) -> dict:
    """Sums of per-sample statistics over this replica's rows (the driver averages them)."""
    rl, micro, engine = cfg.rl, min(cfg.train.micro_batch_size, len(batch)), trainer.engine
    sums = {"samples": 0.0}
    engine.train()
    for _ in range(rl.epochs):
        for mb in batch.micro_batches(micro):
            inputs = build_inputs(mb.sequences, cfg.packing, pad_id)
            # the entropy is a logged figure unless the loss has an entropy term
            flat, ent_flat = token_logprobs(engine, inputs, entropy=True,
                                            entropy_grad=bool(rl.entropy_coef))
            mask = mb.mask.bool()
            logp = torch.zeros(mask.shape, dtype=flat.dtype)
            logp = logp.masked_scatter(mask, by_sequence(flat, inputs))
            entropy = torch.zeros(mask.shape, dtype=flat.dtype)
            entropy = entropy.masked_scatter(mask, by_sequence(ent_flat, inputs))
            old = mb.old_logprobs if mb.old_logprobs is not None else logp.detach()
            is_w = (truncated_is_weights(old, mb.rollout_logprobs, mask, rl.tis_cap)
                    if rl.tis_cap else None)
            loss, stats = policy_loss("ppo", logp, old, mb.advantages, mask,
                                      agg=rl.aggregation, eps_low=rl.eps_low, eps_high=rl.eps_high,
                                      dual_clip=rl.dual_clip, is_weights=is_w)
            if rl.kl_mode == "loss" and rl.kl_coef:
                loss = loss + kl_loss(logp, mb.ref_logprobs, mask, rl.kl_coef, rl.kl_estimator,
                                      rl.aggregation)
            if rl.entropy_coef:
                loss = loss + entropy_loss(entropy, mask, rl.entropy_coef, rl.aggregation)
            engine.backward(loss)
            trainer.step()
            n = len(mb)
            with torch.no_grad():
                kl = kl_per_token(rl.kl_estimator, logp, mb.ref_logprobs, mask)
                tokens = mask.sum().clamp(min=1)
                # how far the engine's sampling log-probs are from the trainer's, same tokens
                gap = ((mb.rollout_logprobs - old).abs() * mask).sum() / tokens
                stats.update(loss=loss.item(), entropy=(entropy.sum() / tokens).item(),
                             kl=(kl.sum() / tokens).item(), logprob_gap=gap.item())
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v * n
            sums["samples"] += n
    sums["grad_norm"] = trainer.grad_norm()
    sums["lr"] = engine.get_lr()[0]
    return sums
