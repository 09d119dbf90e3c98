"""A tiny sequence-classification reward model built locally, for tests and demos.

Same Llama sizes and the same BPE tokenizer (with its chat template) as
:mod:`orchestrator.tiny_model`, but with a one-logit score head
(``LlamaForSequenceClassification``, ``num_labels=1``) and ``pad_token_id`` set, so that
batches can be padded. The weights are random: scores are finite but mean nothing.
"""
from __future__ import annotations

import logging
from pathlib import Path

from orchestrator.tiny_model import llama_config

log = logging.getLogger(__name__)


def build_reward_model(out_dir: str | Path, size: str = "tiny", seed: int = 0,
                       max_positions: int = 1024) -> Path:
    """Write a random-init Llama reward model and its tokenizer to ``out_dir``; returns the path."""
    import torch
    from transformers import LlamaForSequenceClassification

    cfg, tokenizer = llama_config(size, max_positions, num_labels=1)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(cfg)
    # the default head init (std 0.02) gives scores near 0 for every input; widen it so that
    # different samples get visibly different scores
    torch.nn.init.normal_(model.score.weight, std=1.0)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    log.info("wrote %s Llama reward model (%.2fM parameters) to %s", size, n / 1e6, out)
    return out
