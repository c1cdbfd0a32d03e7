"""Triton kernels of genrec_fast, installed as ``genrec_fast.kernels``.

Import the kernel modules lazily (``from genrec_fast.kernels import rq``): importing
triton is slow and, on CPU, TRITON_INTERPRET=1 must be set before it happens.

This folder sits at the repository root, so whenever the root is on ``sys.path``
(``python -m ...``, ``python -c``, a notebook started there) ``import kernels`` finds this
file first. Imported under any name but ``genrec_fast.kernels`` it hands the import over to
the first ``kernels`` on ``sys.path`` outside this repository (Hugging Face's ``kernels``,
which transformers imports) or raises ModuleNotFoundError: it never stands in for another
package. tests/test_packaging.py checks this for every importable name at the root.
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
        if spec is None:
            del sys.modules[name]
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # the import statement returns what sys.modules holds after this file runs
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise

    _hand_over(__name__)
