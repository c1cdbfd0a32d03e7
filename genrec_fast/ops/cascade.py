"""Shared-prefix ("cascade") decode attention: ``cascade_attention`` (Triton or torch) and its torch reference.

One query token per beam row. The B beams of a prompt share its prompt K/V, stored ONCE per prompt;
each beam row holds only its own generated tail (t positions, t <= L - 1 in a search of L levels).

``cascade_attention(q, prefix_k, prefix_v, prefix_mask, tail_k, tail_v, scale=None, backend="auto")``
    q            [P, B, H, D]        the query of beam b of prompt p (one token)
    prefix_k/v   [P, Hkv, T, D]      the prompt K/V, once per prompt (H = G * Hkv, GQA: query head h reads
                                      K/V head h // G, as transformers' ``repeat_kv`` lays them out)
    prefix_mask  [P, T] bool         True where the prompt key is attended (left padding is False)
    tail_k/v     [P, B, Hkv, t, D]   each beam's own generated keys/values, t >= 0, all attended
    scale        float or None       softmax scale (None: D ** -0.5, as sdpa)
    -> out       [P, B, H, D] in q's dtype:
    ``softmax(scale * q . [prefix keys where prefix_mask ; tail keys]) @ [prefix values ; tail values]``,
    i.e. what ``torch.nn.functional.scaled_dot_product_attention`` gives over K/V replicated per beam
    (``cat([prefix.repeat_interleave(B), tail], seq)``) with the prompt mask. A row with no attended key at
    all (every prompt key masked and t == 0) gives zeros (sdpa gives NaN there).

The two parts are merged exactly by their log-sum-exps: with ``o_x, lse_x`` the softmax-normalised output
and log-sum-exp of part x, ``out = o_1 exp(lse_1 - lse) + o_2 exp(lse_2 - lse)``, ``lse = logaddexp(lse_1,
lse_2)``. The reference computes the two parts and merges them so; the kernel keeps one running
(max, sum, accumulator) over the prompt's key blocks and then the tail positions, which is the same merge
done block by block (online softmax).

Both backends compute scores and softmax in fp32. The kernel multiplies the fp32 probabilities, cast to
the value dtype, by the values on the tensor cores (fp16/bf16 inputs; fp32 inputs use IEEE fp32 dots,
no TF32), as flash attention does, so fp16/bf16 results differ from the reference by that rounding.
Forward only (no autograd): it serves the beam search, which runs under ``torch.inference_mode``.
"""
from __future__ import annotations

from typing import Optional

import torch

from genrec_fast.ops.backend import resolve_backend

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _shape(t) -> tuple:
    return tuple(getattr(t, "shape", ())) if isinstance(t, torch.Tensor) else (type(t).__name__,)


def _check_inputs(q, prefix_k, prefix_v, prefix_mask, tail_k, tail_v, scale) -> None:
    name = "cascade_attention"
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"{name}: q must be a 4-D tensor [P, B, H, D], got {_shape(q)}")
    if q.dtype not in _FLOATS:
        raise ValueError(f"{name}: q must be float32, float16 or bfloat16, got {q.dtype}")
    P, B, H, D = q.shape
    if (not isinstance(prefix_k, torch.Tensor) or prefix_k.dim() != 4 or prefix_k.shape[0] != P
            or prefix_k.shape[3] != D):
        raise ValueError(f"{name}: prefix_k must be [P={P}, Hkv, T, D={D}], got {_shape(prefix_k)}")
    Hkv, T = prefix_k.shape[1], prefix_k.shape[2]
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"{name}: q's {H} heads are not a multiple of prefix_k's {Hkv} K/V heads")
    if not isinstance(prefix_v, torch.Tensor) or tuple(prefix_v.shape) != tuple(prefix_k.shape):
        raise ValueError(f"{name}: prefix_v must have prefix_k's shape {tuple(prefix_k.shape)}, got {_shape(prefix_v)}")
    if (not isinstance(prefix_mask, torch.Tensor) or tuple(prefix_mask.shape) != (P, T)
            or prefix_mask.dtype != torch.bool):
        raise ValueError(f"{name}: prefix_mask must be a bool tensor of shape ({P}, {T}), got "
                         f"{getattr(prefix_mask, 'dtype', type(prefix_mask))} {_shape(prefix_mask)}")
    if (not isinstance(tail_k, torch.Tensor) or tail_k.dim() != 5 or tuple(tail_k.shape[:3]) != (P, B, Hkv)
            or tail_k.shape[4] != D):
        raise ValueError(f"{name}: tail_k must be [P={P}, B={B}, Hkv={Hkv}, t, D={D}], got {_shape(tail_k)}")
    if not isinstance(tail_v, torch.Tensor) or tuple(tail_v.shape) != tuple(tail_k.shape):
        raise ValueError(f"{name}: tail_v must have tail_k's shape {tuple(tail_k.shape)}, got {_shape(tail_v)}")
    for arg, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v), ("tail_k", tail_k), ("tail_v", tail_v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name}: {arg} dtype {t.dtype} differs from q's {q.dtype}")
    for arg, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v), ("prefix_mask", prefix_mask),
                   ("tail_k", tail_k), ("tail_v", tail_v)):
        if t.device != q.device:
            raise ValueError(f"{name}: {arg} on {t.device} but q on {q.device}")
    if scale is not None and not float(scale) > 0:
        raise ValueError(f"{name}: scale must be > 0 or None, got {scale}")


def _partial(q, k, v, mask):
    """Softmax attention of one part -> (normalised output [..., M, D] fp32, lse [..., M] fp32; -inf, 0 when
    no key of the part is attended)."""
    s = q @ k.transpose(-1, -2)  # [..., M, N]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf where nothing is attended
    w = torch.exp(s - torch.where(torch.isneginf(lse), 0.0, lse)[..., None])  # 0 at masked keys
    return w @ v, lse


def cascade_attention_ref(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, prefix_mask: torch.Tensor,
                          tail_k: torch.Tensor, tail_v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """Torch reference of :func:`cascade_attention` (fp32 math; the two parts merged by log-sum-exp)."""
    P, B, H, D = q.shape
    Hkv = prefix_k.shape[1]
    G = H // Hkv
    scale = D ** -0.5 if scale is None else float(scale)
    # [P, Hkv, B*G, D]: the B x G query rows of K/V head j of prompt p, one GEMM per (p, j) over the prompt
    qf = (q.float() * scale).reshape(P, B, Hkv, G, D)
    q_pre = qf.permute(0, 2, 1, 3, 4).reshape(P, Hkv, B * G, D)
    o_pre, lse_pre = _partial(q_pre, prefix_k.float(), prefix_v.float(), prefix_mask[:, None, None, :])
    o_pre = o_pre.reshape(P, Hkv, B, G, D).permute(0, 2, 1, 3, 4)  # [P, B, Hkv, G, D]
    lse_pre = lse_pre.reshape(P, Hkv, B, G).permute(0, 2, 1, 3)  # [P, B, Hkv, G]
    # the tails: [P, B, Hkv, G, D] queries against their own [P, B, Hkv, t, D] keys
    o_tail, lse_tail = _partial(qf, tail_k.float(), tail_v.float(), None)
    lse = torch.logaddexp(lse_pre, lse_tail)
    safe = torch.where(torch.isneginf(lse), 0.0, lse)
    out = o_pre * torch.exp(lse_pre - safe)[..., None] + o_tail * torch.exp(lse_tail - safe)[..., None]
    return out.reshape(P, B, H, D).to(q.dtype)


def cascade_attention(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, prefix_mask: torch.Tensor,
                      tail_k: torch.Tensor, tail_v: torch.Tensor, scale: Optional[float] = None,
                      backend: str = "auto") -> torch.Tensor:
    """One-token attention of P x B beam rows over their prompt's shared K/V plus their own tails (module doc)."""
    _check_inputs(q, prefix_k, prefix_v, prefix_mask, tail_k, tail_v, scale)
    if resolve_backend(backend, q.device) == "torch":
        return cascade_attention_ref(q, prefix_k, prefix_v, prefix_mask, tail_k, tail_v, scale)
    # lazy: triton (slow to import; on CPU TRITON_INTERPRET=1 must be set first)
    from genrec_fast.kernels import cascade as cascade_kernels

    return cascade_kernels.cascade_attention(q, prefix_k, prefix_v, prefix_mask, tail_k, tail_v, scale)
