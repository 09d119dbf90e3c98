"""The online loop (PPO with a critic; critic-free GRPO, RLOO, REINFORCE++; online DPO), one step:

    prompts -> rollout.generate -> {reward.score, reference.logprobs, policy.logprobs,
                                    critic.values}
            -> advantages (driver) -> {policy.rl_step, critic.critic_step}
               or best/worst pairs (online DPO) -> policy.train_step
            -> policy => rollout weight sync

The algorithm only picks the update: an advantage estimator (orchestrator/advantages.py) and
whether a critic takes part, or online DPO's pairs (orchestrator/online_pairs.py); everything
else is this one loop. Drawing, generating and scoring, and with ``rl.async_rollout`` the next
step's batch generated while this one trains, belong to the rollout pipeline
(orchestrator/rollouts.py), so the loop reads as its steps.
"""
from __future__ import annotations

import logging
import math
import time
from statistics import mean

import torch

from actors.group import RoleFailure
from actors.runtime import load_tokenizer
from orchestrator.advantages import compute_advantages, token_rewards
from orchestrator.batches import RolloutBatch, pad_tokens
from orchestrator.data import load_prompts
from orchestrator.elastic import ElasticRollout
from orchestrator.evaluate import load_reward_fn
from orchestrator.kl import kl_per_token
from orchestrator.metrics import PhaseTimer, combine_replicas
from orchestrator.progress import run_in_chunks
from orchestrator.online_pairs import PairUpdate
from orchestrator.recovery import Injector, Recovery, Rewound
from orchestrator.rl_losses import explained_variance
from orchestrator.roles import RLRoles
from orchestrator.rollouts import Rollout, RolloutPipeline, Scores, drop_failed, reward_records
from orchestrator.sampler import ResumableSampler
from orchestrator.session import RunSession, TrainResult
from orchestrator.storage import RunStorage

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
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
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
    sampler = ResumableSampler(len(prompts), cfg.train.seed)
    start = session.restore(roles.trainables, sampler)
    if session.resume is not None:
        roles.sync()  # engines start from the model dir
    timer = PhaseTimer()
    pipe = RolloutPipeline(cfg, roles, prompts, sampler, tokenizer, needs_old_logprobs(cfg))
    recovery = Recovery(cfg, roles, session, sampler)
    inject = Injector(cfg, roles, recovery)
    roles.elastic = elastic = ElasticRollout(cfg, roles, session.run_dir, fresh=start == 0)
    pipe.recover = recovery.recover  # an engine lost mid-generation: only its share again

    def evaluate(step: int) -> dict:
        """The reward role's mean reward of one sample per held-out prompt; with a gold reward
        (eval.reward_fn) beside a trained reward model, the gold reward of the same samples,
        so that over-optimisation of the proxy shows (proxy up, gold down)."""
        if not held_out:
            return {}
        samples = roles.rollout.run("generate", [p.prompt_ids for p in held_out],
                                    dict(pipe.sampling, n=1, seed=cfg.train.seed))
        records = reward_records(tokenizer, held_out, samples)
        scores = run_in_chunks(cfg, roles.reward, "score", records, "eval rewards", "sample")
        kept = [x for x in scores if not math.isnan(x)]  # NaN: dropped by reward.on_failure
        out = {"eval/reward": mean(kept) if kept else math.nan,
               "eval/response_tokens": mean(len(s.response_ids) for s in samples)}
        if len(kept) < len(scores):
            out["eval/reward_dropped"] = len(scores) - len(kept)
        if gold is not None:
            out["eval/gold_reward"] = mean(float(gold(r.prompt, r.response)) for r in records)
        return out

    def evaluate_or_recover(step: int) -> dict:
        try:
            return evaluate(step)
        except RoleFailure as failure:  # replace the role (or stop), then evaluate once more
            recovery.recover(failure, step)
            return evaluate(step)

    def sample_and_update(step: int) -> tuple:
        """Take the step's rollout, score it, and update the trainers on it."""
        with timer.phase("generate"):
            ro = pipe.take(step)
        with timer.phase("score"):
            scored = pipe.scores(ro)
        with timer.phase("other"):
            ro, scored, dropped = drop_failed(ro, scored, cfg.rl.group_size, step)
            update = make_update(cfg, roles, ro, scored)
        with timer.phase("train"):  # policy (and critic) update
            session.update_started()
            refs = update.submit()
            pipe.during_update(refs)
            row = update.gather(refs)
        session.update_done(step, pipe.resume_state(),
                            [p.row for p in ro.prompts if p.row not in dropped],
                            cfg.rl.group_size, dropped)
        return ro, scored, row, dropped

    def sync(step: int) -> None:
        try:
            roles.sync()
        except RoleFailure as failure:  # new engines receive the current weights as they join
            recovery.recover(failure, step)

    def one_step(step: int) -> None:
        inject.before(step)
        t_step = time.perf_counter()
        if elastic.reconcile():  # engines added or removed (rayalign scale, capacity back)
            pipe.restart(session.sampler_state)  # a batch generated ahead is drawn again
        while True:
            try:
                ro, scored, row, dropped = sample_and_update(step)
                break
            except RoleFailure as failure:  # before the update: take the step again
                recovery.recover(failure, step)
                pipe.restart(session.sampler_state)
        with timer.phase("generate"):
            pipe.after_update()
        if pipe.failure is not None:  # met on the next step's batch, which was dropped
            failure, pipe.failure = pipe.failure, None
            recovery.recover(failure, step)
        with timer.phase("sync"):
            if step % cfg.weight_sync.every == 0:
                sync(step)
        pipe.after_sync(step)
        if pipe.reissued:  # prompts of a lost engine generated again (only those)
            row["rollout/reissued_prompts"], pipe.reissued = pipe.reissued, 0
        if ro.parts is not None:  # streamed: how long the first part's scoring could overlap
            row["rollout/stream_parts"] = len(ro.parts)  # the sampling of the last
            row["rollout/stream_lead_s"] = ro.parts[-1][2] - ro.parts[0][2]
        row.update(step_metrics(ro, scored.rewards, cfg.rl.group_size, dropped),
                   **elastic.metrics(),
                   **recovery.pop(step),
                   **timer.pop(), **{"timing/step": time.perf_counter() - t_step})
        session.end_step(step, row, pipe.resume_state(),
                         {"reward": f"{row['reward/mean']:.3f}", "kl": f"{row['kl']:.4f}"})

    session.begin(evaluate_or_recover)
    with session.steps():
        step, resync = start, False
        while step < cfg.train.max_steps:
            try:
                with recovery.trainers(step + 1):
                    if resync:  # the engines hold the weights of abandoned steps
                        sync(step)
                        resync = False
                    one_step(step + 1)
                step += 1
            except Rewound as back:  # a trainer role rebuilt from a checkpoint
                step, resync = back.step, True
                timer.pop()
                pipe.restart(session.sampler_state)
                pipe.failure = None
        if cfg.train.max_steps % cfg.weight_sync.every:  # evaluate what the trainer ended with
            sync(cfg.train.max_steps)
        return session.finish(sampler.state_dict(), data_notes)


def make_update(cfg, roles, ro: Rollout, scored: Scores):
    """The algorithm's update of a scored rollout: online DPO's pairs, or an estimator's."""
    if cfg.algorithm == "online_dpo":
        return PairUpdate(cfg, roles, ro, scored.rewards, scored.reference)
    return EstimatorUpdate(cfg, roles, ro, scored.rewards, scored.reference, scored.old,
                           scored.values)


def step_metrics(ro: Rollout, rewards: torch.Tensor, group_size: int,
                 dropped: list = ()) -> dict:
    """The step's rows and its samples' reward and length; the samples of ``dropped`` rows
    (a failed reward, see ``drop_failed``) are counted, not averaged in."""
    dropped = set(dropped)
    kept = [i for i in range(len(ro.samples)) if ro.prompts[i // group_size].row not in dropped]
    row = {"batch/rows": [p.row for p in ro.prompts if p.row not in dropped],  # rows trained on
           "batch/samples_per_row": group_size,
           "reward/mean": rewards[kept].mean().item(), "reward/std": rewards[kept].std().item(),
           "response/length": mean(len(ro.samples[i].response_ids) for i in kept)}
    if dropped:
        row.update({"reward/dropped": len(ro.samples) - len(kept),
                    "batch/dropped_rows": sorted(dropped)})
    return row
