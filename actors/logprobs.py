"""Per-sequence log-probabilities of response tokens, packed or padded.

A sequence is (prompt ids, response ids). Its log-prob is the sum over response tokens of
log p(token | everything before it); prompt tokens never count. With packing, the sequences
of a micro-batch are binned into rows as wide as the longest one; position ids restart at 0
for each sequence, so transformers builds block-diagonal causal masks, and almost no
compute goes to padding. Only the positions that predict response tokens are sent through
the LM head.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

Sequence = tuple[list[int], list[int]]  # (prompt ids, response ids)


@dataclass
class ModelInputs:
    """One forward pass worth of sequences.

    input_ids / position_ids: [rows, W]; attention_mask: [rows, W], or None when packed
    (position ids then mark where each sequence starts). keep: flat indices into rows*W of
    the positions whose next token is a response token; targets: those next tokens;
    owner: which sequence each kept position belongs to.
    """
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    keep: torch.Tensor
    targets: torch.Tensor
    owner: torch.Tensor
    num_sequences: int


def pack_rows(lengths: list[int]) -> tuple[int, list[list[int]]]:
    """First-fit-decreasing bins of width = the longest sequence: (width, sequence ids per row).

    Attention costs rows * width^2, so bins as narrow as the longest sequence keep the
    block-diagonal masks small, while filling rows keeps padding (wasted MLP work) low.
    """
    width = max(lengths)
    rows: list[list[int]] = []
    free: list[int] = []
    for s in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, room in enumerate(free):
            if lengths[s] <= room:
                rows[r].append(s)
                free[r] -= lengths[s]
                break
        else:
            rows.append([s])
            free.append(width - lengths[s])
    return width, rows


def build_inputs(seqs: list[Sequence], pack: bool, pad_id: int = 0) -> ModelInputs:
    """Lay sequences out packed into rows (``pack``) or one right-padded row per sequence."""
    lengths = [len(p) + len(r) for p, r in seqs]
    if pack:
        width, rows = pack_rows(lengths)
    else:
        width, rows = max(lengths), [[s] for s in range(len(seqs))]
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = None if pack else torch.zeros((len(rows), width), dtype=torch.long)
    keep, targets, owner = [], [], []
    for r, members in enumerate(rows):
        col = 0
        for s in members:
            p, resp = seqs[s]
            n = len(p) + len(resp)
            input_ids[r, col:col + n] = torch.tensor(p + resp)
            position_ids[r, col:col + n] = torch.arange(n)
            if mask is not None:
                mask[r, col:col + n] = 1
            # position t predicts token t+1; response tokens sit at len(p) .. n-1
            start = r * width + col
            keep += range(start + len(p) - 1, start + n - 1)
            targets += resp
            owner += [s] * len(resp)
            col += n
        # the filler at the end of a packed row counts as one more sequence of its own
        position_ids[r, col:] = torch.arange(width - col)
    return ModelInputs(input_ids, position_ids, mask, torch.tensor(keep), torch.tensor(targets),
                       torch.tensor(owner), len(seqs))


@contextmanager
def head_on_positions(model, keep: torch.Tensor):
    """Feed only the ``keep`` positions (flat over rows*W) to the model's LM head."""
    head = getattr(model, "module", model).get_output_embeddings()

    def select(_module, args):
        hidden = args[0]
        return (hidden.reshape(-1, hidden.shape[-1])[keep].unsqueeze(0),) + tuple(args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def token_logprobs(model, inputs: ModelInputs, entropy: bool = False):
    """Log-prob of each response token, flat in the order of ``inputs.keep``; with ``entropy``,
    also the entropy of the model's next-token distribution at each of those positions."""
    device = next(model.parameters()).device
    kwargs = dict(input_ids=inputs.input_ids.to(device), position_ids=inputs.position_ids.to(device),
                  use_cache=False)
    if inputs.attention_mask is not None:
        kwargs["attention_mask"] = inputs.attention_mask.to(device)
    with head_on_positions(model, inputs.keep.to(device)):
        logits = model(**kwargs).logits[0].float()
    targets = inputs.targets.to(device)
    picked = logits.gather(-1, targets[:, None]).squeeze(-1)
    logz = torch.logsumexp(logits, dim=-1)
    if not entropy:
        return picked - logz
    probs = torch.softmax(logits, dim=-1)
    return picked - logz, logz - (probs * logits).sum(-1)


def by_sequence(flat: torch.Tensor, inputs: ModelInputs) -> torch.Tensor:
    """Reorder flat per-token values (``keep`` order) into sequence order, tokens in order.

    Packing places sequences in rows by length, so ``keep`` is not in sequence order; each
    sequence's tokens stay contiguous and ordered, so a stable sort by owner restores it.
    """
    return flat[torch.argsort(inputs.owner.to(flat.device), stable=True)]


@torch.no_grad()
def per_response_token(model, seqs: list[Sequence], micro_batch: int, pack: bool, pad_id: int,
                       values) -> list[list[float]]:
    """``values(model, inputs)`` (flat, in sequence order) per response token of each
    sequence, a micro-batch at a time, without gradients."""
    out = []
    for start in range(0, len(seqs), micro_batch):
        chunk = seqs[start:start + micro_batch]
        flat = values(model, build_inputs(chunk, pack, pad_id))
        out += [t.tolist() for t in flat.split([len(r) for _, r in chunk])]
    return out


def response_logprobs(model, seqs: list[Sequence], micro_batch: int, pack: bool,
                      pad_id: int = 0) -> list[list[float]]:
    """Per-token log-probs of each sequence's response tokens, without gradients."""
    return per_response_token(model, seqs, micro_batch, pack, pad_id,
                              lambda m, inputs: by_sequence(token_logprobs(m, inputs), inputs))


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
