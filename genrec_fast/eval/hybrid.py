"""The hybrid row: the model's beams re-ranked with last-item transition counts.

Each item the beam search returned for a sample gets

    score(item) = beam log-prob(item) + weight * log(1 + count(last history item -> item))

where the counts are the transition baseline's (``TransitionTable`` over the same fitting samples: train
for a valid evaluation, train + valid for test). Up to a per-sample constant this is the model's log-prob
plus ``weight`` times the log of an add-one-smoothed transition probability, so ``weight`` 0 is the model's
own order and a large weight puts the last item's seen successors first (by count, ties by the model).
Only the model's own list is re-ordered: the hybrid holds the same items as the model (the same hits
at the list's length), never an item the model did not generate. Equal scores keep the beam order.
An invalid beam's slot (``INVALID_SLOT``) has no successor count and keeps its beam score.

The hybrid is reported as its own row beside the model: the pure generative model is what the
quality targets are about. Its weight is chosen on valid (``select_weight``), with a model that was not
trained on valid, and then fixed for test.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np

from genrec_fast.data.types import Sample
from genrec_fast.eval.baselines import TransitionTable
from genrec_fast.eval.metrics import INVALID_SLOT, target_ranks
from genrec_fast.eval.stats import per_sample

SELECT_METRIC = "NDCG@10"


def check_weight(weight: float, what: str = "hybrid weight") -> float:
    """``weight`` as a float if it is finite and >= 0; ValueError naming ``what`` otherwise."""
    w = float(weight)
    if not np.isfinite(w) or w < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {weight!r}")
    return w


class TransitionReranker:
    """Re-ranks scored item lists with ``weight * log1p(count(last -> item))`` from a ``TransitionTable``."""

    def __init__(self, table: TransitionTable):
        self.table = table

    def counts(self, last: int, items: Sequence[int]) -> np.ndarray:
        """The transition count of ``last -> item`` for each item (0 for an invalid slot or an unseen pair)."""
        out = np.zeros(len(items), dtype=np.float64)
        if last < 0:
            return out
        lo, hi = np.searchsorted(self.table.src, [last, last + 1])
        succ = dict(zip(self.table.dst[lo:hi].tolist(), self.table.counts[lo:hi].tolist()))
        for j, item in enumerate(items):
            if item != INVALID_SLOT:
                out[j] = succ.get(int(item), 0)
        return out

    def rerank(self, items: Sequence[int], scores: Sequence[float], last: int, weight: float) -> List[int]:
        """``items`` (best first, with their beam ``scores``) in the hybrid's order for a user whose last
        history item is ``last`` (-1: no history, the model's order)."""
        return self.rerank_scored(items, scores, last, weight)[0]

    def rerank_scored(self, items: Sequence[int], scores: Sequence[float], last: int,
                      weight: float) -> Tuple[List[int], List[float]]:
        """As :meth:`rerank`, with each item's hybrid score (beam score + weight * log1p(count)) beside it."""
        if len(items) != len(scores):
            raise ValueError(f"rerank: {len(items)} items but {len(scores)} scores")
        new = np.asarray(scores, dtype=np.float64) + weight * np.log1p(self.counts(last, items))
        order = np.lexsort((np.arange(len(items)), -new))  # higher score first, then the beam order
        return [int(items[j]) for j in order], [float(new[j]) for j in order]


def sequence_transitions(sequences: Sequence[Sequence[int]], num_items: int) -> TransitionTable:
    """A ``TransitionTable`` of the consecutive pairs of user sequences (catalogue indices, oldest first), e.g.
    the interactions a served model was trained on."""
    pairs = [Sample(str(u), [int(seq[j])], int(seq[j + 1])) for u, seq in enumerate(sequences)
             for j in range(len(seq) - 1)]
    if not pairs:
        raise ValueError("sequence_transitions: no sequence holds two items, so there is no transition to count")
    return TransitionTable(pairs, num_items)


def _last_item(sample) -> int:
    return int(sample.history[-1]) if len(sample.history) else -1


def hybrid_lists(records: Sequence[dict], samples: Sequence, table: TransitionTable, weight: float) -> List[List[int]]:
    """The hybrid's ranked list per record (``predict(..., with_scores=True)`` records of ``samples``)."""
    weight = check_weight(weight)
    if len(records) != len(samples):
        raise ValueError(f"hybrid: {len(records)} prediction records for {len(samples)} samples")
    reranker = TransitionReranker(table)
    out = []
    for i, (rec, s) in enumerate(zip(records, samples)):
        if "scores" not in rec:
            raise ValueError(f"hybrid: prediction record {i} has no beam scores (predict with with_scores=True)")
        if int(rec["target"]) != int(s.target):
            raise ValueError(f"hybrid: prediction record {i} has target {rec['target']}, its sample {s.target}")
        out.append(reranker.rerank(rec["ranked"], rec["scores"], _last_item(s), weight))
    return out


def hybrid_ranks(records: Sequence[dict], samples: Sequence, table: TransitionTable, weight: float) -> np.ndarray:
    """0-based rank of each sample's target in its hybrid list (-1: not in it)."""
    return target_ranks(hybrid_lists(records, samples, table, weight), [int(s.target) for s in samples])


def select_weight(records: Sequence[dict], samples: Sequence, table: TransitionTable, weights: Iterable[float],
                  metric: str = SELECT_METRIC) -> Tuple[float, Dict[float, float]]:
    """The weight of ``weights`` with the highest mean ``metric`` on these (valid) samples, and every weight's
    value; ties go to the smaller weight (the one nearer the model's own order)."""
    grid = sorted({check_weight(w, "hybrid grid weight") for w in weights})
    if not grid:
        raise ValueError("select_weight: no weights to choose from")
    values = {w: float(per_sample(hybrid_ranks(records, samples, table, w), metric).mean()) for w in grid}
    best = max(grid, key=lambda w: (values[w], -w))
    return best, values
