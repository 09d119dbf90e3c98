"""Named data that travels between the driver and the roles."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from orchestrator.data import PreferenceExample, SFTExample


class Rows:
    """A batch whose fields all have one entry per row (lists, or tensors with rows first);
    a field may be None. Cut into replica shares and micro-batches without copying rows."""

    def __len__(self) -> int:
        return len(getattr(self, dataclasses.fields(self)[0].name))

    def slice(self, start: int, end: int):
        return type(self)(*(None if v is None else v[start:end]
                            for v in (getattr(self, f.name) for f in dataclasses.fields(self))))

    def split(self, n: int) -> list:
        """n equal contiguous parts (len must divide evenly, as config checks)."""
        size = len(self) // n
        return [self.slice(i * size, (i + 1) * size) for i in range(n)]

    def micro_batches(self, size: int) -> list:
        return [self.slice(i, i + size) for i in range(0, len(self), size)]


@dataclass
class PreferenceBatch(Rows):
    """Preference pairs for one replica and one step (DPO, reward-model training).

    pairs: the tokenized pairs (prompt ids kept apart from chosen/rejected response ids, and
    the pair's margin). ref_chosen, ref_rejected: float tensors [len(pairs)], the reference
    model's log-prob of each response summed over its tokens (DPO; None for a reward model).
    weights: float tensor [len(pairs)] of per-pair loss factors, or None (all 1): online DPO
    fills a step up to its fixed pair count with weight-0 copies (orchestrator/online_pairs.py).
    """
    pairs: list[PreferenceExample]
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None
    weights: torch.Tensor | None = None

    @classmethod
    def build(cls, pairs: list[PreferenceExample],
              ref: list[tuple[float, float]] | None = None) -> "PreferenceBatch":
        if ref is None:
            return cls(list(pairs))
        ref_t = torch.tensor(ref, dtype=torch.float32).reshape(len(pairs), 2)
        return cls(list(pairs), ref_t[:, 0].contiguous(), ref_t[:, 1].contiguous())


@dataclass
class SFTBatch(Rows):
    """SFT rows for one replica and one step: each an SFTExample whose segments alternate
    context and trained tokens."""
    examples: list[SFTExample]


@dataclass
class RolloutBatch(Rows):
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


def pad_tokens(rows: list[list[float]], width: int | None = None) -> torch.Tensor:
    """Right-pad per-token lists into a float tensor [len(rows), width]."""
    width = width or max(len(r) for r in rows)
    out = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.float32)
    return out
