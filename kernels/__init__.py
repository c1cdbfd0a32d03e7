"""Triton kernels of genrec_fast, installed as ``genrec_fast.kernels``.

Import the kernel modules lazily (``from genrec_fast.kernels import rq``): importing
triton is slow and, on CPU, TRITON_INTERPRET=1 must be set before it happens.

This folder sits at the repository root, so whenever the root is on ``sys.path``
(``python -m ...``, ``python -c``, a notebook started there) ``import kernels`` finds this
file first. Imported under any name but ``genrec_fast.kernels`` it never stands in for
another package:
- it hands the import over to the first ``kernels`` on ``sys.path`` outside this repository
  (Hugging Face's ``kernels``, which transformers imports), or
- when there is none, it becomes what Python makes of a folder without ``__init__.py``: an
  empty namespace package (no ``__file__``, no ``__version__``, nothing importable inside).
  transformers' ``is_kernels_available()`` (5.17 and later) imports a ``kernels`` that has no
  distribution metadata and reads exactly that as "a shadow on sys.path, not installed"; an
  import error here instead would fail its import of every model (transformers 5.17 does
  not depend on Hugging Face's ``kernels``).
tests/test_packaging.py checks both for every importable name at the root.
"""
import importlib.machinery
import importlib.util
import os
import sys

if __name__ != "genrec_fast.kernels":
    def _hand_over(name: str) -> None:
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = [p for p in sys.path if os.path.abspath(p or os.curdir) != repo]
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:  # the empty namespace package a bare folder would give
            spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
            spec.submodule_search_locations = []
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # the import statement returns what sys.modules holds after this file runs
        try:
            spec.loader.exec_module(module)  # module_from_spec gave a namespace spec its (no-op) loader
        except BaseException:
            sys.modules.pop(name, None)
            raise

    _hand_over(__name__)
