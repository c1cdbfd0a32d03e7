"""Non-learned baselines, evaluated on the same split and metrics as the model.

- popularity: every item ranked by how often it occurs (in histories and as a target) in the
  fitting samples; ties go to the lower item index. The same ranking for every user.
- transition: counts of (last history item -> target) over the fitting samples; a user's list is
  the successors of their last item by count (ties: lower index), then the popularity ranking
  for the rest (without repeats). A user with no history gets the popularity ranking.

The fitting samples are train for a valid-split evaluation and train + valid for test
(``fit_samples``). Samples need only ``.history`` (item indices, oldest first) and ``.target``.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Sequence

import numpy as np

from genrec_fast.eval.metrics import DEFAULT_KS, check_ks, metrics_from_ranks

SPLITS = ("train", "valid", "test")


def fit_samples(data, split: str) -> list:
    """The samples a baseline may learn from when evaluating ``split`` of a RecData."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "train":
        raise ValueError("baselines are fitted on train (for valid) or train + valid (for test): evaluating "
                         "them on train would score them on the samples they learned from")
    if split == "test":
        return list(data.train) + list(data.valid)
    return list(data.train)


def _check_items(samples: Sequence, num_items: int, what: str) -> None:
    for i, s in enumerate(samples):
        bad = [x for x in list(s.history) + [s.target] if not 0 <= int(x) < num_items]
        if bad:
            raise ValueError(f"{what} sample {i}: item index {bad[0]} out of range 0..{num_items - 1}")


def item_counts(samples: Sequence, num_items: int) -> np.ndarray:
    """Occurrences of each item in the samples' histories and targets: int64 [num_items]."""
    _check_items(samples, num_items, "fit")
    flat = [int(x) for s in samples for x in s.history] + [int(s.target) for s in samples]
    return np.bincount(np.asarray(flat, dtype=np.int64), minlength=num_items)


def popularity_ranking(samples: Sequence, num_items: int) -> np.ndarray:
    """All item indices, most frequent first (ties: lower index first)."""
    counts = item_counts(samples, num_items)
    return np.lexsort((np.arange(num_items), -counts))


class TransitionTable:
    """Sparse last-item -> next-item counts, each row sorted by count desc, then item asc."""

    def __init__(self, samples: Sequence, num_items: int):
        _check_items(samples, num_items, "fit")
        pairs = np.asarray([(int(s.history[-1]), int(s.target)) for s in samples if len(s.history)],
                           dtype=np.int64).reshape(-1, 2)
        keys, counts = np.unique(pairs[:, 0] * num_items + pairs[:, 1], return_counts=True)
        src, dst = keys // num_items, keys % num_items
        order = np.lexsort((dst, -counts, src))
        self.src, self.dst, self.counts = src[order], dst[order], counts[order]
        self.num_items = num_items

    def successors(self, item: int) -> np.ndarray:
        lo, hi = np.searchsorted(self.src, [item, item + 1])
        return self.dst[lo:hi]


def transition_rankings(fit: Sequence, samples: Sequence, num_items: int, top_n: int) -> List[np.ndarray]:
    """Top ``top_n`` items per sample by last-item transition, backed off to popularity."""
    _check_items(samples, num_items, "eval")
    table = TransitionTable(fit, num_items)
    pop = popularity_ranking(fit, num_items)
    pop_head = pop[: top_n]
    out = []
    for s in samples:
        succ = table.successors(int(s.history[-1]))[:top_n] if len(s.history) else pop_head[:0]
        if len(succ) >= top_n:
            out.append(succ)
            continue
        # successors first, then popularity without the successors (top_n more always suffice)
        rest = pop[: top_n + len(succ)]
        rest = rest[~np.isin(rest, succ)]
        out.append(np.concatenate([succ, rest])[:top_n])
    return out


def _ranks(lists: Sequence[np.ndarray], samples: Sequence) -> np.ndarray:
    ranks = np.full(len(samples), -1, dtype=np.int64)
    for i, (lst, s) in enumerate(zip(lists, samples)):
        pos = np.nonzero(lst == int(s.target))[0]
        if pos.size:
            ranks[i] = pos[0]
    return ranks


def popularity_baseline(fit: Sequence, samples: Sequence, num_items: int,
                        ks: Iterable[int] = DEFAULT_KS) -> Dict[str, float]:
    """Metrics of the popularity ranking (fitted on ``fit``) on ``samples``."""
    ks = check_ks(ks)
    _check_items(samples, num_items, "eval")
    head = popularity_ranking(fit, num_items)[: max(ks)]
    return metrics_from_ranks(_ranks([head] * len(samples), samples), ks)


def transition_baseline(fit: Sequence, samples: Sequence, num_items: int,
                        ks: Iterable[int] = DEFAULT_KS) -> Dict[str, float]:
    """Metrics of the last-item transition ranking (fitted on ``fit``) on ``samples``."""
    ks = check_ks(ks)
    lists = transition_rankings(fit, samples, num_items, max(ks))
    return metrics_from_ranks(_ranks(lists, samples), ks)


def baseline_metrics(data, split: str, samples: Sequence = None,
                     ks: Iterable[int] = DEFAULT_KS) -> Dict[str, Dict[str, float]]:
    """Both baselines for ``split`` of a RecData (or for a subset ``samples`` of it)."""
    fit = fit_samples(data, split)
    samples = getattr(data, split) if samples is None else samples
    n = len(data.catalog.item_ids)
    return {"popularity": popularity_baseline(fit, samples, n, ks),
            "transition": transition_baseline(fit, samples, n, ks)}
