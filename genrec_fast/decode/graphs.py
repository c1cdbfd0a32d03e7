"""CUDA graphs for beam_search's model forwards (``beam_search(..., cuda_graphs=True)``).

Why: at decode sizes an eager HF forward of a 24-layer model is bound by Python and kernel
launches, not by the GPU (on an H200, Qwen2.5-0.5B shapes, 8 prompts x 50 beams: about 20 ms a
forward whatever the batch), and a search is one prefill plus L - 1 one-token steps. Replaying
captured graphs removes that host cost.

What is captured, per (model, prompts P, beams B, bucketed prompt width T, levels L):
- the prefill graph: the forward of the P prompts into static ``KVBuffer`` layers, then the copy of
  each prompt's K/V into its B beam rows;
- one graph per level l = 1 .. L-1: the reorder of the generated tail by parent beam, then the
  one-token forward of the P*B beams;
- or, with ``graph_scope="search"`` (``GraphForward.search``), ONE graph of the whole search: the same prefill
  and step functions with each level's scoring and top-k between them (the search's own code, handed in), so
  a search is one replay.
With ``shared_prefix=True`` (``kv.SharedPrefixLayer``) the prefill graph copies nothing: the step graphs'
layers read the prompts' K/V from the prefill's own buffers (P rows, not P*B), the beam rows hold only
their L - 1 generated positions, the reorder moves those, and the attention is
``ops.cascade.cascade_attention`` (the Triton kernel is captured like any other launch); the steps take no
4-D masks, only a static [P, T] prompt mask.
Everything a graph reads lives in static buffers that are refilled before each replay: token ids,
the index of each prompt's last token, step positions, the parent index and the steps' additive 4-D attention
masks. HF uses a 4-D mask as given, so no data-dependent mask code (``padding_mask.all()`` ...) runs inside a
capture. The prefill takes no mask at all: each prompt's tokens come first (``kv.right_aligned``), so the causal
mask alone keeps real queries off the padding after them (sdpa's causal path; no [P, 1, T, T] mask exists), its
real tokens sit at positions 0 .. n_p - 1 as under left padding, and its hidden state is read at n_p - 1.
Prompts are padded to a multiple of ``bucket`` tokens so batches of nearby widths share graphs; the padding
changes nothing for real positions (the steps mask its K/V).

Capture protocol (``_Graph.run``): the first call of a graph runs its function once eagerly on a
side stream (warm-up; the parent index set to the identity, so the non-idempotent tail reorder
leaves the cache as it was), captures it, sets the real inputs again, then replays it; later
calls only replay. In
``mode="emulate"`` (CPU tests) the same sequence runs with the function called where the capture
and the replays would be, so the protocol itself is tested without a GPU.

Graph sets are kept per model in an LRU of ``GRAPH_SETS`` entries (``clear_graphs()`` drops them);
a set holds its KV buffers (P*B x layers x 2 x kv_heads x (T + L - 1) x head_dim values; with shared_prefix
P x T + P*B x (L - 1) positions instead of P*B x (T + L - 1)) until evicted.
The key includes the autocast state (a graph replays the dtypes it was captured with) and the
parameters' addresses; in-place weight updates (optimizer steps) are read by the replays.
"""
from __future__ import annotations

import collections
import contextlib
import weakref
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from genrec_fast.decode import kv
from genrec_fast.model import lm_modules
from genrec_fast.ops.backend import resolve_backend

GRAPH_SETS = 4  # graph sets (shapes) kept per model
MODES = ("cuda", "emulate")
_SUPPORTED_ATTENTION = ("sdpa", "eager")

_sets: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def clear_graphs(model=None) -> None:
    """Drop the captured graphs (and free their buffers) of ``model`` (the causal LM, a PEFT wrapper or its
    base transformer: graphs are kept per base transformer), or of every model when None."""
    if model is None:
        keys = list(_sets.keys())
    else:
        keys = [model]
        if model not in _sets:
            try:
                keys.append(lm_modules(model)[0])
            except (ValueError, AttributeError):  # not a causal LM: only ``model`` itself can be a key
                pass
    for key in keys:
        for graph_set in (_sets.pop(key, None) or {}).values():
            graph_set.close()


def check_supported(base) -> None:
    """Raise ValueError naming why ``base`` cannot run the graph path (the eager path still can)."""
    if not kv.HAS_LAYERED_CACHE:
        raise ValueError("beam_search(cuda_graphs=True) needs transformers >= 4.54 (per-layer cache objects)")
    cfg = base.config
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in _SUPPORTED_ATTENTION:
        raise ValueError(f"beam_search(cuda_graphs=True) needs attn_implementation in {_SUPPORTED_ATTENTION} "
                         f"(4-D attention masks), the model has {impl!r}")
    kv.check_full_attention(cfg, "beam_search(cuda_graphs=True)")
    for name in ("rope_parameters", "rope_scaling"):
        rope = getattr(cfg, name, None)
        kind = str(rope.get("rope_type", rope.get("type", ""))) if isinstance(rope, dict) else ""
        if "dynamic" in kind:
            raise ValueError(f"beam_search(cuda_graphs=True): {name} rope_type {kind!r} recomputes its frequencies "
                             "from the sequence length on the host, which a captured graph cannot follow")


def _autocast_without_cache():
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


def _autocast_state(device: torch.device):
    return (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))


def _fingerprint(base) -> int:
    """Changes when a parameter is re-allocated (``model.to``, ...): captured graphs read weights by address;
    and with the PEFT adapter state (active adapters, disabled or not), which a capture bakes in."""
    return hash((tuple(p.data_ptr() for p in base.parameters()), adapter_state(base)))


def adapter_state(module) -> tuple:
    """What of ``module``'s PEFT adapters changes its output without touching a parameter: per adapter
    layer the active adapters, whether adapters are disabled, and the LoRA scales (captured graphs bake
    the scale in as a constant). Empty without peft."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer  # lazy: peft is optional (the 'lora' extra)
    except ImportError:  # no peft: no adapters
        return ()
    return tuple((tuple(m.active_adapters), bool(m.disable_adapters), tuple(sorted(getattr(m, "scaling", {}).items())))
                 for m in module.modules() if isinstance(m, BaseTunerLayer))


class _Graph:
    """One captured function; ``run()`` warms up and captures on first use, then replays."""

    def __init__(self, name: str, fn: Callable[[], torch.Tensor], mode: str, pool, warmup: Callable[[], None]):
        self.name, self.fn, self.mode, self.pool, self.warmup = name, fn, mode, pool, warmup
        self.graph = None
        self.out: Optional[torch.Tensor] = None

    def release(self) -> None:
        """Drop the captured graph, its outputs and its functions (which refer back to their GraphForward)."""
        self.graph = self.out = self.fn = self.warmup = None

    def run(self, restore: Callable[[], None]) -> torch.Tensor:
        if self.out is None:  # first use: warm-up (on the identity), capture, then the real run below
            self.warmup()
            if self.mode == "cuda":
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    self.fn()
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                try:  # autocast's weight-cast cache must not hold graph-pool tensors past the capture
                    with torch.cuda.graph(graph, pool=self.pool), _autocast_without_cache():
                        out = self.fn()
                except RuntimeError as err:
                    raise RuntimeError(f"beam_search: capturing the {self.name} forward as a CUDA graph failed "
                                       f"({err}); run it with cuda_graphs=False") from err
                self.graph, self.out = graph, out
            else:
                self.out = self.fn()
            restore()
        if self.mode == "cuda":
            self.graph.replay()
            return self.out
        self.out = self.fn()
        return self.out


class GraphForward:
    """The prefill and the L - 1 step forwards of one search shape, run from static buffers."""

    def __init__(self, base, P: int, B: int, T: int, L: int, device: torch.device, mode: str,
                 shared_prefix: bool = False, backend: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"GraphForward: mode must be one of {MODES}, got {mode!r}")
        # weakly: the per-model cache (a WeakKeyDictionary keyed by the model) must not keep the model alive
        self._base = weakref.ref(base)
        self.P, self.B, self.T, self.L, self.mode = P, B, T, L, mode
        dtype = next(base.parameters()).dtype
        self.dtype, self.min = dtype, torch.finfo(dtype).min
        R = P * B
        self.ids = torch.zeros((P, T), dtype=torch.long, device=device)  # each prompt's tokens first (right padded)
        self.pos = torch.arange(T, device=device).expand(P, T)  # positions 0 .. n_p - 1 of the real tokens
        self.last = torch.zeros(P, dtype=torch.long, device=device)  # n_p - 1: where the prefill's hidden is read
        self.tok = torch.zeros((R, 1), dtype=torch.long, device=device)
        self.index = torch.arange(R, device=device)
        self.identity = torch.arange(R, device=device)
        self.step_pos = [None] + [torch.zeros((R, 1), dtype=torch.long, device=device) for _ in range(1, L)]
        # (shared prefix: no per-beam masks; the attention reads the [P, T] prompt mask of the layers)
        self.step_mask4 = [None] + [None if shared_prefix
                                    else torch.zeros((R, 1, 1, T + lvl), dtype=dtype, device=device)
                                    for lvl in range(1, L)]
        self.shared_prefix = bool(shared_prefix)
        self.pre_layers = [kv.KVBuffer(T) for _ in range(base.config.num_hidden_layers)]
        if self.shared_prefix:  # the prompts' K/V stay in the prefill's buffers; the beam rows hold their tails
            self.prefix_mask = torch.zeros((P, T), dtype=torch.bool, device=device)
            self.beam_layers = [kv.SharedPrefixLayer(pre, self.prefix_mask, B, L - 1, backend)
                                for pre in self.pre_layers]
        else:
            self.beam_layers = [kv.KVBuffer(T + L - 1) for _ in range(base.config.num_hidden_layers)]
        self.pre_cache, self.beam_cache = kv.buffer_cache(self.pre_layers), kv.buffer_cache(self.beam_layers)
        self.pool = torch.cuda.graph_pool_handle() if mode == "cuda" else None
        self.prefill_graph = _Graph("prefill", self._prefill, mode, self.pool, warmup=lambda: None)
        self._step_fns = [None] + [self._stepper(lvl) for lvl in range(1, L)]
        # warm-up with the identity parent index: the tail reorder is not idempotent
        self.step_graphs = [None] + [_Graph(f"level-{lvl} step", self._step_fns[lvl], mode, self.pool,
                                            warmup=lambda: self.index.copy_(self.identity)) for lvl in range(1, L)]
        self.search_graph: Optional[tuple] = None  # (key, _Graph) of the whole search (graph_scope="search")

    def close(self) -> None:
        """Free the graphs and buffers now (the captured functions refer back to this object, so without
        this they would wait for the garbage collector)."""
        for g in [self.prefill_graph, *self.step_graphs, self.search_graph and self.search_graph[1]]:
            if g is not None:
                g.release()
        self.prefill_graph, self.step_graphs, self.search_graph, self._step_fns = None, [], None, []
        self.pre_layers = self.beam_layers = self.pre_cache = self.beam_cache = None
        self.ids = self.pos = self.last = self.tok = self.index = self.identity = self.prefix_mask = None
        self.step_pos = self.step_mask4 = []

    @property
    def base(self):
        base = self._base()
        if base is None:
            raise RuntimeError("GraphForward: its model has been freed")
        return base

    # ---- captured functions: read and write static buffers only --------------------------------
    def _prefill(self) -> torch.Tensor:
        for ly in self.pre_layers:
            ly.set_length(0)
        _, hidden = kv.forward(self.base, self.ids, None, self.pos, self.pre_cache, last=self.last)
        if not self.shared_prefix:
            for pre, beam in zip(self.pre_layers, self.beam_layers):
                beam.expand_from(pre.keys, pre.values, self.B)
        return hidden

    def _stepper(self, level: int) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            for ly in self.beam_layers:
                if self.shared_prefix:
                    ly.set_tail_length(level - 1)
                else:
                    ly.set_length(self.T + level - 1)
                if level > 1:
                    ly.reorder_tail(self.index)
            # shared prefix: kv.forward gives the model its placeholder mask (the layers hold prefix_mask)
            _, hidden = kv.forward(self.base, self.tok, self.step_mask4[level], self.step_pos[level], self.beam_cache)
            return hidden
        return step

    def _inner_step(self, level: int, token: torch.Tensor, parent_rows: Optional[torch.Tensor]) -> torch.Tensor:
        """A level's step inside the search graph: its inputs are copied into the step's static buffers on the
        device (they were computed earlier in the same graph), then the step function runs."""
        self.tok.copy_(token.reshape(-1, 1))
        if parent_rows is not None:
            self.index.copy_(parent_rows)
        return self._step_fns[level]()

    # ---- the search's calls ----------------------------------------------------------------------
    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Fill the static inputs from a left-padded [P, t <= T] batch and run the prefill -> hidden [P, H]."""
        self._fill(input_ids, mask)
        return self.prefill_graph.run(restore=lambda: None)

    def search(self, input_ids: torch.Tensor, mask: torch.Tensor, key: tuple,
               body: Callable[[Callable, torch.Tensor], tuple]) -> tuple:
        """The whole search as ONE graph (``graph_scope="search"``): fill the static inputs from a left-padded
        [P, t <= T] batch, then run ``body(step, hidden)``, the search's levels from the prefill's hidden states
        (``step(level, token, parent_rows)`` runs a level's forward), captured on first use together with the
        prefill and the steps, so a replay runs the forwards, the scoring and the top-k with nothing on the host
        in between. ``key`` names what else ``body`` reads (head and trie tensors, scoring choices): another key
        replaces the captured search. Returns ``body``'s outputs (on CUDA: the graph's own buffers, overwritten
        by the next replay). The body is idempotent (the prefill rewrites the K/V, each step its tail position,
        and the reorders use the parents found in the same run), so its warm-up needs no reset."""
        self._fill(input_ids, mask)
        if self.search_graph is None or self.search_graph[0] != key:
            if self.search_graph is not None:
                self.search_graph[1].release()
            graph = _Graph("search", lambda: body(self._inner_step, self._prefill()), self.mode, self.pool,
                           warmup=lambda: None)
            self.search_graph = (key, graph)
        return self.search_graph[1].run(restore=lambda: None)

    def _fill(self, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
        T, B = self.T, self.B
        pad = T - input_ids.shape[1]
        ids, key_ok, lengths = kv.right_aligned(F.pad(input_ids, (pad, 0)), F.pad(mask, (pad, 0)))
        self.ids.copy_(ids)
        self.last.copy_(lengths - 1)
        if self.shared_prefix:
            self.prefix_mask.copy_(key_ok)
        lengths = lengths.repeat_interleave(B)[:, None]
        prompt_mask = torch.where(key_ok, 0.0, self.min).to(self.dtype).repeat_interleave(B, dim=0)
        for level in range(1, self.L):  # generated positions (>= T) are always attended: zeros from __init__
            self.step_pos[level].copy_(lengths + level - 1)
            if not self.shared_prefix:
                self.step_mask4[level][:, 0, 0, :T].copy_(prompt_mask)

    def step(self, level: int, token: torch.Tensor, parent_rows: Optional[torch.Tensor]) -> torch.Tensor:
        """Level ``level`` >= 1: beams' last tokens [P*B] (and flat parent rows for level >= 2) -> hidden [P*B, H]."""
        self.tok.copy_(token.reshape(-1, 1))

        def set_parents() -> None:
            if parent_rows is not None:
                self.index.copy_(parent_rows)

        set_parents()
        return self.step_graphs[level].run(restore=set_parents)


def graph_forward(base, P: int, B: int, T: int, L: int, device: torch.device, mode: str, bucket: int,
                  shared_prefix: bool = False, backend: str = "auto") -> GraphForward:
    """The cached ``GraphForward`` for this shape (prompt width rounded up to ``bucket``), made on first use;
    ``shared_prefix``: the prompt K/V kept once per prompt (``kv.SharedPrefixLayer``), ``backend`` its attention's."""
    check_supported(base)
    width = -(-T // bucket) * bucket
    per_model = _sets.setdefault(base, collections.OrderedDict())
    # the backend only matters inside the graphs for the shared-prefix attention ("auto" resolved as the search does)
    backend = resolve_backend(backend, device) if shared_prefix else None
    key = (P, B, width, L, str(device), mode, _autocast_state(device), _fingerprint(base), bool(shared_prefix),
           backend)
    if key in per_model:
        per_model.move_to_end(key)
        return per_model[key]
    while len(per_model) >= GRAPH_SETS:
        per_model.popitem(last=False)[1].close()
    per_model[key] = GraphForward(base, P, B, width, L, device, mode, shared_prefix, backend or "auto")
    return per_model[key]
