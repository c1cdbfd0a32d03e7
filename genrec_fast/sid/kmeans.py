"""k-means (k-means++ init, Lloyd iterations, optional balanced sizes) and residual k-means.

Assignments go through :func:`genrec_fast.ops.rq.residual_quantize` with one level, so
they use the fused Triton kernel on GPUs and never build [N, K] distances there.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from genrec_fast.ops.rq import residual_quantize
from genrec_fast.sid.assign import balanced_assign


def _sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (x.pow(2).sum(1, keepdim=True) - 2.0 * x @ c.t() + c.pow(2).sum(1).unsqueeze(0)).clamp_(min=0.0)


def _nearest(x: torch.Tensor, centroids: torch.Tensor, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (index [N] long, squared distance to it [N])."""
    codes, _, norms = residual_quantize(x, centroids.unsqueeze(0), backend=backend, return_norms=True)
    return codes[:, 0].long(), norms[:, 0]


def _cluster_sums(x: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    """Per-cluster sums of the rows of ``x`` [k, D]. On the CPU with ``index_add_``, which adds in a fixed
    order: ``index_put_(accumulate=True)`` with several threads does not, and gave the demo two different SID
    sets run to run (243 of 3,011 items moved) from the same embeddings."""
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)
    if x.device.type == "cpu":
        return sums.index_add_(0, assign, x)
    return sums.index_put_((assign,), x, accumulate=True)


def kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding. With fewer distinct points than ``k``, the extra centroids repeat points.

    Runs on the host in numpy (single-threaded einsum): k sequential matrix-vector steps,
    which threaded BLAS/torch stall on when the host is busy.
    """
    xn = x.detach().float().cpu().numpy()
    n = xn.shape[0]
    sq = np.einsum("ij,ij->i", xn, xn)

    def dist_to(i: int) -> np.ndarray:
        return np.maximum(sq - 2.0 * np.einsum("ij,j->i", xn, xn[i]) + sq[i], 0.0)

    picks = [int(torch.randint(n, (1,), generator=generator))]
    d2 = dist_to(picks[0])
    for _ in range(1, k):
        total = float(d2.sum(dtype=np.float64))
        if total <= 0.0:
            idx = int(torch.randint(n, (1,), generator=generator))
        else:
            idx = int(torch.multinomial(torch.from_numpy(d2.astype(np.float64) / total), 1, generator=generator))
        picks.append(idx)
        d2 = np.minimum(d2, dist_to(idx))
    return x[torch.tensor(picks, device=x.device)]


def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int = 30,
    seed: int = 0,
    balanced: bool = False,
    tol: float = 1e-5,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cluster ``x`` [N, D] (fp32) into ``k`` groups -> (centroids [k, D], assignment [N] long).

    Empty clusters are re-seeded with the point farthest from its centroid. ``balanced``: each
    cluster holds at most ``ceil(N / k)`` points (Sinkhorn-rounded assignment), which spreads
    items over the codebook; otherwise plain Lloyd (nearest centroid).
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans: x must be a non-empty [N, D] tensor, got shape {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"kmeans: k must be >= 1, got {k}")
    if iters < 1:
        raise ValueError(f"kmeans: iters must be >= 1, got {iters}")
    x = x.float()
    n = x.shape[0]
    g = torch.Generator(device="cpu").manual_seed(seed)
    centroids = kmeans_plusplus(x, k, g)
    cap = torch.full((k,), -(-n // k), dtype=torch.long)
    prev_inertia = None
    assign = None
    for _ in range(iters):
        if balanced:
            assign = balanced_assign(_sq_dists(x, centroids), cap.to(x.device))
            d2 = (x - centroids[assign]).pow(2).sum(1)
        else:
            assign, d2 = _nearest(x, centroids, backend)
        counts = torch.bincount(assign, minlength=k)
        sums = _cluster_sums(x, assign, k)
        new = torch.where(counts.unsqueeze(1) > 0, sums / counts.clamp(min=1).unsqueeze(1).float(), centroids)
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel() > 0:
            far = torch.argsort(d2, descending=True, stable=True)[: empty.numel()]
            new[empty[: far.numel()]] = x[far]
        centroids = new
        inertia = float(d2.sum())
        if empty.numel() == 0 and prev_inertia is not None and prev_inertia - inertia <= tol * max(prev_inertia, 1e-12):
            break
        prev_inertia = inertia
    if balanced:
        assign = balanced_assign(_sq_dists(x, centroids), cap.to(x.device))
    else:
        assign, _ = _nearest(x, centroids, backend)
    return centroids, assign


class ResidualKMeans:
    """Residual k-means quantizer: level l clusters the residuals left by levels < l.

    ``fit(x)`` returns the fitted codes [N, L] int32 (with ``balanced``, the balanced
    assignment); ``encode(x)`` assigns new rows greedily (nearest codeword per level).
    ``codebooks`` [L, K, D] and ``residuals`` (the last level's input residual of the fitted
    rows, used by the collision resolver) are set by ``fit``.
    """

    def __init__(self, levels: int = 3, codebook_size: int = 256, iters: int = 30, seed: int = 0,
                 balanced: bool = False, backend: str = "auto"):
        if levels < 1 or codebook_size < 1 or iters < 1:
            raise ValueError(f"ResidualKMeans: levels, codebook_size and iters must be >= 1, got {levels}, "
                             f"{codebook_size}, {iters}")
        self.levels = levels
        self.codebook_size = codebook_size
        self.iters = iters
        self.seed = seed
        self.balanced = balanced
        self.backend = backend
        self.codebooks: Optional[torch.Tensor] = None
        self.residuals: Optional[torch.Tensor] = None

    def fit(self, x: torch.Tensor, progress: bool = False) -> torch.Tensor:
        r = x.float().clone()
        books: List[torch.Tensor] = []
        codes = []
        for lvl in tqdm(range(self.levels), desc="residual k-means", disable=not progress):
            self.residuals = r.clone()
            c, a = kmeans(r, self.codebook_size, iters=self.iters, seed=self.seed + lvl,
                          balanced=self.balanced, backend=self.backend)
            books.append(c)
            codes.append(a)
            r = r - c[a]
        self.codebooks = torch.stack(books)
        return torch.stack(codes, dim=1).to(torch.int32)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.codebooks is None:
            raise RuntimeError("ResidualKMeans.encode: call fit() first")
        codes, _ = residual_quantize(x.float(), self.codebooks.to(x.device), backend=self.backend)
        return codes
