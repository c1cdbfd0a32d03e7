"""genrec_fast: fast, reproducible LLM-based generative recommendation.

Semantic IDs (``genrec_fast.sid``), a C++ trie over them (``SIDTrie``), constrained beam
search with Triton kernels (``genrec_fast.decode``), SFT / S-DPO / GRPO training
(``genrec_fast.train``) and full-catalogue evaluation (``genrec_fast.eval``).
"""
from genrec_fast.trie import SIDTrie, TrieDeviceArrays

__version__ = "0.1.0"
__all__ = ["SIDTrie", "TrieDeviceArrays", "__version__"]
