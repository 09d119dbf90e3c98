"""The online loop's rollout pipeline: drawing prompts, generating, scoring, and the work in
flight between steps.

At depth 0 (on-policy) a step's batch is drawn and generated when the step starts, with the
weights of the last sync. At depth 1 (``rl.async_rollout``) the engines generate the next
step's batch while this step trains, with the weights of one update earlier, and its scoring
starts as soon as it is in. Calls to one actor run in the order they were made, so that
batch's pre-update log-probs and values still come from the policy and critic after this
step's update.

With ``rollout.stream_groups`` the engines hand back finished prompts in parts
(orchestrator/streams.py) and each part's scoring starts as it arrives; at depth 1 the parts
that come in while the update runs are scored then.

Each step's generation is seeded by its step number, so a step sampled again (after a resume)
samples the same.
"""
from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import ray
import torch

from actors.group import RoleFailure, split_even, wait_calls
from actors.reward import RewardSample
from orchestrator.progress import pad_to_multiple
from orchestrator.streams import StreamedGeneration

STEP_SEED = 100_003  # a step's sampling seed is train.seed + STEP_SEED x step


@dataclass
class Rollout:
    """One step's batch on its way through generation and scoring."""
    prompts: list                  # the drawn prompts (orchestrator.data prompt records)
    sampler_state: dict            # the sampler before they were drawn
    generating: list               # the rollout group's call refs
    samples: list | None = None    # RolloutSample per response, once generated
    scoring: dict | None = None    # call refs of reward, reference, old log-probs and values
    step: int = 0
    shards: list | None = None     # the prompt ids each generating ref was given
    engines: list | None = None    # the engine each generating ref runs on
    sampling: dict | None = None
    stream: StreamedGeneration | None = None  # with rollout.stream_groups: its engines' streams
    got: list | None = None        # streamed: the samples of each prompt, as they arrive
    parts: list | None = None      # streamed: (sample indices, scoring call refs, time in)

    def sequences(self) -> list[tuple[list[int], list[int]]]:
        return [(s.prompt_ids, s.response_ids) for s in self.samples]


class Scores(NamedTuple):
    rewards: torch.Tensor              # [samples]
    reference: list[list[float]]       # per-token log-probs of each response
    old: list[list[float]] | None      # the policy's before the update (when computed)
    values: list[list[float]] | None   # the critic's (PPO)


def drop_failed(ro: Rollout, scored: Scores, group: int, step: int
                ) -> tuple[Rollout, Scores, list]:
    """Leave out of the update the prompts with a sample the reward endpoint failed to score
    (NaN, ``reward.on_failure: drop``): all ``group`` samples of such a prompt, since a
    group's advantages are relative to each other. Their responses become empty (no token to
    train, as for a skipped prompt) with reward 0 and no per-token values. Returns the rollout
    and scores to train on and the dropped prompts' dataset rows; RewardError when no prompt
    is left."""
    from actors.reward import RewardError
    from actors.rollout import RolloutSample
    bad = torch.isnan(scored.rewards)
    if not bad.any():
        return ro, scored, []
    groups = sorted({i // group for i in bad.nonzero().flatten().tolist()})
    if len(groups) == len(ro.prompts):
        raise RewardError(f"step {step}: the reward endpoint failed for a sample of every prompt "
                          f"(reward.on_failure: drop leaves nothing to train on); see the "
                          f"reward actor's log for the cause")
    samples, rewards = list(ro.samples), scored.rewards.clone()
    lists = [None if x is None else list(x) for x in (scored.reference, scored.old, scored.values)]
    for i in (i for g in groups for i in range(g * group, (g + 1) * group)):
        samples[i] = RolloutSample(samples[i].prompt_ids, [], [], "dropped")
        rewards[i] = 0.0
        for per_token in lists:
            if per_token is not None:
                per_token[i] = []
    kept = dataclasses.replace(ro, samples=samples)
    return kept, Scores(rewards, *lists), [ro.prompts[g].row for g in groups]


def first_done(*calls: list) -> int:
    """Block until every ref of one of ``calls`` is ready; the index of that call."""
    pending = [ref for call in calls for ref in call]
    while True:
        for i, call in enumerate(calls):
            ready, _ = ray.wait(call, num_returns=len(call), timeout=0, fetch_local=False)
            if len(ready) == len(call):
                return i
        ready, pending = ray.wait(pending, num_returns=1, fetch_local=False)


def reward_records(tokenizer, prompts, samples, index: list[int] | None = None
                   ) -> list[RewardSample]:
    """What the reward role scores: each sample's text with its prompt's text and fields
    (``index``: each sample's place in the step's batch, when ``samples`` are a part of it)."""
    per = len(samples) // len(prompts)
    texts = tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
    return [RewardSample(prompts[i // per].prompt_text, t, prompts[i // per].extra,
                         index=i if index is None else index[i])
            for i, t in enumerate(texts)]


class RolloutPipeline:
    """Launch, scoring and in-flight rollouts of the online loop (see the module docstring).

    A step calls, in order: :meth:`take` (its rollout, scoring started), :meth:`scores`,
    :meth:`during_update` with the update's call refs, :meth:`after_update`, and after the
    weight sync :meth:`after_sync`; :meth:`resume_state` is the sampler a checkpoint keeps.
    """

    def __init__(self, cfg, roles, prompts, sampler, tokenizer, needs_old: bool):
        self.cfg, self.roles, self.prompts = cfg, roles, prompts
        self.sampler, self.tokenizer, self.needs_old = sampler, tokenizer, needs_old
        self.depth = 1 if cfg.rl.async_rollout else 0
        rl = cfg.rl
        self.sampling = dict(n=rl.group_size, temperature=rl.temperature, top_p=rl.top_p,
                             top_k=rl.top_k, max_new_tokens=rl.max_new_tokens)
        self.ahead: deque[Rollout] = deque()  # launched, not yet trained on; oldest first
        self.failure = None  # a RoleFailure met on a later step's batch, for the loop
        self.recover = None  # Recovery.recover(failure, step), for engines lost mid-generation
        self.reissued = 0  # prompts generated again since the last step's metrics

    # ---- the steps ----------------------------------------------------------------------
    def take(self, step: int) -> Rollout:
        """Step ``step``'s rollout with its scoring started; at depth 1 the next step's
        generation is under way when this returns."""
        ro = self.ahead.popleft() if self.ahead else self.launch(step)
        if ro.scoring is None:
            self.start_scoring(ro)
        if self.depth and not self.ahead and step < self.cfg.train.max_steps:
            self.ahead.append(self.launch(step + 1))  # first step (or first after resume)
        return ro

    def scores(self, ro: Rollout) -> Scores:
        """Wait for a rollout's scoring: rewards, reference, old log-probs and values."""
        if ro.parts is None:
            rewards, reference, old, values = self._gathered(ro.scoring, len(ro.samples))
            return Scores(torch.tensor(rewards), reference, old, values)
        got = [[None] * len(ro.samples) for _ in range(4)]
        for index, calls, _ in ro.parts:  # streamed: each part's scores to its samples' places
            for whole, part in zip(got, self._gathered(calls, len(index))):
                for i, x in zip(index, part or ()):
                    whole[i] = x
        rewards, reference, old, values = got
        return Scores(torch.tensor(rewards), reference, old if self.needs_old else None,
                      values if self.roles.critic else None)

    def _gathered(self, calls: dict, n: int) -> tuple:
        """(rewards, reference, old log-probs or None, values or None) of ``n`` samples whose
        scoring :meth:`_submit` started."""
        roles = self.roles
        rewards = roles.reward.gather("score", calls["reward"])
        reference = roles.reference.gather("token_logprobs", calls["reference"])
        old = (roles.policy.gather("token_logprobs", calls["old"])[:n] if self.needs_old
               else None)
        values = roles.critic.gather("values", calls["values"])[:n] if roles.critic else None
        return rewards, reference, old, values

    def during_update(self, update_refs: list) -> None:
        """Depth 1: wait for whichever ends first, the update or the next batch's generation,
        and if it is the batch, start its scoring (then the caller waits for the update)."""
        nxt = self._unscored()
        if nxt is None or not update_refs:
            return
        if nxt.stream is not None:  # score the parts that come in while the update runs
            self._score_ahead(nxt, until=update_refs)
        elif first_done(nxt.generating, update_refs) == 0:
            self._score_ahead(nxt)

    def after_update(self) -> None:
        """Depth 1: the next batch's sampling outlasted the update; wait for it and start its
        scoring."""
        nxt = self._unscored()
        if nxt is not None:
            self._score_ahead(nxt)

    def _score_ahead(self, ro: Rollout, until: list = ()) -> None:
        """Start scoring a batch of a later step (streamed: its parts in so far, or until
        every ref of ``until`` is ready). A role that fails on it does not stop this step
        (its update is under way): the failure waits in ``failure`` for the loop, and the
        batch is dropped, to be drawn and generated again."""
        try:
            self.start_scoring(ro, reissue=False, until=until)  # not while the update runs
        except RoleFailure as failure:
            self.failure = failure
            self.restart(self.ahead[0].sampler_state)

    def restart(self, sampler_state: dict) -> None:
        """Drop every batch launched ahead and put the sampler back at ``sampler_state`` (the
        position before the oldest step still to train)."""
        self.ahead.clear()
        self.sampler.load_state_dict(sampler_state)

    def after_sync(self, step: int) -> None:
        """Depth 1: launch the batch two steps on, sampled with the weights just synced."""
        if self.depth and step + 2 <= self.cfg.train.max_steps:
            self.ahead.append(self.launch(step + 2))

    def resume_state(self) -> dict:
        """The sampler as a checkpoint after this step keeps it: before the oldest draw not
        yet trained on (at depth 1 a later step's prompts are drawn already; a resume draws
        them again)."""
        return self.ahead[0].sampler_state if self.ahead else self.sampler.state_dict()

    # ---- parts ---------------------------------------------------------------------------
    def launch(self, step: int) -> Rollout:
        """Draw the step's prompts and start generating (seeded by the step)."""
        state = self.sampler.state_dict()
        batch = [self.prompts[i] for i in self.sampler.next_batch(self.cfg.rl.prompts_per_step)]
        group = self.roles.rollout
        sampling = dict(self.sampling, seed=self.cfg.train.seed + STEP_SEED * step)
        if self.cfg.rollout.stream_groups:
            stream = StreamedGeneration(group, [p.prompt_ids for p in batch], sampling,
                                        self.cfg.rollout.stream_groups)
            return Rollout(batch, state, [], step=step, sampling=sampling, stream=stream,
                           got=[None] * len(batch), parts=[])
        shards = split_even([p.prompt_ids for p in batch], len(group))
        refs = [group.call(a, "generate", shard, sampling)
                for a, shard in zip(group.actors, shards)]
        return Rollout(batch, state, refs, step=step, shards=shards, engines=list(group.actors),
                       sampling=sampling)

    def start_scoring(self, ro: Rollout, reissue: bool = True, until: list = ()) -> None:
        """Wait for the samples, then start reward scoring, reference and pre-update policy
        log-probs and critic values on them, all at once. ``reissue``: an engine lost on its
        share is recovered and only that share generated again (:meth:`_generated`).

        Streamed (``rollout.stream_groups``): each part's scoring starts as it arrives; with
        ``until``, only the parts in before every ref of ``until`` is ready (the scoring is
        complete, ``ro.scoring`` set, once every part is in)."""
        if ro.stream is not None:
            self._streamed(ro, reissue, until)
            if ro.stream.done():
                ro.samples = [s for got in ro.got for s in got]
                ro.scoring = {"parts": len(ro.parts)}
            return
        ro.samples = self._generated(ro, reissue)
        ro.scoring = self._submit(reward_records(self.tokenizer, ro.prompts, ro.samples),
                                  ro.sequences())

    def _submit(self, records: list, seqs: list) -> dict:
        """Start the scoring of samples: their reward records and (prompt, response) ids."""
        roles = self.roles
        return {
            "reward": roles.reward.submit("score", records),
            "reference": roles.reference.submit("token_logprobs", seqs),
            "old": (roles.policy.submit("token_logprobs", pad_to_multiple(seqs, len(roles.policy)))
                    if self.needs_old else None),
            "values": (roles.critic.submit("values", pad_to_multiple(seqs, len(roles.critic)))
                       if roles.critic else None)}

    def _streamed(self, ro: Rollout, reissue: bool, until: list) -> None:
        """Score the parts of a streamed rollout as they arrive. With ``reissue`` and a
        ``recover`` callback, an engine lost mid-stream is recovered and only the prompts it
        had not handed back are generated again, as in :meth:`_generated`."""
        n = self.sampling["n"]
        while True:
            try:
                for positions, samples in ro.stream.parts(until):
                    index = [p * n + k for p in positions for k in range(n)]
                    for j, p in enumerate(positions):
                        ro.got[p] = samples[j * n:(j + 1) * n]
                    records = reward_records(self.tokenizer, [ro.prompts[p] for p in positions],
                                             samples, index)
                    ro.parts.append((index, self._submit(
                        records, [(s.prompt_ids, s.response_ids) for s in samples]),
                        time.monotonic()))
                return
            except RoleFailure as failure:
                if not reissue or self.recover is None or failure.role != "rollout":
                    raise
                self.recover(failure, ro.step)  # raises when it may not
                ro.stream.group = self.roles.rollout
                elastic = getattr(self.roles, "elastic", None)
                self.reissued += ro.stream.reissue(
                    elastic.successor if elastic is not None else lambda engine: None)

    def _generated(self, ro: Rollout, reissue: bool) -> list:
        """The rollout's samples in prompt order. With ``reissue`` and a ``recover`` callback
        (orchestrator/recovery.py), an engine lost on its share (dead, or hung past its
        deadline) is recovered and only the prompts it had not answered are generated again:
        by its replacement (same rank and seed, so on-policy the same samples), else by the
        engine now at its position, else by the first engine left. The shares other engines
        finished, or are still working on, are kept."""
        done: dict[int, list] = {}
        while True:
            group = self.roles.rollout
            todo = [i for i in range(len(ro.generating)) if i not in done]
            try:
                got = wait_calls([(group, "generate", [ro.generating[i] for i in todo],
                                   [group.actors.index(ro.engines[i]) for i in todo])])[0]
                done.update(zip(todo, got))
                return [s for i in sorted(done) for s in done[i]]
            except RoleFailure as failure:
                if not reissue or self.recover is None or failure.role != "rollout":
                    raise
                for i in todo:  # what finished before recovery kills anything
                    if ray.wait([ro.generating[i]], timeout=0)[0]:
                        try:
                            done[i] = ray.get(ro.generating[i])
                        except Exception:  # noqa: BLE001  (its engine died: generated again)
                            pass
                self.recover(failure, ro.step)  # raises when it may not
                group, elastic = self.roles.rollout, getattr(self.roles, "elastic", None)
                for i in todo:
                    if i in done or ro.engines[i] in group.actors:
                        continue  # finished, or its engine is still at it
                    heir = elastic.successor(ro.engines[i]) if elastic is not None else None
                    heir = heir or group.actors[i % len(group)]
                    ro.generating[i] = group.call(heir, "generate", ro.shards[i], ro.sampling)
                    ro.engines[i] = heir
                    self.reissued += len(ro.shards[i])

    def _unscored(self) -> Rollout | None:
        return self.ahead[0] if self.ahead and self.ahead[0].scoring is None else None
