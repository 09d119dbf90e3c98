"""What differs between the offline algorithms on the driver's side: the data each reads, the
batch each step hands the trainer group, how the model is evaluated on held-out rows, and what
the progress bar shows. The loop itself (orchestrator/offline_loop.py) is the same for all;
the loss lives with the trainer (actors/objectives.py).
"""
from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod

from orchestrator.batches import PreferenceBatch, SFTBatch
from orchestrator.progress import run_in_chunks
from orchestrator.data import load_preferences, load_sft
from orchestrator.evaluate import (preference_accuracy, reward_model_accuracy, sampled_reward,
                                   sft_heldout)

log = logging.getLogger(__name__)


class OfflineTask(ABC):
    """Base: ``train`` / ``eval`` rows, their load reports, and the per-step pieces."""
    count = "pairs"            # the sum the metrics divide by (a key of the objective's sums)
    rate = "pairs"             # reported per second next to tokens

    def __init__(self, cfg, tokenizer, reward_fn):
        self.cfg, self.tokenizer, self.reward_fn = cfg, tokenizer, reward_fn
        self.train, report = self.load(cfg.data.train)
        self.reports, self.eval = [report], []
        if cfg.data.eval:
            self.eval, report = self.load(cfg.data.eval)
            self.eval = self.eval[:cfg.eval.max_pairs]
            self.reports.append(report)

    @abstractmethod
    def load(self, path: str) -> tuple[list, object]:
        """Rows of ``path`` and their load report."""

    @abstractmethod
    def token_lists(self):
        """Every token list of the data, for the check that the model can take them."""

    def prepare(self, roles, timer) -> None:
        """Work done once before the first step."""

    @abstractmethod
    def batch(self, idx: list[int], roles, timer):
        """The trainer group's batch for the sampled row indices."""

    @abstractmethod
    def evaluate(self, policy, step: int) -> dict:
        """Held-out metrics of the model now (step 0: the starting model)."""

    def finish_row(self, row: dict) -> None:
        """Derive metrics from the summed ones (in place)."""

    def postfix(self, row: dict) -> dict:
        return {"loss": f"{row['loss']:.4f}"}

    def _sampled_reward(self, policy, rows, step: int) -> dict:
        if self.reward_fn is None:
            return {}
        return sampled_reward(policy, self.tokenizer, rows, self.reward_fn, self.cfg.eval,
                              self.cfg.train.seed + step)


class PreferenceTask(OfflineTask):
    def load(self, path):
        d = self.cfg.data
        return load_preferences(path, self.tokenizer, d.max_length, d.on_bad_row,
                                (d.prompt_key, d.chosen_key, d.rejected_key), d.margin_key)

    def token_lists(self):
        for ex in self.train + self.eval:
            yield ex.prompt_ids + ex.chosen_ids
            yield ex.prompt_ids + ex.rejected_ids


class DPOTask(PreferenceTask):
    """Pairs with the reference's log-probs: computed once for the whole dataset
    (``reference.precompute``, after which the reference is released) or every batch."""

    def prepare(self, roles, timer) -> None:
        self.ref_train, self.ref_eval = None, []
        if self.cfg.reference.precompute:
            t0 = time.perf_counter()
            self.ref_train = run_in_chunks(self.cfg, roles.reference, "logprobs", self.train,
                                           "reference log-probs", "pair")
            self.ref_eval = (run_in_chunks(self.cfg, roles.reference, "logprobs", self.eval,
                                           "reference log-probs (eval)", "pair")
                             if self.eval else [])
            log.info("reference log-probs for %d pairs in %.1fs", len(self.train) + len(self.eval),
                     time.perf_counter() - t0)
            roles.stop_reference()
        elif self.eval:
            self.ref_eval = roles.reference.run("logprobs", self.eval)

    def batch(self, idx, roles, timer) -> PreferenceBatch:
        pairs = [self.train[i] for i in idx]
        with timer.phase("reference"):
            ref = ([self.ref_train[i] for i in idx] if self.ref_train is not None
                   else roles.reference.run("logprobs", pairs))
        return PreferenceBatch.build(pairs, ref)

    def evaluate(self, policy, step):
        if not self.eval:
            return {}
        logps = run_in_chunks(self.cfg, policy, "logprobs", self.eval, "eval log-probs", "pair")
        return {**preference_accuracy(logps, self.ref_eval, self.cfg.dpo.beta),
                **self._sampled_reward(policy, self.eval, step)}

    def postfix(self, row):
        return {"loss": f"{row['loss']:.4f}", "acc": f"{row['rewards/accuracy']:.2f}",
                "pairs_s": f"{row['pairs_per_s']:.1f}"}


class RewardModelTask(PreferenceTask):
    """Pairs scored by the model being trained; held-out pair accuracy, and with a gold
    reward (``eval.reward_fn``) the rank correlation of its scores with the gold ones."""

    def batch(self, idx, roles, timer) -> PreferenceBatch:
        return PreferenceBatch.build([self.train[i] for i in idx])

    def evaluate(self, policy, step):
        if not self.eval:
            return {}
        scores = run_in_chunks(self.cfg, policy, "rewards", self.eval, "eval scores", "pair")
        return reward_model_accuracy(scores, self.eval, self.tokenizer, self.reward_fn)

    def finish_row(self, row):
        # per pair: rewards/sum = r_c + r_r, rewards/sq_sum = r_c^2 + r_r^2 (two scores a pair)
        mean = row.pop("rewards/sum") / 2
        row["rewards/mean"] = mean
        row["rewards/std"] = math.sqrt(max(0.0, row.pop("rewards/sq_sum") / 2 - mean ** 2))

    def postfix(self, row):
        return {"loss": f"{row['loss']:.4f}", "acc": f"{row['accuracy']:.2f}",
                "pairs_s": f"{row['pairs_per_s']:.1f}"}


class SFTTask(OfflineTask):
    """Prompt/response rows or conversations; held-out loss, perplexity and token accuracy,
    and with a gold reward the reward of sampled responses."""
    count, rate = "target_tokens", "sequences"

    def load(self, path):
        d = self.cfg.data
        return load_sft(path, self.tokenizer, d.max_length, d.on_bad_row,
                        (d.prompt_key, d.response_key, d.messages_key))

    def token_lists(self):
        for ex in self.train + self.eval:
            yield [t for seg in ex.segments for t in seg]

    def batch(self, idx, roles, timer) -> SFTBatch:
        return SFTBatch([self.train[i] for i in idx])

    def evaluate(self, policy, step):
        if not self.eval:
            return {}
        scores = run_in_chunks(self.cfg, policy, "sft_scores", self.eval, "eval loss", "row")
        return {**sft_heldout(scores), **self._sampled_reward(policy, self.eval, step)}

    def finish_row(self, row):
        row["perplexity"] = math.exp(min(row["loss"], 50.0))

    def postfix(self, row):
        return {"loss": f"{row['loss']:.4f}", "tok_acc": f"{row['token_accuracy']:.2f}",
                "tokens_s": f"{row['tokens_per_s']:.0f}"}


TASKS = {"dpo": DPOTask, "rm": RewardModelTask, "sft": SFTTask}
