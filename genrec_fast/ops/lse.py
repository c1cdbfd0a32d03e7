"""Full-vocabulary log-sum-exp of an LM head: ``lm_head_lse`` (Triton or torch) and its torch reference.

``lm_head_lse(hidden, weight, bias=None, backend="auto")``
    hidden  [R, H]   the rows' last hidden states
    weight  [V, H]   the LM head (hidden's dtype: float32, float16 or bfloat16), row v = token v
    bias    [V] or None
    -> [R] float32: ``logsumexp(hidden @ weight.T + bias, dim=1)``, the normaliser of a full-vocabulary
    log-softmax (what HF's beam search subtracts from each logit), without the [R, V] logits ever existing at once.

Reference (``lm_head_lse_ref``): the logits in the model dtype (as the model's own forward forms them), ``chunk_elems
// R`` vocabulary columns at a time, each chunk reduced in fp32, the chunks merged by ``logsumexp``. The Triton
kernel (``genrec_fast.kernels.lse``) fuses the matmul with the reduction: each program multiplies BLOCK_M rows by
BLOCK_N vocabulary rows at a time (tensor-core dots, fp32 accumulation; fp32 inputs use IEEE fp32 dots, no TF32),
keeps a running (max, sum of exp) per row over its share of the vocabulary, and writes only those two numbers; the
shares are merged by ``logsumexp``. Its logits stay fp32, so in fp16/bf16 it is closer to the exact value than the
reference, which rounds each logit to the model dtype first: the two differ by that rounding (tests bound both
against a float64 computation). A NaN logit makes the row NaN in both (``beam_search`` reports NaN scores).
Forward only (no autograd): it serves the beam search, which runs under ``torch.inference_mode``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from genrec_fast.ops.backend import resolve_backend

LSE_CHUNK_ELEMS = 1 << 26  # rows x vocabulary columns per logits chunk of the reference
_LSE_PROBE = 1024  # columns searched for a finite logit to read the log-sum-exp at
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check_inputs(hidden, weight, bias) -> None:
    name = "lm_head_lse"
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"{name}: hidden must be a 2-D tensor [R, H], got {getattr(hidden, 'shape', type(hidden))}")
    if hidden.dtype not in _FLOATS:
        raise ValueError(f"{name}: hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{name}: weight must be [V, H={hidden.shape[1]}], got "
                         f"{getattr(weight, 'shape', type(weight))}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"{name}: weight dtype {weight.dtype} differs from hidden's {hidden.dtype}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"{name}: bias must be None or [V={weight.shape[0]}], got "
                         f"{getattr(bias, 'shape', type(bias))}")
    for arg, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name}: {arg} on {t.device} but hidden on {hidden.device}")


def _lse(logits: torch.Tensor) -> torch.Tensor:
    """fp32 log-sum-exp of each row, by one fused log-softmax pass: lse = x_j - log_softmax(x)_j, read at
    j = the arg-max of the first ``_LSE_PROBE`` columns (a -inf logit there would give -inf - -inf = NaN;
    the arg-max of the whole row would cost one more pass over [rows, V]). Only a row whose first
    ``_LSE_PROBE`` logits are all -inf gives NaN (in :func:`lm_head_lse_ref`: of any of its vocabulary
    chunks), which beam_search reports as an error, never silently."""
    j = logits[:, :_LSE_PROBE].argmax(dim=1, keepdim=True)
    log_probs = torch.log_softmax(logits, dim=1, dtype=torch.float32)
    return (logits.gather(1, j).float() - log_probs.gather(1, j)).squeeze(1)


def lm_head_lse_ref(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    chunk_elems: int = LSE_CHUNK_ELEMS) -> torch.Tensor:
    """Torch reference of :func:`lm_head_lse` (module doc): logits in the model dtype, ``chunk_elems // R``
    vocabulary columns (multiples of 1024) at a time, reduced in fp32."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    cols = max(1024, chunk_elems // max(rows, 1) // 1024 * 1024)  # multiples of 1024: aligned GEMM outputs
    if cols >= vocab:
        return _lse(F.linear(hidden, weight, bias))
    parts = [_lse(F.linear(hidden, weight[s:s + cols], None if bias is None else bias[s:s + cols]))
             for s in range(0, vocab, cols)]
    return torch.logsumexp(torch.stack(parts, dim=1), dim=1)


def lm_head_lse(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                backend: str = "auto") -> torch.Tensor:
    """log-sum-exp over all V rows of the LM head, [R] float32 (module doc)."""
    _check_inputs(hidden, weight, bias)
    if resolve_backend(backend, hidden.device) == "torch":
        return lm_head_lse_ref(hidden, weight, bias)
    # lazy: triton (slow to import; on CPU TRITON_INTERPRET=1 must be set first)
    from genrec_fast.kernels import lse as lse_kernels

    return lse_kernels.lm_head_lse(hidden, weight, bias)
