"""Collaborative item vectors for SIDs that carry "what follows what", fitted on TRAIN samples only.

``cf_embeddings``: a symmetric, degree-normalised item-item matrix of (history item, next item)
pairs of the fitting samples (a pair at distance d in the history weighs ``decay ** (d - 1)``;
the last history item -> target pair weighs 1), ``D^-1/2 (A + A^T) D^-1/2``, factorised by a
truncated eigendecomposition (the ``dim`` largest eigenvalues); an item's vector is its row of
``U * sqrt(lambda)``, L2-normalised.
Items absent from the fitting samples get a zero vector (their SID then comes from text alone).

``mix_embeddings``: ``[sqrt(1 - w) * text, sqrt(w) * cf]`` of the two row-normalised blocks, so ``w``
is the share of the squared distance that comes from the collaborative block (k-means on the
concatenation clusters items by both). LETTER / ETEGRec-style SIDs, without training a tokenizer.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def cooccurrence(samples: Sequence, num_items: int, decay: float = 0.5) -> np.ndarray:
    """Dense [N, N] float64 counts of (history item -> target) pairs (see the module doc), not symmetrised."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"cooccurrence: decay must be in [0, 1], got {decay}")
    a = np.zeros((num_items, num_items), dtype=np.float64)
    src, dst, w = [], [], []
    for s in samples:
        hist = [int(x) for x in s.history]
        t = int(s.target)
        for d, h in enumerate(reversed(hist), start=1):
            wt = decay ** (d - 1)
            if wt == 0.0:
                break
            src.append(h), dst.append(t), w.append(wt)
    if src:
        src_a, dst_a = np.asarray(src), np.asarray(dst)
        if src_a.min() < 0 or dst_a.min() < 0 or max(src_a.max(), dst_a.max()) >= num_items:
            raise ValueError(f"cooccurrence: item index out of range 0..{num_items - 1}")
        np.add.at(a, (src_a, dst_a), np.asarray(w))
    return a


def cf_embeddings(samples: Sequence, num_items: int, dim: int = 64, decay: float = 0.5) -> np.ndarray:
    """Collaborative item vectors [N, dim] float32 (rows L2-normalised; unseen items: zeros)."""
    if dim < 1:
        raise ValueError(f"cf_embeddings: dim must be >= 1, got {dim}")
    a = cooccurrence(samples, num_items, decay)
    a = a + a.T
    deg = a.sum(axis=1)
    inv = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1e-12)), 0.0)
    m = a * inv[:, None] * inv[None, :]
    vals, vecs = np.linalg.eigh(m)  # ascending; N ~ a few thousand: dense is fine
    order = np.argsort(-vals)[:dim]  # the largest (similarity) part; negative ones say "never together"
    vals, vecs = np.clip(vals[order], 0.0, None), vecs[:, order]
    emb = vecs * np.sqrt(vals)[None, :]
    out = np.zeros((num_items, dim), dtype=np.float32)
    out[:, :emb.shape[1]] = emb
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    out = np.where(norms > 0, out / np.maximum(norms, 1e-12), 0.0).astype(np.float32)
    out[deg == 0] = 0.0
    return out


def mix_embeddings(text: np.ndarray, cf: np.ndarray, cf_weight: float = 0.5) -> np.ndarray:
    """``[sqrt(1 - w) * text, sqrt(w) * cf]`` (each block row-normalised first; zero rows stay zero)."""
    if not 0.0 <= cf_weight <= 1.0:
        raise ValueError(f"mix_embeddings: cf_weight must be in [0, 1], got {cf_weight}")
    text, cf = np.asarray(text, dtype=np.float32), np.asarray(cf, dtype=np.float32)
    if text.shape[0] != cf.shape[0]:
        raise ValueError(f"mix_embeddings: {text.shape[0]} text rows but {cf.shape[0]} cf rows")

    def unit(x):
        n = np.linalg.norm(x, axis=1, keepdims=True)
        return np.where(n > 0, x / np.maximum(n, 1e-12), 0.0)

    mixed = np.concatenate([np.sqrt(1.0 - cf_weight) * unit(text), np.sqrt(cf_weight) * unit(cf)], axis=1)
    return mixed.astype(np.float32)
