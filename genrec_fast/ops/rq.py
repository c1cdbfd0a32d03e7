"""Residual quantization op: ``residual_quantize`` (Triton or torch) and its torch reference.

Per row and level l: ``k_l = argmin_k ||r_l - C_l[k]||^2``, ``r_{l+1} = r_l - C_l[k_l]``;
``x_hat = sum_l C_l[k_l]``.

Ties, the contract both backends keep on every device: among IDENTICAL codewords of a level
the lowest index wins, always (``codeword_norms`` gives the later copies an infinite norm, so
they never win, whatever the rounding of their dot products in another tile or BLAS path).
Distinct codewords at the same true distance are a near-tie: the pick is whichever the
rounding of ``||c||^2 - 2 r.c`` favours, and may differ between backends, devices and tiles
(within fp32 rounding of the distance).

Autograd (same for both backends): straight-through for x_hat w.r.t. x (dx = d x_hat) and,
for the codebooks, the gradient of ``sum_l C_l[k_l]`` (each chosen codeword receives the
sum of the x_hat gradients of the rows that chose it). Codes and norms carry no gradient.
"""
from __future__ import annotations

from typing import Tuple, Union

import torch

from genrec_fast.ops.backend import resolve_backend

_REF_CHUNK_ELEMS = 1 << 24  # rows x codes per distance block in the torch reference
# The kernel keeps BLOCK_N x D residuals in registers; "auto" sends wider rows (e.g. raw
# 384-d text embeddings in k-means) to the torch path, where one GEMM per level is as good.
MAX_FUSED_D = 128


def _check_inputs(x: torch.Tensor, codebooks: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"residual_quantize: x must be a 2-D tensor [N, D], got {getattr(x, 'shape', type(x))}")
    if not isinstance(codebooks, torch.Tensor) or codebooks.dim() != 3:
        raise ValueError(
            "residual_quantize: codebooks must be a 3-D tensor [L, K, D], got "
            f"{getattr(codebooks, 'shape', type(codebooks))}"
        )
    if codebooks.shape[2] != x.shape[1]:
        raise ValueError(
            f"residual_quantize: x has D={x.shape[1]} but codebooks have D={codebooks.shape[2]} "
            f"(shape {tuple(codebooks.shape)})"
        )
    if codebooks.shape[0] < 1 or codebooks.shape[1] < 1:
        raise ValueError(f"residual_quantize: codebooks need L >= 1 and K >= 1, got shape {tuple(codebooks.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"residual_quantize: x must be fp32, fp16 or bf16, got {x.dtype}")
    if codebooks.dtype != x.dtype:
        raise ValueError(f"residual_quantize: codebooks dtype {codebooks.dtype} differs from x dtype {x.dtype}")
    if codebooks.device != x.device:
        raise ValueError(f"residual_quantize: codebooks on {codebooks.device} but x on {x.device}")


def codeword_norms(codebooks: torch.Tensor) -> torch.Tensor:
    """fp32 [L, K]: ``||C_l[k]||^2``, and +inf for a codeword identical to a lower-index one of its
    level, so that the lowest index of identical codewords is the only one that can win."""
    cb = codebooks.float()
    cnorm = cb.pow(2).sum(-1)
    levels, k, _ = cb.shape
    idx = torch.arange(k, device=cb.device)
    for lvl in range(levels):
        _, inverse = torch.unique(cb[lvl], dim=0, return_inverse=True)
        first = torch.full((k,), k, dtype=idx.dtype, device=cb.device).scatter_reduce(0, inverse, idx, "amin")
        cnorm[lvl].masked_fill_(first[inverse] != idx, float("inf"))
    return cnorm


def _ref_forward(x: torch.Tensor, codebooks: torch.Tensor):
    """Plain torch forward: fp32 math, distances in row chunks of bounded size."""
    n, _ = x.shape
    levels, k, _ = codebooks.shape
    cb = codebooks.float()
    cnorm = codeword_norms(codebooks)  # [L, K]
    r = x.float().clone()
    codes = torch.empty((n, levels), dtype=torch.int32, device=x.device)
    norms = torch.empty((n, levels), dtype=torch.float32, device=x.device)
    chunk = max(1, _REF_CHUNK_ELEMS // k)
    for lvl in range(levels):
        idx = torch.empty(n, dtype=torch.long, device=x.device)
        for s in range(0, n, chunk):
            # ||c||^2 - 2 r.c  (the row's own ||r||^2 does not change the argmin)
            dist = torch.addmm(cnorm[lvl], r[s:s + chunk], cb[lvl].t(), beta=1.0, alpha=-2.0)
            idx[s:s + chunk] = dist.argmin(dim=1)
        r -= cb[lvl].index_select(0, idx)
        codes[:, lvl] = idx.to(torch.int32)
        norms[:, lvl] = r.pow(2).sum(-1)
    xhat = (x.float() - r).to(x.dtype)
    return codes, xhat, norms


def _triton_forward(x: torch.Tensor, codebooks: torch.Tensor):
    # lazy: triton (slow to import; on CPU TRITON_INTERPRET=1 must be set first)
    from genrec_fast.kernels import rq as rq_kernels

    return rq_kernels.rq_forward(x, codebooks, codeword_norms(codebooks))


class _ResidualQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, codebooks, impl):
        codes, xhat, norms = impl(x.detach(), codebooks.detach())
        ctx.save_for_backward(codes)
        ctx.codebook_shape = codebooks.shape
        ctx.codebook_dtype = codebooks.dtype
        ctx.mark_non_differentiable(codes, norms)
        return codes, xhat, norms

    @staticmethod
    def backward(ctx, grad_codes, grad_xhat, grad_norms):
        (codes,) = ctx.saved_tensors
        grad_x = grad_cb = None
        if grad_xhat is None:
            return None, None, None
        if ctx.needs_input_grad[0]:
            grad_x = grad_xhat
        if ctx.needs_input_grad[1]:
            levels, k, d = ctx.codebook_shape
            g = grad_xhat.float()
            grad_cb = torch.zeros((levels, k, d), dtype=torch.float32, device=g.device)
            for lvl in range(levels):
                grad_cb[lvl].index_put_((codes[:, lvl].long(),), g, accumulate=True)
            grad_cb = grad_cb.to(ctx.codebook_dtype)
        return grad_x, grad_cb, None


def _apply(impl, x, codebooks, return_norms):
    _check_inputs(x, codebooks)
    if torch.is_grad_enabled() and (x.requires_grad or codebooks.requires_grad):
        codes, xhat, norms = _ResidualQuantize.apply(x, codebooks, impl)
    else:
        codes, xhat, norms = impl(x, codebooks)
    return (codes, xhat, norms) if return_norms else (codes, xhat)


def residual_quantize_ref(
    x: torch.Tensor, codebooks: torch.Tensor, backend: str = "torch", return_norms: bool = False
) -> Union[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Plain-torch reference of :func:`residual_quantize` (same signature; ``backend`` is ignored)."""
    return _apply(_ref_forward, x, codebooks, return_norms)


def residual_quantize(
    x: torch.Tensor, codebooks: torch.Tensor, backend: str = "auto", return_norms: bool = False
) -> Union[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Residual quantization of ``x`` [N, D] over ``codebooks`` [L, K, D] (fp32/fp16/bf16, same dtype).

    Returns ``(codes [N, L] int32, x_hat [N, D])``, plus ``norms [N, L]`` fp32 (squared norm of the
    residual left after each level) when ``return_norms``. ``backend``: "auto" (Triton on CUDA
    for D <= MAX_FUSED_D, torch otherwise), "triton" or "torch". Differentiable (see the module docstring).
    """
    if backend == "auto" and x.dim() == 2 and x.shape[1] > MAX_FUSED_D:
        backend = "torch"
    impl = _triton_forward if resolve_backend(backend, x.device) == "triton" else _ref_forward
    return _apply(impl, x, codebooks, return_norms)
