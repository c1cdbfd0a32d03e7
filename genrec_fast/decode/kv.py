"""The beam search's KV cache: fixed buffers written in place, shared by the eager and the CUDA-graph paths.

``KVBuffer`` is an HF cache layer (a ``DynamicLayer``, so any model whose attention calls
``cache.update`` uses it unchanged) over a preallocated ``[rows, heads, capacity, head_dim]``
buffer: an append writes positions ``length .. length + q`` in place and returns views of the
first ``length + q`` positions, so no ``torch.cat`` of the whole cache happens per step and the
buffers' addresses never change (what a captured CUDA graph needs). Every beam's parent
belongs to the same prompt, whose B rows hold identical prompt positions, so a reorder only
gathers the generated tail (positions >= the prompt length).
"""
from __future__ import annotations

import functools
import inspect
from typing import List, Optional

import torch

try:  # transformers >= 4.54: per-layer cache objects
    from transformers.cache_utils import DynamicCache, DynamicLayer
except ImportError:  # pragma: no cover - older transformers: beam search uses cache.reorder_cache
    DynamicCache = DynamicLayer = None

HAS_LAYERED_CACHE = DynamicLayer is not None


if HAS_LAYERED_CACHE:

    class KVBuffer(DynamicLayer):
        """One layer's K/V in buffers with room for ``capacity`` positions (allocated by the first append
        when not given)."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.length, self.prompt_len = int(capacity), 0, 0
            self._k = self._v = None

        @classmethod
        def expanded(cls, layer: "DynamicLayer", repeats: int, extra: int) -> "KVBuffer":
            """A prompt's layer (rows P, n positions) copied to ``repeats`` rows each, with ``extra`` free positions."""
            n = layer.keys.shape[-2]
            buf = cls(n + extra)
            buf.expand_from(layer.keys, layer.values, repeats)
            return buf

        def _allocate(self, keys: torch.Tensor, values: torch.Tensor, rows: int) -> None:
            self.device = keys.device
            self._k = keys.new_empty((rows, keys.shape[1], self.capacity, keys.shape[-1]))
            self._v = values.new_empty((rows, values.shape[1], self.capacity, values.shape[-1]))
            self.is_initialized = True

        def set_length(self, n: int) -> None:
            """Positions ``< n`` hold valid K/V (the next append writes at ``n``)."""
            self.length = int(n)
            if self._k is not None:
                self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

        def expand_from(self, keys: torch.Tensor, values: torch.Tensor, repeats: int) -> None:
            """Row p * repeats + b of this buffer := row p of ``keys``/``values`` (positions ``:n``); length n.

            The n positions are the prompt: later reorders leave them alone.
            """
            rows, n = keys.shape[0], keys.shape[-2]
            if n > self.capacity:
                raise RuntimeError(f"KVBuffer: {n} prompt positions do not fit a buffer of {self.capacity}")
            if self._k is None:
                self._allocate(keys, values, rows * repeats)
            for buf, src in ((self._k, keys), (self._v, values)):
                buf.view(rows, repeats, *buf.shape[1:])[:, :, :, :n] = src[:, None]
            self.prompt_len = n
            self.set_length(n)

        def update(self, key_states, value_states, *args, **kwargs):
            if self._k is None:
                self._allocate(key_states, value_states, key_states.shape[0])
            end = self.length + key_states.shape[-2]
            if end > self.capacity:
                raise RuntimeError(f"KVBuffer full: {end} > {self.capacity} positions")
            self._k[:, :, self.length:end] = key_states
            self._v[:, :, self.length:end] = value_states
            self.set_length(end)
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def reorder_tail(self, index: torch.Tensor) -> None:
            """Rows := rows ``index`` on the generated positions ``prompt_len .. length``."""
            t = self.prompt_len
            self._k[:, :, t:self.length] = self._k[index, :, t:self.length]
            self._v[:, :, t:self.length] = self._v[index, :, t:self.length]

    def buffer_cache(layers: List["KVBuffer"]):
        """An HF ``DynamicCache`` whose layers are the given buffers."""
        cache = DynamicCache()
        cache.layers = list(layers)
        return cache


def expand_cache(cache, beams: int, extra: int) -> None:
    """P prompt rows -> P * beams rows (row p*beams + b is beam b of prompt p), ``extra`` free positions each."""
    layers = getattr(cache, "layers", None)
    if HAS_LAYERED_CACHE and layers and all(type(ly) is DynamicLayer and ly.keys is not None for ly in layers):
        cache.layers = [KVBuffer.expanded(ly, beams, extra) for ly in layers]
    else:
        cache.batch_repeat_interleave(beams)


def reorder_cache(cache, index: torch.Tensor) -> None:
    """Gather the cache rows of the chosen parent beams (``index``: flat row per beam)."""
    layers = getattr(cache, "layers", None)
    if HAS_LAYERED_CACHE and layers and all(type(ly) is KVBuffer for ly in layers):
        for ly in layers:
            ly.reorder_tail(index)
    else:
        cache.reorder_cache(index)


@functools.lru_cache(maxsize=None)
def _cache_arg(model_class: type) -> str:
    """transformers 5.2x names the cache argument/output ``cache``, earlier releases ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def forward(base, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], position_ids: torch.Tensor, cache):
    """One cached forward of the base transformer -> (cache, last position's hidden state [rows, H]).

    An sdpa (or flash-attention) model runs with :func:`decode_sdpa` as its attention for this call (see there)."""
    name = _cache_arg(type(base))
    with decode_attention(base.config):
        out = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                   **{name: cache})
    return getattr(out, name), out.last_hidden_state[:, -1]


# ---- one-token attention without repeating K/V ----------------------------------------------------
DECODE_SDPA = "genrec_fast_decode_sdpa"

try:  # transformers >= 4.53: named attention and mask functions
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError:  # pragma: no cover - older transformers: the model's own sdpa is used
    AttentionInterface = None


def _compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling and is_compiling())


def decode_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                **kwargs):
    """transformers' sdpa attention, except for one query token with grouped K/V heads (GQA) and a mask
    shared by all heads: the G query heads of each K/V head are stacked as G query positions
    ([R, H, 1, D] -> [R, H_kv, G, D]), so K/V are read as they are. transformers' sdpa path instead
    copies K/V to all H heads (``repeat_kv``) whenever a mask is given (5.17 does; 5.24 packs like
    this itself), which at decode sizes (R = prompts x beams rows, a prompt-long cache) was most of a
    step's GPU time. Same result: each query row attends to the K/V of its own head group under the
    same mask. Under torch.compile it defers to transformers, as transformers' own packing does."""
    groups = getattr(module, "num_key_value_groups", 1)
    shared_mask = attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1
                                             and attention_mask.shape[2] == 1)
    if (query.shape[2] != 1 or groups <= 1 or not shared_mask or kwargs.get("softcap") is not None
            or kwargs.get("position_bias") is not None or kwargs.get("output_attentions", False) or _compiling()):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    rows, heads, _, dim = query.shape
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(rows, heads // groups, groups, dim), key, value, attn_mask=attention_mask, dropout_p=dropout,
        scale=scaling)
    return out.reshape(rows, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


if AttentionInterface is not None:
    AttentionInterface.register(DECODE_SDPA, decode_sdpa)
    AttentionMaskInterface.register(DECODE_SDPA, sdpa_mask)  # the masks of "sdpa", so 2-D masks work as there


def _stock_sdpa() -> bool:
    """The functions registered as "sdpa" are transformers' own (a library that replaced them keeps its own:
    no swap then)."""
    return (AttentionInterface is not None and ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward
            and ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] is sdpa_mask)


def _config_tree(config) -> List:
    """``config`` and its sub-configs, recursively, each once."""
    out, seen, todo = [], set(), [config]
    while todo:
        c = todo.pop()
        if c is None or id(c) in seen:
            continue
        seen.add(id(c))
        out.append(c)
        todo += [getattr(c, k, None) for k in (getattr(c, "sub_configs", None) or {})]
    return out


def _swapped(impl) -> bool:
    """Attention implementations the search's forwards replace by :func:`decode_sdpa`: sdpa, and flash
    attention (the same attention; the search's padded, cached batches are tested on sdpa only)."""
    return impl == "sdpa" or (isinstance(impl, str) and impl.startswith("flash_attention"))


class decode_attention:  # noqa: N801 - a context manager used like a function
    """Within: every config of the model (sub-configs included) whose attention is "sdpa" or a flash
    attention uses :func:`decode_sdpa`; each is put back exactly after, the others are never touched.
    Set on the configs' stored value directly: the ``_attn_implementation`` setter would copy one value
    into every sub-config. A nested use finds nothing left to swap."""

    def __init__(self, config):
        self.saved = [(c, c._attn_implementation_internal) for c in _config_tree(config)
                      if _swapped(getattr(c, "_attn_implementation_internal", None))] if _stock_sdpa() else []

    def __enter__(self):
        for c, _ in self.saved:
            c._attn_implementation_internal = DECODE_SDPA

    def __exit__(self, *exc):
        for c, impl in self.saved:
            c._attn_implementation_internal = impl
        return False
