"""genrec_fast: fast, reproducible LLM-based generative recommendation.

Semantic IDs (``genrec_fast.sid``), a C++ trie over them (``SIDTrie``), constrained beam
search with Triton kernels (``genrec_fast.decode``), SFT / S-DPO / GRPO training
(``genrec_fast.train``), full-catalogue evaluation (``genrec_fast.eval``) and recommendations from a saved
model in one call (``Recommender.from_pretrained(model_dir).recommend(histories, k=10)``).
"""
from genrec_fast.recommend import Recommendation, Recommender
from genrec_fast.trie import SIDTrie, TrieDeviceArrays

__version__ = "0.1.0"
__all__ = ["Recommendation", "Recommender", "SIDTrie", "TrieDeviceArrays", "__version__"]
