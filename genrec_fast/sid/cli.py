"""``genrec-fast sids``: item texts -> embeddings -> unique SIDs.

Three inputs:
- ``--items item.json``: writes ``index.json``, ``codes.npy`` and ``sids_meta.json`` into ``--out``;
- ``--data DIR`` (a dataset in the MiniOneRec release format): new SIDs for its items (``--embedding
  text+cf`` fits the collaborative vectors on its train split, ``--cf-fit train+valid`` on both), and
  ``--out`` becomes a copy of the dataset with them;
- ``--log interactions.csv [--meta items.csv]`` (a user's own data): the log is read by
  ``genrec_fast.data.load_interactions`` (history, split), the catalogue's item texts get SIDs, and
  ``--out`` becomes a complete dataset in the MiniOneRec release format (train/valid/test.csv,
  index.json, item.json, info.txt, plus codes.npy and sids_meta.json) that ``genrec-fast sft --data``
  and ``genrec-fast eval --data`` read.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from genrec_fast.data.interactions import SPLIT_MODES
from genrec_fast.sid.build import EMBEDDINGS, METHODS, build_sids
from genrec_fast.sid.embed import embed_items, read_item_json
from genrec_fast.sid.index_io import write_index
from genrec_fast.sid_tokens import LEVEL_PREFIXES

# the options that only --log reads, with their defaults (--items and --data reject any other value)
LOG_DEFAULTS = {"meta": None, "sep": None, "user_col": "user_id", "item_col": "item_id", "time_col": "timestamp",
                "title_col": "title", "split": "leave_one_out", "max_history": 10, "max_users": None,
                "max_interactions_per_user": None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--items", default=None, help="item.json (item id -> {title, description, ...}); one of --items, --data, --log "
                                                      "(default: none)")
    parser.add_argument("--data", default=None, help="a MiniOneRec-format dataset folder: new SIDs for its items, the "
                                                     "dataset with them written to --out (default: none)")
    parser.add_argument("--out", required=True, help="output directory for index.json, codes.npy, sids_meta.json "
                                                     "(with --log: the whole dataset in the release format)")
    log = parser.add_argument_group("from an interaction log (instead of --items)")
    log.add_argument("--log", default=None, help="header-ed CSV/TSV of interactions (user, item, timestamp columns) "
                                                   "(default: none)")
    d = LOG_DEFAULTS
    log.add_argument("--meta", default=d["meta"], help="item metadata CSV/TSV (item column + title + any text "
                                                       "columns) (default: none: titles are the item ids)")
    log.add_argument("--sep", default=d["sep"],
                     help="field separator (default: tab for .tsv/.inter/.item/.txt, else comma)")
    log.add_argument("--user-col", default=d["user_col"])
    log.add_argument("--item-col", default=d["item_col"])
    log.add_argument("--time-col", default=d["time_col"])
    log.add_argument("--title-col", default=d["title_col"], help="--meta's title column (required there)")
    log.add_argument("--split", choices=SPLIT_MODES, default=d["split"])
    log.add_argument("--max-history", type=int, default=d["max_history"])
    log.add_argument("--max-users", type=int, default=d["max_users"], help="a seeded random subset of users (default: all)")
    log.add_argument("--max-interactions-per-user", type=int, default=d["max_interactions_per_user"],
                     help="each user's most recent ones (default: all)")
    parser.add_argument("--method", choices=METHODS, default="rqkmeans")
    parser.add_argument("--embedding", choices=EMBEDDINGS, default="text",
                        help="text: the text embeddings; text+cf: with collaborative vectors fitted on the TRAIN "
                             "split of --log / --data")
    parser.add_argument("--cf-fit", choices=("train", "train+valid"), default="train",
                        help="text+cf: the samples the collaborative vectors are fitted on (train+valid: for a model "
                             "that trains on valid too and is tested)")
    parser.add_argument("--cf-weight", type=float, default=0.5, help="text+cf: share of the collaborative block")
    parser.add_argument("--cf-dim", type=int, default=64, help="text+cf: collaborative vector size")
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--codebook", type=int, default=256, help="codes per level")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-balanced", dest="balanced", action="store_false",
                        help="rqkmeans: plain Lloyd instead of size-balanced clusters")
    parser.add_argument("--kmeans-iters", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=150, help="rqvae training epochs")
    parser.add_argument("--encoder", default=None, help="sentence encoder path or hub name (default: bundled all-MiniLM-L6-v2)")
    parser.add_argument("--embeddings", default=None, help="precomputed [N, H] .npy in item.json order (with --log: the --meta file's order "
                             "of the items in the log, else their first appearance) (skips the encoder; default: none, "
                             "the encoder embeds the texts)")
    parser.add_argument("--cache-dir", default=None, help="embedding cache (default ~/.cache/genrec_fast/embeddings)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def _check_options(args: argparse.Namespace) -> None:
    """Everything that can be checked before the inputs are read and embedded (the encoder is the slow part)."""
    if sum(x is not None for x in (args.items, args.log, args.data)) != 1:
        raise ValueError("genrec-fast sids: give exactly one of --items (item.json), --log (an interaction log) or "
                         "--data (a MiniOneRec-format dataset)")
    if args.embedding == "text+cf" and args.items is not None:
        raise ValueError("genrec-fast sids: --embedding text+cf fits collaborative vectors on a train split: it needs "
                         "--log or --data")
    if args.cf_fit != "train" and args.embedding != "text+cf":
        raise ValueError("genrec-fast sids: --cf-fit goes with --embedding text+cf")
    if args.embedding == "text+cf" and (not 0.0 <= args.cf_weight <= 1.0 or args.cf_dim < 1):
        raise ValueError(f"genrec-fast sids: --cf-weight must be in [0, 1] and --cf-dim >= 1, got {args.cf_weight} "
                         f"and {args.cf_dim}")
    max_levels = len(LEVEL_PREFIXES) - 1  # as build_sids: a level may be appended to separate colliders
    if not 1 <= args.levels <= max_levels:
        raise ValueError(f"genrec-fast sids: --levels must be in 1..{max_levels}, got {args.levels}: SID tokens "
                         f"are spelled <{LEVEL_PREFIXES[0]}_..> to <{LEVEL_PREFIXES[-1]}_..> and a dedup level may "
                         "be added")
    for flag, value in (("--codebook", args.codebook), ("--kmeans-iters", args.kmeans_iters),
                        ("--epochs", args.epochs)):
        if value < 1:
            raise ValueError(f"genrec-fast sids: {flag} must be >= 1, got {value}")
    given = [k for k, default in LOG_DEFAULTS.items() if getattr(args, k) != default]
    if given and args.log is None:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        source = "--items reads item.json only" if args.items is not None else "--data reads a dataset as it is"
        raise ValueError(f"genrec-fast sids: {source}; {flags} go(es) with --log")
    if args.data is not None and Path(args.data).resolve() == Path(args.out).resolve():
        raise ValueError(f"genrec-fast sids: --out {args.out} is the --data folder; give another --out")
    if args.items is not None:
        out = Path(args.out)
        dataset = [n for n in ("info.txt", "train.csv", "valid.csv", "test.csv") if (out / n).exists()]
        if dataset:
            raise ValueError(f"genrec-fast sids: --out {out} holds a dataset ({', '.join(dataset)}): --items writes "
                             "only index.json, codes.npy and sids_meta.json, and the dataset's other files would "
                             "keep the old SIDs; give another --out")
    else:
        from genrec_fast.data.minionerec import check_dataset_dir

        check_dataset_dir(args.out)  # before the slow part: --out is replaced by the dataset


def _cf_samples(data, cf_fit: str):
    """The samples text+cf SIDs fit their collaborative vectors on (None without a dataset)."""
    if data is None:
        return None
    return list(data.train) + (list(data.valid) if cf_fit == "train+valid" else [])


def run(args: argparse.Namespace) -> int:
    _check_options(args)
    data = None
    if args.log is not None:
        from genrec_fast.data import load_interactions

        data = load_interactions(args.log, args.meta, sep=args.sep, user_col=args.user_col, item_col=args.item_col,
                                 time_col=args.time_col, title_col=args.title_col, max_history=args.max_history,
                                 split=args.split, max_users=args.max_users,
                                 max_interactions_per_user=args.max_interactions_per_user, seed=args.seed)
        item_ids, texts = list(data.catalog.item_ids), list(data.catalog.texts)
    elif args.data is not None:
        from genrec_fast.data import load_minionerec

        data = load_minionerec(args.data)
        item_ids, texts = list(data.catalog.item_ids), list(data.catalog.texts)
    else:
        item_ids, texts = read_item_json(args.items)
    if args.embeddings:
        try:
            emb = np.load(args.embeddings)
        except ValueError as e:  # not a .npy of numbers (a pickle, a text file, ...)
            raise ValueError(f"genrec-fast sids: {args.embeddings}: cannot read as a .npy array ({e})") from None
        if not isinstance(emb, np.ndarray) or emb.dtype.kind not in "fiu" or emb.ndim != 2 \
                or emb.shape[0] != len(item_ids):
            desc = f"shape {emb.shape} dtype {emb.dtype}" if isinstance(emb, np.ndarray) else "not one array"
            raise ValueError(f"genrec-fast sids: {args.embeddings} has {desc}, expected [{len(item_ids)}, H] numbers")
    else:
        emb = embed_items(texts, encoder=args.encoder, cache_dir=args.cache_dir, device=args.device,
                          progress=args.progress)
    res = build_sids(emb, method=args.method, levels=args.levels, codebook_size=args.codebook, seed=args.seed,
                     balanced=args.balanced, kmeans_iters=args.kmeans_iters, rqvae_epochs=args.epochs,
                     device=args.device, progress=args.progress, embedding=args.embedding,
                     interactions=_cf_samples(data, args.cf_fit), cf_weight=args.cf_weight,
                     cf_dim=args.cf_dim)
    rep = res.report
    extra = {}
    if data is None:
        path = write_index(args.out, item_ids, res.codes, res.codebook_sizes, res.report)
    else:
        from genrec_fast.data import save_minionerec

        data.catalog.set_codes(res.codes, res.codebook_sizes)
        path = save_minionerec(data, args.out, sid_report=res.report) / "index.json"
        extra = {"data": str(args.out), "train": len(data.train), "valid": len(data.valid), "test": len(data.test)}
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
        **extra,
    }
    print(json.dumps(summary))
    return 0

