"""Per-sequence log-probabilities of response tokens, packed or padded.

A sequence is (prompt ids, response ids). Its log-prob is the sum over response tokens of
log p(token | everything before it); prompt tokens never count. With packing, all sequences
of a micro-batch go into one row whose position ids restart at 0 for each sequence, so
transformers builds a block-diagonal causal mask and no compute is spent on padding. Only
the positions that predict response tokens are sent through the LM head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

Sequence = tuple[list[int], list[int]]  # (prompt ids, response ids)


@dataclass
class ModelInputs:
    """One forward pass worth of sequences.

    input_ids / position_ids: [rows, T]; attention_mask: [rows, T] or None when packed.
    keep: flat indices into rows*T of the positions whose next token is a response token;
    targets: those next tokens; owner: which sequence each kept position belongs to.
    """
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    keep: torch.Tensor
    targets: torch.Tensor
    owner: torch.Tensor
    num_sequences: int


def build_inputs(seqs: list[Sequence], pack: bool, pad_id: int = 0) -> ModelInputs:
    """Lay sequences out as one packed row (``pack``) or as right-padded rows."""
    keep, targets, owner = [], [], []
    if pack:
        ids, pos, offset = [], [], 0
        for s, (p, r) in enumerate(seqs):
            full = p + r
            ids += full
            pos += range(len(full))
            # position t predicts token t+1; response tokens sit at len(p) .. len(full)-1
            keep += range(offset + len(p) - 1, offset + len(full) - 1)
            targets += r
            owner += [s] * len(r)
            offset += len(full)
        input_ids = torch.tensor([ids])
        position_ids = torch.tensor([pos])
        mask = None
    else:
        width = max(len(p) + len(r) for p, r in seqs)
        input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for s, (p, r) in enumerate(seqs):
            full = p + r
            input_ids[s, :len(full)] = torch.tensor(full)
            mask[s, :len(full)] = 1
            keep += range(s * width + len(p) - 1, s * width + len(full) - 1)
            targets += r
            owner += [s] * len(r)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ModelInputs(input_ids, position_ids, mask, torch.tensor(keep), torch.tensor(targets),
                       torch.tensor(owner), len(seqs))


def token_logprobs(model, inputs: ModelInputs) -> torch.Tensor:
    """Log-prob of each response token, flat in the order of ``inputs.keep``."""
    device = next(model.parameters()).device
    rows, width = inputs.input_ids.shape
    kwargs = dict(input_ids=inputs.input_ids.to(device), position_ids=inputs.position_ids.to(device),
                  use_cache=False)
    if inputs.attention_mask is not None:
        kwargs["attention_mask"] = inputs.attention_mask.to(device)
    if rows == 1:
        # only the kept positions go through the LM head
        logits = model(**kwargs, logits_to_keep=inputs.keep.to(device)).logits[0]
    else:
        logits = model(**kwargs).logits.reshape(rows * width, -1)[inputs.keep.to(device)]
    logits = logits.float()
    targets = inputs.targets.to(device)
    picked = logits.gather(-1, targets[:, None]).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logprobs(model, inputs: ModelInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of response-token log-probs, number of response tokens) per sequence."""
    per_token = token_logprobs(model, inputs)
    owner = inputs.owner.to(per_token.device)
    sums = torch.zeros(inputs.num_sequences, dtype=per_token.dtype, device=per_token.device)
    sums = sums.index_add(0, owner, per_token)
    counts = torch.bincount(owner, minlength=inputs.num_sequences)
    return sums, counts


def pair_sequences(pairs) -> list[Sequence]:
    """Chosen sequences first, then rejected: one forward covers both halves of every pair."""
    return ([(p.prompt_ids, p.chosen_ids) for p in pairs]
            + [(p.prompt_ids, p.rejected_ids) for p in pairs])


@torch.no_grad()
def pair_logprobs(model, pairs, micro_batch: int, pack: bool, pad_id: int = 0) -> list[tuple[float, float]]:
    """(chosen, rejected) summed log-probs for each pair, without gradients."""
    out = []
    for start in range(0, len(pairs), micro_batch):
        chunk = pairs[start:start + micro_batch]
        sums, _ = sequence_logprobs(model, build_inputs(pair_sequences(chunk), pack, pad_id))
        n = len(chunk)
        out += list(zip(sums[:n].tolist(), sums[n:].tolist()))
    return out
