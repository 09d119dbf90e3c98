"""Small Llama-architecture models and BPE tokenizers built locally, with no model hub.

The tokenizer is trained with `tokenizers` on local text (the synthetic task's words plus
chat markup), carries a chat template, and is saved next to a randomly initialised
LlamaForCausalLM in Hugging Face format. Attention head_dim is 64, which vLLM's CPU
back-end accepts.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Chat:
    """A family's chat markup: template, its special tokens, the tokenizer's EOS, and every
    token that ends a reply (the generation config's EOS list)."""
    template: str
    special: tuple[str, ...]
    eos: str
    stops: tuple[str, ...]


# each family's markup in its own style, so that what differs between real checkpoints
# differs here too: the turn's end equal to EOS (ours, Mistral's </s>), an end token followed
# by a newline (ChatML), an end-of-turn token that is not the tokenizer's EOS (Gemma)
CHATS = {
    "ours": Chat(CHAT_TEMPLATE, (), "<|end|>", ("<|end|>",)),
    "chatml": Chat("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                   "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                   "{% endif %}", ("<|im_start|>", "<|im_end|>"), "<|im_end|>", ("<|im_end|>",)),
    "inst": Chat("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}</s>"
                 "{% else %}[INST] {{ m['content'] }} [/INST]{% endif %}{% endfor %}",
                 ("[INST]", "[/INST]", "</s>"), "</s>", ("</s>",)),
    "gemma": Chat("{% for m in messages %}<start_of_turn>"
                  "{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ m['content'] }}"
                  "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
                  "{% endif %}", ("<start_of_turn>", "<end_of_turn>", "<eos>"), "<eos>",
                  ("<eos>", "<end_of_turn>")),
}


def build_tokenizer(vocab_size: int, extra_text: list[str] | None = None, chat: str = "ours"):
    """Train a byte-level BPE tokenizer on the synthetic corpus (plus ``extra_text``) with the
    chat markup ``chat`` (see CHATS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    markup = CHATS[chat]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL + [
                                      t for t in markup.special if t not in SPECIAL],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(synthetic.corpus() + list(extra_text or []), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=markup.eos,
                                   pad_token="<|endoftext|>", bos_token=None)
    fast.chat_template = markup.template
    return fast


def stop_ids(tokenizer, chat: str = "ours") -> list[int]:
    """The ids that end a reply in markup ``chat`` (for the generation config)."""
    return tokenizer.convert_tokens_to_ids(list(CHATS[chat].stops))


def llama_config(size: str, max_positions: int = 1024, chat: str = "ours", **extra):
    """(LlamaConfig, tokenizer) of a preset size; ``extra`` goes into the config."""
    from transformers import LlamaConfig

    if size not in SIZES:
        raise ValueError(f"size {size!r}: choose one of {', '.join(SIZES)}")
    hidden, layers, heads, inter, vocab = SIZES[size]
    tokenizer = build_tokenizer(vocab, chat=chat)
    cfg = LlamaConfig(
        vocab_size=max(vocab, len(tokenizer)), hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=hidden // heads, max_position_embeddings=max_positions,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, torch_dtype="float32", **extra,
    )
    return cfg, tokenizer


# families other than Llama: transformers config class, model class, chat markup (CHATS), and
# what the family does its own way (tied embeddings or not, biases, fused projections,
# activations)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "ours", {"tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "chatml",  # qkv biases
              {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", "inst", {"tie_word_embeddings": False}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", "gemma",  # scaled embeddings, GeLU, tied
              {"tie_word_embeddings": True, "hidden_act": "gelu_pytorch_tanh"}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", "ours",  # fused query_key_value,
                 {"tie_word_embeddings": False, "rotary_pct": 0.25,  # partial rotary
                  "use_parallel_residual": True}),
}


def arch_config(arch: str, size: str, max_positions: int = 1024):
    """(config, tokenizer) of a preset size in model family ``arch`` (see ARCHS)."""
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r}: choose one of {', '.join(ARCHS)}")
    config_cls, _, chat, extra = ARCHS[arch]
    if arch == "llama":
        return llama_config(size, max_positions, chat, **extra)
    base, tokenizer = llama_config(size, max_positions, chat)
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
    stops = stop_ids(tokenizer, ARCHS[arch][2])
    model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    log.info("wrote %s %s (%.2fM parameters, vocab %d) to %s", size, arch, n / 1e6,
             cfg.vocab_size, out)
    return out
