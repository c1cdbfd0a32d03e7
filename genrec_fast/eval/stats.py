"""Bootstrap intervals for ranking metrics, over evaluation users.

Every method's per-sample 0-based target ranks (-1 = not in its list; ``metrics.metrics_from_ranks``)
give a per-sample metric (HR@K: hit; NDCG@K: 1/log2(rank+2) for a hit, else 0). The resampling
unit is the user: each of ``num_resamples`` draws takes as many users as there are, with
replacement, and the statistic is the mean over all samples of the drawn users (a user with several
samples counts with all of them; with one sample per user this is the plain bootstrap over samples).
Its point estimate is the metric itself. Intervals are 95 % percentile intervals (``level``).

- ``bootstrap_interval``: one method's mean.
- ``paired_interval``: the difference of two methods' means on the same samples, each draw using the
  same users for both, so what the methods share (easy and hard users) cancels out.

Seeded (numpy ``default_rng(seed)``) and vectorised; the draws are made in blocks to bound memory.
"""
from __future__ import annotations

import hashlib
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95
INTERVAL_METRICS = ("NDCG@10", "HR@10")


def per_sample(ranks: Sequence[int], metric: str) -> np.ndarray:
    """Per-sample values of ``metric`` ("HR@K" or "NDCG@K") from 0-based target ranks (-1 = miss)."""
    name, _, k = metric.partition("@")
    if name not in ("HR", "NDCG") or not k.isdigit() or int(k) < 1:
        raise ValueError(f"metric must be HR@K or NDCG@K, got {metric!r}")
    r = np.asarray(ranks, dtype=np.int64)
    hit = (r >= 0) & (r < int(k))
    if name == "HR":
        return hit.astype(np.float64)
    return np.where(hit, 1.0 / np.log2(np.maximum(r, 0) + 2.0), 0.0)


def _groups(n: int, users: Optional[Sequence]) -> Tuple[np.ndarray, int]:
    """Group index of each sample (one group per distinct user; each sample its own without users)."""
    if users is None:
        return np.arange(n), n
    if len(users) != n:
        raise ValueError(f"{len(users)} user ids for {n} samples")
    _, inv = np.unique(np.asarray([str(u) for u in users]), return_inverse=True)
    return inv.reshape(-1), int(inv.max()) + 1 if n else 0


def _draw_means(values: np.ndarray, users: Optional[Sequence], num_resamples: int, seed: int,
                block: int = 256) -> np.ndarray:
    """Bootstrap means over users of each column of ``values`` [n, m]: array [num_resamples, m]."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    n = values.shape[0]
    if n == 0:
        raise ValueError("no samples to bootstrap")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    group, g = _groups(n, users)
    sums = np.zeros((g, values.shape[1]))
    np.add.at(sums, group, values)
    counts = np.bincount(group, minlength=g).astype(np.float64)
    rng = np.random.default_rng(seed)
    out = np.empty((num_resamples, values.shape[1]))
    for start in range(0, num_resamples, block):
        b = min(block, num_resamples - start)
        # how often each user is drawn in each resample: [b, g] (the same draws for every column)
        idx = rng.integers(0, g, (b, g)) + (np.arange(b) * g)[:, None]
        w = np.bincount(idx.ravel(), minlength=b * g).reshape(b, g).astype(np.float64)
        out[start:start + b] = (w @ sums) / (w @ counts)[:, None]
    return out


def _interval(draws: np.ndarray, level: float) -> Tuple[float, float]:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    lo, hi = np.quantile(draws, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def _mean_over_samples(values: np.ndarray) -> float:
    return float(np.asarray(values, dtype=np.float64).mean())


def bootstrap_interval(values: Sequence[float], users: Optional[Sequence] = None,
                       num_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                       level: float = DEFAULT_LEVEL) -> Dict[str, object]:
    """{"mean", "ci": [lo, hi]} of the mean of per-sample ``values``, resampling ``users`` (None: samples)."""
    values = np.asarray(values, dtype=np.float64)
    draws = _draw_means(values, users, num_resamples, seed)[:, 0]
    return {"mean": _mean_over_samples(values), "ci": list(_interval(draws, level))}


def paired_interval(a: Sequence[float], b: Sequence[float], users: Optional[Sequence] = None,
                    num_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                    level: float = DEFAULT_LEVEL) -> Dict[str, object]:
    """{"diff", "ci": [lo, hi]} of mean(a) - mean(b) over the same samples, the same users drawn for both."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values differ in length: {a.shape} vs {b.shape}")
    draws = _draw_means(a - b, users, num_resamples, seed)[:, 0]  # mean over users of a - b, per draw
    return {"diff": _mean_over_samples(a) - _mean_over_samples(b), "ci": list(_interval(draws, level))}


def unpaired_interval(a: Sequence[float], b: Sequence[float], users: Optional[Sequence] = None,
                      num_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                      level: float = DEFAULT_LEVEL) -> Dict[str, object]:
    """The same difference with independent draws for a and b (what ignoring the pairing gives)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    da = _draw_means(a, users, num_resamples, seed)[:, 0]
    db = _draw_means(b, users, num_resamples, seed + 1)[:, 0]
    return {"diff": _mean_over_samples(a) - _mean_over_samples(b), "ci": list(_interval(da - db, level))}


# ---- on evaluate_split results -------------------------------------------------------------------

def samples_fingerprint(samples: Sequence) -> str:
    """sha1 of the samples' (user, history, target), in order: two results compare only if these match."""
    h = hashlib.sha1()
    for s in samples:
        h.update(repr((str(s.user_id), [int(x) for x in s.history], int(s.target))).encode())
    return h.hexdigest()


def method_intervals(ranks: Dict[str, Sequence[int]], users: Optional[Sequence],
                     metrics: Iterable[str] = INTERVAL_METRICS, num_resamples: int = DEFAULT_RESAMPLES,
                     seed: int = 0, level: float = DEFAULT_LEVEL) -> Dict[str, Dict[str, list]]:
    """{method: {metric: [lo, hi]}}: every method's interval, all from the same draws of users."""
    names = list(ranks)
    metrics = list(metrics)
    out: Dict[str, Dict[str, list]] = {m: {} for m in names}
    for metric in metrics:
        cols = np.stack([per_sample(ranks[m], metric) for m in names], axis=1)
        draws = _draw_means(cols, users, num_resamples, seed)
        for j, m in enumerate(names):
            out[m][metric] = list(_interval(draws[:, j], level))
    return out


def paired_vs_best(ranks: Dict[str, Sequence[int]], baselines: Sequence[str], users: Optional[Sequence],
                   metrics: Iterable[str] = INTERVAL_METRICS, method: str = "model",
                   num_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                   level: float = DEFAULT_LEVEL) -> Dict[str, dict]:
    """{metric: {"baseline", "diff", "ci"}}: ``method`` minus the baseline with the best point estimate."""
    out = {}
    for metric in metrics:
        vals = {b: per_sample(ranks[b], metric) for b in baselines}
        best = max(baselines, key=lambda b: (vals[b].mean(), -list(baselines).index(b)))
        res = paired_interval(per_sample(ranks[method], metric), vals[best], users, num_resamples, seed, level)
        out[metric] = {"baseline": best, **res}
    return out


def compare_results(a: dict, b: dict, method_a: str = "model", method_b: str = "model",
                    metrics: Iterable[str] = INTERVAL_METRICS, num_resamples: int = DEFAULT_RESAMPLES,
                    seed: int = 0, level: float = DEFAULT_LEVEL) -> Dict[str, dict]:
    """Paired intervals of ``method_a`` of result ``a`` minus ``method_b`` of result ``b``.

    ``a`` and ``b`` are ``evaluate_split`` results (with their ``per_sample`` block) on the same
    samples, e.g. an SFT model and its post-trained version. Returns {metric: {"a", "b", "diff", "ci"}}.
    Raises ValueError when they do not cover the same samples in the same order.
    """
    for name, r in (("first", a), ("second", b)):
        if "per_sample" not in r:
            raise ValueError(f"compare_results: the {name} result has no per-sample ranks (an evaluate_split "
                             f"result of this version holds them under 'per_sample')")
    pa, pb = a["per_sample"], b["per_sample"]
    if pa["samples_sha1"] != pb["samples_sha1"] or len(pa["user_id"]) != len(pb["user_id"]):
        raise ValueError(
            f"compare_results: the results cover different samples ({a.get('split')} split, {len(pa['user_id'])} "
            f"samples, sha1 {pa['samples_sha1'][:12]} vs {b.get('split')} split, {len(pb['user_id'])} samples, sha1 "
            f"{pb['samples_sha1'][:12]}): evaluate both on the same split with the same max_samples and seed")
    for name, p, m in (("first", pa, method_a), ("second", pb, method_b)):
        if m not in p["ranks"]:
            raise ValueError(f"compare_results: the {name} result has no method {m!r} (has {sorted(p['ranks'])})")
    users = pa["user_id"]
    out = {}
    for metric in metrics:
        va, vb = per_sample(pa["ranks"][method_a], metric), per_sample(pb["ranks"][method_b], metric)
        res = paired_interval(va, vb, users, num_resamples, seed, level)
        out[metric] = {"a": float(va.mean()), "b": float(vb.mean()), **res}
    return out
