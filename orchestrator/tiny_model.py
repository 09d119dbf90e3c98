"""Small Llama-architecture models and BPE tokenizers built locally, with no model hub.

The tokenizer is trained with `tokenizers` on local text (the synthetic task's words plus
chat markup), carries a chat template, and is saved next to a randomly initialised
LlamaForCausalLM in Hugging Face format. Attention head_dim is 64, which vLLM's CPU
back-end accepts.
"""
from __future__ import annotations

import logging
from pathlib import Path

from orchestrator import synthetic

log = logging.getLogger(__name__)

# name: (hidden, layers, heads, intermediate, vocab)
SIZES = {
    "tiny": (128, 2, 2, 256, 512),    # ~0.4M parameters: tests
    "small": (256, 3, 4, 688, 2048),  # ~3M parameters: demo and benchmarks
    "medium": (512, 8, 8, 1408, 8192),  # ~30M parameters: benchmarks at a size where fixed
                                        # per-call costs no longer dominate
    "base": (768, 12, 12, 2048, 8192),  # ~100M parameters: weight-sync benchmarks
}
SPECIAL = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(vocab_size: int, extra_text: list[str] | None = None):
    """Train a byte-level BPE tokenizer on the synthetic corpus (plus ``extra_text``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(synthetic.corpus() + list(extra_text or []), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>",
                                   pad_token="<|endoftext|>", bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def llama_config(size: str, max_positions: int = 1024, **extra):
    """(LlamaConfig, tokenizer) of a preset size; ``extra`` goes into the config."""
    from transformers import LlamaConfig

    if size not in SIZES:
        raise ValueError(f"size {size!r}: choose one of {', '.join(SIZES)}")
    hidden, layers, heads, inter, vocab = SIZES[size]
    tokenizer = build_tokenizer(vocab)
    cfg = LlamaConfig(
        vocab_size=max(vocab, len(tokenizer)), hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=hidden // heads, max_position_embeddings=max_positions,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, torch_dtype="float32", **extra,
    )
    return cfg, tokenizer


# families other than Llama: transformers config class, model class, and what the family does
# its own way (tied embeddings or not, biases, fused projections, activations)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),  # qkv biases
    "mistral": ("MistralConfig", "MistralForCausalLM", {"tie_word_embeddings": False}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM",  # scaled embeddings, GeLU, tied
              {"tie_word_embeddings": True, "hidden_act": "gelu_pytorch_tanh"}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",  # fused query_key_value, partial rotary
                 {"tie_word_embeddings": False, "rotary_pct": 0.25,
                  "use_parallel_residual": True}),
}


def arch_config(arch: str, size: str, max_positions: int = 1024):
    """(config, tokenizer) of a preset size in model family ``arch`` (see ARCHS)."""
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r}: choose one of {', '.join(ARCHS)}")
    if arch == "llama":
        return llama_config(size, max_positions, **ARCHS["llama"][2])
    base, tokenizer = llama_config(size, max_positions)
    config_cls, _, extra = ARCHS[arch]
    common = {k: getattr(base, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "max_position_embeddings", "eos_token_id", "pad_token_id",
        "bos_token_id")}
    if arch != "gpt_neox":
        common.update(num_key_value_heads=base.num_key_value_heads, head_dim=base.head_dim)
    cfg = getattr(transformers, config_cls)(**common, **extra)
    return cfg, tokenizer


def build_model(out_dir: str | Path, size: str = "tiny", seed: int = 0, max_positions: int = 1024,
                arch: str = "llama"):
    """Write a random-init model of family ``arch`` (Llama by default) and its tokenizer to
    ``out_dir``; returns the path."""
    import torch
    import transformers

    cfg, tokenizer = arch_config(arch, size, max_positions)
    torch.manual_seed(seed)
    model = getattr(transformers, ARCHS[arch][1])(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    log.info("wrote %s %s (%.2fM parameters, vocab %d) to %s", size, arch, n / 1e6,
             cfg.vocab_size, out)
    return out
