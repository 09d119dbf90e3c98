"""LoRA on a trainable role (``policy.lora``, ``critic.lora``), with peft.

The role's model gets low-rank adapters on the configured linear layers and only those (and a
classifier's head) train; the base weights stay frozen. What leaves the trainer is always the
plain model's view of the weights:

* weight sync and the merged checkpoint carry each adapted layer's base weight plus its
  adapters' update (``W + B @ A * alpha / r``) under the layer's own name, so engines and
  later stages load a plain Hugging Face model and never see an adapter;
* the reference can be the same module with its adapters switched off (``reference.from:
  policy_base``), which is exactly the starting policy, so no second copy is held.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch

# the heads a classifier's adapters leave whole and train fully (they start new); GPT-NeoX's
# token classifier calls its head "classifier"
HEADS = {"causal": None, "classifier": ["score", "classifier"]}


def apply_lora(model: torch.nn.Module, lora_cfg, kind: str = "causal") -> torch.nn.Module:
    """``model`` wrapped by peft with the adapters of ``lora_cfg`` (a LoraConfig section);
    ``kind``: "causal" (an LM, whose output head is never adapted) or "classifier" (a
    reward or value model, whose ``score`` head trains in full)."""
    from peft import LoraConfig, get_peft_model
    targets = lora_cfg.target_modules
    config = LoraConfig(
        r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        modules_to_save=HEADS[kind], exclude_modules=HEADS[kind])
    model = get_peft_model(model, config)
    if getattr(model, "is_gradient_checkpointing", False):
        model.enable_input_require_grads()  # the frozen embeddings' output must carry grads
    return model


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
    """The adapters' (and trained heads') tensors as peft saves them, on rank 0 (None
    elsewhere), gathered under ZeRO-3."""
    from peft import get_peft_model_state_dict
    params = [p for p in module.parameters() if p.requires_grad]
    with _gatherer(zero3)(params):
        state = get_peft_model_state_dict(module) if rank == 0 else None
        return {k: v.detach().clone() for k, v in state.items()} if state is not None else None
