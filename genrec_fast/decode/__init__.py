"""Trie-constrained beam search over Semantic IDs (see docs/decode.md)."""
from genrec_fast.decode.search import BeamSearchResult, beam_search, full_vocab_lse, score_sids
from genrec_fast.sid_tokens import SIDVocab  # the SID token block, re-exported here for decoding

__all__ = ["SIDVocab", "beam_search", "BeamSearchResult", "full_vocab_lse", "score_sids"]
