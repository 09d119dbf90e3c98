"""The offline loop (DPO, SFT, reward model), one step:

    draw rows -> the task's batch (DPO: with reference log-probs) -> trainer group step
              -> metrics -> (eval, checkpoint on schedule)

The algorithm is a small pluggable part on each side: its data, batch and evaluation on the
driver (orchestrator/offline_tasks.py), its loss in the trainer (actors/objectives.py).
"""
from __future__ import annotations

import logging
import time

from actors.group import RoleFailure
from actors.runtime import load_tokenizer
from orchestrator.evaluate import load_reward_fn
from orchestrator.metrics import PhaseTimer, combine_replicas
from orchestrator.offline_tasks import TASKS
from orchestrator.recovery import Injector, Recovery, Rewound
from orchestrator.roles import start_offline_roles
from orchestrator.sampler import ResumableSampler
from orchestrator.schema import ConfigError
from orchestrator.session import RunSession, TrainResult
from orchestrator.storage import RunStorage

log = logging.getLogger(__name__)


def check_model_fits(cfg, token_lists) -> None:
    """Refuse lengths and token ids the model cannot take, before any actor starts."""
    from transformers import AutoConfig
    model_cfg = AutoConfig.from_pretrained(cfg.model.path,
                                           trust_remote_code=cfg.model.trust_remote_code)
    limit = getattr(model_cfg, "max_position_embeddings", None)
    if limit and cfg.data.max_length > limit:
        raise ConfigError(f"data.max_length: {cfg.data.max_length} exceeds the model's "
                          f"max_position_embeddings ({limit}); lower it to at most {limit}")
    top = max(max(ids) for ids in token_lists)
    if top >= model_cfg.vocab_size:
        raise ConfigError(f"model.path: the tokenizer makes token id {top} but the model's vocab "
                          f"has {model_cfg.vocab_size} entries; use the tokenizer saved with the model")


def run_offline(cfg, storage: RunStorage | None = None) -> TrainResult:
    session = RunSession(cfg, storage)
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    task = TASKS[cfg.algorithm](cfg, tokenizer, load_reward_fn(cfg.eval.reward_fn))
    check_model_fits(cfg, task.token_lists())
    roles = start_offline_roles(cfg)
    try:
        result = _train(cfg, session, task, roles)
    finally:
        roles.shutdown()
    result.usage = roles.usage()
    return result


def _train(cfg, session: RunSession, task, roles) -> TrainResult:
    timer = PhaseTimer()
    task.prepare(roles, timer)
    sampler = ResumableSampler(len(task.train), cfg.train.seed)
    step = session.restore(roles.trainables, sampler)
    recovery = Recovery(cfg, roles, session, sampler)
    inject = Injector(cfg, roles, recovery)

    def one_step(step: int) -> None:
        policy = roles.policy
        inject.before(step)
        t_step = time.perf_counter()
        with timer.phase("data"):
            idx = sampler.next_batch(cfg.train.batch_size)
            batch = task.batch(idx, roles, timer)
        with timer.phase("train"):
            session.update_started()
            row = combine_replicas(policy.run("train_step", batch.split(len(policy))),
                                   task.count, same=("grad_norm", "lr"),
                                   totals=("tokens", task.rate, "train_seconds"))
            # the step inside the replicas (their mean); timing/train less this is the
            # round trip
            row["timing/in_actor"] = row.pop("train_seconds") / len(policy)
        elapsed = time.perf_counter() - t_step
        task.finish_row(row)
        row["batch/rows"] = [task.train[i].row for i in idx]  # which file rows it used
        row.update(timer.pop(), **recovery.pop(step),
                   **{"timing/step": elapsed, f"{task.rate}_per_s": row[task.rate] / elapsed,
                      "tokens_per_s": row["tokens"] / elapsed})
        session.end_step(step, row, sampler.state_dict(), task.postfix(row))

    session.begin(lambda s: task.evaluate(roles.policy, s))
    with session.steps():
        while step < cfg.train.max_steps:
            try:
                with recovery.trainers(step + 1):
                    try:
                        one_step(step + 1)
                    except RoleFailure as failure:  # a reference scoring the batch: again
                        if failure.role != "reference":
                            raise
                        recovery.recover(failure, step + 1)
                        sampler.load_state_dict(session.sampler_state)
                        continue
                step += 1
            except Rewound as back:  # the trainer rebuilt from a checkpoint
                step = back.step
                timer.pop()
        return session.finish(sampler.state_dict(), [r.summary() for r in task.reports])
