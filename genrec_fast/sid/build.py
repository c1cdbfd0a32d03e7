"""One call from item texts (or embeddings) to unique SIDs: ``build_sids``."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from genrec_fast.sid.cf import cf_embeddings, mix_embeddings
from genrec_fast.sid.collisions import make_unique
from genrec_fast.sid.embed import embed_items
from genrec_fast.sid.kmeans import ResidualKMeans
from genrec_fast.sid.rqvae import train_rqvae
from genrec_fast.sid_tokens import LEVEL_PREFIXES

METHODS = ("rqkmeans", "rqvae")
EMBEDDINGS = ("text", "text+cf")


@dataclass
class SIDResult:
    codes: np.ndarray  # [N, L'] int32, unique rows; L' = levels (+1 if a dedup level was needed)
    codebook_sizes: Tuple[int, ...]
    report: dict = field(default_factory=dict)


def _as_embeddings(data) -> Optional[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        emb = data.detach().float().cpu()
    elif isinstance(data, np.ndarray):
        emb = torch.from_numpy(np.asarray(data, dtype=np.float32))
    else:
        return None
    if emb.dim() != 2 or emb.shape[0] == 0:
        raise ValueError(f"build_sids: embeddings must be a non-empty [N, H] array, got shape {tuple(emb.shape)}")
    bad = torch.nonzero(~torch.isfinite(emb).all(dim=1)).flatten()
    if bad.numel():
        raise ValueError(f"build_sids: non-finite embeddings in rows {bad[:10].tolist()}")
    return emb


def build_sids(
    data: Union[Sequence[str], np.ndarray, torch.Tensor],
    method: str = "rqkmeans",
    levels: int = 3,
    codebook_size: int = 256,
    seed: int = 0,
    balanced: bool = True,
    kmeans_iters: int = 30,
    rqvae_epochs: int = 150,
    encoder: Optional[str] = None,
    cache_dir=None,
    device: Optional[str] = None,
    backend: str = "auto",
    progress: bool = True,
    embedding: str = "text",
    interactions: Optional[Sequence] = None,
    cf_weight: float = 0.5,
    cf_dim: int = 64,
    cf_decay: float = 0.5,
) -> SIDResult:
    """Item texts (embedded with :func:`embed_items`) or embeddings [N, H] -> unique SIDs.

    ``method``: "rqkmeans" (residual k-means on the embeddings; ``balanced`` caps each
    cluster at ceil(N/K) items) or "rqvae" (RQ-VAE on the embeddings, ``rqvae_epochs``).
    Collisions are then removed by :func:`genrec_fast.sid.collisions.make_unique`, which may
    append a dedup level. The report holds timings, stats before/after and per-level usage.

    ``embedding``: "text" (the text embeddings alone) or "text+cf": each item's text embedding
    concatenated with a collaborative vector (:func:`genrec_fast.sid.cf.cf_embeddings`, ``cf_dim``
    dims, ``cf_decay``) fitted on ``interactions`` (samples with ``.history`` / ``.target`` item
    indices: pass the TRAIN split only), mixed by :func:`genrec_fast.sid.cf.mix_embeddings` with
    ``cf_weight``, so an SID prefix groups items that are watched in the same contexts.
    """
    _check_build_options(method, embedding, interactions, levels, rqvae_epochs)
    t0 = time.perf_counter()
    emb = _as_embeddings(data)
    embed_s = 0.0
    if emb is None:
        emb = torch.from_numpy(embed_items(list(data), encoder=encoder, cache_dir=cache_dir, device=device,
                                           progress=progress))
        embed_s = time.perf_counter() - t0
    extra_report = {"embedding": embedding}
    if embedding == "text+cf":
        emb = _mix_cf(emb, interactions, cf_weight, cf_dim, cf_decay, extra_report)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t1 = time.perf_counter()
    if method == "rqkmeans":
        rkm = ResidualKMeans(levels, codebook_size, iters=kmeans_iters, seed=seed, balanced=balanced, backend=backend)
        codes = rkm.fit(emb.to(device), progress=progress)
        residuals, last_book, extra = rkm.residuals, rkm.codebooks[-1], {}
    else:
        model, extra = train_rqvae(emb, levels=levels, codebook_size=codebook_size, epochs=rqvae_epochs,
                                   seed=seed, device=device, backend=backend, progress=progress)
        codes, residuals = model.encode(emb.to(device))
        last_book = model.codebooks[-1].detach()
    fit_s = time.perf_counter() - t1
    codes_u, sizes, coll = make_unique(codes.cpu().numpy(), (codebook_size,) * levels, residuals, last_book)
    report = {
        "method": method,
        "num_items": int(emb.shape[0]),
        "embedding_dim": int(emb.shape[1]),
        "levels": levels,
        "codebook_size": codebook_size,
        "balanced": bool(balanced) if method == "rqkmeans" else None,
        "seed": seed,
        **extra_report,
        **coll,
        "train": extra,
        "embed_s": embed_s,
        "fit_s": fit_s,
        "wall_s": time.perf_counter() - t0,
    }
    return SIDResult(codes=codes_u, codebook_sizes=sizes, report=report)


def _check_build_options(method: str, embedding: str, interactions: Optional[Sequence], levels: int,
                         rqvae_epochs: int) -> None:
    if method not in METHODS:
        raise ValueError(f"build_sids: method must be one of {METHODS}, got {method!r}")
    if embedding not in EMBEDDINGS:
        raise ValueError(f"build_sids: embedding must be one of {EMBEDDINGS}, got {embedding!r}")
    if embedding == "text+cf" and interactions is None:
        raise ValueError("build_sids: embedding='text+cf' needs interactions (the train samples the collaborative "
                         "vectors are fitted on)")
    max_levels = len(LEVEL_PREFIXES) - 1  # one more may be appended to separate colliding items
    if not 1 <= int(levels) <= max_levels:
        raise ValueError(f"build_sids: levels (--levels) must be in 1..{max_levels}, got {levels}: SID tokens are "
                         f"spelled <{LEVEL_PREFIXES[0]}_..> to <{LEVEL_PREFIXES[-1]}_..> and a dedup level may be "
                         "added")
    if method == "rqvae" and int(rqvae_epochs) < 1:
        raise ValueError(f"build_sids: rqvae_epochs (--epochs) must be >= 1, got {rqvae_epochs}")


def _mix_cf(emb: torch.Tensor, interactions: Sequence, cf_weight: float, cf_dim: int, cf_decay: float,
            report: dict) -> torch.Tensor:
    """The text embeddings mixed with collaborative vectors fitted on ``interactions``; their settings and
    coverage go into ``report``."""
    cf = cf_embeddings(interactions, int(emb.shape[0]), dim=cf_dim, decay=cf_decay)
    report.update(cf_weight=float(cf_weight), cf_dim=int(cf_dim), cf_decay=float(cf_decay),
                  cf_items=int((np.abs(cf).sum(axis=1) > 0).sum()), cf_samples=len(interactions))
    return torch.from_numpy(mix_embeddings(emb.numpy(), cf, cf_weight))
