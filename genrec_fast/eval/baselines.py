"""Non-learned baselines, evaluated on the same split and metrics as the model.

- popularity: every item ranked by how often it occurs (in histories and as a target) in the
  fitting samples; ties go to the lower item index. The same ranking for every user.
- transition: counts of (last history item -> target) over the fitting samples; a user's list is
  the successors of their last item by count (ties: the more popular item first, then the lower
  index), then the popularity ranking for the rest (without repeats). A user with no history gets
  the popularity ranking.
- sasrec: a learned SASRec (``genrec_fast.eval.sasrec``), fitted with early stopping on a held-out
  part of the fitting samples; every item is ranked by its logits (ties: lower index).

The fitting samples are train for a valid-split evaluation and train + valid for test
(``fit_samples``). Samples need only ``.history`` (item indices, oldest first) and ``.target``.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np

from genrec_fast.eval.metrics import DEFAULT_KS, check_ks, metrics_from_ranks
from genrec_fast.eval.sasrec import sasrec_ranks

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
    """Sparse last-item -> next-item counts, each row sorted by count desc, then by popularity (the
    item's place in ``popularity_ranking`` of the same samples: more occurrences first, then lower index)."""

    def __init__(self, samples: Sequence, num_items: int):
        _check_items(samples, num_items, "fit")
        pairs = np.asarray([(int(s.history[-1]), int(s.target)) for s in samples if len(s.history)],
                           dtype=np.int64).reshape(-1, 2)
        keys, counts = np.unique(pairs[:, 0] * num_items + pairs[:, 1], return_counts=True)
        src, dst = keys // num_items, keys % num_items
        pop_place = np.empty(num_items, dtype=np.int64)
        pop_place[popularity_ranking(samples, num_items)] = np.arange(num_items)
        order = np.lexsort((pop_place[dst], -counts, src))
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


def popularity_ranks(fit: Sequence, samples: Sequence, num_items: int, top_n: int) -> np.ndarray:
    """0-based rank of each sample's target in the popularity ranking (-1 beyond ``top_n``)."""
    _check_items(samples, num_items, "eval")
    head = popularity_ranking(fit, num_items)[:top_n]
    return _ranks([head] * len(samples), samples)


def transition_ranks(fit: Sequence, samples: Sequence, num_items: int, top_n: int) -> np.ndarray:
    """0-based rank of each sample's target in its transition list (-1 beyond ``top_n``)."""
    return _ranks(transition_rankings(fit, samples, num_items, top_n), samples)


def popularity_baseline(fit: Sequence, samples: Sequence, num_items: int,
                        ks: Iterable[int] = DEFAULT_KS) -> Dict[str, float]:
    """Metrics of the popularity ranking (fitted on ``fit``) on ``samples``."""
    ks = check_ks(ks)
    return metrics_from_ranks(popularity_ranks(fit, samples, num_items, max(ks)), ks)


def transition_baseline(fit: Sequence, samples: Sequence, num_items: int,
                        ks: Iterable[int] = DEFAULT_KS) -> Dict[str, float]:
    """Metrics of the last-item transition ranking (fitted on ``fit``) on ``samples``."""
    ks = check_ks(ks)
    return metrics_from_ranks(transition_ranks(fit, samples, num_items, max(ks)), ks)


def baseline_ranks(data, split: str, samples: Sequence = None, ks: Iterable[int] = DEFAULT_KS,
                   sasrec=True) -> Tuple[Dict[str, np.ndarray], Dict[str, dict]]:
    """Per-sample target ranks of every baseline on ``split`` of a RecData (or a subset ``samples``).

    Returns ({name: 0-based ranks, -1 beyond max(ks)}, {name: extra info}); names: popularity,
    transition and, unless ``sasrec`` is False, sasrec (``sasrec``: True for the default
    ``SASRecConfig``, or a config / dict of its fields; the fit is memoised per data and config).
    """
    ks = check_ks(ks)
    fit = fit_samples(data, split)
    samples = getattr(data, split) if samples is None else samples
    n = len(data.catalog.item_ids)
    ranks = {"popularity": popularity_ranks(fit, samples, n, max(ks)),
             "transition": transition_ranks(fit, samples, n, max(ks))}
    info: Dict[str, dict] = {}
    if sasrec is not False and sasrec is not None:
        ranks["sasrec"], fit_info = sasrec_ranks(data, split, samples, max(ks), None if sasrec is True else sasrec)
        info["sasrec"] = {k: v for k, v in fit_info.items() if not k.endswith("_curve")}
    return ranks, info


def baseline_metrics(data, split: str, samples: Sequence = None, ks: Iterable[int] = DEFAULT_KS,
                     sasrec=True) -> Dict[str, Dict[str, float]]:
    """Every baseline's metrics for ``split`` of a RecData (or for a subset ``samples`` of it).

    ``sasrec=False`` leaves SASRec out (see ``baseline_ranks``); its entry also holds the fit's
    ``fit_seconds``, ``epochs`` and ``best_epoch``.
    """
    ks = check_ks(ks)
    return metrics_of(*baseline_ranks(data, split, samples, ks, sasrec), ks)


def metrics_of(ranks: Dict[str, np.ndarray], info: Dict[str, dict], ks: Iterable[int]) -> Dict[str, Dict[str, float]]:
    """The metrics rows of ``baseline_ranks``' output (SASRec's also with its fit_seconds, epochs, best_epoch)."""
    out = {name: metrics_from_ranks(r, ks) for name, r in ranks.items()}
    for name, extra in info.items():
        out[name].update({k: extra[k] for k in ("fit_seconds", "epochs", "best_epoch") if k in extra})
    return out
