"""``genrec-fast sids``: item.json -> embeddings -> unique SIDs -> index.json + codes.npy."""
from __future__ import annotations

import argparse
import json

import numpy as np

from genrec_fast.sid.build import METHODS, build_sids
from genrec_fast.sid.embed import embed_items, read_item_json
from genrec_fast.sid.index_io import write_index


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--items", required=True, help="item.json (item id -> {title, description, ...})")
    parser.add_argument("--out", required=True, help="output directory for index.json, codes.npy, sids_meta.json")
    parser.add_argument("--method", choices=METHODS, default="rqkmeans")
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--codebook", type=int, default=256, help="codes per level")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-balanced", dest="balanced", action="store_false",
                        help="rqkmeans: plain Lloyd instead of size-balanced clusters")
    parser.add_argument("--kmeans-iters", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=150, help="rqvae training epochs")
    parser.add_argument("--encoder", default=None, help="sentence encoder path or hub name (default: bundled all-MiniLM-L6-v2)")
    parser.add_argument("--embeddings", default=None, help="precomputed [N, H] .npy in item.json order (skips the encoder)")
    parser.add_argument("--cache-dir", default=None, help="embedding cache (default ~/.cache/genrec_fast/embeddings)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def run(args: argparse.Namespace) -> int:
    item_ids, texts = read_item_json(args.items)
    if args.embeddings:
        emb = np.load(args.embeddings)
        if emb.ndim != 2 or emb.shape[0] != len(item_ids):
            raise SystemExit(f"genrec-fast sids: {args.embeddings} has shape {emb.shape}, expected [{len(item_ids)}, H]")
    else:
        emb = embed_items(texts, encoder=args.encoder, cache_dir=args.cache_dir, device=args.device,
                          progress=args.progress)
    res = build_sids(emb, method=args.method, levels=args.levels, codebook_size=args.codebook, seed=args.seed,
                     balanced=args.balanced, kmeans_iters=args.kmeans_iters, rqvae_epochs=args.epochs,
                     device=args.device, progress=args.progress)
    path = write_index(args.out, item_ids, res.codes, res.codebook_sizes, res.report)
    rep = res.report
    summary = {
        "index": str(path),
        "items": rep["num_items"],
        "codebook_sizes": list(res.codebook_sizes),
        "collisions_before": rep["before"]["collision_groups"],
        "collisions_after": rep["after"]["collision_groups"],
        "moved_items": rep["moved_items"],
        "dedup_level": rep["dedup_level"],
        "used_codes": rep["after"]["used_codes"],
        "perplexity": [round(p, 1) for p in rep["after"]["perplexity"]],
        "fit_s": round(rep["fit_s"], 2),
    }
    print(json.dumps(summary))
    return 0

