"""Triton kernels of genrec_fast, installed as ``genrec_fast.kernels``.

Import the kernel modules lazily (``from genrec_fast.kernels import rq``): importing
triton is slow and, on CPU, TRITON_INTERPRET=1 must be set before it happens.
"""
