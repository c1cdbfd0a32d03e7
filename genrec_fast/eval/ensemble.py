"""Product-of-experts ensembles of generative recommenders, each member with its own Semantic IDs.

Members are (model, tokenizer, sid_vocab, catalog) of the same items (``catalog.item_ids`` equal) whose SIDs may
differ, e.g. two residual k-means runs with other seeds, each with its own SFT. For each sample:
1. every member's constrained beam search (:func:`genrec_fast.eval.evaluate.predict`) gives its ranked items;
2. the union of those lists is the candidate set;
3. each member scores every candidate exactly: the full-vocabulary log-probability of the candidate's SID in that
   member's catalogue, given the member's prompt (the quantity its ``score="full_vocab"`` beam search ranks by):
   the beam score for a candidate its own beams hold, else teacher forced (:func:`member_scores`);
4. candidates are ranked by the mean of the members' log-probabilities (ties: lower item index first).
A one-member "ensemble" reproduces that member's beam ranking over its own list. Items no member's beams reach
are not ranked; with B beams per member the list holds at least B items (when the catalogue has them).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import torch

from genrec_fast.decode import score_sids
from genrec_fast.eval.beams import catalog_trie, predict
from genrec_fast.eval.metrics import INVALID_SLOT
from genrec_fast.model import encode_prompts, eval_mode
from genrec_fast.prompts import check_prompt_style, model_prompt_style, rec_prompt


class Member(NamedTuple):
    """One generative recommender of an ensemble, with the catalogue whose SIDs it was trained on."""

    model: torch.nn.Module
    tokenizer: object
    sid_vocab: object
    catalog: object
    prompt_style: Optional[str] = None  # None: the model's own


def check_same_items(item_ids: Sequence, reference_ids: Sequence, who: str, reference: str) -> None:
    """ValueError "``who`` lists other items (or another order) than ``reference``" unless the two id lists are
    equal: every member of an ensemble ranks the same items, each on its own SIDs."""
    if list(item_ids) != list(reference_ids):
        raise ValueError(f"{who} lists other items (or another order) than {reference}; every ensemble member "
                         f"ranks the same items, each on its own SIDs")


def _check_members(members: Sequence[Member]) -> None:
    if not members:
        raise ValueError("ensemble: no members")
    for k, m in enumerate(members[1:], start=1):
        check_same_items(m.catalog.item_ids, members[0].catalog.item_ids, f"ensemble: member {k}'s catalogue",
                         "member 0's")
        if m.catalog.codes is None:
            raise ValueError(f"ensemble: member {k}'s catalogue has no SIDs")


@torch.no_grad()
def member_scores(member: Member, samples: Sequence, candidates: Sequence[Sequence[int]],
                  max_prompt_length: Optional[int] = None, max_rows: int = 1024,
                  shared_prefix: bool = False) -> List[np.ndarray]:
    """Per sample, the member's full-vocabulary log-probability of each candidate item's SID (float64 arrays).

    Consecutive samples go through the model together, about ``max_rows`` (sample, candidate) rows at a time (one
    sample's candidates are never split); each prompt is computed once and its cache copied to its candidates, or
    with ``shared_prefix`` kept once for them (:func:`genrec_fast.decode.score_sids`)."""
    if max_rows < 1:
        raise ValueError(f"member_scores: max_rows must be >= 1, got {max_rows}")
    model, tok, vocab, catalog = member.model, member.tokenizer, member.sid_vocab, member.catalog
    style = model_prompt_style(model) if member.prompt_style is None else check_prompt_style(member.prompt_style)
    codes = np.asarray(catalog.codes)
    out: List[np.ndarray] = [np.zeros(0)] * len(samples)
    todo = [i for i, cand in enumerate(candidates) if len(cand)]
    with eval_mode(model):
        for chunk in _chunks(todo, [len(candidates[i]) for i in todo], max_rows):
            ids, mask = encode_prompts(tok, [rec_prompt(samples[i].history, catalog, style) for i in chunk],
                                       max_length=max_prompt_length)
            width = max(len(candidates[i]) for i in chunk)
            items = np.zeros((len(chunk), width), dtype=np.int64)  # short rows padded with their first candidate
            for j, i in enumerate(chunk):
                items[j] = np.resize(np.asarray(candidates[i], dtype=np.int64), width)
            resp = vocab.token_ids(torch.from_numpy(codes[items.reshape(-1)])).view(len(chunk), width, -1)
            lp = score_sids(model, ids, mask, resp, shared_prefix=shared_prefix).double().cpu().numpy()
            for j, i in enumerate(chunk):
                out[i] = lp[j, :len(candidates[i])]
    return out


def _own_scores(lists: Sequence[Sequence[int]], scores: Sequence[Sequence[float]], who: str) -> List[Dict[int, float]]:
    """Per sample, item -> the score of its first entry in the sample's list (``INVALID_SLOT`` left out)."""
    if len(scores) != len(lists):
        raise ValueError(f"ensemble: {who} has {len(scores)} score lists for {len(lists)} samples")
    out = []
    for i, (lst, sc) in enumerate(zip(lists, scores)):
        if len(sc) != len(lst):
            raise ValueError(f"ensemble: {who}[{i}] has {len(sc)} scores for {len(lst)} items")
        own: Dict[int, float] = {}
        for item, value in zip(lst, sc):
            if item != INVALID_SLOT and item not in own:
                own[int(item)] = float(value)
        out.append(own)
    return out


def _member_lists(members: Sequence[Member], samples: Sequence, beam_lists, beam_scores, search: dict):
    """(per member, per sample its beams' item list; per member, per sample item -> log-probability known from its
    beams): the given lists (and scores), the others decoded by :func:`predict` with ``search``'s options."""
    given = [None] * len(members) if beam_lists is None else list(beam_lists)
    if len(given) != len(members):
        raise ValueError(f"ensemble: beam_lists has {len(given)} entries for {len(members)} members")
    given_scores = [None] * len(members) if beam_scores is None else list(beam_scores)
    if len(given_scores) != len(members):
        raise ValueError(f"ensemble: beam_scores has {len(given_scores)} entries for {len(members)} members")
    lists, known = [], []
    for k, (m, lst, sc) in enumerate(zip(members, given, given_scores)):
        if lst is None:
            if sc is not None:
                raise ValueError(f"ensemble: beam_scores[{k}] is given without beam_lists[{k}]")
            recs = predict(m.model, m.tokenizer, m.sid_vocab, catalog_trie(m.catalog), samples, m.catalog,
                           top_n=len(m.catalog.item_ids), prompt_style=m.prompt_style,  # all beams
                           score="full_vocab", with_scores=True, **search)
            lst, sc = [r["ranked"] for r in recs], [r["scores"] for r in recs]
        elif len(lst) != len(samples):
            raise ValueError(f"ensemble: beam_lists[{k}] has {len(lst)} lists for {len(samples)} samples")
        lists.append(lst)
        known.append([{}] * len(samples) if sc is None else _own_scores(lst, sc, f"beam_scores[{k}]"))
    return lists, known


def _merge(candidates: Sequence[int], own: Dict[int, float], todo: Sequence[int], scored: np.ndarray) -> np.ndarray:
    """One sample's candidates' log-probabilities: those in ``own``, the others (``todo``, in order) from ``scored``."""
    rest = dict(zip(todo, scored.tolist()))
    return np.asarray([own[c] if c in own else rest[c] for c in candidates], dtype=np.float64)


def _chunks(indices: Sequence[int], sizes: Sequence[int], max_rows: int) -> List[List[int]]:
    """``indices`` cut into consecutive runs of at most ``max_rows`` rows (a larger single index is its own run)."""
    runs: List[List[int]] = []
    rows = 0
    for i, n in zip(indices, sizes):
        if runs and rows + n <= max_rows:
            runs[-1].append(i)
            rows += n
        else:
            runs.append([i])
            rows = n
    return runs


def ensemble_predict(members: Sequence[Member], samples: Sequence, num_beams: int = 50, top_n: int = 50,
                     batch_size: int = 16, max_prompt_length: Optional[int] = None,
                     beam_lists: Optional[Sequence[Optional[Sequence[Sequence[int]]]]] = None,
                     max_rows: int = 1024, backend: str = "auto", cuda_graphs: bool = False,
                     search_options: Optional[Mapping[str, Any]] = None,
                     beam_scores: Optional[Sequence[Optional[Sequence[Sequence[float]]]]] = None) -> List[dict]:
    """Rank items for each sample by the members' mean log-probability (see the module doc).

    beam_lists: per member, its beams' item lists for ``samples`` when already decoded (e.g. member 0's, from the
    evaluation of that model alone: :func:`genrec_fast.eval.beams.predict` with ``top_n`` = the catalogue's size),
    or None to decode them here; ``INVALID_SLOT`` entries are ignored.
    beam_scores: per member with beam_lists, the scores beside its lists' entries when they are full-vocabulary
    log-probabilities (``predict(..., score="full_vocab", with_scores=True)``), else None. A member's log-probability
    of a candidate its own beams hold is its beam score (the same quantity, summed in another order: the last bits
    may differ); only the other candidates are scored (:func:`member_scores`). Members decoded here keep theirs.
    backend, cuda_graphs, search_options: how the members' beam searches run (:func:`predict`'s); the scoring pass
    keeps each prompt's K/V once too when ``search_options`` asks for ``shared_prefix``.
    Returns one record per sample, in order: {"index", "target", "ranked" (<= top_n item indices), "scores" (their
    mean log-probabilities), "num_candidates" (the union's size)}.
    """
    _check_members(members)
    if num_beams < 1 or top_n < 1:
        raise ValueError(f"ensemble: num_beams and top_n must be >= 1, got {num_beams} and {top_n}")
    lists, known = _member_lists(members, samples, beam_lists, beam_scores,
                                 dict(num_beams=num_beams, batch_size=batch_size, max_prompt_length=max_prompt_length,
                                      backend=backend, cuda_graphs=cuda_graphs, search_options=search_options))
    candidates = [sorted(set().union(*(set(lst[i]) for lst in lists)) - {INVALID_SLOT}) for i in range(len(samples))]
    shared = bool((search_options or {}).get("shared_prefix", False))
    scores = []
    for m, own in zip(members, known):
        todo = [[c for c in cand if c not in own[i]] for i, cand in enumerate(candidates)]
        got = member_scores(m, samples, todo, max_prompt_length, max_rows, shared)
        scores.append([_merge(cand, own[i], todo[i], got[i]) for i, cand in enumerate(candidates)])
    records = []
    for i, s in enumerate(samples):
        cand = np.asarray(candidates[i], dtype=np.int64)
        mean = np.mean([sc[i] for sc in scores], axis=0) if len(cand) else np.zeros(0)
        order = np.lexsort((cand, -mean))[:top_n]  # higher mean first, then the lower item index
        records.append({"index": i, "target": int(s.target), "ranked": cand[order].tolist(),
                        "scores": mean[order].tolist(), "num_candidates": int(len(cand))})
    return records
