"""Trie-constrained beam search over Semantic IDs for any HF causal LM.

One prefill per prompt (``P`` rows, not ``P * B``), with each prompt's tokens first and no padding mask
(``kv.right_aligned``). Level 0 is scored from the prefill's last
hidden state with one beam per prompt; its top-B codes seed the B beams, and the KV cache is
expanded to ``P * B`` rows by the same parent-index gather that reorders it at later levels.
Each level l: hidden state of the last position -> logits of the level's K_l SID rows of the
LM head only -> (score="full_vocab") log-sum-exp over all V rows, computed in column chunks
so [R, V] never exists at once -> trie mask + log-softmax + parent score
(``ops.beam.trie_log_softmax``) -> per-prompt top-B over B x K_l candidates
(``ops.beam.grouped_topk``: parent, code, score, next trie node). The last level needs no
forward pass, so a search costs one prefill and L - 1 cached one-token steps. With
``shared_prefix=True`` the cache is never expanded: the prompt's K/V stay once per prompt, each beam row
holds only its generated tail (``kv.SharedPrefixLayer``, attention by ``ops.cascade.cascade_attention``).

Ranking equals HF ``generate(num_beams=B, num_return_sequences=B, max_new_tokens=L,
length_penalty=0, do_sample=False, prefix_allowed_tokens_fn=<trie>)`` with score="full_vocab":
HF adds the full-vocabulary log-softmax of each step, masked to -inf outside the allowed
set, and keeps the top B of the B x V sums per prompt; here only the allowed SID columns
are ever formed. The model's own generation config (temperature, penalties, ...) is not
applied.
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from typing import List, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from genrec_fast.decode import graphs, kv
from genrec_fast.model import eval_mode, lm_modules
from genrec_fast.ops.backend import resolve_backend
from genrec_fast.ops.beam import grouped_topk, trie_log_softmax
from genrec_fast.ops.lse import lm_head_lse, lm_head_lse_ref
from genrec_fast.sid_tokens import SIDVocab

SCORES = ("full_vocab", "sid")
GRAPH_SCOPES = ("forward", "search")

_device_arrays_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

# logsumexp(hidden @ weight.T + bias) in fp32, the chunked torch reference (``genrec_fast.ops.lse``)
full_vocab_lse = lm_head_lse_ref


class BeamSearchResult:
    """Per prompt, B beams best first.

    codes [batch, B, L] long (-1 rows for padding), scores [batch, B] float32 (sum of the
    per-level log-probs; -inf for padding), leaf_ids [batch, B] long (trie leaf, -1 for
    padding), all on the model's device (``input_ids`` are moved there). ``item_ids[p][b]`` is the np.ndarray
    of item ids whose SID is beam b's (empty for padding), computed on first access.
    """

    def __init__(self, codes: torch.Tensor, scores: torch.Tensor, leaf_ids: torch.Tensor, trie):
        self.codes = codes
        self.scores = scores
        self.leaf_ids = leaf_ids
        self._trie = trie

    @functools.cached_property
    def item_ids(self) -> List[List[np.ndarray]]:
        empty = np.zeros(0, dtype=np.int64)
        leaves = self.leaf_ids.cpu().tolist()
        return [[self._trie.leaf_items(leaf) if leaf >= 0 else empty for leaf in row] for row in leaves]

    def __repr__(self) -> str:
        batch, beams, levels = self.codes.shape
        return f"BeamSearchResult(batch={batch}, beams={beams}, levels={levels})"


def trie_device_arrays(trie, device: torch.device):
    """``trie.device_arrays(device)``, built once per (trie, device) and kept while the trie lives."""
    per_trie = _device_arrays_cache.setdefault(trie, {})
    key = str(torch.device(device))
    if key not in per_trie:
        per_trie[key] = trie.device_arrays(device)
    return per_trie[key]


def _lm_parts(model):
    """(base transformer, LM-head weight, LM-head bias) of an HF causal LM (PEFT wrappers unwrapped)."""
    try:
        base, head = lm_modules(model)
    except ValueError as e:
        raise ValueError(f"beam_search: {e}") from e
    if isinstance(head, torch.nn.Linear):
        return base, head.weight, head.bias
    return (base, *_affine_head(head, base.config.hidden_size))


_affine_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _affine_head(head: torch.nn.Module, hidden: int):
    """:func:`_read_affine_head`, cached per head while none of its parameters is re-allocated or updated
    in place (``Tensor._version``) and its adapters' state (active, enabled, scale) is unchanged: reading
    it costs an [H + 1, V] forward and a [V, H] copy."""
    # the adapter state too: disable_adapter() / set_adapter() change the head's output, not its parameters
    state = (tuple((p.data_ptr(), p._version) for p in head.parameters()), graphs.adapter_state(head))
    hit = _affine_cache.get(head)
    if hit is not None and hit[0] == state:
        return hit[1]
    out = _read_affine_head(head, hidden)
    _affine_cache[head] = (state, out)
    return out


def _read_affine_head(head: torch.nn.Module, hidden: int):
    """(weight [V, H], bias [V] or None) of an LM head that is an affine map but no plain nn.Linear.

    PEFT wraps the head under LoRA (``lora.Linear``, or ``TrainableTokensWrapper`` when SID rows of a
    tied embedding are trainable); its effective weight is read off exactly by running the head on the
    identity and on a zero row (1 * w + 0 * ... is exact in any precision), then checked on random rows,
    so a head that is not affine raises instead of ranking wrongly.
    """
    param = next(head.parameters())
    probe = torch.cat([torch.zeros(1, hidden), torch.eye(hidden)]).to(device=param.device, dtype=param.dtype)
    out = head(probe)
    bias, weight = out[0], (out[1:] - out[0]).t().contiguous()
    x = torch.randn(4, hidden, generator=torch.Generator().manual_seed(0)).to(device=param.device, dtype=param.dtype)
    expect = F.linear(x.float(), weight.float(), bias.float())
    got = head(x).float()
    if not torch.allclose(got, expect, rtol=1e-2, atol=1e-2 * float(expect.abs().max().clamp_min(1.0))):
        raise ValueError(
            f"beam_search: the LM head {type(head).__name__} is not an affine map of the last hidden state "
            f"(logits = W h + b); merge or remove what rescales the logits before decoding"
        )
    return weight, (bias if bool(bias.any()) else None)


def _check_inputs(input_ids, attention_mask, trie, sid_vocab, num_beams, score, vocab_rows):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or 0 in input_ids.shape:
        raise ValueError("beam_search: input_ids must be a [batch, T] tensor with batch, T >= 1, got "
                         f"{getattr(input_ids, 'shape', type(input_ids))}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"beam_search: attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
    not_left = torch.nonzero(attention_mask[:, -1] == 0).flatten()
    if not_left.numel():
        raise ValueError(
            f"beam_search: prompts must be LEFT padded (last position attended); row(s) {not_left[:5].tolist()} "
            "end in padding"
        )
    if score not in SCORES:
        raise ValueError(f"beam_search: score must be one of {SCORES}, got {score!r}")
    if int(num_beams) < 1:
        raise ValueError(f"beam_search: num_beams must be >= 1, got {num_beams}")
    if tuple(sid_vocab.codebook_sizes) != tuple(trie.codebook_sizes):
        raise ValueError(
            f"beam_search: sid_vocab codebook sizes {sid_vocab.codebook_sizes} differ from the trie's "
            f"{trie.codebook_sizes}"
        )
    if sid_vocab.end > vocab_rows:
        raise ValueError(f"beam_search: SID token ids reach {sid_vocab.end - 1} but the LM head has {vocab_rows} rows")


def _prefill_right_aligned(base, input_ids: torch.Tensor, mask: torch.Tensor):
    """The prefill of the P prompts, each prompt's tokens first (``kv.right_aligned``: causal attention only, no
    padding mask) -> (cache, the prompts' last hidden states [P, H], valid [P, T] bool, lengths [P])."""
    ids, valid, lengths = kv.right_aligned(input_ids, mask)
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    cache, hidden = kv.forward(base, ids, None, positions, None, last=(lengths - 1).clamp_min(0))
    return cache, hidden, valid, lengths


class _EagerForward:
    """The search's forwards run eagerly: HF's own prefill cache, then the in-place beam buffers (``kv``)."""

    def __init__(self, base, B: int, L: int):
        self.base, self.B, self.L = base, B, L

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.cache, hidden, valid, lengths = _prefill_right_aligned(self.base, input_ids, mask)
        self.lengths, self.mask_rep = lengths.repeat_interleave(self.B), valid.long().repeat_interleave(self.B, dim=0)
        return hidden

    def step(self, level: int, token: torch.Tensor, parent_rows: Optional[torch.Tensor]) -> torch.Tensor:
        """Level ``level``'s forward of the P*B rows' tokens: at level 1 every row's parent is its prompt's single
        row (P -> P*B rows); later, ``parent_rows`` reorders the rows first (None: each row continues itself)."""
        if level == 1:
            kv.expand_cache(self.cache, self.B, self.L - 1)
        elif parent_rows is not None:
            kv.reorder_cache(self.cache, parent_rows)
        step_mask = torch.cat([self.mask_rep, self.mask_rep.new_ones((self.mask_rep.shape[0], level))], dim=1)
        position = (self.lengths + level - 1)[:, None]
        self.cache, hidden = kv.forward(self.base, token.reshape(-1, 1), step_mask, position, self.cache)
        return hidden


class _SharedPrefixForward(_EagerForward):
    """The eager forwards with the prompt's K/V kept once per prompt (``shared_prefix=True``): the prefill's
    own cache layers are the prompts' K/V, each beam row gets a tail of L - 1 positions
    (``kv.SharedPrefixLayer``), the attention is ``ops.cascade.cascade_attention`` and a reorder moves the
    tails only."""

    def __init__(self, base, B: int, L: int, backend: str):
        super().__init__(base, B, L)
        self.backend = backend

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.prompt_cache, hidden, self.prefix_mask, lengths = _prefill_right_aligned(self.base, input_ids, mask)
        self.lengths = lengths.repeat_interleave(self.B)
        return hidden

    def step(self, level: int, token: torch.Tensor, parent_rows: Optional[torch.Tensor]) -> torch.Tensor:
        if level == 1:  # empty tails, nothing to copy
            self.cache = kv.shared_prefix_cache(self.prompt_cache, self.prefix_mask, self.B, self.L - 1, self.backend)
        elif parent_rows is not None:
            kv.reorder_cache(self.cache, parent_rows)
        position = (self.lengths + level - 1)[:, None]
        self.cache, hidden = kv.forward(self.base, token.reshape(-1, 1), None, position, self.cache)
        return hidden


def _forward_runner(base, cuda_graphs, P, B, T, L, device, bucket, shared_prefix=False, backend="auto",
                    who="beam_search"):
    if shared_prefix:
        kv.check_shared_prefix(base.config, who)
    if cuda_graphs is False or cuda_graphs is None:
        return _SharedPrefixForward(base, B, L, backend) if shared_prefix else _EagerForward(base, B, L)
    if cuda_graphs is True:
        if device.type != "cuda":
            raise ValueError(f"beam_search: cuda_graphs=True needs the model on a CUDA device, it is on {device}")
        mode = "cuda"
    elif cuda_graphs == "emulate":
        mode = "emulate"
    else:
        raise ValueError(f"beam_search: cuda_graphs must be True, False or 'emulate', got {cuda_graphs!r}")
    if int(bucket) < 1:
        raise ValueError(f"beam_search: graph_bucket must be >= 1, got {bucket}")
    return graphs.graph_forward(base, P, B, T, L, device, mode, int(bucket), shared_prefix=bool(shared_prefix),
                                backend=backend)


def _raise_if_stuck_or_nan(stuck: List[torch.Tensor], nan: List[torch.Tensor], B: int) -> None:
    """Raise for the first level where a live beam had no allowed continuation, or a beam's scores were
    NaN (both checked with one host sync after the search)."""
    flags = torch.stack([torch.stack([s.any(), n.any()]) for s, n in zip(stuck, nan)])  # [L, 2]
    if not bool(flags.any()):
        return
    level, kind = (int(x) for x in torch.nonzero(flags)[0])
    nb = 1 if level == 0 else B
    rows = torch.nonzero((stuck if kind == 0 else nan)[level]).flatten()[:5].tolist()
    beams = [(r // nb, r % nb) for r in rows]
    if kind == 0:
        raise RuntimeError(f"beam_search: trie state with no allowed continuation at level {level} "
                           f"(prompt, beam) = {beams}; the trie is inconsistent")
    raise RuntimeError(f"beam_search: NaN scores at level {level} (prompt, beam) = {beams}: the model's "
                       f"logits are NaN (an overflow in float16? try bfloat16 or float32)")


def beam_search(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], trie, sid_vocab: SIDVocab,
                num_beams: int, score: str = "full_vocab", backend: str = "auto",
                cuda_graphs: Union[bool, str] = False, graph_bucket: int = 64,
                shared_prefix: bool = False, graph_scope: str = "forward",
                lse_backend: str = "torch") -> BeamSearchResult:
    """Constrained beam search of ``num_beams`` SIDs per prompt (see the module doc).

    input_ids / attention_mask: [batch, T], LEFT padded, each prompt ending exactly where the
    SID response starts. trie: ``SIDTrie`` of the catalogue. score: "full_vocab" (HF-equal
    ranking) or "sid" (normalise each level over its allowed SID tokens only).
    Prompts with fewer than ``num_beams`` SIDs get all of them, then padding (-1 / -inf).
    cuda_graphs: replay the prefill and the SID steps from CUDA graphs captured per shape
    (``genrec_fast.decode.graphs``; prompts padded to a multiple of ``graph_bucket`` tokens);
    "emulate" runs the same static-buffer protocol eagerly (any device; for tests).
    graph_scope (with cuda_graphs): "forward" captures the prefill and each level's step forward, and the
    scoring (head slice, log-sum-exp, trie step, log-softmax, top-k) runs eagerly between replays; "search"
    captures the whole search, forwards and scoring, as ONE graph per shape (one replay per batch).
    lse_backend: the full-vocabulary log-sum-exp (score="full_vocab") by ``ops.lse.lm_head_lse``: "torch" (the
    default: the head's matmul in chunks, then a log-softmax pass) or "triton" / "auto" (the matmul fused with
    the reduction, no logits written; on CPU "triton" needs TRITON_INTERPRET=1).
    shared_prefix: keep each prompt's K/V once (not once per beam); the beam steps attend with
    ``ops.cascade.cascade_attention`` (prompt K/V shared by the prompt's B beams + each beam's own tail) and
    a reorder moves the tails only. Needs sdpa (or flash) full attention; eager and graph paths.
    """
    for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask)):
        if not (isinstance(t, torch.Tensor) or (t is None and name == "attention_mask")):
            raise ValueError(f"beam_search: {name} must be a torch.Tensor, got {type(t).__name__}")
    # eval mode before the head is read (a LoRA head's dropout must be off); each submodule's mode restored
    with eval_mode(model), torch.inference_mode():
        base, weight, bias = _lm_parts(model)
        device = weight.device
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            # graphs, streams and replays all act on the CURRENT CUDA device: make it the model's
            res = _search(model, base, weight, bias, device, input_ids, attention_mask, trie, sid_vocab,
                          num_beams, score, backend, cuda_graphs, graph_bucket, shared_prefix, graph_scope,
                          lse_backend)
    # out of inference mode: results the caller may edit in place or use in autograd (small tensors)
    return BeamSearchResult(res.codes.clone(), res.scores.clone(), res.leaf_ids.clone(), trie)


def score_sids(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
               tokens: torch.Tensor, shared_prefix: bool = False, backend: str = "auto") -> torch.Tensor:
    """Teacher-forced full-vocabulary log-probability of given SID token sequences: [P, C] float32.

    input_ids / attention_mask: [P, T] LEFT-padded prompts (as :func:`beam_search`); tokens: [P, C, L] token ids,
    C responses per prompt. Each prompt is prefilled once and its cache expanded to its C rows, then the L - 1
    steps run on all rows with the beam search's own eager forwards, so a prompt's tokens are computed once, not
    once per response. The sum over the L tokens of log p(token | prompt, earlier tokens): what
    :func:`genrec_fast.model.sequence_logprobs` computes, up to float rounding.
    shared_prefix: the prompt's K/V kept once for its C responses, not copied to each (as :func:`beam_search`'s;
    sdpa full attention only), ``backend`` its attention's (``ops.cascade``).
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 or tokens.shape[0] != input_ids.shape[0]:
        raise ValueError(f"score_sids: tokens must be a [P={input_ids.shape[0]}, C, L] tensor, got "
                         f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
    P, C, L = tokens.shape
    if C == 0 or L == 0:
        return torch.zeros((P, C))
    with eval_mode(model), torch.inference_mode():
        base, weight, bias = _lm_parts(model)
        device = weight.device
        ids = input_ids.to(device)
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device=device, dtype=torch.long)
        tok = tokens.to(device=device, dtype=torch.long).reshape(P * C, L)
        runner = _forward_runner(base, False, P, C, ids.shape[1], L, device, 1, shared_prefix,
                                 resolve_backend(backend, device), who="score_sids")
        hidden = runner.prefill(ids, mask).repeat_interleave(C, dim=0)  # row p*C + c: response c of prompt p
        total = torch.zeros(P * C, device=device)
        for level in range(L):
            if level > 0:  # every row continues its own response: no reorder
                hidden = runner.step(level, tok[:, level - 1], None)
            picked = (hidden * weight[tok[:, level]]).sum(-1)
            if bias is not None:
                picked = picked + bias[tok[:, level]]
            total += picked.float() - full_vocab_lse(hidden, weight, bias)
        del runner
    return total.view(P, C).clone()


class _LevelScorer:
    """Scores one SID level from the hidden states of its beam rows: the level's slice of the LM head ->
    (full_vocab) log-sum-exp over all V rows -> trie step -> ``trie_log_softmax`` -> per-prompt ``grouped_topk``.
    Only device ops with shapes fixed by (P, B, L): the eager search runs it between forwards, the search graph
    (``graph_scope="search"``) captures it with them."""

    def __init__(self, weight, bias, da, sid_vocab: SIDVocab, score: str, backend: str, lse_backend: str):
        self.weight, self.bias, self.da, self.vocab = weight, bias, da, sid_vocab
        self.score, self.backend, self.lse_backend = score, backend, lse_backend

    def key(self) -> tuple:
        """What a captured search reads besides its static buffers: the head's and the trie's tensors (by
        address; the graph keeps them alive), the SID block and the scoring choices."""
        w, b = self.weight, self.bias
        return (w.data_ptr(), tuple(w.shape), None if b is None else b.data_ptr(), id(self.da), self.vocab.start,
                tuple(self.vocab.codebook_sizes), self.score, self.backend, self.lse_backend)

    def run(self, step, hidden: torch.Tensor, P: int, B: int, L: int):
        """All L levels from the prefill's last hidden states [P, H]; ``step(level, token [P*B], parent_rows or
        None)`` runs a level's forward -> hidden [P*B, H]. Returns (codes [P, B, L], scores [P*B], nodes [P*B],
        stuck [L] and nan [L] per-row flags for :func:`_raise_if_stuck_or_nan`)."""
        device, vocab = hidden.device, self.vocab
        rows = torch.arange(P, device=device)[:, None]
        scores = torch.zeros(P, device=device)  # level 0: one beam per prompt
        nodes = torch.zeros(P, dtype=torch.long, device=device)
        codes = torch.zeros((P, 1, 0), dtype=torch.long, device=device)
        nb, parent, code = 1, None, None
        stuck: List[torch.Tensor] = []
        nan: List[torch.Tensor] = []
        for level in range(L):
            if level > 0:
                nb = B
                token = vocab.start + vocab.offsets[level - 1] + code.clamp_min(0)
                parent_rows = None if level == 1 else (rows * B + parent.clamp_min(0)).reshape(-1)
                hidden = step(level, token.reshape(-1), parent_rows)
            lo, hi = vocab.level_range(level)
            logits = F.linear(hidden, self.weight[lo:hi], None if self.bias is None else self.bias[lo:hi])
            lse = (lm_head_lse(hidden, self.weight, self.bias, backend=self.lse_backend)
                   if self.score == "full_vocab" else None)
            allowed, child = self.da.step(level, nodes, check=False)  # nodes come from the trie's own child ids
            # a live beam with no allowed child, NaN scores: checked once after the search (no host sync per
            # level); such candidates are never picked, so they only ever yield padding until then
            stuck.append((nodes >= 0) & ~allowed.any(dim=1))
            cand = trie_log_softmax(logits, allowed, scores, lse, backend=self.backend)
            nan.append(torch.isnan(cand).any(dim=1))
            K = hi - lo
            parent, code, top_scores, top_nodes = grouped_topk(cand.view(P, nb, K), child.view(P, nb, K), B,
                                                               backend=self.backend)
            history = torch.gather(codes, 1, parent.clamp_min(0)[..., None].expand(P, B, level))
            codes = torch.cat([history, code[..., None]], dim=2)
            scores, nodes = top_scores.reshape(-1), top_nodes.reshape(-1).long()
        return codes, scores, nodes, stuck, nan


def _search(model, base, weight, bias, device, input_ids, attention_mask, trie, sid_vocab, num_beams, score,
            backend, cuda_graphs, graph_bucket, shared_prefix=False, graph_scope="forward",
            lse_backend="torch") -> BeamSearchResult:
    input_ids = input_ids.to(device)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device=device, dtype=torch.long)
    _check_inputs(input_ids, mask, trie, sid_vocab, num_beams, score, weight.shape[0])
    if graph_scope not in GRAPH_SCOPES:
        raise ValueError(f"beam_search: graph_scope must be one of {GRAPH_SCOPES}, got {graph_scope!r}")
    backend, lse_backend = resolve_backend(backend, device), resolve_backend(lse_backend, device)
    scorer = _LevelScorer(weight, bias, trie_device_arrays(trie, device), sid_vocab, score, backend, lse_backend)
    P, B, L = input_ids.shape[0], int(num_beams), trie.num_levels
    runner = _forward_runner(base, cuda_graphs, P, B, input_ids.shape[1], L, device, graph_bucket, shared_prefix,
                             backend)
    if graph_scope == "search" and isinstance(runner, graphs.GraphForward):
        codes, scores, nodes, stuck, nan = runner.search(input_ids, mask, scorer.key(),
                                                         lambda step, hidden: scorer.run(step, hidden, P, B, L))
    else:
        hidden = runner.prefill(input_ids, mask)
        codes, scores, nodes, stuck, nan = scorer.run(runner.step, hidden, P, B, L)
    del runner
    _raise_if_stuck_or_nan(stuck, nan, B)
    leaf_ids = nodes.view(P, B)
    codes = torch.where(leaf_ids[..., None] >= 0, codes, torch.full_like(codes, -1))
    return BeamSearchResult(codes, scores.view(P, B), leaf_ids, trie)
