"""``genrec-fast eval``: a trained model on one split of a MiniOneRec-format dataset, beside the
popularity, last-item-transition and SASRec baselines, with bootstrap intervals, as a printed table
and a JSON file.

Run it under ``accelerate launch`` to shard the prompts over processes.
"""
from __future__ import annotations

import argparse

from genrec_fast.eval.metrics import DEFAULT_KS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="trained model directory (or hub name) with its tokenizer")
    parser.add_argument("--data", required=True,
                        help="dataset directory in the MiniOneRec release format (train/valid/test.csv, "
                             "index.json or info.txt, item.json)")
    parser.add_argument("--samples", default=None,
                        help="CSV of samples (release format) to evaluate instead of DATA/<split>.csv; "
                             "baselines still fit on DATA's train (+valid for --split test)")
    parser.add_argument("--split", default="test", choices=["valid", "test"])
    parser.add_argument("--num-beams", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate a seeded random subset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ks", type=int, nargs="+", default=None,
                        help=f"cut-offs, at most --num-beams (default: {' '.join(map(str, DEFAULT_KS))} up to --num-beams)")
    parser.add_argument("--score", default="full_vocab", choices=["full_vocab", "sid"])
    parser.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="model dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay the beam searches' forwards from CUDA graphs (CUDA only; sdpa/eager attention)")
    parser.add_argument("--sasrec", action=argparse.BooleanOptionalAction, default=True,
                        help="fit and show the SASRec baseline (CPU, seconds to minutes; --no-sasrec skips it)")
    parser.add_argument("--num-resamples", type=int, default=2000,
                        help="bootstrap resamples (over users) for the 95%% intervals")
    parser.add_argument("--out", default=None, help="write the results here as JSON")


def run(args: argparse.Namespace) -> int:
    import torch
    from genrec_fast.data.minionerec import load_minionerec, read_split
    from genrec_fast.eval.evaluate import dist_state, evaluate_split
    from genrec_fast.model import load_model_and_tokenizer

    data = load_minionerec(args.data)
    if args.samples is not None:
        setattr(data, args.split, read_split(args.samples, data.catalog))
    state = dist_state()
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if state.device.type == "cuda" else "float32"
    model, tokenizer, sid_vocab = load_model_and_tokenizer(args.model, data.catalog.codebook_sizes,
                                                           torch_dtype=getattr(torch, dtype), device=state.device)
    evaluate_split(model, tokenizer, sid_vocab, data, split=args.split, num_beams=args.num_beams,
                   batch_size=args.batch_size, ks=args.ks, max_samples=args.max_samples, seed=args.seed,
                   out=args.out, score=args.score, backend=args.backend, progress=True,
                   cuda_graphs=args.cuda_graphs, sasrec=args.sasrec, num_resamples=args.num_resamples)
    return 0
