"""The online RL loop (PPO with a critic; critic-free GRPO, RLOO, REINFORCE++), one step:

    prompts -> rollout.generate -> {reward.score, reference.logprobs, policy.logprobs,
                                    critic.values}
            -> advantages (driver) -> {policy.rl_step, critic.critic_step}
            -> policy => rollout weight sync

The algorithm only picks the advantage estimator (orchestrator/advantages.py) and whether a
critic takes part; everything else is this one loop.
"""
from __future__ import annotations

import logging
import time
from statistics import mean

import torch
from tqdm import tqdm

from actors.reward import RewardSample
from actors.runtime import load_tokenizer
from orchestrator.advantages import compute_advantages, token_rewards
from orchestrator.batches import RolloutBatch, pad_tokens
from orchestrator.checkpoint import CheckpointManager, restore_run, resume_dir, save_run
from orchestrator.data import load_prompts
from orchestrator.dpo_loop import TrainResult
from orchestrator.evaluate import pad_to_multiple
from orchestrator.kl import kl_per_token
from orchestrator.metrics import MetricsLog, PhaseTimer, combine_replicas
from orchestrator.rl_losses import explained_variance
from orchestrator.roles import RLRoles
from orchestrator.sampler import ResumableSampler
from orchestrator.storage import RunStorage
from orchestrator.weight_sync import sync_weights

log = logging.getLogger(__name__)


ESTIMATOR = {"ppo": "gae"}  # algorithms whose advantage estimator has another name


def _advantages(cfg, rewards: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None,
                values: torch.Tensor | None):
    rl = cfg.rl
    penalty = rl.kl_coef if rl.kl_mode == "reward" else 0.0
    return compute_advantages(
        ESTIMATOR.get(cfg.algorithm, cfg.algorithm), rewards=rewards, mask=mask,
        group_size=rl.group_size, token_rewards=token_rewards(rewards, mask, kl, penalty),
        values=values, gamma=rl.gamma, lam=rl.lam, whiten=rl.whiten, scale_by_std=rl.scale_by_std)


def run_rl(cfg, storage: RunStorage | None = None) -> TrainResult:
    storage = storage or RunStorage(cfg.run_dir)
    run_dir = storage.local_dir
    tokenizer = load_tokenizer(cfg.model.path)
    limit = cfg.rollout.max_model_len - cfg.rl.max_new_tokens
    prompts, report = load_prompts(cfg.data.train, tokenizer, limit, cfg.data.on_bad_row,
                                   cfg.data.prompt_key)
    held_out = (load_prompts(cfg.data.eval, tokenizer, limit, cfg.data.on_bad_row,
                             cfg.data.prompt_key)[0][:cfg.eval.num_prompts] if cfg.data.eval else [])
    ckpts = CheckpointManager(run_dir, cfg.checkpoint.keep, storage)
    ckpts.clear_partial()
    resume = resume_dir(cfg.checkpoint.resume, ckpts)
    roles = RLRoles(cfg)
    try:
        return _train(cfg, roles, tokenizer, prompts, held_out, [report.summary()], ckpts, resume)
    finally:
        roles.shutdown()


def _train(cfg, roles, tokenizer, prompts, held_out, data_notes, ckpts, resume) -> TrainResult:
    rl, run_dir = cfg.rl, ckpts.storage.local_dir
    bucket_bytes = cfg.weight_sync.bucket_bytes
    sampler = ResumableSampler(len(prompts), cfg.train.seed)
    start, before = 0, None
    if resume is not None:
        start, before = restore_run(resume, roles.trainables, sampler, ckpts)
        sync_weights(roles.policy, roles.rollout, bucket_bytes)  # engines start from the model dir
    metrics = MetricsLog(run_dir, cfg.log.tensorboard, resume_step=start,
                         storage=ckpts.storage)
    timer = PhaseTimer()
    sampling = dict(n=rl.group_size, temperature=rl.temperature, top_p=rl.top_p, top_k=rl.top_k,
                    max_new_tokens=rl.max_new_tokens)

    def score(batch_prompts, samples) -> list[float]:
        per = len(samples) // len(batch_prompts)
        texts = tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
        records = [RewardSample(batch_prompts[i // per].prompt_text, t,
                                batch_prompts[i // per].extra, index=i) for i, t in enumerate(texts)]
        return roles.reward.run("score", records)

    def evaluate(step: int) -> dict:
        if not held_out:
            return {}
        samples = roles.rollout.run("generate", [p.prompt_ids for p in held_out],
                                    dict(sampling, n=1, seed=cfg.train.seed))
        return {"eval/reward": mean(score(held_out, samples)),
                "eval/response_tokens": mean(len(s.response_ids) for s in samples)}

    # pre-update log-probs need their own forward pass unless the update is exactly on-policy
    # (one epoch, one optimizer step per rollout) and no KL penalty enters the rewards; with
    # async rollouts the engine's own log-probs are the old policy's (it sampled one step behind)
    rollout_size = rl.prompts_per_step * rl.group_size
    needs_old = not rl.async_rollout and not (rl.epochs == 1 and cfg.train.batch_size == rollout_size
                                              and (rl.kl_mode == "loss" or rl.kl_coef == 0))

    def launch(step: int):
        """Draw step's prompts and start generating (seeded per step, so a resumed run samples
        the same); returns the prompts, the call's refs, and the sampler state before the draw."""
        state = sampler.state_dict()
        batch_prompts = [prompts[i] for i in sampler.next_batch(rl.prompts_per_step)]
        refs = roles.rollout.submit("generate", [p.prompt_ids for p in batch_prompts],
                                    dict(sampling, seed=cfg.train.seed + 100_003 * step))
        return batch_prompts, refs, state

    pending = None  # async: the next step's generation, running while this step trains
    if before is None:
        before = evaluate(0)
        metrics.log(0, before)
    last_ckpt = None
    bar = tqdm(total=cfg.train.max_steps, initial=start, desc=cfg.algorithm, unit="step",
               disable=not cfg.log.progress_bar, dynamic_ncols=True)
    for step in range(start + 1, cfg.train.max_steps + 1):
        t_step = time.perf_counter()
        with timer.phase("generate"):
            batch_prompts, refs, _ = pending or launch(step)
            samples = roles.rollout.gather("generate", refs)
            pending = (launch(step + 1) if rl.async_rollout and step < cfg.train.max_steps
                       else None)
        seqs = [(s.prompt_ids, s.response_ids) for s in samples]
        with timer.phase("score"):  # reference and policy log-probs run while rewards are scored
            ref_refs = roles.reference.submit("token_logprobs", seqs)
            old_refs = (roles.policy.submit("token_logprobs", pad_to_multiple(seqs, len(roles.policy)))
                        if needs_old else None)
            value_refs = (roles.critic.submit("values", pad_to_multiple(seqs, len(roles.critic)))
                          if roles.critic else None)
            rewards = torch.tensor(score(batch_prompts, samples))
            ref_lp = roles.reference.gather("token_logprobs", ref_refs)
            old_lp = roles.policy.gather("token_logprobs", old_refs)[:len(seqs)] if needs_old else None
            value_rows = roles.critic.gather("values", value_refs)[:len(seqs)] if roles.critic else None
        with timer.phase("other"):
            mask = pad_tokens([[1.0] * len(r) for _, r in seqs])
            width = mask.shape[1]
            ref = pad_tokens(ref_lp, width)
            engine_lp = pad_tokens([s.logprobs for s in samples], width)
            old = pad_tokens(old_lp, width) if needs_old else engine_lp if rl.async_rollout else None
            values = pad_tokens(value_rows, width) if roles.critic else None
            kl = kl_per_token(rl.kl_estimator, old, ref, mask.bool()) if old is not None else None
            adv, returns = _advantages(cfg, rewards, mask.bool(), kl, values)
            batch = RolloutBatch(seqs, mask, adv, old, ref, engine_lp, values, returns)
        with timer.phase("train"):  # policy and critic update side by side
            refs = roles.policy.submit("rl_step", batch.split(len(roles.policy)))
            critic_refs = (roles.critic.submit("critic_step", batch.split(len(roles.critic)))
                           if roles.critic else None)
            row = combine_replicas(roles.policy.gather("rl_step", refs), "samples",
                                   same=("grad_norm", "lr"))
            if roles.critic:
                row.update(combine_replicas(roles.critic.gather("critic_step", critic_refs),
                                            "samples", same=("critic_grad_norm",)))
                row.update({"explained_variance": explained_variance(values, returns, mask),
                            "values/mean": (values * mask).sum().item() / mask.sum().item()})
        with timer.phase("sync"):
            if step % cfg.weight_sync.every == 0:
                sync_weights(roles.policy, roles.rollout, bucket_bytes)
        row["batch/rows"] = [p.row for p in batch_prompts]  # which prompt rows this step used
        row.update({"reward/mean": rewards.mean().item(), "reward/std": rewards.std().item(),
                    "response/length": mask.sum(1).mean().item()})
        row.update(timer.pop(), **{"timing/step": time.perf_counter() - t_step})
        if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.max_steps:
            row.update(evaluate(step))
        metrics.log(step, row)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward/mean']:.3f}", kl=f"{row['kl']:.4f}")
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            # async: the next step's prompts are drawn already; the checkpoint keeps the sampler
            # as it was before that draw, so a resume draws them again
            last_ckpt = save_run(ckpts, roles.trainables, step,
                                 pending[2] if pending else sampler.state_dict(), before)
            metrics.sync()
    bar.close()
    steps = cfg.train.max_steps
    if steps % cfg.weight_sync.every:  # evaluate what the trainer ended with
        sync_weights(roles.policy, roles.rollout, bucket_bytes)
    after = evaluate(steps)
    metrics.log(steps, {f"final/{k}": v for k, v in after.items()})
    metrics.close()
    if last_ckpt is None or not last_ckpt.name.endswith(f"{steps:07d}"):
        last_ckpt = save_run(ckpts, roles.trainables, steps, sampler.state_dict(), before)
    result = TrainResult(run_dir, steps, last_ckpt, last_ckpt / "model", before, after, data_notes,
                         resume)
    log.info("%s", result.summary())
    return result
