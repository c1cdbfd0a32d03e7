"""Backend selection shared by every op."""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401  # lazy: optional (Linux only) and slow to import; see genrec_fast.kernels
    except Exception:  # noqa: BLE001 - any import failure means "no triton"
        return False
    return True


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """Return "triton" or "torch" for an op whose tensors live on ``device``.

    "auto" takes Triton on CUDA devices (when triton imports) and the torch reference
    elsewhere. "triton" is honoured on CUDA, and on CPU only under TRITON_INTERPRET=1
    (the interpreter is for correctness tests, not speed); otherwise it is an error.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise ValueError("backend='triton' asked for, but triton is not importable (use backend='auto' or 'torch')")
    if device.type != "cuda" and not interpreter_on():
        raise ValueError(
            f"backend='triton' on a {device.type} tensor needs TRITON_INTERPRET=1 set before triton is imported"
        )
    return "triton"
