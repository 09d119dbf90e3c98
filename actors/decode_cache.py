"""The KV cache of the hf rollout engine's decoding loop (actors/rollout_hf.py ``_decode``).

transformers' default cache grows each layer's keys and values by concatenation, so every
decoding step copies the whole cache again; its static cache is allocated once but hands the
attention its full length at every step, so a step attends over (and reads) every slot,
filled or not. :class:`FilledLayer` does neither: its keys and values are allocated once for
the call's longest row and each step returns a view of the slots filled so far.

Rows that repeat a prompt (a GRPO group's n samples) share their prefill: the prompt goes
through the model once and the cache is then widened to one row per sample
(:meth:`FilledLayer.batch_select_indices`, which transformers' own layers also have).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class FilledLayer(DynamicLayer):
    """One attention layer's keys and values, allocated once for ``capacity`` positions."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        rows, heads = key_states.shape[:2]
        self._keys = key_states.new_empty(rows, heads, self.capacity, key_states.shape[-1])
        self._values = value_states.new_empty(rows, heads, self.capacity, value_states.shape[-1])
        self._expose()
        self.is_initialized = True

    def _expose(self) -> None:
        self.keys = self._keys[:, :, :self.length]
        self.values = self._values[:, :, :self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise ValueError(f"decode cache: {end} positions do not fit the {self.capacity} "
                             f"allocated for this call")
        self._keys[:, :, self.length:end] = key_states
        self._values[:, :, self.length:end] = value_states
        self.length = end
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Rows ``indices`` of the cache (repeats allowed: this is how a shared prefill is
        widened to one row per sample)."""
        if self.is_initialized:
            self._keys = self._keys.index_select(0, indices)
            self._values = self._values.index_select(0, indices)
            self._expose()

    def reset(self) -> None:
        self.length = 0
        if self.is_initialized:
            self._expose()


def decode_cache(model, capacity: int) -> Cache:
    """A cache of :class:`FilledLayer` where every layer of ``model`` is plain full attention
    (what transformers' dynamic cache would give a :class:`DynamicLayer`); otherwise (sliding
    windows, linear attention) transformers' own dynamic cache, which knows those."""
    cache = DynamicCache(config=model.config)
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        return Cache(layers=[FilledLayer(capacity) for _ in cache.layers])
    return cache
