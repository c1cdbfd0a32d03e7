"""The beam search's KV cache: fixed buffers written in place, shared by the eager and the CUDA-graph paths.

``KVBuffer`` is an HF cache layer (a ``DynamicLayer``, so any model whose attention calls
``cache.update`` uses it unchanged) over a preallocated ``[rows, heads, capacity, head_dim]``
buffer: an append writes positions ``length .. length + q`` in place and returns views of the
first ``length + q`` positions, so no ``torch.cat`` of the whole cache happens per step and the
buffers' addresses never change (what a captured CUDA graph needs). Every beam's parent
belongs to the same prompt, whose B rows hold identical prompt positions, so a reorder only
gathers the generated tail (positions >= the prompt length).

``SharedPrefixLayer`` (``beam_search(..., shared_prefix=True)``) goes further: the prompt's K/V are never
copied per beam (they stay in the prefill's own layer, once per prompt) and each beam row holds only its
L - 1 generated positions; those forwards attend with :func:`shared_prefix_attention`
(``genrec_fast.ops.cascade.cascade_attention``: the prompt part read once for all B x G query rows of a
prompt, merged with each row's tail by log-sum-exp).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from genrec_fast.model import cache_arg
from genrec_fast.ops.cascade import cascade_attention

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

    class SharedPrefixLayer(DynamicLayer):
        """One layer's K/V for the beam steps of ``beam_search(..., shared_prefix=True)``: the prompt's K/V
        stay where the prefill wrote them, ONCE per prompt (``source.keys`` / ``source.values``, [P, Hkv, T,
        D], read at attention time), and each of the P * B beam rows owns a tail buffer of ``capacity``
        (= L - 1) positions for its generated tokens. ``update`` appends to the tails and returns the tail
        views; the attention (:func:`shared_prefix_attention`, set for these forwards by :func:`forward`)
        reads the prompt from here. A reorder gathers the tails only; nothing is ever expanded per beam.
        ``prefix_mask`` [P, T] bool: the prompt keys that are attended (False at left padding)."""

        def __init__(self, source, prefix_mask: torch.Tensor, beams: int, capacity: int, backend: str = "auto"):
            super().__init__()
            self.source, self.prefix_mask, self.beams, self.capacity = source, prefix_mask, int(beams), int(capacity)
            self.backend, self.tail_len = backend, 0
            self._k = self._v = None

        @property
        def prefix_k(self) -> torch.Tensor:
            return self.source.keys

        @property
        def prefix_v(self) -> torch.Tensor:
            return self.source.values

        def set_tail_length(self, n: int) -> None:
            """Tail positions ``< n`` hold valid K/V (the next append writes at ``n``)."""
            self.tail_len = int(n)
            if self._k is not None:
                self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

        def update(self, key_states, value_states, *args, **kwargs):
            if self._k is None:  # first append (outside a capture: the graph path warms up first)
                self.device = key_states.device
                self._k = key_states.new_empty((key_states.shape[0], key_states.shape[1], self.capacity,
                                                key_states.shape[-1]))
                self._v = value_states.new_empty((value_states.shape[0], value_states.shape[1], self.capacity,
                                                  value_states.shape[-1]))
                self.is_initialized = True
            end = self.tail_len + key_states.shape[-2]
            if end > self.capacity:
                raise RuntimeError(f"SharedPrefixLayer: tail full, {end} > {self.capacity} generated positions")
            self._k[:, :, self.tail_len:end] = key_states
            self._v[:, :, self.tail_len:end] = value_states
            self.set_tail_length(end)
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.source.keys.shape[-2] + self.tail_len

        def reorder_tail(self, index: torch.Tensor) -> None:
            """Rows := rows ``index`` on the generated positions (the prompt is per prompt: nothing to move)."""
            if self._k is not None and self.tail_len:
                n = self.tail_len
                self._k[:, :, :n] = self._k[index, :, :n]
                self._v[:, :, :n] = self._v[index, :, :n]

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


def shared_prefix_cache(prompt_cache, prefix_mask: torch.Tensor, beams: int, extra: int, backend: str = "auto"):
    """A cache of :class:`SharedPrefixLayer` over the prompt layers of ``prompt_cache`` (plain ``DynamicLayer``s
    or ``KVBuffer``s of the P prompts: their K/V are used in place, not copied), ``extra`` tail positions per
    beam row."""
    layers = getattr(prompt_cache, "layers", None)
    if not (HAS_LAYERED_CACHE and layers and all(type(ly) in (DynamicLayer, KVBuffer) and ly.keys is not None
                                                 for ly in layers)):
        kinds = sorted({type(ly).__name__ for ly in layers or ()}) or [type(prompt_cache).__name__]
        raise ValueError(f"beam_search(shared_prefix=True): the prefill made a cache of {kinds}; the shared-prefix "
                         "path needs full-attention DynamicLayer caches (transformers >= 4.54)")
    return buffer_cache([SharedPrefixLayer(ly, prefix_mask, beams, extra, backend) for ly in layers])


def is_shared_prefix(cache) -> bool:
    layers = getattr(cache, "layers", None)
    return bool(HAS_LAYERED_CACHE and layers and all(type(ly) is SharedPrefixLayer for ly in layers))


def reorder_cache(cache, index: torch.Tensor) -> None:
    """Gather the cache rows of the chosen parent beams (``index``: flat row per beam)."""
    layers = getattr(cache, "layers", None)
    if is_shared_prefix(cache) or (HAS_LAYERED_CACHE and layers and all(type(ly) is KVBuffer for ly in layers)):
        for ly in layers:
            ly.reorder_tail(index)
    else:
        cache.reorder_cache(index)


def right_aligned(input_ids: torch.Tensor, mask: torch.Tensor):
    """Padded prompts [P, T] (left padded, or with holes) -> (ids with each prompt's tokens first, in order, then
    the padding; valid [P, T] bool, True on those first n_p positions; n_p = lengths [P]).

    The search prefills prompts so: with the padding after every real token, the causal mask alone keeps each
    real query off it, so the prefill needs no padding mask (sdpa runs its causal kernels, no [P, 1, T, T] mask is
    built), and the real tokens keep the positions 0 .. n_p - 1 they have under left padding. The padding's K/V
    are then masked in the steps (``valid``), the prompt's last hidden state is read at n_p - 1. The padding
    positions repeat the prompt's last token (not the pad id: HF warns about a pad id at either end of ``input_ids``
    when no mask is given)."""
    order = torch.sort((mask == 0).to(torch.int8), dim=1, stable=True).indices  # real tokens first, in order
    lengths = mask.sum(-1)
    valid = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
    ids = input_ids.gather(1, order)
    return torch.where(valid, ids, ids.gather(1, (lengths - 1).clamp_min(0)[:, None])), valid, lengths


def forward(base, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], position_ids: torch.Tensor, cache,
            last: Optional[torch.Tensor] = None):
    """One cached forward of the base transformer -> (cache, the hidden state [rows, H] of each row's position
    ``last`` [rows] (None: the last position)).

    An sdpa (or flash-attention) model runs with :func:`decode_sdpa` as its attention for this call (see there);
    on a cache of :class:`SharedPrefixLayer` every layer runs :func:`shared_prefix_attention` instead and
    ``attention_mask`` is replaced by a placeholder (the layers hold the prompt mask)."""
    name = cache_arg(type(base))
    if is_shared_prefix(cache):  # every layer attends through shared_prefix_attention; the mask is the layers'
        ctx = shared_prefix_forward(base.config, cache)
        attention_mask = _placeholder_mask(cache)
    else:
        ctx = decode_attention(base.config)
    with ctx:
        out = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                   **{name: cache})
    hidden = out.last_hidden_state
    if last is None:
        return getattr(out, name), hidden[:, -1]
    return getattr(out, name), hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


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


# ---- shared-prefix attention (beam_search(..., shared_prefix=True)) -----------------------------------
SHARED_PREFIX = "genrec_fast_shared_prefix"
_active_shared = []  # the SharedPrefixLayer list of the forward running now (a stack: one entry per forward)


def _placeholder_mask(cache) -> torch.Tensor:
    """A 4-D mask given to the model so that none of transformers' mask code runs (a 4-D mask is passed on as
    it is, in every release); :func:`shared_prefix_attention` ignores it and reads ``prefix_mask``. Made once
    per cache (a captured graph may hold it)."""
    if getattr(cache, "_genrec_placeholder", None) is None:
        ly = cache.layers[0]
        cache._genrec_placeholder = ly.prefix_mask.new_zeros((1, 1, 1, 1), dtype=ly.prefix_k.dtype)
    return cache._genrec_placeholder


def check_shared_prefix(config, who: str = "beam_search") -> None:
    """Raise ValueError naming why the model cannot run the shared-prefix decode (every attention layer must
    be a full-attention sdpa / flash one: all of them are replaced by :func:`shared_prefix_attention`); ``who``:
    the function asked for it."""
    who = f"{who}(shared_prefix=True)"
    if not HAS_LAYERED_CACHE or AttentionInterface is None:
        raise ValueError(f"{who} needs transformers >= 4.54 (per-layer caches, AttentionInterface)")
    impls = {getattr(c, "_attn_implementation_internal", None) for c in _config_tree(config)} - {None}
    bad = sorted(str(i) for i in impls if not _swapped(i))
    if bad or not impls:
        raise ValueError(f"{who} needs sdpa (or flash) attention in every config, the model has "
                         f"{sorted(str(i) for i in impls)}")
    check_full_attention(config, who)


def check_full_attention(config, who: str) -> None:
    """Raise ValueError (naming ``who``) when a layer of ``config`` is not full attention: a sliding window per
    layer (layer_types), switched on (use_sliding_window), or always on where the config has no switch
    (Mistral, Phi-3: sliding_window set means it is used)."""
    layer_types = getattr(config, "layer_types", None) or ()
    window = getattr(config, "use_sliding_window", getattr(config, "sliding_window", None) is not None)
    if any(t != "full_attention" for t in layer_types) or window:
        raise ValueError(f"{who} supports full-attention layers only (layer_types={sorted(set(layer_types))}, "
                         f"sliding_window={getattr(config, 'sliding_window', None)}, use_sliding_window="
                         f"{getattr(config, 'use_sliding_window', None)})")


class shared_prefix_forward:  # noqa: N801 - a context manager used like a function
    """Within: every config of the model uses :func:`shared_prefix_attention` (put back exactly after) and it
    reads the layers of ``cache``."""

    def __init__(self, config, cache):
        check_shared_prefix(config)
        self.layers = cache.layers
        self.saved = [(c, c._attn_implementation_internal) for c in _config_tree(config)
                      if _swapped(getattr(c, "_attn_implementation_internal", None))]

    def __enter__(self):
        _active_shared.append(self.layers)
        for c, _ in self.saved:
            c._attn_implementation_internal = SHARED_PREFIX

    def __exit__(self, *exc):
        for c, impl in self.saved:
            c._attn_implementation_internal = impl
        _active_shared.pop()
        return False


def shared_prefix_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                            is_causal=None, **kwargs):
    """The attention of a shared-prefix beam step: one query token per beam row over its prompt's K/V (once
    per prompt, in the layer) and its own tail (``key``/``value``: what ``SharedPrefixLayer.update`` just
    returned), by ``genrec_fast.ops.cascade.cascade_attention``. ``attention_mask`` is a placeholder: the
    prompt mask is the layer's, the tail is attended entirely."""
    idx = getattr(module, "layer_idx", None)
    where = f"shared_prefix_attention ({type(module).__name__}, layer {idx})"
    if not _active_shared or idx is None or not 0 <= idx < len(_active_shared[-1]):
        raise RuntimeError(f"{where}: called outside a shared-prefix beam step, or the module has no layer_idx")
    layer = _active_shared[-1][idx]
    if key is not layer.keys or value is not layer.values:
        raise RuntimeError(f"{where}: key/value are not the tails the cache layer just returned (the model "
                           "changes them between cache.update and attention); use shared_prefix=False")
    unsupported = [k for k in ("softcap", "position_bias", "sliding_window", "s_aux") if kwargs.get(k) is not None]
    if query.shape[2] != 1 or dropout or kwargs.get("output_attentions") or unsupported:
        raise RuntimeError(f"{where}: supports one query token, no dropout and no {unsupported or 'extra terms'} "
                           f"(query {tuple(query.shape)}, dropout {dropout})")
    rows, heads, _, dim = query.shape
    P = layer.prefix_k.shape[0]
    q = query[:, :, 0].unflatten(0, (P, layer.beams))
    out = cascade_attention(q, layer.prefix_k, layer.prefix_v, layer.prefix_mask, key.unflatten(0, (P, layer.beams)),
                            value.unflatten(0, (P, layer.beams)), scale=scaling, backend=layer.backend)
    return out.reshape(rows, 1, heads, dim), None


if AttentionInterface is not None:
    # no mask function under this name: the search gives these forwards a 4-D placeholder mask
    AttentionInterface.register(SHARED_PREFIX, shared_prefix_attention)
