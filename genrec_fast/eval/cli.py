"""``genrec-fast eval``: a trained model on one split of a MiniOneRec-format dataset, beside the
popularity, last-item-transition and SASRec baselines, with bootstrap intervals, as a printed table
and a JSON file.

Run it under ``accelerate launch`` to shard the prompts over processes.

Before anything is loaded or decoded the options are checked (``--num-beams``, ``--ks``, ``--out`` can be
written), and the model's bundle (``genrec_fast.bundle``) is compared with the data's SID index: a model
trained on other Semantic IDs is refused; a model without a bundle gets a warning.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional

import torch

from genrec_fast.bundle import check_model_matches
from genrec_fast.data.minionerec import load_minionerec, read_split
from genrec_fast.eval.evaluate import dist_state, evaluate_split
from genrec_fast.eval.metrics import DEFAULT_KS, ks_for_beams
from genrec_fast.model import load_model_and_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="trained model directory (or hub name) with its tokenizer")
    parser.add_argument("--data", required=True,
                        help="dataset directory in the MiniOneRec release format (train/valid/test.csv, "
                             "index.json or info.txt, item.json)")
    parser.add_argument("--samples", default=None,
                        help="CSV of samples (release format) to evaluate instead of DATA/<split>.csv; "
                             "baselines still fit on DATA's train (+valid for --split test) (default: none)")
    parser.add_argument("--split", default="test", choices=["valid", "test"], help="the split to evaluate")
    parser.add_argument("--num-beams", type=int, default=50, help="beams of the constrained beam search (>= 1)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts decoded together (>= 1)")
    parser.add_argument("--max-samples", type=int, default=None,
                        help="evaluate a seeded random subset of this many samples (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset and of the bootstrap")
    parser.add_argument("--ks", type=int, nargs="+", default=None,
                        help=f"cut-offs, at most --num-beams (default: {' '.join(map(str, DEFAULT_KS))} up to --num-beams)")
    parser.add_argument("--score", default="full_vocab", choices=["full_vocab", "sid"],
                        help="beam scores: log-softmax over the full vocabulary or over the SID tokens only")
    parser.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"],
                        help="beam-step kernels (auto: Triton on CUDA, torch otherwise)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="model dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay the beam searches' forwards from CUDA graphs (CUDA only; sdpa/eager attention)")
    parser.add_argument("--sasrec", action=argparse.BooleanOptionalAction, default=True,
                        help="fit and show the SASRec baseline (CPU, seconds to minutes; --no-sasrec skips it)")
    parser.add_argument("--num-resamples", type=int, default=2000,
                        help="bootstrap resamples (over users) for the 95%% intervals")
    parser.add_argument("--max-prompt-length", type=int, default=None,
                        help="keep each prompt's last this many tokens (default: whole prompts; a prompt that "
                             "does not fit the model's positions is an error naming the sample)")
    parser.add_argument("--out", default=None, help="write the results here as JSON (default: not written)")


def check_out_file(path: Optional[str], option: str = "--out") -> Optional[Path]:
    """``path`` as a Path if a file can be written there (None passes through): not an existing folder, and
    its nearest existing parent a writable folder (missing parents are made when it is written).
    ValueError naming the option and the path otherwise."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{option} {p}: is a folder; give a file path (e.g. {p / 'results.json'})")
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{option} {p}: {parent} is a file, not a folder, so {p} cannot be written")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {p}: the folder {parent} is not writable")
    return p


def check_args(args: argparse.Namespace) -> None:
    """The options' own checks, before any file is read: ValueError naming the option."""
    for name in ("num_beams", "batch_size", "num_resamples"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("max_samples", "max_prompt_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    ks_for_beams(args.ks, args.num_beams, "--ks")
    check_out_file(args.out)


def run(args: argparse.Namespace) -> int:
    check_args(args)
    data = load_minionerec(args.data)
    if args.samples is not None:
        setattr(data, args.split, read_split(args.samples, data.catalog))
    check_model_matches(args.model, data.catalog, args.data)
    state = dist_state()
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if state.device.type == "cuda" else "float32"
    model, tokenizer, sid_vocab = load_model_and_tokenizer(args.model, data.catalog.codebook_sizes,
                                                           torch_dtype=getattr(torch, dtype), device=state.device)
    evaluate_split(model, tokenizer, sid_vocab, data, split=args.split, num_beams=args.num_beams,
                   batch_size=args.batch_size, ks=args.ks, max_samples=args.max_samples, seed=args.seed,
                   out=args.out, score=args.score, backend=args.backend, progress=True,
                   cuda_graphs=args.cuda_graphs, sasrec=args.sasrec, num_resamples=args.num_resamples,
                   max_prompt_length=args.max_prompt_length)
    return 0
