"""Fused residual quantization (Triton).

One program owns ``BLOCK_N`` rows of ``x`` and keeps their residual in registers for all
L levels. Per level it walks the codebook in ``BLOCK_K`` tiles, scores a tile with one
``tl.dot`` as ``||c_k||^2 - 2 r.c_k`` and folds it into a running (min, argmin), so the
[N, K] distance matrix never exists in memory. The chosen codeword is gathered and
subtracted, and added to x_hat. Ties: identical codewords of a level resolve to the lowest
index in every tile (``cnorm``, from ``genrec_fast.ops.rq.codeword_norms``, gives later copies an
infinite norm); equal computed distances go to the lowest index (``tl.argmin`` breaks ties left
inside a tile, a later tile must be strictly better); distinct codewords at the same true distance
follow the dots' rounding (see ``genrec_fast.ops.rq``).

fp32 inputs use ``tf32x3`` dots on GPUs (about fp32 accuracy on tensor cores); bf16/fp16
inputs feed the dot in their own dtype with fp32 accumulation. The residual, x_hat and
the per-level squared residual norms are always accumulated in fp32.

On a GPU the tile sizes are autotuned per (D, K, L) (eight configs, compiled and timed on first
use of a shape); ``GENREC_FAST_AUTOTUNE=0``, read when this module is imported, takes one fixed
config instead (the test suite sets it: tests check results, not speed).

Plain-torch reference with the same signature: ``genrec_fast.ops.rq.residual_quantize_ref``.
Import this module lazily: triton is imported here and, on CPU, TRITON_INTERPRET=1 must
be set before that happens.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _rq_fwd_kernel(
    x_ptr, cb_ptr, cnorm_ptr, codes_ptr, xhat_ptr, norms_ptr,
    N, D, K,
    L: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rmask = rows < N
    dcol = tl.arange(0, BLOCK_D)
    dmask = dcol < D
    xmask = rmask[:, None] & dmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * D + dcol[None, :], mask=xmask, other=0.0)
    dot_dtype = x.dtype
    r = x.to(tl.float32)
    xhat = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for lvl in tl.static_range(L):
        cb_lvl = cb_ptr + lvl * K * D
        best = tl.full([BLOCK_N], float("inf"), tl.float32)
        best_idx = tl.zeros([BLOCK_N], dtype=tl.int32)
        r_dot = r.to(dot_dtype)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            c = tl.load(cb_lvl + ks[:, None] * D + dcol[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
            cn = tl.load(cnorm_ptr + lvl * K + ks, mask=kmask, other=0.0)
            dots = tl.dot(r_dot, tl.trans(c), input_precision=INPUT_PRECISION)
            dist = cn[None, :] - 2.0 * dots
            dist = tl.where(kmask[None, :], dist, float("inf"))
            tile_min = tl.min(dist, axis=1)
            tile_arg = tl.argmin(dist, axis=1).to(tl.int32)
            better = tile_min < best
            best = tl.where(better, tile_min, best)
            best_idx = tl.where(better, k0 + tile_arg, best_idx)
        q = tl.load(cb_lvl + best_idx[:, None].to(tl.int64) * D + dcol[None, :], mask=xmask, other=0.0).to(tl.float32)
        r = r - q
        xhat = xhat + q
        tl.store(codes_ptr + rows * L + lvl, best_idx, mask=rmask)
        tl.store(norms_ptr + rows * L + lvl, tl.sum(r * r, axis=1), mask=rmask)
    tl.store(xhat_ptr + rows[:, None] * D + dcol[None, :], xhat.to(xhat_ptr.dtype.element_ty), mask=xmask)


def _autotune_on() -> bool:
    value = os.environ.get("GENREC_FAST_AUTOTUNE", "1")
    if value not in ("0", "1"):
        raise ValueError(f"GENREC_FAST_AUTOTUNE must be 0 or 1, got {value!r}")
    return value == "1"


_AUTOTUNE = _autotune_on()  # a bad value is an error here, on CPU too

# (BLOCK_N, BLOCK_K, num_warps, num_stages) the GPU autotuner picks from; tests run every one of them
CONFIGS = [
    (64, 64, 4, 2), (128, 64, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2),
    (64, 128, 4, 2), (256, 64, 8, 2), (64, 256, 8, 1), (128, 256, 8, 1),
]

if _INTERPRET:
    # The interpreter is for correctness: one fixed, large-ish tile (fewer numpy programs).
    _kernel = _rq_fwd_kernel
    _FIXED = {"BLOCK_N": 32, "BLOCK_K": 64}
elif not _AUTOTUNE:  # pragma: no cover - needs a GPU
    # GENREC_FAST_AUTOTUNE=0 (the test suite's default): one config, one compile per shape instead of
    # eight compiles and a timing round; every config computes the same codes (tests run each one)
    _kernel = _rq_fwd_kernel
    _FIXED = dict(zip(("BLOCK_N", "BLOCK_K", "num_warps", "num_stages"), CONFIGS[0]))
else:  # pragma: no cover - needs a GPU
    _kernel = triton.autotune(
        configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bn, bk, w, s in CONFIGS],
        key=["D", "K", "L"],
    )(_rq_fwd_kernel)
    _FIXED = {}


def rq_forward(x: torch.Tensor, codebooks: torch.Tensor, cnorm: torch.Tensor, config=None):
    """Fused forward: ``x`` [N, D], ``codebooks`` [L, K, D] (same dtype, same device), ``cnorm`` [L, K] the
    codeword norms of ``genrec_fast.ops.rq.codeword_norms(codebooks)`` (+inf for repeated codewords).

    Returns ``codes`` [N, L] int32, ``x_hat`` [N, D] (x's dtype) and ``norms`` [N, L] fp32,
    the squared norm of the residual left after each level. ``config``: one entry of ``CONFIGS``
    to launch with instead of the autotuned / fixed choice (for tests).
    """
    x = x.contiguous()
    codebooks = codebooks.contiguous()
    n, d = x.shape
    levels, k, _ = codebooks.shape
    codes = torch.empty((n, levels), dtype=torch.int32, device=x.device)
    xhat = torch.empty_like(x)
    norms = torch.empty((n, levels), dtype=torch.float32, device=x.device)
    if n == 0:
        return codes, xhat, norms
    cnorm = cnorm.float().contiguous()
    block_d = max(16, triton.next_power_of_2(d))
    precision = "tf32x3" if x.dtype == torch.float32 else "tf32"  # non-fp32 dots ignore the setting

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    kernel, tiles = _kernel, _FIXED
    if config is not None:
        bn, bk, warps, stages = config
        kernel, tiles = _rq_fwd_kernel, {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}
    kernel[grid](
        x, codebooks, cnorm, codes, xhat, norms, n, d, k,
        L=levels, BLOCK_D=block_d, INPUT_PRECISION=precision, **tiles,
    )
    return codes, xhat, norms
