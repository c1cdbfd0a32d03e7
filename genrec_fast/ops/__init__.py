"""Public ops. Each op has a Triton kernel (``genrec_fast.kernels``) and a plain-torch reference with the
same signature (``<op>_ref``); ``backend`` picks one ("auto" | "triton" | "torch", :func:`resolve_backend`).

- :func:`trie_log_softmax`, :func:`grouped_topk`: the steps of the trie-constrained beam search (``ops.beam``)
- :func:`lm_head_lse`: the full-vocabulary log-sum-exp of an LM head, fused with its matmul (``ops.lse``)
- :func:`cascade_attention`: one-token attention over a shared prompt prefix and per-beam tails (``ops.cascade``)
- :func:`residual_quantize`: residual quantization over L codebooks (``ops.rq``)

Importing this package loads no kernel: each op imports its Triton module on its first Triton call.
"""
from genrec_fast.ops.backend import resolve_backend, triton_available
from genrec_fast.ops.beam import grouped_topk, grouped_topk_ref, trie_log_softmax, trie_log_softmax_ref
from genrec_fast.ops.cascade import cascade_attention, cascade_attention_ref
from genrec_fast.ops.lse import lm_head_lse, lm_head_lse_ref
from genrec_fast.ops.rq import residual_quantize, residual_quantize_ref

__all__ = [
    "cascade_attention",
    "cascade_attention_ref",
    "grouped_topk",
    "grouped_topk_ref",
    "lm_head_lse",
    "lm_head_lse_ref",
    "residual_quantize",
    "residual_quantize_ref",
    "resolve_backend",
    "trie_log_softmax",
    "trie_log_softmax_ref",
    "triton_available",
]
