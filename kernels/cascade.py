"""Triton kernel of the shared-prefix decode attention (semantics: ``genrec_fast.ops.cascade``).

Grid (P prompts, Hkv K/V heads, M blocks). A program takes BLOCK_M of the B x G query rows that read K/V
head j of prompt p (row m = beam m // G, query head j * G + m % G) and
  1. takes each of the t tail positions: every row's own key and value (a gather by beam), a row-wise dot,
     with a running max / sum / fp32 accumulator (online softmax);
  2. then walks the prompt's keys in BLOCK_N blocks, skipping blocks with no attended key (left padding):
     scores ``Q [BLOCK_M, D] @ K^T [D, BLOCK_N]`` and ``P [BLOCK_M, BLOCK_N] @ V [BLOCK_N, D]`` are tensor-core
     dots (``tl.dot``), masked by ``prefix_mask``, with the same running update.
The running update IS the exact log-sum-exp merge of the two parts (their order only changes the rounding).
So the prompt K/V of (p, j) is read once per program: once for all B x G rows when B * G <= BLOCK_M
(fp16/bf16: up to 128 rows for head dims <= 64, 64 rows beyond; ``tile_config``), else once per M block
(from L2 after the first).

fp32 inputs use IEEE fp32 dots (no TF32: the search's fp32 ranking must equal the reference's); fp16 /
bf16 inputs multiply in their dtype with fp32 accumulation, the probabilities cast to the value dtype
before ``P @ V`` (as flash attention does). Head dims that are not a power of two (or < 16, which
``tl.dot`` cannot take) are zero-padded in registers to BLOCK_D. A row with no attended key gets zeros.

Plain-torch reference with the same signature: ``genrec_fast.ops.cascade.cascade_attention_ref``. Import
this module lazily: triton is imported here and, on CPU, TRITON_INTERPRET=1 must be set before that.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["B", "T", "TAIL", "G"])
def _cascade_kernel(q_ptr, pk_ptr, pv_ptr, mask_ptr, tk_ptr, tv_ptr, out_ptr,
                    B, T, TAIL, G, scale,
                    sq_p, sq_b, sq_h,
                    spk_p, spk_h, spk_t, spv_p, spv_h, spv_t,
                    sm_p,
                    stk_p, stk_b, stk_h, stk_t, stv_p, stv_b, stv_h, stv_t,
                    so_p, so_b, so_h,
                    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    IEEE: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B * G
    b = (rows // G).to(tl.int64)
    h = j * G + rows % G
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q_ok = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + p * sq_p + b[:, None] * sq_b + h[:, None] * sq_h + d[None, :], mask=q_ok, other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    # 1. each row's own tail (t <= L - 1 positions): gathered per beam, row-wise dots, a running max / sum / acc
    #    (done first, so its element-wise state is converted to the prompt loop's tensor-core layout once)
    for i in range(0, TAIL):
        kt = tl.load(tk_ptr + p * stk_p + j * stk_h + i * stk_t + b[:, None] * stk_b + d[None, :], mask=q_ok,
                     other=0.0)
        s = tl.sum(q.to(tl.float32) * kt.to(tl.float32), axis=1) * scale
        s = tl.where(row_ok, s, float("-inf"))
        m_new = tl.maximum(m_i, s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        w = tl.exp(s - m_safe)
        l_i = l_i * alpha + w
        vt = tl.load(tv_ptr + p * stv_p + j * stv_h + i * stv_t + b[:, None] * stv_b + d[None, :], mask=q_ok,
                     other=0.0)
        acc = acc * alpha[:, None] + w[:, None] * vt.to(tl.float32)
        m_i = m_new

    # 2. the prompt: one [BLOCK_M, BLOCK_N] GEMM per key block, shared by all rows of this program; a block with
    #    no attended key (left padding) is skipped after reading its BLOCK_N mask bytes (its K/V are not read)
    pk = pk_ptr + p * spk_p + j * spk_h
    pv = pv_ptr + p * spv_p + j * spv_h
    for n0 in range(0, T, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < T
        keep = (tl.load(mask_ptr + p * sm_p + n, mask=n_ok, other=0) != 0) & n_ok
        if tl.max(keep.to(tl.int32), axis=0) > 0:
            k = tl.load(pk + n[None, :] * spk_t + d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, k, input_precision="ieee")
            else:
                s = tl.dot(q, k)
            s = tl.where(keep[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)  # 0 while m_i is -inf
            w = tl.exp(s - m_safe[:, None])  # 0 at masked keys
            l_i = l_i * alpha + tl.sum(w, axis=1)
            v = tl.load(pv + n[:, None] * spv_t + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(w.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(w.to(v.dtype), v)
            m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # nothing attended: acc is 0, so is out
    tl.store(out_ptr + p * so_p + b[:, None] * so_b + h[:, None] * so_h + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_ok)


def tile_config(rows: int, T: int, D: int, dtype: torch.dtype):
    """(BLOCK_D, BLOCK_M, BLOCK_N, num_warps) for ``rows`` = B x G query rows per (prompt, K/V head).

    fp16/bf16: tensor-core tiles of up to 128 rows (D <= 64) or 64 (D = 128) by 64 keys. fp32: the IEEE dots run
    on CUDA cores with every operand row held in registers, so tiles of 16 (D >= 64) or 32. Compiled ahead of
    time for sm_90 (tests/test_cascade_attention.py): bf16 D = 64 at 128 rows uses 142 registers, no spills."""
    block_d = max(16, triton.next_power_of_2(D))
    if dtype == torch.float32:
        cap_m = cap_n = 16 if block_d >= 64 else 32
    else:
        cap_m, cap_n = (128 if block_d <= 64 else 64), 64
    block_m = min(cap_m, max(16, triton.next_power_of_2(rows)))
    block_n = min(cap_n, max(16, triton.next_power_of_2(max(T, 1))))
    num_warps = 4 if dtype == torch.float32 or block_m * block_d <= 64 * 64 else 8
    return block_d, block_m, block_n, num_warps


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def cascade_attention(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, prefix_mask: torch.Tensor,
                      tail_k: torch.Tensor, tail_v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    P, B, H, D = q.shape
    Hkv, T = prefix_k.shape[1], prefix_k.shape[2]
    G, t = H // Hkv, tail_k.shape[3]
    scale = D ** -0.5 if scale is None else float(scale)
    q, prefix_k, prefix_v, tail_k, tail_v = (_last_dim_contiguous(x) for x in (q, prefix_k, prefix_v, tail_k, tail_v))
    mask = prefix_mask.contiguous().view(torch.uint8)
    out = torch.empty((P, B, H, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if t == 0:  # no tail position is read: q stands in for the (possibly unallocated) empty tail pointers
        tail_k = tail_v = q[:, :, :Hkv, None]
    block_d, block_m, block_n, num_warps = tile_config(B * G, T, D, q.dtype)
    grid = (P, Hkv, triton.cdiv(B * G, block_m))
    _cascade_kernel[grid](
        q, prefix_k, prefix_v, mask, tail_k, tail_v, out,
        B, T, t, G, scale,
        q.stride(0), q.stride(1), q.stride(2),
        prefix_k.stride(0), prefix_k.stride(1), prefix_k.stride(2),
        prefix_v.stride(0), prefix_v.stride(1), prefix_v.stride(2),
        mask.stride(0),
        tail_k.stride(0), tail_k.stride(1), tail_k.stride(2), tail_k.stride(3),
        tail_v.stride(0), tail_v.stride(1), tail_v.stride(2), tail_v.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        D=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, IEEE=q.dtype == torch.float32,
        num_warps=num_warps,
    )
    return out
