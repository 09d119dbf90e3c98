"""Per-sequence log-probabilities of response tokens, packed or padded.

A sequence is (prompt ids, response ids), or for a conversation trained on every reply,
(context, reply, context, reply, ...): token lists that alternate between context and scored
tokens. Its log-prob is the sum over scored (response) tokens of log p(token | everything
before it); prompt and context tokens never count. With packing, the sequences
of a micro-batch are binned into rows as wide as the longest one; position ids restart at 0
for each sequence, so transformers builds block-diagonal causal masks, and almost no
compute goes to padding. Only the positions that predict response tokens are sent through
the LM head.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

Sequence = tuple[list[int], ...]  # (prompt ids, response ids) or (context, reply, ...)


@dataclass
class ModelInputs:
    """One forward pass worth of sequences.

    input_ids / position_ids: [rows, W]; attention_mask: [rows, W], or None when packed
    (position ids then mark where each sequence starts). keep: flat indices into rows*W of
    the positions whose next token is a response token; targets: those next tokens;
    owner: which sequence each kept position belongs to; last: flat index of each sequence's
    last token, in sequence order (where a reward model reads its score).
    """
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    keep: torch.Tensor
    targets: torch.Tensor
    owner: torch.Tensor
    num_sequences: int
    last: torch.Tensor | None = None


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


def build_inputs(seqs: list[Sequence], pack: bool | str, pad_id: int = 0) -> ModelInputs:
    """Lay sequences out one right-padded row per sequence (``pack`` False), packed into rows
    as wide as the longest (True), or all in one row without padding (``"one_row"``, for the
    varlen attention of actors/packed_attention.py, which keeps them apart; see
    :func:`one_row`)."""
    if pack == "one_row":
        return one_row(seqs)
    lengths = [sum(map(len, s)) for s in seqs]
    if pack:
        width, rows = pack_rows(lengths)
    else:
        width, rows = max(lengths), [[s] for s in range(len(seqs))]
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = None if pack else torch.zeros((len(rows), width), dtype=torch.long)
    keep, targets, owner, last = [], [], [], [0] * len(seqs)
    for r, members in enumerate(rows):
        col = 0
        for s in members:
            n = lengths[s]
            input_ids[r, col:col + n] = torch.tensor([t for seg in seqs[s] for t in seg])
            position_ids[r, col:col + n] = torch.arange(n)
            if mask is not None:
                mask[r, col:col + n] = 1
            last[s] = _scored(seqs[s], s, r * width + col, keep, targets, owner) - 1
            col += n
        # the filler at the end of a packed row counts as one more sequence of its own
        position_ids[r, col:] = torch.arange(width - col)
    return ModelInputs(input_ids, position_ids, mask, torch.tensor(keep, dtype=torch.long),
                       torch.tensor(targets, dtype=torch.long), torch.tensor(owner, dtype=torch.long),
                       len(seqs), torch.tensor(last, dtype=torch.long))


def _scored(seq: Sequence, s: int, offset: int, keep: list, targets: list,
            owner: list) -> int:
    """Note sequence ``s``, laid out from flat index ``offset``: the positions that predict its
    scored segments' tokens, those tokens and their owner. Returns where it ends."""
    for k, seg in enumerate(seq):
        # position t predicts token t+1: a scored segment at offset o of length m is
        # predicted from positions o-1 .. o+m-2
        if k % 2:
            keep += range(offset - 1, offset + len(seg) - 1)
            targets += seg
            owner += [s] * len(seg)
        offset += len(seg)
    return offset


def one_row(seqs: list[Sequence]) -> ModelInputs:
    """All sequences in one row without padding, each prompt laid out once for the
    neighbours that share it.

    A (prompt, response) sequence whose prompt is that of the last sequence laid out in full
    becomes a branch: only its response tokens go into the row, with positions continuing
    from the prompt's, which tells the varlen attention that they see that prompt and then
    themselves (the layout :func:`pair_inputs` gives a preference pair). The samples of one
    prompt in an RL group are neighbours, so a group's prompt goes through the model once
    instead of once per sample. The response's first token is predicted from the prompt's
    last position, which several sequences then share in ``keep``.
    """
    ids: list[int] = []
    pos: list[int] = []
    keep: list[int] = []
    targets: list[int] = []
    owner: list[int] = []
    last = [0] * len(seqs)
    root = None  # (prompt, where it starts) of the last sequence laid out in full
    for s, seq in enumerate(seqs):
        start = len(ids)
        if root is not None and len(seq) == 2 and len(seq[1]) and list(seq[0]) == root[0]:
            prompt, response = root[0], list(seq[1])
            ids += response
            pos += range(len(prompt), len(prompt) + len(response))
            keep += [root[1] + len(prompt) - 1, *range(start, start + len(response) - 1)]
            targets += response
            owner += [s] * len(response)
            last[s] = start + len(response) - 1
            continue
        end = _scored(seq, s, start, keep, targets, owner)
        ids += [t for seg in seq for t in seg]
        pos += range(end - start)
        last[s] = end - 1
        root = (list(seq[0]), start) if len(seq) == 2 and len(seq[0]) else None
    row = lambda xs: torch.tensor([xs], dtype=torch.long)  # noqa: E731
    return ModelInputs(row(ids), row(pos), None, torch.tensor(keep, dtype=torch.long),
                       torch.tensor(targets, dtype=torch.long),
                       torch.tensor(owner, dtype=torch.long), len(seqs),
                       torch.tensor(last, dtype=torch.long))


def unwrap(model) -> torch.nn.Module:
    """The transformers model inside a DeepSpeed engine and a peft (LoRA) wrapper."""
    from actors.lora import plain_model
    return plain_model(getattr(model, "module", model))


@contextmanager
def head_on_positions(model, keep: torch.Tensor):
    """Feed only the ``keep`` positions (flat over rows*W) to the model's LM head, and to the
    last block's per-position parts (see :func:`last_block_on_positions`)."""
    inner = unwrap(model)
    handle = inner.get_output_embeddings().register_forward_pre_hook(_picker(keep))
    try:
        # each position once: a shared prompt's last position predicts several responses'
        # first tokens (the head reads it once for each), and the last block's parts run on
        # it once
        with last_block_on_positions(inner, torch.unique(keep)):
            yield
    finally:
        handle.remove()


def _picker(keep: torch.Tensor, shape: dict | None = None):
    """A forward pre-hook that hands a module the ``keep`` positions (flat over rows*W) of its
    hidden-state input as one row; ``shape`` notes the input's shape under "in"."""
    def pick(_module, args):
        hidden = args[0]
        if shape is not None:
            shape["in"] = hidden.shape
        # index_select, not [keep]: its backward adds rows in place, the other's sorts them
        return ((hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep).unsqueeze(0),)
                + tuple(args[1:]))
    return pick


def last_block(model) -> torch.nn.Module | None:
    """The model's last transformer block, where the block list is one of the layouts
    transformers' dense causal LMs use (``layers`` or ``h`` on the base model)."""
    base = getattr(model, "base_model", model)
    for name in ("layers", "h"):
        blocks = getattr(base, name, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
            return blocks[-1]
    return None


def last_block_parts(model) -> list[torch.nn.Module]:
    """The modules of the last block whose output at a position is read at that position
    alone: the attention's query projection (``q_proj``; GPT-NeoX fuses it with keys and
    values, so not there), its output projection (``o_proj``, GPT-NeoX's ``dense``) and the
    MLP. Keys and values are not among them: every later position reads them."""
    block = last_block(model)
    if block is None:
        return []
    attn = next((m for m in (getattr(block, n, None) for n in ("self_attn", "attention"))
                 if isinstance(m, torch.nn.Module)), None)
    names = [(attn, "q_proj"), (attn, "o_proj"), (attn, "dense"), (block, "mlp")]
    return [m for m in (getattr(owner, n, None) for owner, n in names if owner is not None)
            if isinstance(m, torch.nn.Module)]


@contextmanager
def last_block_on_positions(model, keep: torch.Tensor):
    """Run the last block's per-position parts (:func:`last_block_parts`) on the ``keep``
    positions only; the others get zeros.

    Past the last block a position's hidden state feeds nothing but the head, and the head
    reads ``keep`` alone. Inside the last block positions meet only in attention, where a
    position's query and attention output serve that position alone; so at the other
    positions the query, the output projection and the MLP make values nothing reads. For a
    reward model (one position per sequence) or a prompt-heavy batch most of that work goes;
    keys and values are still made everywhere. Exact (each part applies to each position on
    its own in every dense family); left off under gradient checkpointing, whose recompute
    runs without hooks.
    """
    parts = last_block_parts(model)
    if not parts or getattr(model, "is_gradient_checkpointing", False):
        yield
        return
    handles = []
    for part in parts:
        shape = {}

        def scatter(_module, _args, out, shape=shape):
            rows = shape["in"][:-1].numel()
            full = out.new_zeros(rows, out.shape[-1]).index_copy(0, keep, out[0])
            return full.reshape(*shape["in"][:-1], out.shape[-1])

        handles += [part.register_forward_pre_hook(_picker(keep, shape)),
                    part.register_forward_hook(scatter)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def model_kwargs(model, inputs: ModelInputs) -> dict:
    """The forward arguments of ``inputs`` on the model's device."""
    device = next(model.parameters()).device
    kwargs = dict(input_ids=inputs.input_ids.to(device), position_ids=inputs.position_ids.to(device),
                  use_cache=False)
    if inputs.attention_mask is not None:
        kwargs["attention_mask"] = inputs.attention_mask.to(device)
    return kwargs


def response_logits(model, inputs: ModelInputs) -> torch.Tensor:
    """Logits [len(keep), vocab] at the positions that predict response tokens (float32)."""
    kwargs = model_kwargs(model, inputs)
    with head_on_positions(model, inputs.keep.to(kwargs["input_ids"].device)):
        logits = model(**kwargs).logits
        # a view, not logits[0]: the backward of an index fills a zero tensor as large
        return logits.view(logits.shape[1:]).float()


class _TargetLogProb(torch.autograd.Function):
    """log p(target) per row of logits [rows, vocab], the row's largest log-prob (the target
    is the most likely token where the two are equal) and, if asked, the row's entropy (a
    figure, without gradient), keeping one [rows, vocab] tensor for the backward.

    Autograd through gather and logsumexp keeps the logits and builds the gradient in several
    passes over [rows, vocab] (a zero tensor for the gather, the exponentials again, their sum,
    the copy out of the batch dimension). Here the forward keeps the softmax (in place of the
    logits, which nothing else needs) and the backward is one multiplication by -grad plus
    grad at each target. log_softmax and softmax are single fused kernels; on CPU each costs
    about half of ``max`` with indices or of a plain ``exp`` over the same rows.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool):
        logp = torch.log_softmax(logits, -1)
        probs = torch.softmax(logits, -1)
        top = logp.amax(-1)
        entropy = -(probs * logp).sum(-1) if with_entropy else top.new_empty(0)
        ctx.save_for_backward(probs, targets)
        ctx.mark_non_differentiable(top, entropy)
        return logp.gather(-1, targets[:, None]).squeeze(-1), top, entropy

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _top, _entropy):
        probs, targets = ctx.saved_tensors
        out = probs * (-grad).to(probs.dtype)[:, None]
        out.scatter_add_(-1, targets[:, None], grad[:, None].to(out.dtype))
        return out, None, None


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool = False,
                    entropy_grad: bool = False):
    """(log-prob of each row's target, the row's largest log-prob, the row's entropy or an
    empty tensor) of logits [rows, vocab]: the target is the row's most likely token where
    the first two are equal. Only the log-prob carries a gradient, and with ``entropy_grad``
    the entropy too."""
    if torch.is_grad_enabled() and logits.requires_grad and not entropy_grad:
        return _TargetLogProb.apply(logits, targets, with_entropy)
    # scoring (nothing kept for a backward), or plain autograd for an entropy term
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1) if with_entropy else logp.new_empty(0)
    return logp.gather(-1, targets[:, None]).squeeze(-1), logp.amax(-1), entropy


def token_logprobs(model, inputs: ModelInputs, entropy: bool = False,
                   entropy_grad: bool = False):
    """Log-prob of each response token, flat in the order of ``inputs.keep``; with ``entropy``,
    also the entropy of the model's next-token distribution at each of those positions, which
    carries a gradient with ``entropy_grad`` (an entropy term in the loss) and is a figure
    only without."""
    logits = response_logits(model, inputs)
    logp, _, ent = target_logprobs(logits, inputs.targets.to(logits.device), entropy,
                                   entropy_grad)
    return (logp, ent) if entropy else logp


def token_logprobs_and_hits(model, inputs: ModelInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each response token (``keep`` order) and whether it is the model's most
    likely next token there (token accuracy)."""
    logits = response_logits(model, inputs)
    targets = inputs.targets.to(logits.device)
    logp, top, _ = target_logprobs(logits, targets)
    return logp, logp >= top


def sequence_scores(model, inputs: ModelInputs) -> torch.Tensor:
    """A one-output sequence classifier's score at each sequence's last token (a reward
    model's reward), in sequence order. The model's own pooling (the last non-pad token of a
    row) cannot read packed rows, so the score head's output is read at ``inputs.last``; the
    last block's per-position parts run on those positions alone."""
    inner = unwrap(model)
    head = getattr(inner, "score", None)
    if head is None:
        raise TypeError(f"{type(inner).__name__} has no 'score' head; "
                        f"a reward model is an AutoModelForSequenceClassification")
    seen = []
    kwargs = model_kwargs(model, inputs)
    last = inputs.last.to(kwargs["input_ids"].device)
    handle = head.register_forward_hook(lambda _module, _args, out: seen.append(out))
    try:
        with last_block_on_positions(inner, last):
            model(**kwargs)
    finally:
        handle.remove()
    scores = seen[0]
    return scores.reshape(-1, scores.shape[-1])[last, 0].float()


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
        out += [t.tolist() for t in flat.split([scored_tokens(s) for s in chunk])]
    return out


def scored_tokens(seq: Sequence) -> int:
    """How many of a sequence's tokens are scored (its response or reply tokens)."""
    return sum(len(seg) for seg in seq[1::2])


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


def pair_inputs(pairs, pack: bool | str, pad_id: int = 0) -> ModelInputs:
    """The inputs of :func:`pair_sequences` (sequence i: pair i's chosen, n + i: its rejected).

    In the ``one_row`` layout each pair's prompt is laid out once: prompt, chosen, rejected.
    The rejected tokens' position ids continue from the prompt's, not from the chosen's, which
    tells the varlen attention (actors/packed_attention.py) that they see the prompt and not
    the chosen response; the first rejected token is predicted from the prompt's last token.
    The prompt's tokens go through the model once instead of twice.
    """
    if pack != "one_row":
        return build_inputs(pair_sequences(pairs), pack, pad_id)
    # each pair's chosen then its rejected, side by side: one_row makes the rejected a branch
    inputs = one_row([seq for ex in pairs for seq in ((ex.prompt_ids, ex.chosen_ids),
                                                      (ex.prompt_ids, ex.rejected_ids))])
    # renumber to pair_sequences' order: sequence 2i is chosen i, 2i + 1 rejected i (n + i)
    n, owner = len(pairs), inputs.owner
    inputs.owner = torch.where(owner % 2 == 0, owner // 2, n + owner // 2)
    inputs.last = torch.cat([inputs.last[0::2], inputs.last[1::2]])
    return inputs


@torch.no_grad()
def pair_logprobs(model, pairs, micro_batch: int, pack: bool | str,
                  pad_id: int = 0) -> list[tuple[float, float]]:
    """(chosen, rejected) summed log-probs for each pair, without gradients."""
    out = []
    for start in range(0, len(pairs), micro_batch):
        chunk = pairs[start:start + micro_batch]
        sums, _ = sequence_logprobs(model, pair_inputs(chunk, pack, pad_id))
        n = len(chunk)
        out += list(zip(sums[:n].tolist(), sums[n:].tolist()))
    return out
