"""Named data that travels between the driver and the roles."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from orchestrator.data import PreferenceExample


@dataclass
class PreferenceBatch:
    """Preference pairs with their reference log-probs, for one replica and one step.

    pairs: the tokenized pairs (prompt ids kept apart from chosen/rejected response ids).
    ref_chosen, ref_rejected: float tensors [len(pairs)], the reference model's log-prob of
    each response summed over its tokens.
    """
    pairs: list[PreferenceExample]
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor

    def __len__(self) -> int:
        return len(self.pairs)

    @classmethod
    def build(cls, pairs: list[PreferenceExample], ref: list[tuple[float, float]]) -> "PreferenceBatch":
        ref_t = torch.tensor(ref, dtype=torch.float32).reshape(len(pairs), 2)
        return cls(list(pairs), ref_t[:, 0].contiguous(), ref_t[:, 1].contiguous())

    def slice(self, start: int, end: int) -> "PreferenceBatch":
        return PreferenceBatch(self.pairs[start:end], self.ref_chosen[start:end],
                               self.ref_rejected[start:end])

    def split(self, n: int) -> list["PreferenceBatch"]:
        """n equal contiguous parts (len must divide evenly, as config checks)."""
        size = len(self) // n
        return [self.slice(i * size, (i + 1) * size) for i in range(n)]

    def micro_batches(self, size: int) -> list["PreferenceBatch"]:
        return [self.slice(i, i + size) for i in range(0, len(self), size)]


@dataclass
class RolloutBatch:
    """Sampled responses with what a policy update needs, one row per response.

    sequences: (prompt ids, response ids) per row. Per-token tensors are [B, T] over response
    tokens, right-padded, with ``mask`` [B, T] (1 on real tokens): advantages, ref_logprobs
    (reference), rollout_logprobs (the engine's sampling log-probs) and old_logprobs (the
    trainer's, before the update; None when the update is exactly on-policy, i.e. one epoch
    and one optimizer step per rollout, where they equal the update's own first forward).
    PPO adds the critic's values at sampling time and the GAE returns (its targets).
    """
    sequences: list[tuple[list[int], list[int]]]
    mask: torch.Tensor
    advantages: torch.Tensor
    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor
    rollout_logprobs: torch.Tensor
    values: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.sequences)

    def slice(self, start: int, end: int) -> "RolloutBatch":
        return RolloutBatch(self.sequences[start:end], *(
            None if t is None else t[start:end]
            for t in (self.mask, self.advantages, self.old_logprobs, self.ref_logprobs,
                      self.rollout_logprobs, self.values, self.returns)))

    def split(self, n: int) -> list["RolloutBatch"]:
        size = len(self) // n
        return [self.slice(i * size, (i + 1) * size) for i in range(n)]

    def micro_batches(self, size: int) -> list["RolloutBatch"]:
        return [self.slice(i, i + size) for i in range(0, len(self), size)]


def pad_tokens(rows: list[list[float]], width: int | None = None) -> torch.Tensor:
    """Right-pad per-token lists into a float tensor [len(rows), width]."""
    width = width or max(len(r) for r in rows)
    out = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.float32)
    return out
