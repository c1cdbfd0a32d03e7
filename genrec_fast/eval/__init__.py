"""Full-catalogue evaluation: ranking metrics, baselines (popularity, transition, SASRec), the model by beam
search, and bootstrap intervals."""
from genrec_fast.eval.baselines import (
    baseline_metrics,
    baseline_ranks,
    fit_samples,
    popularity_baseline,
    popularity_ranking,
    transition_baseline,
    transition_rankings,
)
from genrec_fast.eval.beams import BeamRanker, catalog_trie, predict
from genrec_fast.eval.evaluate import evaluate, evaluate_split, results_table, shard_range, write_json_atomic
from genrec_fast.eval.hybrid import TransitionReranker, hybrid_ranks, select_weight
from genrec_fast.eval.metrics import DEFAULT_KS, format_table, metrics_from_ranks, ranking_metrics
from genrec_fast.eval.sasrec import SASRecConfig, fit_sasrec
from genrec_fast.eval.stats import bootstrap_interval, compare_results, paired_interval

__all__ = [
    "DEFAULT_KS", "BeamRanker", "SASRecConfig", "TransitionReranker", "baseline_metrics", "baseline_ranks",
    "bootstrap_interval",
    "catalog_trie", "compare_results", "evaluate", "evaluate_split", "fit_samples", "fit_sasrec", "format_table",
    "hybrid_ranks", "metrics_from_ranks", "paired_interval", "popularity_baseline", "popularity_ranking", "predict",
    "ranking_metrics", "results_table", "select_weight", "shard_range", "transition_baseline", "transition_rankings",
    "write_json_atomic",
]
