"""Triton kernels of the constrained beam search (semantics: ``genrec_fast.ops.beam``).

``trie_log_softmax``: one program per beam row; loads the row's K slice logits and trie mask,
normalises by the given full-vocabulary log-sum-exp (or by the log-sum-exp of the allowed
entries), adds the parent beam score and writes -inf where the trie forbids the code.

``grouped_topk``: one program per prompt holds all NB*K candidate scores in registers, laid
out code-major (index = code * NB + parent), and extracts the k best by k rounds of
``tl.max(..., return_indices=True)`` with left tie-breaking, i.e. ties go to the lower code,
then the lower parent beam. A round whose maximum is -inf writes padding (-1 / -inf).

Plain-torch references with the same signatures: ``genrec_fast.ops.beam.trie_log_softmax_ref``
and ``grouped_topk_ref``; the ops there check the inputs and ``MAX_TOPK_CANDIDATES`` (the most
candidates one top-k program holds) before they call in here. Import this module lazily: triton is
imported here and, on CPU, TRITON_INTERPRET=1 must be set before that happens.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

# Sizes are not specialised on (do_not_specialize) and blocks start at _MIN_BLOCK, so all shapes up to
# _MIN_BLOCK share one compiled kernel and larger ones one per power of two; the masked tail costs nothing here
_MIN_BLOCK = 64


def log_softmax_launch(K: int):
    """(BLOCK_K, num_warps) of a trie_log_softmax launch over K codes per row."""
    block = max(_MIN_BLOCK, triton.next_power_of_2(K))
    return block, 4 if block <= 1024 else 8


def topk_launch(candidates: int):
    """(BLOCK, num_warps) of a grouped_topk launch over NB * K candidates per prompt. On an H100 the block holds
    its candidates in registers without spilling up to 16,384 (50 beams x 256 codes); above, up to
    MAX_TOPK_CANDIDATES, it spills (tests/test_beam_ops.py compiles these launches for sm_90)."""
    block = max(_MIN_BLOCK, triton.next_power_of_2(candidates))
    return block, 4 if block <= 2048 else (8 if block <= 8192 else 16)


@triton.jit(do_not_specialize=["K"])
def _trie_log_softmax_kernel(logits_ptr, allowed_ptr, parent_ptr, lse_ptr, out_ptr, K,
                             stride_x, stride_a, stride_o,
                             HAS_LSE: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    inb = offs < K
    x = tl.load(logits_ptr + row * stride_x + offs, mask=inb, other=0.0).to(tl.float32)
    ok = (tl.load(allowed_ptr + row * stride_a + offs, mask=inb, other=0) != 0) & inb
    parent = tl.load(parent_ptr + row).to(tl.float32)
    if HAS_LSE:
        norm = tl.load(lse_ptr + row).to(tl.float32)
    else:
        m = tl.max(tl.where(ok, x, float("-inf")), axis=0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        total = tl.sum(tl.where(ok, tl.exp(x - m_safe), 0.0), axis=0)
        # a NaN among the allowed logits makes total (so norm, so the row) NaN, as logsumexp does in the
        # reference, whether or not this GPU's max ignored it
        norm = m_safe + tl.log(total)
        # +inf allowed: NaN at that entry only, as in the reference
        norm = tl.where(m == float("inf"), float("inf"), norm)
    # every allowed logit -inf (norm -inf): -inf out, not -inf - -inf = NaN (the reference does the same)
    norm = tl.where(norm == float("-inf"), 0.0, norm)
    out = tl.where(ok, x - norm + parent, float("-inf"))
    tl.store(out_ptr + row * stride_o + offs, out, mask=inb)


def trie_log_softmax(logits: torch.Tensor, allowed: torch.Tensor, parent_scores: torch.Tensor,
                     lse: Optional[torch.Tensor] = None) -> torch.Tensor:
    R, K = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    allowed = allowed.contiguous().view(torch.uint8)
    parent_scores = parent_scores.float().contiguous()
    out = torch.empty((R, K), dtype=torch.float32, device=logits.device)
    if R == 0 or K == 0:
        return out.fill_(float("-inf"))
    has_lse = lse is not None
    lse_arg = lse.float().contiguous() if has_lse else parent_scores  # unused when HAS_LSE is False
    block, num_warps = log_softmax_launch(K)
    _trie_log_softmax_kernel[(R,)](
        logits, allowed, parent_scores, lse_arg, out, K,
        logits.stride(0), allowed.stride(0), out.stride(0),
        HAS_LSE=has_lse, BLOCK_K=block, num_warps=num_warps,
    )
    return out


@triton.jit(do_not_specialize=["NB", "K", "TOPK"])
def _grouped_topk_kernel(scores_ptr, child_ptr, parent_out, code_out, score_out, node_out,
                         NB, K, TOPK, BLOCK: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    n = NB * K
    offs = tl.arange(0, BLOCK)
    inb = offs < n
    code = offs // NB
    beam = offs % NB
    base = p * n
    s = tl.load(scores_ptr + base + beam * K + code, mask=inb, other=float("-inf"))
    # NaN is never picked (as in the reference): made -inf here, since how an arg-max reduction orders NaN
    # depends on its combine tree (the interpreter and the compiled kernel differed)
    s = tl.where(s == s, s, float("-inf"))
    for j in range(0, TOPK):
        best, idx = tl.max(s, axis=0, return_indices=True, return_indices_tie_break_left=True)
        valid = best > float("-inf")
        c = idx // NB
        b = idx % NB
        node = tl.load(child_ptr + base + b * K + c, mask=valid, other=-1)
        out = p * TOPK + j
        tl.store(parent_out + out, tl.where(valid, b, -1).to(tl.int64))
        tl.store(code_out + out, tl.where(valid, c, -1).to(tl.int64))
        tl.store(score_out + out, best)
        tl.store(node_out + out, tl.where(valid, node, -1).to(tl.int32))
        s = tl.where(offs == idx, float("-inf"), s)


def grouped_topk(scores: torch.Tensor, child: torch.Tensor, k: int) -> Tuple[torch.Tensor, ...]:
    P, NB, K = scores.shape
    block, num_warps = topk_launch(NB * K)  # the caller keeps NB * K <= MAX_TOPK_CANDIDATES
    scores = scores.contiguous()
    child = child.contiguous()
    dev = scores.device
    parent = torch.empty((P, k), dtype=torch.int64, device=dev)
    code = torch.empty((P, k), dtype=torch.int64, device=dev)
    best = torch.empty((P, k), dtype=torch.float32, device=dev)
    node = torch.empty((P, k), dtype=torch.int32, device=dev)
    if P == 0:
        return parent, code, best, node
    _grouped_topk_kernel[(P,)](scores, child, parent, code, best, node, NB, K, k,
                               BLOCK=block, num_warps=num_warps)
    return parent, code, best, node
