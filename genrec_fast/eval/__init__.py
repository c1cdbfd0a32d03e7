"""Full-catalogue evaluation: ranking metrics, non-learned baselines and the model by beam search."""
from genrec_fast.eval.baselines import (baseline_metrics, fit_samples, popularity_baseline, popularity_ranking,
                                        transition_baseline, transition_rankings)
from genrec_fast.eval.evaluate import (BeamRanker, catalog_trie, evaluate, evaluate_split, predict, results_table,
                                       shard_range, write_json_atomic)
from genrec_fast.eval.metrics import DEFAULT_KS, format_table, metrics_from_ranks, ranking_metrics

__all__ = [
    "DEFAULT_KS", "BeamRanker", "baseline_metrics", "catalog_trie", "evaluate", "evaluate_split", "fit_samples",
    "format_table", "metrics_from_ranks", "popularity_baseline", "popularity_ranking", "predict", "ranking_metrics",
    "results_table", "shard_range", "transition_baseline", "transition_rankings", "write_json_atomic",
]
