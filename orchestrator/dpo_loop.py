"""The offline DPO loop: pairs -> (reference log-probs) -> policy update, with eval and checkpoints."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from actors.runtime import load_tokenizer
from orchestrator.batches import PreferenceBatch
from orchestrator.checkpoint import CheckpointManager, restore_run, resume_dir, save_run
from orchestrator.data import load_preferences
from orchestrator.evaluate import load_reward_fn, preference_accuracy, sampled_reward
from orchestrator.metrics import MetricsLog, PhaseTimer, combine_replicas
from orchestrator.roles import start_dpo_roles
from orchestrator.sampler import ResumableSampler
from orchestrator.schema import ConfigError
from orchestrator.storage import RunStorage

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished run hands back to a driver script."""
    run_dir: Path
    steps: int
    checkpoint: Path
    model_dir: Path
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    data: list[str] = field(default_factory=list)
    resumed_from: Path | None = None

    def summary(self) -> str:
        lines = [f"run {self.run_dir}: {self.steps} steps, model in {self.model_dir}"]
        for key in ("eval/accuracy", "eval/margin", "eval/reward", "eval/response_tokens"):
            if key in self.before and key in self.after:
                lines.append(f"  {key:<22} {self.before[key]:8.3f} -> {self.after[key]:8.3f}")
        if "eval/sample" in self.after:
            lines.append(f"  sample after training: {self.after['eval/sample'][:120]!r}")
        lines += [f"  data {d}" for d in self.data]
        return "\n".join(lines)


class DPOData:
    """Tokenized train / eval pairs and their reference log-probs."""

    def __init__(self, cfg, tokenizer):
        d = cfg.data
        keys = (d.prompt_key, d.chosen_key, d.rejected_key)
        self.train, train_report = load_preferences(d.train, tokenizer, d.max_length, d.on_bad_row, keys)
        self.reports = [train_report]
        self.eval = []
        if d.eval:
            self.eval, eval_report = load_preferences(d.eval, tokenizer, d.max_length, d.on_bad_row, keys)
            self.eval = self.eval[:cfg.eval.max_pairs]
            self.reports.append(eval_report)
        self.ref_train: list | None = None
        self.ref_eval: list = []


def check_model_fits(cfg, data: DPOData) -> None:
    """Refuse lengths and token ids the model cannot take, before any actor starts."""
    from transformers import AutoConfig
    model_cfg = AutoConfig.from_pretrained(cfg.model.path)
    limit = getattr(model_cfg, "max_position_embeddings", None)
    if limit and cfg.data.max_length > limit:
        raise ConfigError(f"data.max_length: {cfg.data.max_length} exceeds the model's "
                          f"max_position_embeddings ({limit}); lower it to at most {limit}")
    top = max(max(ex.prompt_ids + ex.chosen_ids + ex.rejected_ids) for ex in data.train + data.eval)
    if top >= model_cfg.vocab_size:
        raise ConfigError(f"model.path: the tokenizer makes token id {top} but the model's vocab "
                          f"has {model_cfg.vocab_size} entries; use the tokenizer saved with the model")


def run_dpo(cfg, storage: RunStorage | None = None) -> TrainResult:
    storage = storage or RunStorage(cfg.run_dir)
    run_dir = storage.local_dir
    reward_fn = load_reward_fn(cfg.eval.reward_fn)
    tokenizer = load_tokenizer(cfg.model.path)
    data = DPOData(cfg, tokenizer)
    check_model_fits(cfg, data)
    ckpts = CheckpointManager(run_dir, cfg.checkpoint.keep, storage)
    ckpts.clear_partial()
    resume = resume_dir(cfg.checkpoint.resume, ckpts)

    roles = start_dpo_roles(cfg)
    try:
        return _train(cfg, roles, data, tokenizer, reward_fn, ckpts, resume)
    finally:
        roles.shutdown()


def _train(cfg, roles, data, tokenizer, reward_fn, ckpts, resume) -> TrainResult:
    run_dir, policy = ckpts.storage.local_dir, roles.policy
    if cfg.reference.precompute:
        t0 = time.perf_counter()
        data.ref_train = roles.reference.run("logprobs", data.train)
        data.ref_eval = roles.reference.run("logprobs", data.eval) if data.eval else []
        log.info("reference log-probs for %d pairs in %.1fs", len(data.train) + len(data.eval),
                 time.perf_counter() - t0)
        roles.stop_reference()
    elif data.eval:
        data.ref_eval = roles.reference.run("logprobs", data.eval)

    def evaluate(step: int) -> dict:
        out = {}
        if data.eval:
            out.update(preference_accuracy(policy, data.eval, data.ref_eval, cfg.dpo.beta))
            if reward_fn is not None:
                out.update(sampled_reward(policy, tokenizer, data.eval, reward_fn, cfg.eval,
                                          cfg.train.seed + step))
        return out

    sampler = ResumableSampler(len(data.train), cfg.train.seed)
    step, before = 0, None
    if resume is not None:
        step, before = restore_run(resume, [policy], sampler, ckpts)
    metrics = MetricsLog(run_dir, cfg.log.tensorboard, resume_step=step,
                         storage=ckpts.storage)
    if before is None:
        before = evaluate(0)
        metrics.log(0, before)
    timer = PhaseTimer()

    def save(step: int) -> Path:
        ckpt = save_run(ckpts, [policy], step, sampler.state_dict(), before)
        metrics.sync()
        return ckpt

    last_ckpt, row = None, {}
    bar = tqdm(total=cfg.train.max_steps, initial=step, desc="dpo", unit="step",
               disable=not cfg.log.progress_bar, dynamic_ncols=True)
    while step < cfg.train.max_steps:
        t_step = time.perf_counter()
        with timer.phase("data"):
            idx = sampler.next_batch(cfg.train.batch_size)
            pairs = [data.train[i] for i in idx]
        with timer.phase("reference"):
            ref = ([data.ref_train[i] for i in idx] if data.ref_train is not None
                   else roles.reference.run("logprobs", pairs))
        with timer.phase("train"):
            batch = PreferenceBatch.build(pairs, ref)
            row = combine_replicas(policy.run("train_step", batch.split(len(policy))), "pairs",
                                   same=("grad_norm", "lr"), totals=("tokens", "train_seconds"))
            del row["train_seconds"]
        step += 1
        elapsed = time.perf_counter() - t_step
        row["batch/rows"] = [p.row for p in pairs]  # which file rows this step trained on
        row.update(timer.pop(), **{"timing/step": elapsed, "pairs_per_s": row["pairs"] / elapsed,
                                   "tokens_per_s": row["tokens"] / elapsed})
        if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.max_steps:
            row.update(evaluate(step))
        metrics.log(step, row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracy']:.2f}",
                        pairs_s=f"{row['pairs_per_s']:.1f}")
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            last_ckpt = save(step)
    bar.close()
    after = evaluate(step)
    metrics.log(step, {f"final/{k}": v for k, v in after.items()})
    metrics.close()
    if last_ckpt is None or not last_ckpt.name.endswith(f"{step:07d}"):
        last_ckpt = save(step)
    result = TrainResult(run_dir, step, last_ckpt, last_ckpt / "model", before, after,
                         [r.summary() for r in data.reports], resume)
    log.info("%s", result.summary())
    return result
