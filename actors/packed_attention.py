"""Attention for packed sequences without padding: ``attn_implementation="varlen"``.

With ``model.attn_implementation: varlen`` the sequences of a micro-batch are packed into one
row with no padding at all (actors/logprobs.py ``build_inputs``, layout ``one_row``); position
ids restart at 0 where each sequence starts. Every position-wise layer (the projections, the
MLP, the norms) then runs on real tokens only. Attention must not cross from one sequence into
another: instead of a [row, row] block-diagonal mask, this function runs causal SDPA on each
sequence's slice of the queries, keys and values. It is what flash-attention's variable-length
kernel does on GPUs, built from SDPA so that it runs on CPUs as well. (Measured here for 16
sequences of 25-90 tokens, forward and backward: 3.9 ms for the per-sequence calls, 7.1 ms for
one call on the sequences re-padded into a batch.)

The position ids also say where a sequence shares its start with the one before it: a run of
tokens whose positions continue from k > 0, not from the previous token, is a branch that sees
the first k tokens of the current sequence and then itself (``pair_inputs`` lays a preference
pair out as prompt, chosen, rejected with the rejected positions continuing from the prompt, so
the prompt goes through the model once for both responses).

A decoding step (one query per row over a KV cache) is two matrix products, which a CPU runs in
about half the time of SDPA's kernel for a single query (``_attend_one``). Anything else, a
batch of several rows, a prefill with a KV cache, dropout, a sliding window shorter than a
sequence of the row, or logit soft-capping, goes to transformers' own SDPA path with the mask
transformers builds for it (the SDPA mask function is registered under the same name), so a
model loaded with ``varlen`` behaves like ``sdpa`` outside packed forwards. That mask starts a
new sequence at every break in the positions, so a branch there would not see its prompt: a row
with branches that cannot take this function's path is refused with an error naming the reason,
never computed wrong.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "varlen"


Piece = tuple[int, int, int]   # (length, index of the piece it continues, prefix length)


class Layout(NamedTuple):
    """A packed row's pieces (:func:`_pieces`), its runs (:func:`_runs`), each run's number of
    tokens, the run each run's first piece is in (by piece index), and the most tokens any
    query sees (a branch sees its prefix too)."""
    pieces: list[Piece]
    runs: list[tuple[int, int]]
    sizes: list[int]
    run_of: dict[int, int]
    reach: int

    @property
    def branched(self) -> bool:
        return any(prefix for _, _, prefix in self.pieces)


_last: tuple[torch.Tensor, Layout] | None = None


def _layout(position_ids: torch.Tensor) -> Layout:
    """The row's layout, computed once per forward (every layer sees the same position ids
    tensor)."""
    global _last
    if _last is None or _last[0] is not position_ids:
        pieces = _pieces(position_ids)
        runs = _runs(pieces)
        _last = (position_ids, Layout(pieces, runs, [pieces[i][0] * n for i, n in runs],
                                      {first: r for r, (first, _) in enumerate(runs)},
                                      max(length + prefix for length, _, prefix in pieces)))
    return _last[1]


def _pieces(position_ids: torch.Tensor) -> list[Piece]:
    """The runs of consecutive positions in the row: a run starting at position 0 begins a
    sequence (prefix 0); one starting at k > 0 continues the first k tokens of the sequence's
    first run."""
    pos = position_ids[0]
    starts = [0] + (torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1).tolist()
    firsts = pos[starts].tolist()
    pieces, root = [], 0
    for i, (start, end, first) in enumerate(zip(starts, starts[1:] + [pos.numel()], firsts)):
        root = i if first == 0 else root
        if first and first > pieces[root][0]:
            raise ValueError(f"packed row: a run at token {start} continues {first} tokens "
                             f"of a sequence whose first run has {pieces[root][0]}")
        pieces.append((end - start, root, first))
    return pieces


def _runs(pieces: list[Piece]) -> list[tuple[int, int]]:
    """(first piece, count) per run of neighbouring pieces of one length that one batched
    attention call takes: whole sequences that no branch continues (a group of sampled
    responses that all ran to the token limit), or branches off the same prefix of one
    sequence (the same group with its prompt laid out once). Every other piece is a run of
    its own."""
    continued = {root for _, root, prefix in pieces if prefix}

    def alike(a: int, b: int) -> bool:
        (len_a, root_a, prefix_a), (len_b, root_b, prefix_b) = pieces[a], pieces[b]
        if len_a != len_b or prefix_a != prefix_b:
            return False
        return root_a == root_b if prefix_a else not {a, b} & continued

    runs, i = [], 0
    while i < len(pieces):
        count = 1
        while i + count < len(pieces) and alike(i, i + count):
            count += 1
        runs.append((i, count))
        i += count
    return runs


def _attend(q, k, v, prefix_k, prefix_v, scaling, gqa: bool) -> torch.Tensor:
    """Causal attention of pieces' queries [pieces, heads, length, dim] over a prefix shared
    by all of them (keys, values [1, heads, prefix, dim]; None for none) and each piece
    itself."""
    if prefix_k is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                              enable_gqa=gqa)
    prefix, length, count = prefix_k.shape[2], q.shape[2], q.shape[0]
    # query i sees the whole prefix and its own piece up to itself
    mask = torch.ones(length, prefix + length, dtype=torch.bool,
                      device=q.device).tril(diagonal=prefix)
    return F.scaled_dot_product_attention(q, torch.cat([prefix_k.expand(count, -1, -1, -1), k], 2),
                                          torch.cat([prefix_v.expand(count, -1, -1, -1), v], 2),
                                          attn_mask=mask, scale=scaling, enable_gqa=gqa)


def _one_row(query, key, position_ids) -> bool:
    """Whether this call is a forward of one packed row (not a decoding step)."""
    return (position_ids is not None and query.shape[0] == 1 and position_ids.shape[0] == 1
            and query.shape[2] == key.shape[2] == position_ids.shape[1]
            and int(position_ids[0, 0]) == 0)


def _unsupported(layout: Layout, kwargs, module, dropout) -> str | None:
    """What in this attention call the function below does not do, or None. A sliding
    window longer than every sequence never cuts and is no obstacle."""
    window = kwargs.get("sliding_window")
    why = {"attention dropout": dropout, "a KV cache": kwargs.get("past_key_values") is not None,
           f"a sliding window of {window} tokens": window and layout.reach > window,
           "logit soft-capping": kwargs.get("softcap"),
           "a position bias": kwargs.get("position_bias") is not None,
           "non-causal attention": not getattr(module, "is_causal", True)}
    return next((reason for reason, present in why.items() if present), None)


def _decoding(query, kwargs, module, dropout) -> bool:
    """Whether this call is a decoding step (one query per row, the row's last position, over
    the keys of the positions before it) that :func:`_attend_one` can take."""
    return (query.shape[2] == 1 and not dropout
            and not kwargs.get("sliding_window") and not kwargs.get("softcap")
            and kwargs.get("position_bias") is None and getattr(module, "is_causal", True))


def _attend_one(query, key, value, attention_mask, scaling) -> torch.Tensor:
    """One decoding step's attention as two matrix products, [rows, 1, heads, dim]: SDPA's
    CPU kernel takes about twice as long for a single query (0.6 against 1.3 ms for 64 rows
    x 8 heads over 88 cached positions). A query head attends with its group's key head."""
    rows, heads, _, dim = query.shape
    groups = key.shape[1]
    q = query.reshape(rows, groups, heads // groups, dim)
    scores = torch.matmul(q, key.transpose(-1, -2)) * (dim ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:  # [rows, 1, 1, keys]: bool (True attends) or additive
        mask = attention_mask[:, :, :, :key.shape[2]]
        scores = (scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                  else scores + mask)
    out = torch.matmul(torch.softmax(scores, -1, dtype=torch.float32).to(value.dtype), value)
    return out.view(rows, 1, heads, dim)


def varlen_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Causal attention within each sequence of a packed row (see the module docstring); a
    decoding step (one query per row over a KV cache) by :func:`_attend_one`."""
    if _decoding(query, kwargs, module, dropout):
        return _attend_one(query, key, value, attention_mask, scaling), None
    position_ids = kwargs.get("position_ids")
    layout = _layout(position_ids) if _one_row(query, key, position_ids) else None
    why = _unsupported(layout, kwargs, module, dropout) if layout is not None else "no row"
    if why is not None:
        if layout is not None and layout.branched:
            # transformers' mask would start a new sequence at each branch: it would not see
            # its prompt, and every log-prob after it would be wrong without a word
            raise ValueError(
                f"varlen attention: a packed row with shared prompts (a preference pair's, or "
                f"an RL group's) needs this function's own path, and this model's attention "
                f"has {why} ({type(module).__name__}); set model.attn_implementation: sdpa")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    # split, not slice: the backward of a split is one concatenation, while every slice's
    # backward would fill a zero tensor as large as the whole row
    qs, ks, vs = (t.split(layout.sizes, 2) for t in (query, key, value))
    parts = []
    for r, (first, count) in enumerate(layout.runs):
        length, root, prefix = layout.pieces[first]
        # a run of pieces side by side: one batched call, viewed, not copied
        q, k, v = (t[r][0].unflatten(1, (count, length)).transpose(0, 1) for t in (qs, ks, vs))
        base = layout.run_of[root] if prefix else None  # the run of the sequence continued
        out = _attend(q, k, v, ks[base][:, :, :prefix] if prefix else None,
                      vs[base][:, :, :prefix] if prefix else None, scaling, gqa)
        parts.append(out.transpose(0, 1).reshape(1, out.shape[1], -1, out.shape[3]))
    out = torch.cat(parts, 2) if len(parts) > 1 else parts[0]
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, varlen_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
