"""Balanced assignment: Sinkhorn transport plan, rounded to a hard assignment under capacities.

Used by balanced k-means (each cluster holds at most ``ceil(N / K)`` rows) and by the
collision resolver (each free last-level code takes at most one item). Runs in numpy fp64
on the host: the matrices are at most [items, K], and many small torch ops on a loaded
2-core CPU spend most of their time in OpenMP barriers.
"""
from __future__ import annotations

import numpy as np
import torch


def _to_numpy(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def sinkhorn_log_plan(cost, capacity, eps: float = 0.05, iters: int = 50) -> np.ndarray:
    """Log of an entropic transport plan between rows (mass 1 each) and columns (at most ``capacity``).

    ``cost`` [n, m] (``inf`` = forbidden), ``capacity`` [m] >= 0 with ``sum(capacity) >= n``.
    Costs are shifted and scaled to [0, 1], so ``eps`` is relative to their spread. Columns
    are upper bounds: the column step only shrinks over-full columns. Kernel form
    (plan = diag(u) exp(-cost/eps) diag(v)), so one exp over the matrix in total.
    """
    c = _to_numpy(cost).astype(np.float64)
    finite = np.isfinite(c)
    if not finite.any(axis=1).all():
        bad = np.where(~finite.any(axis=1))[0][:10].tolist()
        raise ValueError(f"sinkhorn: rows {bad} have no allowed column")
    vals = c[finite]
    lo, scale = vals.min(), max(vals.max() - vals.min(), 1e-12)
    with np.errstate(invalid="ignore"):
        logk = np.where(finite, -(c - lo) / (scale * eps), -np.inf)
    kmat = np.exp(logk)  # in [exp(-1/eps), 1]: no underflow for eps >= 0.015
    cap = np.clip(_to_numpy(capacity).astype(np.float64), 0, None)
    v = np.ones_like(cap)
    # einsum, not BLAS gemv: threaded gemv stalls for milliseconds on a busy 2-core host
    for _ in range(iters):
        u = 1.0 / np.einsum("ij,j->i", kmat, v)
        col = v * np.einsum("i,ij->j", u, kmat)
        v = v * np.minimum(cap / np.maximum(col, 1e-300), 1.0)
    u = 1.0 / np.einsum("ij,j->i", kmat, v)
    with np.errstate(divide="ignore"):
        return logk + np.log(u)[:, None] + np.log(np.maximum(v, 1e-300))[None, :]


def balanced_assign(cost, capacity, eps: float = 0.05, iters: int = 50) -> torch.Tensor:
    """Hard assignment of each row to a column, at most ``capacity[j]`` rows per column.

    Rows are ranked by their Sinkhorn plan; each round, every unassigned row proposes its
    best column that still has room and each column accepts its highest-ranked proposers
    (ties: lower row index). Returns a long tensor [n] (on ``cost``'s device). Raises if infeasible.
    """
    device = cost.device if isinstance(cost, torch.Tensor) else torch.device("cpu")
    c = _to_numpy(cost)
    n, m = c.shape
    cap = _to_numpy(capacity).astype(np.int64).copy()
    if cap.shape != (m,):
        raise ValueError(f"balanced_assign: capacity has shape {cap.shape}, expected ({m},)")
    if int(np.clip(cap, 0, None).sum()) < n:
        raise ValueError(f"balanced_assign: total capacity {int(np.clip(cap, 0, None).sum())} < {n} rows")
    assign = np.full(n, -1, dtype=np.int64)
    if n:
        score = np.where(np.isfinite(c), sinkhorn_log_plan(c, cap, eps=eps, iters=iters), -np.inf)
    while (assign < 0).any():
        un = np.where(assign < 0)[0]
        s = np.where(cap[None, :] > 0, score[un], -np.inf)
        choice = s.argmax(axis=1)
        val = s[np.arange(un.size), choice]
        ok = np.isfinite(val)
        if not ok.any():
            raise ValueError(f"balanced_assign: rows {un[:10].tolist()} have no allowed column with room left")
        un, val, choice = un[ok], val[ok], choice[ok]
        # proposals ordered by (column, -score, row); each column keeps its first capacity[column]
        order = np.lexsort((un, -val, choice))
        ch = choice[order]
        rank = np.arange(ch.size) - np.searchsorted(ch, ch, side="left")
        accept = rank < cap[ch]
        assign[un[order[accept]]] = ch[accept]
        cap -= np.bincount(ch[accept], minlength=m)
    return torch.from_numpy(assign).to(device)
