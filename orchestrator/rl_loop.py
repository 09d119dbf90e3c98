"""The online loop (PPO with a critic; critic-free GRPO, RLOO, REINFORCE++; online DPO), one step:

    prompts -> rollout.generate -> {reward.score, reference.logprobs, policy.logprobs,
                                    critic.values}
            -> advantages (driver) -> {policy.rl_step, critic.critic_step}
               or best/worst pairs (online DPO) -> policy.train_step
            -> policy => rollout weight sync

The algorithm only picks the update: an advantage estimator (orchestrator/advantages.py) and
whether a critic takes part, or online DPO's pairs (orchestrator/online_pairs.py); everything
else is this one loop. With ``rl.async_rollout`` the engines
generate step k+1's batch while step k trains (one update behind), and its scoring starts as
soon as it is in, before step k's weight sync.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from statistics import mean

import ray
import torch

from actors.reward import RewardSample
from actors.runtime import load_tokenizer
from orchestrator.advantages import compute_advantages, token_rewards
from orchestrator.batches import RolloutBatch, pad_tokens
from orchestrator.data import load_prompts
from orchestrator.evaluate import load_reward_fn, pad_to_multiple
from orchestrator.kl import kl_per_token
from orchestrator.metrics import PhaseTimer, combine_replicas
from orchestrator.online_pairs import PairUpdate
from orchestrator.rl_losses import explained_variance
from orchestrator.roles import RLRoles
from orchestrator.sampler import ResumableSampler
from orchestrator.session import RunSession, TrainResult
from orchestrator.storage import RunStorage
from orchestrator.weight_sync import sync_weights

log = logging.getLogger(__name__)


ESTIMATOR = {"ppo": "gae"}  # algorithms whose advantage estimator has another name


@dataclass
class Rollout:
    """One step's batch on its way through generation and scoring."""
    prompts: list                  # the drawn prompts (orchestrator.data prompt records)
    sampler_state: dict            # the sampler before they were drawn
    generating: list               # the rollout group's call refs
    samples: list | None = None    # RolloutSample per response, once generated
    scoring: dict | None = None    # call refs of reward, reference, old log-probs and values

    def sequences(self) -> list[tuple[list[int], list[int]]]:
        return [(s.prompt_ids, s.response_ids) for s in self.samples]


def _advantages(cfg, rewards: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None,
                values: torch.Tensor | None):
    rl = cfg.rl
    penalty = rl.kl_coef if rl.kl_mode == "reward" else 0.0
    return compute_advantages(
        ESTIMATOR.get(cfg.algorithm, cfg.algorithm), rewards=rewards, mask=mask,
        group_size=rl.group_size, token_rewards=token_rewards(rewards, mask, kl, penalty),
        values=values, gamma=rl.gamma, lam=rl.lam, whiten=rl.whiten, scale_by_std=rl.scale_by_std)


def _first_done(*calls: list) -> int:
    """Block until every ref of one of ``calls`` is ready; the index of that call."""
    pending = [ref for call in calls for ref in call]
    while True:
        for i, call in enumerate(calls):
            ready, _ = ray.wait(call, num_returns=len(call), timeout=0, fetch_local=False)
            if len(ready) == len(call):
                return i
        ready, pending = ray.wait(pending, num_returns=1, fetch_local=False)


def needs_old_logprobs(cfg) -> bool:
    """Whether a step computes the pre-update policy's log-probs in a forward pass of its own.

    The ratio's old policy is the trainer's policy before this update, also with async
    rollouts, where the engines sampled with the weights of one update earlier: the ratio still
    clips around the trainer's policy, and ``rl.tis_cap`` weights each token by
    min(pi_old / pi_engine, cap) for the lag (the "decoupled" PPO objective). The update's own
    first forward gives those log-probs when it is one epoch of one optimizer step; a KL
    penalty in the rewards needs them before the update.
    """
    rl = cfg.rl
    if cfg.algorithm == "online_dpo":  # a preference step against the reference only
        return False
    one_step = rl.epochs == 1 and cfg.train.batch_size == rl.prompts_per_step * rl.group_size
    return not (one_step and (rl.kl_mode == "loss" or rl.kl_coef == 0))


class EstimatorUpdate:
    """The RL estimators' update: advantages from the scored rollout, then the policy's clipped
    step (and, for PPO, the critic's) side by side."""

    def __init__(self, cfg, roles, ro: Rollout, rewards: torch.Tensor, ref_lp, old_lp,
                 value_rows):
        self.roles, rl = roles, cfg.rl
        seqs = ro.sequences()
        mask = pad_tokens([[1.0] * len(r) for _, r in seqs])
        width = mask.shape[1]
        ref = pad_tokens(ref_lp, width)
        engine_lp = pad_tokens([s.logprobs for s in ro.samples], width)
        old = pad_tokens(old_lp, width) if old_lp is not None else None
        self.values = pad_tokens(value_rows, width) if value_rows is not None else None
        kl = kl_per_token(rl.kl_estimator, old, ref, mask.bool()) if old is not None else None
        adv, self.returns = _advantages(cfg, rewards, mask.bool(), kl, self.values)
        self.mask = mask
        self.batch = RolloutBatch(seqs, mask, adv, old, ref, engine_lp, self.values, self.returns)
        self.critic_refs = None

    def submit(self) -> list:
        """The policy's call refs and the critic's after them (when there is a critic)."""
        roles = self.roles
        refs = roles.policy.submit("rl_step", self.batch.split(len(roles.policy)))
        if roles.critic:
            self.critic_refs = roles.critic.submit("critic_step",
                                                   self.batch.split(len(roles.critic)))
        return refs + (self.critic_refs or [])

    def gather(self, refs: list) -> dict:
        roles, values, mask = self.roles, self.values, self.mask
        row = combine_replicas(roles.policy.gather("rl_step", refs[:len(roles.policy)]),
                               "samples", same=("grad_norm", "lr"))
        if roles.critic:
            row.update(combine_replicas(roles.critic.gather("critic_step", self.critic_refs),
                                        "samples", same=("critic_grad_norm",)))
            row.update({"explained_variance": explained_variance(values, self.returns, mask),
                        "values/mean": (values * mask).sum().item() / mask.sum().item()})
        return row


def run_rl(cfg, storage: RunStorage | None = None) -> TrainResult:
    session = RunSession(cfg, storage)
    tokenizer = load_tokenizer(cfg.model.path)
    limit = cfg.rollout.max_model_len - cfg.rl.max_new_tokens
    prompts, report = load_prompts(cfg.data.train, tokenizer, limit, cfg.data.on_bad_row,
                                   cfg.data.prompt_key)
    held_out = (load_prompts(cfg.data.eval, tokenizer, limit, cfg.data.on_bad_row,
                             cfg.data.prompt_key)[0][:cfg.eval.num_prompts] if cfg.data.eval else [])
    gold = load_reward_fn(cfg.eval.reward_fn)
    roles = RLRoles(cfg)
    try:
        result = _train(cfg, session, roles, tokenizer, prompts, held_out, gold,
                        [report.summary()])
    finally:
        roles.shutdown()
    result.usage = roles.usage()
    return result


def _train(cfg, session, roles, tokenizer, prompts, held_out, gold, data_notes) -> TrainResult:
    rl, bucket_bytes = cfg.rl, cfg.weight_sync.bucket_bytes
    sampler = ResumableSampler(len(prompts), cfg.train.seed)
    start = session.restore(roles.trainables, sampler)
    if session.resume is not None:
        sync_weights(roles.policy, roles.rollout, bucket_bytes)  # engines start from the model dir
    timer = PhaseTimer()
    sampling = dict(n=rl.group_size, temperature=rl.temperature, top_p=rl.top_p, top_k=rl.top_k,
                    max_new_tokens=rl.max_new_tokens)

    def reward_records(batch_prompts, samples) -> list[RewardSample]:
        per = len(samples) // len(batch_prompts)
        texts = tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
        return [RewardSample(batch_prompts[i // per].prompt_text, t, batch_prompts[i // per].extra,
                             index=i) for i, t in enumerate(texts)]

    def evaluate(step: int) -> dict:
        """The reward role's mean reward of one sample per held-out prompt; with a gold reward
        (eval.reward_fn) beside a trained reward model, the gold reward of the same samples,
        so that over-optimisation of the proxy shows (proxy up, gold down)."""
        if not held_out:
            return {}
        samples = roles.rollout.run("generate", [p.prompt_ids for p in held_out],
                                    dict(sampling, n=1, seed=cfg.train.seed))
        records = reward_records(held_out, samples)
        out = {"eval/reward": mean(roles.reward.run("score", records)),
               "eval/response_tokens": mean(len(s.response_ids) for s in samples)}
        if gold is not None:
            out["eval/gold_reward"] = mean(float(gold(r.prompt, r.response)) for r in records)
        return out

    needs_old = needs_old_logprobs(cfg)

    def launch(step: int) -> Rollout:
        """Draw step's prompts and start generating (seeded per step, so a resumed run samples
        the same)."""
        state = sampler.state_dict()
        batch_prompts = [prompts[i] for i in sampler.next_batch(rl.prompts_per_step)]
        refs = roles.rollout.submit("generate", [p.prompt_ids for p in batch_prompts],
                                    dict(sampling, seed=cfg.train.seed + 100_003 * step))
        return Rollout(batch_prompts, state, refs)

    def start_scoring(ro: Rollout) -> None:
        """Wait for the samples, then start reward scoring, reference and pre-update policy
        log-probs and critic values on them, all at once."""
        ro.samples = roles.rollout.gather("generate", ro.generating)
        seqs = ro.sequences()
        ro.scoring = {
            "reward": roles.reward.submit("score", reward_records(ro.prompts, ro.samples)),
            "reference": roles.reference.submit("token_logprobs", seqs),
            "old": (roles.policy.submit("token_logprobs", pad_to_multiple(seqs, len(roles.policy)))
                    if needs_old else None),
            "values": (roles.critic.submit("values", pad_to_multiple(seqs, len(roles.critic)))
                       if roles.critic else None)}

    def scores(ro: Rollout) -> tuple:
        """(rewards, reference, old and value rows) of a rollout whose scoring has started."""
        n, calls = len(ro.samples), ro.scoring
        rewards = torch.tensor(roles.reward.gather("score", calls["reward"]))
        ref_lp = roles.reference.gather("token_logprobs", calls["reference"])
        old_lp = roles.policy.gather("token_logprobs", calls["old"])[:n] if needs_old else None
        value_rows = roles.critic.gather("values", calls["values"])[:n] if roles.critic else None
        return rewards, ref_lp, old_lp, value_rows

    # With async rollouts the next batch is generated while this one trains (with the weights
    # of one update earlier), and its scoring starts as soon as it is in. Calls to one actor run
    # in the order they were made, so its pre-update log-probs and values come from the policy
    # and critic after this step's update. `ahead` holds the launched rollouts, oldest first.
    ahead: deque[Rollout] = deque()
    session.begin(evaluate)
    with session.steps():
        for step in range(start + 1, cfg.train.max_steps + 1):
            t_step = time.perf_counter()
            with timer.phase("generate"):
                ro = ahead.popleft() if ahead else launch(step)
                if ro.scoring is None:
                    start_scoring(ro)
                if rl.async_rollout and not ahead and step < cfg.train.max_steps:
                    ahead.append(launch(step + 1))  # first step (or first after resume) only
            with timer.phase("score"):
                rewards, ref_lp, old_lp, value_rows = scores(ro)
            with timer.phase("other"):
                update = (PairUpdate(cfg, roles, ro, rewards, ref_lp)
                          if cfg.algorithm == "online_dpo" else
                          EstimatorUpdate(cfg, roles, ro, rewards, ref_lp, old_lp, value_rows))
            nxt = ahead[0] if ahead and ahead[0].scoring is None else None  # async: next batch
            with timer.phase("train"):  # policy (and critic) update
                session.update_started()
                refs = update.submit()
                if nxt is not None and refs and _first_done(nxt.generating, refs) == 0:
                    start_scoring(nxt)  # async: the next batch is in first; score it meanwhile
                row = update.gather(refs)
            session.update_done(step, ahead[0].sampler_state if ahead else sampler.state_dict())
            if nxt is not None and nxt.scoring is None:
                with timer.phase("generate"):  # async: its sampling outlasted the update
                    start_scoring(nxt)
            with timer.phase("sync"):
                if step % cfg.weight_sync.every == 0:
                    sync_weights(roles.policy, roles.rollout, bucket_bytes)
            if rl.async_rollout and step + 2 <= cfg.train.max_steps:
                ahead.append(launch(step + 2))  # sampled with the weights just synced
            row["batch/rows"] = [p.row for p in ro.prompts]  # which prompt rows this step used
            row.update({"reward/mean": rewards.mean().item(), "reward/std": rewards.std().item(),
                        "response/length": mean(len(s.response_ids) for s in ro.samples)})
            row.update(timer.pop(), **{"timing/step": time.perf_counter() - t_step})
            # async: later steps' prompts are drawn already; a checkpoint keeps the sampler as it
            # was before the oldest of those draws, so a resume draws them again
            session.end_step(step, row, ahead[0].sampler_state if ahead else sampler.state_dict(),
                             {"reward": f"{row['reward/mean']:.3f}", "kl": f"{row['kl']:.4f}"})
        if cfg.train.max_steps % cfg.weight_sync.every:  # evaluate what the trainer ended with
            sync_weights(roles.policy, roles.rollout, bucket_bytes)
        return session.finish(sampler.state_dict(), data_notes)
