"""Constrained beam search over a catalogue's trie, turned into ranked item lists.

Each sample's prompt (``genrec_fast.prompts.rec_prompt``, in the model's own prompt style) is decoded into
``num_beams`` SIDs, best first. The ranked item list walks the beams in order; a beam whose SID several items share
contributes all of them in ascending item index; repeats are dropped. A hit counts on the target ITEM, not on a
shared SID string. An invalid beam (codes that are no SID of the trie) keeps its place as ``INVALID_SLOT``.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from genrec_fast.decode import beam_search
from genrec_fast.decode.options import SEARCH_OPTIONS
from genrec_fast.eval.metrics import INVALID_SLOT
from genrec_fast.model import encode_prompts, eval_mode, max_positions
from genrec_fast.prompts import check_prompt_style, model_prompt_style, rec_prompt
from genrec_fast.trie import SIDTrie

# ---- trie over a catalogue -------------------------------------------------------------------

def catalog_trie(catalog):
    """The SIDTrie of a catalogue's codes; item ids are catalogue indices; shared SIDs are kept."""
    if catalog.codes is None:
        raise ValueError("the catalogue has no Semantic IDs (catalog.codes is None); build them first")
    return SIDTrie(catalog.codes, codebook_sizes=catalog.codebook_sizes, allow_duplicates=True)


# ---- beams -> ranked items -------------------------------------------------------------------

class BeamRanker:
    """Turns beam codes into ranked, deduplicated item lists using the trie (host side)."""

    def __init__(self, trie):
        self.trie = trie
        self.sizes = np.asarray(trie.codebook_sizes, dtype=np.int64)
        self._leaf_cache: Dict[int, List[int]] = {}

    def _items_of_leaf(self, leaf: int) -> List[int]:
        items = self._leaf_cache.get(leaf)
        if items is None:
            items = sorted(int(x) for x in self.trie.leaf_items(leaf))
            self._leaf_cache[leaf] = items
        return items

    def rank(self, codes: np.ndarray, scores: np.ndarray, top_n: int) -> Tuple[List[List[int]], np.ndarray, np.ndarray]:
        """codes [P, B, L], scores [P, B] (best first; -inf marks padding beams).

        Returns (ranked item lists truncated to ``top_n``, returned beams per row [P],
        invalid beams per row [P]). An invalid beam (codes that are no SID) holds its place in the
        list as ``INVALID_SLOT`` (-1), which is never a hit.
        """
        lists, _, n_ret, n_bad = self.rank_scored(codes, scores, top_n)
        return lists, n_ret, n_bad

    def rank_scored(self, codes: np.ndarray, scores: np.ndarray,
                    top_n: int) -> Tuple[List[List[int]], List[List[float]], np.ndarray, np.ndarray]:
        """As :meth:`rank`, with each list entry's score beside it: (ranked item lists, their beam scores,
        returned beams [P], invalid beams [P]); the items of one shared SID share its beam's score."""
        codes = np.asarray(codes, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float64)
        P, B, L = codes.shape
        if L != len(self.sizes):
            raise ValueError(f"beam codes have {L} levels, the trie {len(self.sizes)}")
        returned = ~np.isneginf(scores)
        in_range = ((codes >= 0) & (codes < self.sizes[None, None, :])).all(-1)
        leaf = np.full((P, B), -1, dtype=np.int64)
        ask = returned & in_range
        if ask.any():
            leaf[ask] = self.trie.lookup(codes[ask].astype(np.int32))
        valid = leaf >= 0
        lists, list_scores = [], []
        for p in range(P):
            ranked: List[int] = []
            ranked_scores: List[float] = []
            seen = set()
            for b in np.nonzero(returned[p])[0]:
                if not valid[p, b]:
                    ranked.append(INVALID_SLOT)  # an invalid beam keeps its rank: later hits are not moved up
                    ranked_scores.append(float(scores[p, b]))
                for item in self._items_of_leaf(int(leaf[p, b])) if valid[p, b] else ():
                    if item not in seen:
                        seen.add(item)
                        ranked.append(item)
                        ranked_scores.append(float(scores[p, b]))
                if len(ranked) >= top_n:
                    break
            lists.append(ranked[:top_n])
            list_scores.append(ranked_scores[:top_n])
        return lists, list_scores, returned.sum(1), (returned & ~valid).sum(1)


def check_prompt_lengths(model, sid_vocab, samples: Sequence, lengths: Dict[int, int],
                        max_prompt_length: Optional[int] = None) -> None:
    """Refuse prompts the model cannot read whole: a prompt (its last ``max_prompt_length`` tokens when that
    is given, as :func:`genrec_fast.model.encode_prompts` keeps them) plus the SID's tokens must fit the
    model's positions (:func:`genrec_fast.model.max_positions`). ValueError naming the sample (index and
    user), its prompt length and the model's limit; prompts are never cut silently."""
    limit = max_positions(model)
    if limit is None:
        return
    levels = sid_vocab.num_levels
    over = [(i, n) for i, n in lengths.items()
            if (n if max_prompt_length is None else min(n, max_prompt_length)) + levels > limit]
    if over:
        i, n = max(over, key=lambda x: x[1])
        kept = n if max_prompt_length is None else min(n, max_prompt_length)
        user = getattr(samples[i], "user_id", "?")
        raise ValueError(
            f"sample {i} (user {user}): its prompt is {kept} tokens, + {levels} SID tokens > the model's "
            f"{limit} positions (max_position_embeddings); {len(over)} sample(s) are over: shorten their "
            f"histories or pass max_prompt_length (at most {limit - levels}) to keep each prompt's last tokens")


@torch.inference_mode()
def predict(model, tokenizer, sid_vocab, trie, samples: Sequence, catalog, num_beams: int = 50,
            batch_size: int = 16, top_n: int = 50, score: str = "full_vocab", backend: str = "auto",
            max_prompt_length: Optional[int] = None, progress: bool = False,
            indices: Optional[Iterable[int]] = None, cuda_graphs: bool = False, prompt_style: Optional[str] = None,
            with_scores: bool = False, search_options: Optional[Mapping[str, Any]] = None) -> List[dict]:
    """Decode ``samples`` (those at ``indices``, default all) and rank items for each.

    cuda_graphs: run the searches' forwards from CUDA graphs (``beam_search(cuda_graphs=True)``);
    prompts are batched by length, so consecutive batches share a graph set.
    search_options: more keyword arguments of ``beam_search``, out of ``SEARCH_OPTIONS`` (``shared_prefix``,
    ``graph_scope``, ``lse_backend``); another name is a ValueError.

    Returns one record per decoded sample: {"index", "target", "ranked" (<= top_n item indices; an
    invalid beam's place holds ``INVALID_SLOT``, -1), "num_beams" (returned), "num_invalid"}, in index
    order; with ``with_scores`` also "scores" (the beam score, a log-probability, of each "ranked" entry:
    float sums that can differ in the last bits with the batch a prompt is decoded in). Prompts are
    batched by length, in the style ``prompt_style`` (None: the model's, :func:`model_prompt_style`).
    A prompt that does not fit the model's positions is an error (:func:`check_prompt_lengths`).
    """
    if num_beams < 1 or batch_size < 1 or top_n < 1:
        raise ValueError(f"num_beams, batch_size and top_n must be >= 1 (got {num_beams}, {batch_size}, {top_n})")
    search_options = dict(search_options or {})
    unknown = sorted(set(search_options) - set(SEARCH_OPTIONS))
    if unknown:
        raise ValueError(f"predict: search_options {unknown} are not among the beam_search options it passes on "
                         f"{SEARCH_OPTIONS}")
    idx = list(range(len(samples))) if indices is None else [int(i) for i in indices]
    if not idx:
        return []
    style = model_prompt_style(model) if prompt_style is None else check_prompt_style(prompt_style)
    prompts = {i: rec_prompt(samples[i].history, catalog, style) for i in idx}
    lengths = {i: len(tokenizer(prompts[i], add_special_tokens=False)["input_ids"]) for i in idx}
    check_prompt_lengths(model, sid_vocab, samples, lengths, max_prompt_length)
    order = sorted(idx, key=lambda i: (lengths[i], i))
    ranker = BeamRanker(trie)
    device = next(model.parameters()).device
    records = []
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if progress:
        batches = tqdm(batches, desc="eval", unit="batch")
    with eval_mode(model):
        for batch in batches:
            ids, mask = encode_prompts(tokenizer, [prompts[i] for i in batch], max_length=max_prompt_length)
            res = beam_search(model, ids.to(device), mask.to(device), trie, sid_vocab, num_beams,
                              score=score, backend=backend, cuda_graphs=cuda_graphs, **search_options)
            lists, list_scores, n_ret, n_bad = ranker.rank_scored(res.codes.cpu().numpy(),
                                                                  res.scores.float().cpu().numpy(), top_n)
            for j, i in enumerate(batch):
                records.append({"index": i, "target": int(samples[i].target), "ranked": lists[j],
                                "num_beams": int(n_ret[j]), "num_invalid": int(n_bad[j])})
                if with_scores:
                    records[-1]["scores"] = list_scores[j]
    records.sort(key=lambda r: r["index"])
    return records
