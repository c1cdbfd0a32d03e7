"""Beam-search ops of the constrained decoder: ``trie_log_softmax`` and ``grouped_topk``.

Each op has a Triton kernel (``genrec_fast.kernels.beam``) and a plain-torch reference here
with the same signature and semantics; ``backend`` ("auto" | "triton" | "torch") picks one.

``trie_log_softmax(logits, allowed, parent_scores, lse=None)``
    Per row r of R beam rows over one SID level (K codes):
    ``out[r, c] = logits[r, c] - norm[r] + parent_scores[r]`` where ``allowed[r, c]``, else -inf.
    ``norm[r]`` is ``lse[r]`` when given (the log-sum-exp over the WHOLE vocabulary,
    score="full_vocab") or the log-sum-exp of the allowed entries of the row (score="sid").
    A row with nothing allowed, or with parent score -inf (a padding beam), or whose allowed logits
    are all -inf, is all -inf.

``grouped_topk(scores, child, k)``
    scores [P, NB, K] (P prompts, NB parent beams, K codes), child [P, NB, K] int (the trie
    node each candidate leads to). Per prompt, the k best of its NB*K candidates, best first:
    (parent beam [P, k] long, code [P, k] long, score [P, k] float32, node [P, k] int32).
    Ties: lower code first, then lower parent beam (parent beams are themselves ordered best
    first). Candidates with score -inf or NaN are not valid (never picked; ``beam_search`` reports
    NaN scores itself): when a prompt has fewer than k valid candidates the tail is padded with
    parent -1, code -1, score -inf, node -1. The Triton kernel holds at most
    ``MAX_TOPK_CANDIDATES`` (65536) candidates per prompt; ``backend="auto"`` uses the reference
    beyond that.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from genrec_fast.ops.backend import resolve_backend

TopK = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
_SIGNED_INT = (torch.int8, torch.int16, torch.int32, torch.int64)
MAX_TOPK_CANDIDATES = 65536  # NB x K per prompt that the Triton top-k kernel holds in one block


def _check_log_softmax_inputs(logits, allowed, parent_scores, lse) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError("trie_log_softmax: logits must be a 2-D tensor [R, K], got "
                         f"{getattr(logits, 'shape', type(logits))}")
    if not logits.is_floating_point():
        raise ValueError(f"trie_log_softmax: logits must be floating point, got {logits.dtype}")
    shape = tuple(logits.shape)
    if not isinstance(allowed, torch.Tensor) or tuple(allowed.shape) != shape or allowed.dtype != torch.bool:
        raise ValueError(
            f"trie_log_softmax: allowed must be a bool tensor of shape {shape}, got "
            f"{getattr(allowed, 'dtype', type(allowed))} {tuple(getattr(allowed, 'shape', ()))}"
        )
    if not isinstance(parent_scores, torch.Tensor) or tuple(parent_scores.shape) != (shape[0],):
        raise ValueError(f"trie_log_softmax: parent_scores must have shape ({shape[0]},), got "
                         f"{tuple(getattr(parent_scores, 'shape', ()))}")
    if lse is not None and (not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (shape[0],)):
        raise ValueError(f"trie_log_softmax: lse must have shape ({shape[0]},), got {tuple(getattr(lse, 'shape', ()))}")
    for name, t in (("allowed", allowed), ("parent_scores", parent_scores), ("lse", lse)):
        if t is not None and t.device != logits.device:
            raise ValueError(f"trie_log_softmax: {name} on {t.device} but logits on {logits.device}")


def trie_log_softmax_ref(logits: torch.Tensor, allowed: torch.Tensor, parent_scores: torch.Tensor,
                         lse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Torch reference of :func:`trie_log_softmax` (fp32 math, [R, K] float32 out)."""
    x = logits.float()
    blocked = ~allowed
    # scalar fills, no tensor made from Python data: a CUDA graph can capture this
    if lse is None:
        norm = torch.logsumexp(x.masked_fill(blocked, float("-inf")), dim=1)
    else:
        norm = lse.float()
    norm = norm.masked_fill(norm == float("-inf"), 0.0)  # all allowed logits -inf: -inf out, not -inf - -inf = NaN
    return (x - norm[:, None] + parent_scores.float()[:, None]).masked_fill(blocked, float("-inf"))


def trie_log_softmax(logits: torch.Tensor, allowed: torch.Tensor, parent_scores: torch.Tensor,
                     lse: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Trie-masked log-softmax over one level's SID slice plus the parent beam score (see module doc)."""
    _check_log_softmax_inputs(logits, allowed, parent_scores, lse)
    if resolve_backend(backend, logits.device) == "torch":
        return trie_log_softmax_ref(logits, allowed, parent_scores, lse)
    # lazy: triton (slow to import; on CPU TRITON_INTERPRET=1 must be set first)
    from genrec_fast.kernels import beam as beam_kernels

    return beam_kernels.trie_log_softmax(logits, allowed, parent_scores, lse)


def _check_topk_inputs(scores, child, k) -> None:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 3:
        raise ValueError("grouped_topk: scores must be a 3-D tensor [P, NB, K], got "
                         f"{getattr(scores, 'shape', type(scores))}")
    if scores.dtype != torch.float32:
        raise ValueError(f"grouped_topk: scores must be float32, got {scores.dtype}")
    if not isinstance(child, torch.Tensor) or child.shape != scores.shape or child.dtype not in _SIGNED_INT:
        raise ValueError(
            f"grouped_topk: child must be a signed integer tensor of shape {tuple(scores.shape)} (-1 marks no "
            f"child), got "
            f"{getattr(child, 'dtype', type(child))} {tuple(getattr(child, 'shape', ()))}"
        )
    if child.device != scores.device:
        raise ValueError(f"grouped_topk: child on {child.device} but scores on {scores.device}")
    if int(k) < 1:
        raise ValueError(f"grouped_topk: k must be >= 1, got {k}")


def grouped_topk_ref(scores: torch.Tensor, child: torch.Tensor, k: int) -> TopK:
    """Torch reference of :func:`grouped_topk`.

    ``torch.topk`` finds the k-th best value t; every candidate above t is taken, and of those equal to t the
    first ones in (code, parent) order (the candidates are laid out code-major: index = code * NB + parent).
    The picks are scattered to their rank among the picks (a cumulative sum), not gathered by ``nonzero``, so
    nothing waits on the host or has a data-dependent shape and a CUDA graph can capture it; a stable sort of
    the k picks then orders them best first with ties still in (code, parent) order.
    """
    P, NB, K = scores.shape
    n = NB * K
    flat = scores.transpose(1, 2).reshape(P, n)  # code-major: index = code * NB + parent
    flat = flat.masked_fill(torch.isnan(flat), float("-inf"))  # NaN: never picked, as in the kernel
    kk = min(k, n)
    kth = torch.topk(flat, kk, dim=1).values[:, -1:]
    above = flat > kth
    tie = flat == kth
    take = above | (tie & (tie.cumsum(1) <= kk - above.sum(1, keepdim=True)))  # exactly kk per row
    slot = torch.where(take, take.cumsum(1) - 1, kk)  # rank among the picks; the rest to a dump column kk
    idx = flat.new_zeros((P, kk + 1), dtype=torch.long)
    idx.scatter_(1, slot, torch.arange(n, device=flat.device).expand(P, n))
    idx = idx[:, :kk]  # ascending index within each row
    vals = flat.gather(1, idx)
    vals, order = torch.sort(vals, dim=1, descending=True, stable=True)
    idx = idx.gather(1, order)
    code, parent = idx // NB, idx % NB
    node = child.reshape(P, n).gather(1, parent * K + code).to(torch.int32)
    valid = vals > float("-inf")
    code = torch.where(valid, code, torch.full_like(code, -1))
    parent = torch.where(valid, parent, torch.full_like(parent, -1))
    node = torch.where(valid, node, torch.full_like(node, -1))
    if k > n:  # fewer candidates than asked for: pad
        pad = k - n
        parent = torch.cat([parent, parent.new_full((P, pad), -1)], 1)
        code = torch.cat([code, code.new_full((P, pad), -1)], 1)
        vals = torch.cat([vals, vals.new_full((P, pad), float("-inf"))], 1)
        node = torch.cat([node, node.new_full((P, pad), -1)], 1)
    return parent, code, vals, node


def grouped_topk(scores: torch.Tensor, child: torch.Tensor, k: int, backend: str = "auto") -> TopK:
    """Per-prompt top-k over NB x K beam candidates (see module doc)."""
    _check_topk_inputs(scores, child, k)
    chosen = resolve_backend(backend, scores.device)
    _, NB, K = scores.shape
    if chosen == "torch" or (backend == "auto" and NB * K > MAX_TOPK_CANDIDATES):
        return grouped_topk_ref(scores, child, int(k))
    if NB * K > MAX_TOPK_CANDIDATES:
        raise ValueError(
            f"grouped_topk (triton): {NB} beams x {K} codes = {NB * K} candidates per prompt exceeds the "
            f"kernel's {MAX_TOPK_CANDIDATES}; use backend='torch' for such shapes"
        )
    # lazy: triton (slow to import; on CPU TRITON_INTERPRET=1 must be set first)
    from genrec_fast.kernels import beam as beam_kernels

    return beam_kernels.grouped_topk(scores, child, int(k))
