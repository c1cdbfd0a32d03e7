"""Triton kernel of the fused LM-head log-sum-exp (semantics: ``genrec_fast.ops.lse``).

Grid (row blocks, vocabulary splits), row blocks fastest, so the programs that run together read the same
vocabulary split of the weight (shared through L2). A program takes BLOCK_M rows of ``hidden`` and walks its split of
the vocabulary in BLOCK_N-row tiles of ``weight``: ``hidden [BLOCK_M, H] @ weight_tile^T [H, BLOCK_N]`` accumulated
in fp32 over BLOCK_K slices of H (``tl.dot``: tensor cores in fp16/bf16, IEEE fp32 dots for fp32 inputs), plus the
bias, then a running (max, sum of exp) per row. It writes those two numbers per row and split, never a logit; the
host merges the splits with one ``logsumexp``. Only [splits, R] floats leave the kernel, so a search never writes
(nor re-reads) the [R, V] logits.

Plain-torch reference with the same signature: ``genrec_fast.ops.lse.lm_head_lse_ref``. Import this module lazily:
triton is imported here and, on CPU, TRITON_INTERPRET=1 must be set before that happens.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

_MIN_COLS_PER_SPLIT = 4  # BLOCK_N tiles at least per vocabulary split
_PROGRAMS_PER_SM = 4  # the splits aim at this many programs per streaming multiprocessor


@triton.jit(do_not_specialize=["R", "V", "cols_per_split"])
def _lm_head_lse_kernel(h_ptr, w_ptr, b_ptr, max_ptr, sum_ptr, R, V, H, stride_h, stride_w, cols_per_split,
                        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    rows64 = rows.to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s_i = tl.zeros((BLOCK_M,), tl.float32)
    v_start = split * cols_per_split
    v_end = tl.minimum(v_start + cols_per_split, V)
    for n0 in range(v_start, v_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < v_end
        cols64 = cols.to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, H, BLOCK_K):
            k = k0 + kk
            k_ok = k < H
            a = tl.load(h_ptr + rows64[:, None] * stride_h + k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            b = tl.load(w_ptr + cols64[None, :] * stride_w + k[:, None], mask=col_ok[None, :] & k_ok[:, None],
                        other=0.0)  # [BLOCK_K, BLOCK_N]: the weight tile transposed by its addressing
            if IEEE:
                acc += tl.dot(a, b, input_precision="ieee")
            else:
                acc += tl.dot(a, b)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc = tl.where(col_ok[None, :], acc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(acc, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing finite yet: exp(-inf - 0) = 0, not NaN
        s_i = s_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(acc - m_safe[:, None]), axis=1)
        m_i = m_new
    out = split.to(tl.int64) * R + rows64
    tl.store(max_ptr + out, m_i, mask=row_ok)
    tl.store(sum_ptr + out, s_i, mask=row_ok)


def tile_config(rows: int, hidden: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps). fp16/bf16: tensor-core tiles up to 128 rows x 128 vocabulary rows
    x 64; fp32 (IEEE dots on CUDA cores): up to 32 x 64 x 32. Never under 16 (``tl.dot``'s smallest)."""
    if dtype == torch.float32:
        cap_m, block_n, cap_k, warps = 32, 64, 32, 4
    else:
        cap_m, block_n, cap_k, warps = 128, 128, 64, 8
    block_m = min(cap_m, max(16, triton.next_power_of_2(rows)))
    block_k = min(cap_k, max(16, triton.next_power_of_2(hidden)))
    return block_m, block_n, block_k, (4 if block_m <= 32 else warps)


def num_splits(row_blocks: int, vocab: int, block_n: int, device: torch.device) -> int:
    """Vocabulary splits: enough programs to fill the GPU (``_PROGRAMS_PER_SM`` per SM; 4 programs on CPU, the
    interpreter), each split at least ``_MIN_COLS_PER_SPLIT`` tiles."""
    target = (torch.cuda.get_device_properties(device).multi_processor_count * _PROGRAMS_PER_SM
              if device.type == "cuda" else 4)
    most = max(1, triton.cdiv(vocab, block_n * _MIN_COLS_PER_SPLIT))
    return max(1, min(most, triton.cdiv(target, row_blocks)))


def lm_head_lse(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    R, H = hidden.shape
    V = weight.shape[0]
    if R == 0:
        return torch.empty(0, dtype=torch.float32, device=hidden.device)
    if V == 0:
        return torch.full((R,), float("-inf"), dtype=torch.float32, device=hidden.device)
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    block_m, block_n, block_k, warps = tile_config(R, H, hidden.dtype)
    row_blocks = triton.cdiv(R, block_m)
    splits = num_splits(row_blocks, V, block_n, hidden.device)
    cols_per_split = triton.cdiv(triton.cdiv(V, splits), block_n) * block_n
    splits = triton.cdiv(V, cols_per_split)  # none empty
    maxes = torch.empty((splits, R), dtype=torch.float32, device=hidden.device)
    sums = torch.empty((splits, R), dtype=torch.float32, device=hidden.device)
    has_bias = bias is not None
    _lm_head_lse_kernel[(row_blocks, splits)](
        hidden, weight, bias.contiguous() if has_bias else hidden, maxes, sums, R, V, H,
        hidden.stride(0), weight.stride(0), cols_per_split,
        HAS_BIAS=has_bias, IEEE=hidden.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, num_stages=3,
    )
    return torch.logsumexp(maxes + torch.log(sums), dim=0)
