"""Public ops. Each op has a Triton kernel (``genrec_fast.kernels``) and a plain-torch
reference with the same signature; ``backend`` picks one ("auto" | "triton" | "torch")."""
from genrec_fast.ops.backend import resolve_backend, triton_available

__all__ = ["resolve_backend", "triton_available"]
