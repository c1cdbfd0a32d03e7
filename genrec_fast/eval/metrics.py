"""Ranking metrics over full-catalogue ranked item lists.

A ranked list holds item indices, best first, without repeats. With one target item per
sample and binary relevance: HR@K = share of samples whose target sits at 0-based rank < K;
NDCG@K = mean of 1 / log2(rank + 2) over those hits (0 for a miss) — the ideal DCG is 1.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Mapping, Optional, Sequence

import numpy as np

DEFAULT_KS = (1, 3, 5, 10, 20, 50)


def check_ks(ks: Iterable[int]) -> tuple:
    given = list(ks)  # once: ks may be a generator
    out = tuple(int(k) for k in given)
    if not out or any(k <= 0 for k in out):
        raise ValueError(f"ks must be a non-empty list of positive cut-offs, got {given}")
    return tuple(sorted(set(out)))


def ks_for_beams(ks: Optional[Iterable[int]], num_beams: int, where: str = "evaluate") -> tuple:
    """The cut-offs of an evaluation by a ``num_beams`` beam search.

    ``None``: the ``DEFAULT_KS`` up to ``num_beams``. A given cut-off above ``num_beams`` raises: the
    model's list only holds the items of ``num_beams`` beams, so its HR@K would be a lower bound set
    beside baselines that rank the whole catalogue. ``num_beams`` below 1 raises, naming num_beams.
    """
    if isinstance(num_beams, bool) or int(num_beams) != num_beams or num_beams < 1:
        raise ValueError(f"{where}: num_beams must be an integer >= 1, got {num_beams!r}")
    if ks is None:
        return tuple(k for k in DEFAULT_KS if k <= num_beams) or (int(num_beams),)
    ks = check_ks(ks)
    if ks[-1] > num_beams:
        raise ValueError(
            f"{where}: cut-off K={ks[-1]} is above num_beams={num_beams}: the model's ranked list holds the items of "
            f"{num_beams} beams only, so HR@{ks[-1]} would not be comparable; raise num_beams or drop the cut-offs "
            f"{[k for k in ks if k > num_beams]}"
        )
    return ks


INVALID_SLOT = -1  # a ranked-list entry that holds a rank but is no item (an invalid beam); never a hit


def target_ranks(ranked_item_lists: Sequence[Sequence[int]], targets: Sequence[int]) -> np.ndarray:
    """0-based rank of each sample's target in its ranked list, -1 where it is absent.

    Entries equal to ``INVALID_SLOT`` take a rank and are never a hit. Raises ValueError naming
    the rows whose list repeats an item (ranks would be ambiguous).
    """
    if len(ranked_item_lists) != len(targets):
        raise ValueError(f"{len(ranked_item_lists)} ranked lists but {len(targets)} targets")
    ranks = np.full(len(targets), -1, dtype=np.int64)
    repeated = []
    for i, (lst, t) in enumerate(zip(ranked_item_lists, targets)):
        lst = [int(x) for x in lst]
        items = [x for x in lst if x != INVALID_SLOT]
        if len(set(items)) != len(items):
            repeated.append(i)
            continue
        if int(t) == INVALID_SLOT:
            raise ValueError(f"row {i}: target {INVALID_SLOT} is the invalid-beam marker, not an item")
        try:
            ranks[i] = lst.index(int(t))
        except ValueError:
            pass
    if repeated:
        raise ValueError(f"ranked lists repeat an item in row(s) {repeated[:10]}"
                         f"{' ...' if len(repeated) > 10 else ''}; deduplicate them first")
    return ranks


def metrics_from_ranks(ranks: np.ndarray, ks: Iterable[int] = DEFAULT_KS) -> Dict[str, float]:
    """HR@K and NDCG@K (K in ``ks``) from 0-based target ranks (-1 = not ranked)."""
    ks = check_ks(ks)
    ranks = np.asarray(ranks, dtype=np.int64)
    if ranks.size == 0:
        raise ValueError("no samples to compute metrics on")
    hit_any = ranks >= 0
    gain = np.where(hit_any, 1.0 / np.log2(np.where(hit_any, ranks, 0) + 2.0), 0.0)
    out: Dict[str, float] = {}
    for k in ks:
        hit = hit_any & (ranks < k)
        out[f"HR@{k}"] = float(hit.mean())
        out[f"NDCG@{k}"] = float(np.where(hit, gain, 0.0).mean())
    out["num_samples"] = int(ranks.size)
    return out


def ranking_metrics(ranked_item_lists: Sequence[Sequence[int]], targets: Sequence[int],
                    ks: Iterable[int] = DEFAULT_KS) -> Dict[str, float]:
    """HR@K / NDCG@K for K in ``ks`` (plus ``num_samples``) of ranked item lists against targets."""
    return metrics_from_ranks(target_ranks(ranked_item_lists, targets), ks)


def format_table(results: Mapping[str, Mapping[str, float]], ks: Iterable[int] = DEFAULT_KS,
                 extra: Sequence[str] = ("invalid_rate",)) -> str:
    """A plain-text table: one row per method, HR@K and NDCG@K columns (+ ``extra`` where present)."""
    ks = check_ks(ks)
    cols = [f"HR@{k}" for k in ks] + [f"NDCG@{k}" for k in ks]
    cols += [c for c in extra if any(c in r for r in results.values())]
    name_w = max([len("method")] + [len(n) for n in results])
    widths = [max(len(c), 7) for c in cols]
    lines = ["  ".join([f"{'method':<{name_w}}"] + [f"{c:>{w}}" for c, w in zip(cols, widths)])]
    for name, row in results.items():
        cells = []
        for c, w in zip(cols, widths):
            v = row.get(c)
            cells.append(f"{'-':>{w}}" if v is None or (isinstance(v, float) and math.isnan(v))
                         else f"{float(v):>{w}.4f}")
        lines.append("  ".join([f"{name:<{name_w}}"] + cells))
    return "\n".join(lines)
