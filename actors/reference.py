"""The frozen reference role: log-probs of the starting policy, never trained."""
from __future__ import annotations

import torch

from actors.group import SCATTER, Measured, dispatch
from actors.logprobs import pair_logprobs, response_logprobs
from actors.runtime import load_causal_lm, load_tokenizer, set_threads


class Reference(Measured):
    def __init__(self, rank: int, world_size: int, cfg):
        set_threads(cfg.reference.cpus)
        torch.manual_seed(cfg.train.seed)
        self.cfg = cfg
        self.model = load_causal_lm(cfg.model, trainable=False)
        self.pad_id = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code).pad_token_id or 0

    def ready(self) -> bool:
        return True

    @dispatch(SCATTER)
    def logprobs(self, pairs) -> list[tuple[float, float]]:
        """(chosen, rejected) summed response log-probs for each pair."""
        return pair_logprobs(self.model, pairs, self.cfg.train.micro_batch_size,
                             self.cfg.packing, self.pad_id)

    @dispatch(SCATTER)
    def token_logprobs(self, sequences) -> list[list[float]]:
        """Per-token log-probs of each (prompt, response)'s response tokens."""
        return response_logprobs(self.model, sequences, self.cfg.train.micro_batch_size,
                                 self.cfg.packing, self.pad_id)
