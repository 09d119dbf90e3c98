"""LoRA on a trainable role (``policy.lora``, ``critic.lora``), with peft.

The role's model gets low-rank adapters on the configured linear layers and only those (and a
classifier's head) train; the base weights stay frozen. What leaves the trainer is always the
plain model's view of the weights:

* weight sync and the merged checkpoint carry each adapted layer's base weight plus its
  adapters' update (``W + B @ A * alpha / r``) under the layer's own name, so engines and
  later stages load a plain Hugging Face model and never see an adapter;
* the reference can be the same module with its adapters switched off (``reference.from:
  policy_base``), which is exactly the starting policy, so no second copy is held;
* where the output head is the input embedding table (tied), adapters on the table change the
  head too (:func:`tie_head_to_embedding`), as the merged table does.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch

# the heads a classifier's adapters leave whole and train fully (they start new); GPT-NeoX's
# token classifier calls its head "classifier"
HEADS = {"causal": None, "classifier": ["score", "classifier"]}


def apply_lora(model: torch.nn.Module, lora_cfg, kind: str = "causal") -> torch.nn.Module:
    """``model`` wrapped by peft with the adapters of ``lora_cfg`` (a LoraConfig section);
    ``kind``: "causal" (an LM; a tied output head follows its table's adapters) or
    "classifier" (a reward or value model, whose ``score`` head trains in full)."""
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(
        r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
        target_modules=_targets(model, list(lora_cfg.target_modules), HEADS[kind]),
        modules_to_save=HEADS[kind], exclude_modules=HEADS[kind])
    with warnings.catch_warnings():
        # peft warns that adapters on a tied table leave the head as it is: handled below
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        model = get_peft_model(model, config)
    tie_head_to_embedding(model)
    if getattr(model, "is_gradient_checkpointing", False):
        model.enable_input_require_grads()  # the frozen embeddings' output must carry grads
    return model


def _targets(model: torch.nn.Module, names: list[str], heads: list[str] | None):
    """peft's ``target_modules`` for ``names``: "all-linear" alone as peft takes it; beside
    other names (``[all-linear, embed_tokens]``), spelled out as the name of every linear
    layer but the output head and the classifier heads."""
    if "all-linear" not in names:
        return names
    if names == ["all-linear"]:
        return "all-linear"
    head = model.get_output_embeddings()
    skip = set(heads or ())
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and m is not head}
    return sorted((linear - skip) | (set(names) - {"all-linear"}))


def tie_head_to_embedding(model: torch.nn.Module) -> None:
    """Where the output head is the input embedding table (tied embeddings) and the table has
    adapters, the head computes with the adapted table too: its logits gain ``h @ B @ A *
    scale``, the head-side product of the embedding adapter's update ``(B @ A)^T * scale``
    (peft adapts the input lookup alone). The model that trains is then the one a merged copy
    of the table (weight sync, checkpoints) describes. Under ZeRO-3 the head gathers the
    adapters as its own (DeepSpeed's external parameters)."""
    plain = plain_model(model)
    table, head = plain.get_input_embeddings(), plain.get_output_embeddings()
    if not (_adapted(table) and getattr(table, "lora_embedding_A", None) and head is not None
            and head.weight is table.base_layer.weight):
        return

    def adapted_head(_module, args, logits):
        if table.disable_adapters or table.merged:
            return logits     # off (the reference), or already inside the shared table
        hidden = args[0]
        for name in table.active_adapters:
            if name in table.lora_embedding_A:
                a, b = table.lora_embedding_A[name], table.lora_embedding_B[name]
                logits = logits + (hidden.to(b.dtype) @ b @ a * table.scaling[name]).to(
                    logits.dtype)
        return logits

    head.register_forward_hook(adapted_head)
    try:
        from deepspeed.zero import register_external_parameter
    except ImportError:
        return
    for params in (table.lora_embedding_A, table.lora_embedding_B):
        for param in params.values():
            register_external_parameter(head, param)


def is_lora(module: torch.nn.Module) -> bool:
    """A peft wrapper (what :func:`apply_lora` returns)."""
    return hasattr(module, "get_base_model") and hasattr(module, "disable_adapter")


def has_adapters(model: torch.nn.Module) -> bool:
    """Whether a transformers model holds peft layers (it is the inside of a peft wrapper)."""
    return any(_adapted(m) or _head(m) for m in model.modules())


def plain_model(module: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (the module itself otherwise)."""
    return module.get_base_model() if is_lora(module) else module


def base_weights(module: torch.nn.Module):
    """Context in which ``module`` computes with its base weights alone (adapters off)."""
    return module.disable_adapter() if is_lora(module) else nullcontext()


def _adapted(sub: torch.nn.Module) -> bool:
    """A peft LoRA layer wrapping a base layer."""
    return hasattr(sub, "lora_A") and hasattr(sub, "base_layer")


def _head(sub: torch.nn.Module) -> bool:
    """A peft wrapper of a fully trained module (``modules_to_save``)."""
    return hasattr(sub, "modules_to_save") and hasattr(sub, "original_module")


def _plain_of(sub: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) of the plain layer a peft wrapper stands for (before any merge)."""
    if _head(sub):
        return list(sub.modules_to_save[sub.active_adapters[0]].named_parameters())
    base = sub.base_layer
    return [("weight", base.weight)] + (
        [("bias", base.bias)] if getattr(base, "bias", None) is not None else [])


def _merged(sub: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name within ``sub``, tensor) of what ``sub`` would be as a plain layer: an adapted
    layer's weight with its active adapters' update added."""
    out = [(n, p.detach()) for n, p in _plain_of(sub)]
    if _head(sub) or getattr(sub, "merged", False):
        return out
    weight = out[0][1]
    for name in sub.active_adapters:
        if name in sub.lora_A or name in getattr(sub, "lora_embedding_A", {}):
            weight = weight + sub.get_delta_weight(name).to(weight.dtype)
    return [("weight", weight)] + out[1:]


def _units(model: torch.nn.Module):
    """The parameters of the plain model ``model`` stands for, a module at a time, in its
    ``named_parameters`` order: (name prefix, the parameters to gather, the plain (name,
    parameter) list, the peft wrapper or None). A wrapper is one unit, adapters included."""
    seen: set[int] = set()
    skip: tuple[str, ...] = ()
    for prefix, sub in model.named_modules():
        if skip and prefix.startswith(skip):
            continue
        dot = f"{prefix}." if prefix else ""
        if _adapted(sub) or _head(sub):
            skip = (dot,)
            params = list(sub.parameters())
            seen.update(id(p) for p in params)
            yield dot, params, _plain_of(sub), sub
            continue
        own = [(n, p) for n, p in sub.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in own)
        if own:
            yield dot, [p for _, p in own], own, None


def plain_parameters(model: torch.nn.Module, zero3: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(module name, tensor) of the plain model a LoRA-wrapped transformers ``model`` stands
    for, in its ``named_parameters`` order: adapted layers merged, adapters and peft's copies
    of the heads left out. Under ZeRO-3 each layer's parameters (base and adapters together)
    are gathered just before they are yielded (a collective: every rank iterates this)."""
    gather = _gatherer(zero3)
    for dot, params, plain, wrapper in _units(model):
        with gather(params):
            tensors = _merged(wrapper) if wrapper is not None else [
                (n, p.detach()) for n, p in plain]
            for name, tensor in tensors:
                yield dot + name, tensor


def plain_shapes(model: torch.nn.Module) -> list[tuple[str, torch.dtype, list[int]]]:
    """(module name, dtype, full shape) of :func:`plain_parameters`' tensors; reads no data."""
    return [(dot + n, p.dtype, _full_shape(p)) for dot, _, plain, _ in _units(model)
            for n, p in plain]


def _full_shape(p: torch.Tensor) -> list[int]:
    return list(getattr(p, "ds_shape", p.shape))


def _gatherer(zero3: bool):
    if not zero3:
        return lambda params: nullcontext()
    import deepspeed

    @contextmanager
    def gather(params):
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    return gather


def trained_state(module: torch.nn.Module, zero3: bool, rank: int) -> dict | None:
    """The adapters' (and trained heads') tensors under the wrapper's own state-dict names, on
    rank 0 (None elsewhere), gathered under ZeRO-3: what peft's ``save_pretrained(...,
    state_dict=)`` takes, which picks and renames them itself (a dict it had renamed once
    already would lose a trained head's weights)."""
    params = [p for p in module.parameters() if p.requires_grad]
    with _gatherer(zero3)(params):
        if rank != 0:
            return None
        return {k: v.detach().clone() for k, v in module.state_dict().items()
                if "lora_" in k or ".modules_to_save." in k}
