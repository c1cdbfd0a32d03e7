"""SID statistics and the collision resolver that makes SIDs unique, always.

Resolution runs in two stages:
1. last-level reassignment: within each prefix (the first L-1 codes) that holds colliding
   items, the colliding items are reassigned to distinct last-level codes among those not
   taken by the prefix's other items, by balanced (Sinkhorn-rounded, capacity one) assignment
   on the distance of each item's last-level residual to the codewords;
2. if a prefix has more items than last-level codes, a dedup level is appended: code 0 for
   every item except the 2nd, 3rd, ... members of a still-colliding group (1, 2, ...).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from genrec_fast.sid.assign import balanced_assign


def _check_codes(codes, where: str = "codes") -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] == 0 or codes.shape[1] == 0:
        raise ValueError(f"{where}: expected a non-empty [N, L] code table, got shape {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"{where}: codes must be integers, got {codes.dtype}")
    if (codes < 0).any():
        rows = np.where((codes < 0).any(1))[0][:10].tolist()
        raise ValueError(f"{where}: negative codes in rows {rows}")
    return codes.astype(np.int64)


def _groups_of(keys: np.ndarray):
    """Rows grouped by equal key rows -> (group id per row, rows sorted by group, group starts, sizes)."""
    _, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return inverse, order, starts, counts


def collision_groups(codes) -> list:
    """Lists of row indices (ascending, groups ordered by first row) that share a full SID."""
    _, order, starts, counts = _groups_of(_check_codes(codes))
    groups = [order[s:s + c].tolist() for s, c in zip(starts, counts) if c > 1]
    return sorted(groups, key=lambda rows: rows[0])


def sid_stats(codes, codebook_sizes: Optional[Sequence[int]] = None) -> dict:
    """Collisions (groups of rows sharing a SID, rows in them, 1 - unique/N), used codes and
    codebook perplexity (exp of the entropy of code usage) per level."""
    codes = _check_codes(codes)
    n, levels = codes.shape
    if codebook_sizes is not None and len(codebook_sizes) != levels:
        raise ValueError(f"sid_stats: {len(codebook_sizes)} codebook sizes for {levels} levels")
    _, counts = np.unique(codes, axis=0, return_counts=True)
    used, perplexity = [], []
    for lvl in range(levels):
        c = np.bincount(codes[:, lvl])
        c = c[c > 0]
        p = c / n
        used.append(int(c.size))
        perplexity.append(float(math.exp(-(p * np.log(p)).sum())))
    return {
        "num_items": int(n),
        "num_unique_sids": int(counts.size),
        "collision_groups": int((counts > 1).sum()),
        "colliding_items": int(counts[counts > 1].sum()),
        "collision_rate": float(1.0 - counts.size / n),
        "used_codes": used,
        "codebook_sizes": list(codebook_sizes) if codebook_sizes is not None else None,
        "perplexity": perplexity,
    }


def resolve_last_level(
    codes,
    codebook_size: int,
    residuals: Optional[torch.Tensor] = None,
    codebook: Optional[torch.Tensor] = None,
) -> Tuple[np.ndarray, int]:
    """Stage 1: reassign colliding items on the last level. Returns (new codes int64, items moved).

    ``residuals`` [N, D] is each item's input to the last level and ``codebook`` [K, D] the
    last-level codewords; without them every free code costs the same (lowest codes first).
    A prefix with more colliding items than free codes cannot be made unique on this level: its
    colliders are spread so that no code holds more than ceil(m / K) of its m items, which the dedup
    level then numbers (so the dedup level needs ceil(m / K) codes, not the largest pile's size).
    """
    codes = _check_codes(codes).copy()
    last = codes.shape[1] - 1
    if (codes[:, last] >= codebook_size).any():
        rows = np.where(codes[:, last] >= codebook_size)[0][:10].tolist()
        raise ValueError(f"resolve_last_level: last-level codes >= codebook_size {codebook_size} in rows {rows}")
    groups = collision_groups(codes)
    if not groups:
        return codes, 0
    colliding = np.concatenate([np.asarray(g) for g in groups])
    is_coll = np.zeros(codes.shape[0], dtype=bool)
    is_coll[colliding] = True
    if residuals is not None and codebook is not None:
        r = residuals[torch.as_tensor(colliding, device=residuals.device)].float()
        cb = codebook.float().to(r.device)
        cost_all = (r.pow(2).sum(1, keepdim=True) - 2 * r @ cb.t() + cb.pow(2).sum(1)).cpu()
    else:
        cost_all = torch.arange(codebook_size, dtype=torch.float32).repeat(colliding.size, 1)
    pos = np.full(codes.shape[0], -1, dtype=np.int64)
    pos[colliding] = np.arange(colliding.size)
    prefixes = codes[:, :last] if last > 0 else np.zeros((codes.shape[0], 1), np.int64)
    prefix_of, order, starts, counts = _groups_of(prefixes)
    moved = 0
    for p in np.unique(prefix_of[colliding]):
        members = order[starts[p]:starts[p] + counts[p]]
        coll = np.sort(members[is_coll[members]])
        taken = np.zeros(codebook_size, dtype=bool)
        taken[codes[members[~is_coll[members]], last]] = True
        cost = cost_all[torch.as_tensor(pos[coll])]
        if int((~taken).sum()) < coll.size:  # crowded: spread evenly, the dedup level numbers each code's items
            per_code = -(-members.size // codebook_size)
            capacity = torch.full((codebook_size,), per_code, dtype=torch.long) - torch.as_tensor(taken).long()
        else:
            cost[:, torch.as_tensor(taken)] = float("inf")
            capacity = torch.ones(codebook_size, dtype=torch.long)
        new = balanced_assign(cost, capacity).numpy()
        moved += int((new != codes[coll, last]).sum())
        codes[coll, last] = new
    return codes, moved


def add_dedup_level(codes) -> Tuple[np.ndarray, int]:
    """Stage 2: append a level numbering the members of each colliding group (0, 1, ...).

    Returns (codes [N, L+1], dedup codebook size). Only call when collisions remain.
    """
    codes = _check_codes(codes)
    extra = np.zeros(codes.shape[0], dtype=np.int64)
    for rows in collision_groups(codes):
        extra[rows] = np.arange(len(rows))
    return np.concatenate([codes, extra[:, None]], axis=1), int(extra.max()) + 1


def make_unique(
    codes,
    codebook_sizes: Sequence[int],
    residuals: Optional[torch.Tensor] = None,
    codebook: Optional[torch.Tensor] = None,
) -> Tuple[np.ndarray, Tuple[int, ...], dict]:
    """Collision-free SIDs: stage 1, then stage 2 if needed.

    Returns (codes int32 [N, L or L+1], codebook_sizes, report) where the report holds the
    stats before and after, the number of items moved and whether a dedup level was added.
    """
    codebook_sizes = tuple(int(k) for k in codebook_sizes)
    codes = _check_codes(codes, "make_unique")
    if len(codebook_sizes) != codes.shape[1]:
        raise ValueError(f"make_unique: {len(codebook_sizes)} codebook sizes for {codes.shape[1]} levels")
    over = codes >= np.asarray(codebook_sizes)[None, :]
    if over.any():
        rows = np.where(over.any(1))[0][:10].tolist()
        raise ValueError(f"make_unique: codes >= their level's codebook size {codebook_sizes} in rows {rows}")
    before = sid_stats(codes, codebook_sizes)
    out, moved = resolve_last_level(codes, codebook_sizes[-1], residuals, codebook)
    dedup = 0
    if collision_groups(out):
        out, dedup = add_dedup_level(out)
        codebook_sizes = codebook_sizes + (dedup,)
    after = sid_stats(out, codebook_sizes)
    if after["collision_groups"] != 0:  # cannot happen: the dedup level numbers every group
        raise RuntimeError(f"make_unique: {after['collision_groups']} collision groups remain")
    report = {"before": before, "after": after, "moved_items": moved, "dedup_level": bool(dedup), "dedup_size": dedup}
    return out.astype(np.int32), codebook_sizes, report
