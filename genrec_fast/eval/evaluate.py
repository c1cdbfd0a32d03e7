"""Full-catalogue evaluation of a generative recommender by constrained beam search
(``genrec_fast.eval.beams`` decodes and ranks), beside the baselines, with bootstrap intervals.

The invalid rate is the share of returned beams whose SID is not an item of the trie, checked from the generated
codes (0 when the search is constrained).

Under ``accelerate launch`` the samples are split over the processes (contiguous shards), each
process decodes its shard, the per-sample results are gathered and every process computes the
same metrics; only the main process should write files (``is_main_process``).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object

from genrec_fast.eval import stats
from genrec_fast.eval.baselines import TransitionTable, baseline_ranks, fit_samples, metrics_of
from genrec_fast.eval.beams import catalog_trie, predict
from genrec_fast.eval.ensemble import Member, ensemble_predict
from genrec_fast.eval.hybrid import check_weight, hybrid_ranks, select_weight
from genrec_fast.eval.levels import level_report, level_table
from genrec_fast.eval.metrics import (
    DEFAULT_KS,
    format_table,
    ks_for_beams,
    metrics_from_ranks,
    ranking_metrics,
    target_ranks,
)
from genrec_fast.io import atomic_write_text
from genrec_fast.prompts import check_prompt_style

# ---- sharding --------------------------------------------------------------------------------

def shard_range(n: int, num_processes: int, process_index: int) -> range:
    """Contiguous shard of ``range(n)`` for one process; shard sizes differ by at most one."""
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"bad process index {process_index} of {num_processes} processes")
    base, extra = divmod(n, num_processes)
    start = process_index * base + min(process_index, extra)
    return range(start, start + base + (1 if process_index < extra else 0))


def dist_state():
    """accelerate's process state (set up once per process; gloo on CPU-only machines)."""
    # on a machine without CUDA, `accelerate launch` needs cpu=True to set up the gloo process group
    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return PartialState(cpu=cpu)


def _shard_info():
    """(num_processes, process_index, gather_object or None) of this run."""
    state = dist_state()
    return state.num_processes, state.process_index, (gather_object if state.num_processes > 1 else None)


def is_main_process() -> bool:
    return dist_state().is_main_process


# ---- evaluation ------------------------------------------------------------------------------

def metrics_from_records(records: Sequence[dict], ks: Iterable[int] = DEFAULT_KS) -> Dict[str, float]:
    """HR@K, NDCG@K, invalid_rate and num_samples of per-sample prediction records."""
    out = ranking_metrics([r["ranked"] for r in records], [r["target"] for r in records], ks)
    beams = sum(r["num_beams"] for r in records)
    out["invalid_rate"] = float(sum(r["num_invalid"] for r in records) / beams) if beams else 0.0
    out["num_beams_returned"] = int(beams)
    return out


def evaluate(model, tokenizer, sid_vocab, trie, samples: Sequence, catalog, num_beams: int = 50,
             batch_size: int = 16, ks: Optional[Iterable[int]] = None, score: str = "full_vocab",
             backend: str = "auto", max_prompt_length: Optional[int] = None, progress: bool = False,
             return_records: bool = False, cuda_graphs: bool = False, prompt_style: Optional[str] = None,
             with_scores: bool = False, list_length: Optional[int] = None,
             search_options: Optional[Mapping[str, Any]] = None):
    """Metrics of the model on ``samples``: {"HR@K", "NDCG@K" for K in ks, "invalid_rate", "num_samples", ...}.

    ks: cut-offs, at most ``num_beams`` (None: 1, 3, 5, 10, 20, 50 up to ``num_beams``).
    search_options: more ``beam_search`` options (:func:`predict`: shared_prefix, graph_scope, lse_backend).
    prompt_style: the prompts' style (``genrec_fast.prompts.PROMPT_STYLES``; None: the model's own).

    Sharded over processes under ``accelerate launch``; every process returns the full result.
    With ``return_records`` also returns the per-sample records (ranked item lists; with ``with_scores``
    each also holds its entries' beam scores, as :func:`predict`), each list at most ``list_length`` long (default:
    the largest cut-off; the metrics are the same for any longer length).
    """
    ks = ks_for_beams(ks, num_beams)
    if len(samples) == 0:
        raise ValueError("evaluate: no samples")
    if list_length is not None and list_length < max(ks):
        raise ValueError(f"evaluate: list_length {list_length} is below the largest cut-off {max(ks)}")
    world, rank, gather = _shard_info()
    shard = shard_range(len(samples), world, rank)
    t0 = time.perf_counter()
    records = predict(model, tokenizer, sid_vocab, trie, samples, catalog, num_beams=num_beams,
                      batch_size=batch_size, top_n=list_length or max(ks), score=score, backend=backend,
                      max_prompt_length=max_prompt_length, progress=progress and rank == 0, indices=shard,
                      cuda_graphs=cuda_graphs, prompt_style=prompt_style, with_scores=with_scores,
                      search_options=search_options)
    if gather is not None:
        records = sorted(gather(records), key=lambda r: r["index"])
    if [r["index"] for r in records] != list(range(len(samples))):
        raise RuntimeError(f"gathered {len(records)} prediction records for {len(samples)} samples")
    out = metrics_from_records(records, ks)
    out["num_beams"] = int(num_beams)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return (out, records) if return_records else out


# ---- model + baselines on one split, written as JSON -----------------------------------------

def write_json_atomic(path, obj) -> None:
    """Write ``obj`` as indented JSON, atomically (temp file in the same folder, then os.replace)."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def interval_metrics(ks: Iterable[int]) -> Tuple[str, str]:
    """The metrics the intervals are given for: NDCG@10 and HR@10 (the largest cut-off when 10 is not one)."""
    ks = tuple(ks)
    k = 10 if 10 in ks else max(ks)
    return f"NDCG@{k}", f"HR@{k}"


def check_hybrid_args(split: str, weight: Optional[float], grid: Optional[Sequence[float]]) -> None:
    """The hybrid options' checks: a weight >= 0, or a non-empty grid of them on the valid split, not both."""
    if weight is not None and grid is not None:
        raise ValueError("give a hybrid weight or a grid to choose it from on valid, not both")
    if weight is not None:
        check_weight(weight)
    if grid is not None:
        if split != "valid":
            raise ValueError(f"the hybrid weight is chosen on the valid split, not on {split!r}: choose it on "
                             f"valid (with a model not trained on valid), then give that one weight for test")
        if len(grid) == 0:
            raise ValueError("the hybrid grid is empty")
        for w in grid:
            check_weight(w, "hybrid grid weight")


def evaluate_split(model, tokenizer, sid_vocab, data, split: str = "test", num_beams: int = 50,
                   batch_size: int = 16, ks: Optional[Iterable[int]] = None, max_samples: Optional[int] = None,
                   seed: int = 0, out: Optional[str] = None, trie=None, print_table: bool = True,
                   sasrec=True, num_resamples: int = stats.DEFAULT_RESAMPLES, prompt_style: Optional[str] = None,
                   hybrid_weight: Optional[float] = None, hybrid_grid: Optional[Sequence[float]] = None,
                   levels: bool = False, ensemble: Sequence[Member] = (), **decode_kwargs) -> dict:
    """The model and the baselines on one split of a RecData, as {"model", "baselines", "split", ...}.

    ``max_samples`` evaluates a fixed random subset (seeded) — the baselines use the same subset.
    ks: as in :func:`evaluate` (at most ``num_beams``; the baselines get the same cut-offs).
    sasrec: False leaves the SASRec baseline out; a ``SASRecConfig`` (or dict) sets it up.
    prompt_style: the style the model is prompted in (``genrec_fast.prompts.PROMPT_STYLES``; None: the model's
    own, :func:`genrec_fast.prompts.model_prompt_style`), checked before anything is decoded.
    The result also holds "per_sample" (user ids, targets, a fingerprint of the samples and every
    method's 0-based target ranks, -1 = not in its list), "intervals" (95 % bootstrap intervals over
    users of each method's NDCG@10 / HR@10, ``num_resamples`` draws seeded by ``seed``) and "paired"
    (model minus the best baseline per metric, paired over the same users); see ``genrec_fast.eval.stats``.
    hybrid_weight: also score the hybrid row (``genrec_fast.eval.hybrid``: the model's beams re-ranked with
    last-item transition counts at this weight) as "hybrid" {"weight", metrics, "paired" (vs the best baseline),
    "vs_model" (paired, hybrid minus model)}. hybrid_grid (valid only): choose that weight on this split from
    these values by NDCG@10, or NDCG at the largest cut-off when 10 is not one (``select_weight``; each value's
    score under "hybrid" "grid", the metric under "grid_metric").
    ensemble: other generative recommenders of the same items, each on its own SIDs
    (:class:`genrec_fast.eval.ensemble.Member`); with them the result also holds "ensemble": the product of experts
    of the model and these members (``genrec_fast.eval.ensemble.ensemble_predict``; the model's own beams are
    reused) as {"members", metrics, "num_candidates" (mean union size), "paired" (vs the best baseline),
    "vs_model" (paired, ensemble minus model)}. One process only.
    levels: also the level-by-level view of the same samples as "levels" (``genrec_fast.eval.levels.level_report``:
    per SID level, the target code's log-probability and rank under the model, SASRec and popularity).
    With ``out`` the main process writes the result as JSON (atomically). Prints the table.
    """
    ensemble = list(ensemble)
    _check_split_args(split, hybrid_weight, hybrid_grid, prompt_style, ensemble)
    want_hybrid = hybrid_weight is not None or hybrid_grid is not None
    ks = ks_for_beams(ks, num_beams, "evaluate_split")
    samples = _subset(list(getattr(data, split)), max_samples, seed)
    trie = catalog_trie(data.catalog) if trie is None else trie
    model_metrics, records = evaluate(model, tokenizer, sid_vocab, trie, samples, data.catalog, num_beams=num_beams,
                                      batch_size=batch_size, ks=ks, return_records=True, prompt_style=prompt_style,
                                      with_scores=want_hybrid or bool(ensemble),
                                      list_length=len(data.catalog) if ensemble else None,
                                      **decode_kwargs)
    ens_records = None
    if ensemble:
        ens_records, records = _ensemble_records([Member(model, tokenizer, sid_vocab, data.catalog, prompt_style),
                                                  *ensemble], samples, records, num_beams, ks, batch_size,
                                                 decode_kwargs)
    ranks = {"model": target_ranks([r["ranked"] for r in records], [r["target"] for r in records])}
    b_ranks, b_info = baseline_ranks(data, split, samples, ks, sasrec)
    ranks.update(b_ranks)
    baselines = metrics_of(b_ranks, b_info, ks)
    users = [str(s.user_id) for s in samples]
    metrics = interval_metrics(ks)
    extra = {}  # the model's other rows
    if ens_records is not None:
        ranks["ensemble"] = target_ranks([r["ranked"] for r in ens_records], [r["target"] for r in ens_records])
        extra["ensemble"] = {"members": len(ensemble) + 1, **metrics_from_ranks(ranks["ensemble"], ks),
                             "num_candidates": float(np.mean([r["num_candidates"] for r in ens_records])),
                             **_paired_blocks(ranks, "ensemble", list(b_ranks), users, metrics, num_resamples, seed)}
    if want_hybrid:
        extra["hybrid"] = _hybrid_result(data, split, samples, records, ranks, list(b_ranks), ks, hybrid_weight,
                                         hybrid_grid, num_resamples, seed)
    result = {"split": split, "num_samples": len(samples), "model": model_metrics, "baselines": baselines,
              "intervals": stats.method_intervals(ranks, users, metrics, num_resamples, seed),
              "paired": stats.paired_vs_best(ranks, list(b_ranks), users, metrics, "model", num_resamples, seed),
              "bootstrap": {"num_resamples": int(num_resamples), "seed": int(seed), "level": stats.DEFAULT_LEVEL,
                            "unit": "user", "num_users": len(set(users))},
              "per_sample": {"user_id": users, "target": [int(s.target) for s in samples],
                             "samples_sha1": stats.samples_fingerprint(samples),
                             "ranks": {k: [int(x) for x in v] for k, v in ranks.items()}}, **extra}
    if levels and is_main_process():
        result["levels"] = level_report(model, tokenizer, sid_vocab, data, split, samples, sasrec=sasrec,
                                        batch_size=batch_size, prompt_style=prompt_style,
                                        max_prompt_length=decode_kwargs.get("max_prompt_length"))
    if is_main_process():
        _report(result, out, print_table, ks)
    return result


def _check_split_args(split: str, hybrid_weight, hybrid_grid, prompt_style: Optional[str], ensemble: List) -> None:
    """evaluate_split's own checks, before anything is decoded: ValueError naming the argument."""
    if split not in ("valid", "test"):
        raise ValueError(f"evaluate_split: split must be 'valid' or 'test' (the baselines learn from train), "
                         f"got {split!r}")
    check_hybrid_args(split, hybrid_weight, hybrid_grid)
    if prompt_style is not None:
        check_prompt_style(prompt_style)
    if ensemble and dist_state().num_processes > 1:
        raise ValueError("evaluate_split: the ensemble row is computed in one process; run without accelerate launch")


def _subset(samples: List, max_samples: Optional[int], seed: int) -> List:
    """A seeded random subset of ``max_samples`` samples in their order (all when None or not fewer)."""
    if max_samples is None or max_samples >= len(samples):
        return samples
    keep = np.sort(np.random.default_rng(seed).choice(len(samples), size=max_samples, replace=False))
    return [samples[i] for i in keep]


def _report(result: dict, out, print_table: bool, ks: Sequence[int]) -> None:
    """Write ``result`` to ``out`` (atomically; None: not written) and print its tables."""
    if out is not None:
        write_json_atomic(out, result)
    if print_table:
        print(results_table(result, ks))
        if "levels" in result:
            print(level_table(result["levels"]))


def _ensemble_records(members: Sequence[Member], samples: Sequence, records: List[dict], num_beams: int,
                      ks: Sequence[int], batch_size: int, decode_kwargs: Mapping[str, Any]):
    """(the ensemble's records, the model's records cut to the largest cut-off): ``members[0]`` is the model, whose
    ``records`` hold every beam's items (its search is not run again); the other members' searches run as the
    model's did (``decode_kwargs``: :func:`evaluate`'s)."""
    n = max(ks)
    how = {k: decode_kwargs[k] for k in ("max_prompt_length", "backend", "cuda_graphs", "search_options")
           if k in decode_kwargs}
    # the model's beam scores are its log-probabilities of its own candidates when its search scored full_vocab
    scores = [r["scores"] for r in records] if decode_kwargs.get("score", "full_vocab") == "full_vocab" else None
    rest = [None] * (len(members) - 1)
    ens = ensemble_predict(members, samples, num_beams=num_beams, top_n=n, batch_size=batch_size,
                           beam_lists=[[r["ranked"] for r in records], *rest], beam_scores=[scores, *rest], **how)
    return ens, [{k: (v[:n] if k in ("ranked", "scores") else v) for k, v in r.items()} for r in records]


def _hybrid_result(data, split: str, samples: Sequence, records: Sequence[dict], ranks: Dict[str, np.ndarray],
                   baselines: Sequence[str], ks: Sequence[int], weight: Optional[float],
                   grid: Optional[Sequence[float]], num_resamples: int, seed: int) -> dict:
    """The "hybrid" block of ``evaluate_split`` (adds ``ranks["hybrid"]``): its weight (given, or chosen on
    this split from ``grid``), metrics, paired intervals against the best baseline and against the model."""
    metrics = interval_metrics(ks)
    users = [str(s.user_id) for s in samples]
    table = TransitionTable(fit_samples(data, split), len(data.catalog.item_ids))
    chosen = {}
    if grid is not None:
        weight, values = select_weight(records, samples, table, grid, metrics[0])
        chosen = {"grid": {repr(w): v for w, v in values.items()}, "grid_metric": metrics[0]}
    ranks["hybrid"] = hybrid_ranks(records, samples, table, weight)
    return {"weight": float(weight), **metrics_from_ranks(ranks["hybrid"], ks), **chosen,
            **_paired_blocks(ranks, "hybrid", baselines, users, metrics, num_resamples, seed)}


def _paired_blocks(ranks: Dict[str, np.ndarray], row: str, baselines: Sequence[str], users: Sequence[str],
                   metrics: Sequence[str], num_resamples: int, seed: int) -> dict:
    """{"paired": ``row`` minus the best baseline, "vs_model": ``row`` minus the model}, paired over the users."""
    vs_model = {m: stats.paired_interval(stats.per_sample(ranks[row], m), stats.per_sample(ranks["model"], m),
                                         users, num_resamples, seed) for m in metrics}
    return {"paired": stats.paired_vs_best(ranks, baselines, users, metrics, row, num_resamples, seed),
            "vs_model": vs_model}


def results_table(result: dict, ks: Optional[Iterable[int]] = None) -> str:
    """The printed table of an ``evaluate_split`` result (ks: default, the cut-offs the result holds)."""
    if ks is None:
        ks = sorted(int(k[3:]) for k in result["model"] if k.startswith("HR@")) or DEFAULT_KS
    rows = {"model": result["model"]}
    if "ensemble" in result:
        rows[ensemble_name(result)] = result["ensemble"]
    if "hybrid" in result:
        rows[hybrid_name(result)] = result["hybrid"]
    rows.update({f"{k} baseline": v for k, v in result["baselines"].items()})
    text = f"{result.get('split', '')} ({result['model']['num_samples']} samples)\n" + format_table(rows, ks)
    return text + intervals_table(result) + row_lines(result, "ensemble") + row_lines(result, "hybrid")


def hybrid_name(result: dict) -> str:
    """The hybrid row's name in the tables: ``model + transition (w W)``."""
    return f"model + transition (w {result['hybrid']['weight']:g})"


def ensemble_name(result: dict) -> str:
    """The ensemble row's name in the tables: ``ensemble of N SID sets``."""
    return f"ensemble of {result['ensemble']['members']} SID sets"


def row_lines(result: dict, row: str) -> str:
    """The paired intervals of the "hybrid" or "ensemble" row (and the hybrid's valid grid), "" without it."""
    h = result.get(row)
    if h is None:
        return ""
    lines = []
    for m, p in h["paired"].items():
        lines.append(f"{row} - best baseline ({p['baseline']}), paired, {m}: "
                     f"{p['diff']:+.4f} [{p['ci'][0]:+.4f}, {p['ci'][1]:+.4f}]")
    for m, p in h["vs_model"].items():
        lines.append(f"{row} - model, paired, {m}: {p['diff']:+.4f} [{p['ci'][0]:+.4f}, {p['ci'][1]:+.4f}]")
    if "grid" in h:
        lines.append(f"hybrid weight chosen on this split by {h['grid_metric']}: " +
                     ", ".join(f"w {float(w):g}: {v:.4f}" for w, v in h["grid"].items()) + f" -> {h['weight']:g}")
    return "\n" + "\n".join(lines)


def intervals_table(result: dict) -> str:
    """The interval lines of an ``evaluate_split`` result ("" when it has none)."""
    iv = result.get("intervals")
    if not iv:
        return ""
    boot = result.get("bootstrap", {})
    metrics = list(next(iter(iv.values())))
    rows = {"ensemble": ensemble_name, "hybrid": hybrid_name}  # the model's own rows, named as in the table
    names = {"model": "model", **{k: f(result) for k, f in rows.items() if k in iv and k in result},
             **{k: f"{k} baseline" for k in iv if k != "model" and k not in rows}}
    points = {"model": result["model"], **{k: result[k] for k in rows if k in iv and k in result},
              **result["baselines"]}
    w = max(len(n) for n in names.values())

    def cell(row, m):
        lo, hi = iv[row][m]
        point = points[row][m]
        return f"{point:.4f} [{lo:.4f}, {hi:.4f}]"

    level = int(round(100 * boot.get("level", stats.DEFAULT_LEVEL)))
    lines = ["", f"{level}% bootstrap intervals ({boot.get('num_resamples', '?')} resamples of the "
                 f"{boot.get('num_users', '?')} users):",
             "  ".join([f"{'method':<{w}}"] + [f"{m + ' [lo, hi]':<24}" for m in metrics]).rstrip()]
    for row, name in names.items():
        lines.append("  ".join([f"{name:<{w}}"] + [f"{cell(row, m):<24}" for m in metrics]).rstrip())
    for m, p in result.get("paired", {}).items():
        lines.append(f"model - best baseline ({p['baseline']}), paired, {m}: "
                     f"{p['diff']:+.4f} [{p['ci'][0]:+.4f}, {p['ci'][1]:+.4f}]")
    return "\n".join(lines)
