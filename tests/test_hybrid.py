"""The hybrid row: beams re-ranked with last-item transition counts (genrec_fast.eval.hybrid)."""
import math

import numpy as np
import pytest

from genrec_fast.data.types import Sample
from genrec_fast.eval.baselines import TransitionTable
from genrec_fast.eval.hybrid import TransitionReranker, hybrid_lists, hybrid_ranks, select_weight

# last item 0 -> 5 seen three times, -> 3 once, -> 7 twice; last item 1 -> 2 once
FIT = ([Sample("a", [9, 0], 5)] * 3 + [Sample("b", [0], 3)] + [Sample("c", [4, 0], 7)] * 2
       + [Sample("d", [1], 2)])


def _table():
    return TransitionTable(FIT, num_items=10)


def test_counts_and_order_at_zero_small_and_large_weight():
    r = TransitionReranker(_table())
    items, scores = [2, 3, 7, -1, 5], [-1.0, -1.5, -2.0, -2.1, -4.0]
    assert r.counts(0, items).tolist() == [0, 1, 2, 0, 3]  # the invalid slot (-1) has no count
    assert r.counts(8, items).tolist() == [0] * 5 and r.counts(-1, items).tolist() == [0] * 5
    assert r.rerank(items, scores, last=0, weight=0.0) == items
    # weight 1: -1, -1.5 + ln 2, -2 + ln 3, -2.1, -4 + ln 4 = -1, -0.807, -0.901, -2.1, -2.614
    assert r.rerank(items, scores, last=0, weight=1.0) == [3, 7, 2, -1, 5]
    # a large weight puts the successors first by count; the rest keep the beam order
    assert r.rerank(items, scores, last=0, weight=100.0) == [5, 7, 3, 2, -1]
    assert r.rerank(items, scores, last=8, weight=100.0) == items  # an item with no successors: the model's order


def test_equal_scores_keep_the_beam_order():
    r = TransitionReranker(_table())
    # items 3 and 9 share a beam's score; 3 has one count, so with weight w its score rises by w ln 2
    assert r.rerank([9, 3, 4], [-1.0, -1.0, -1.0], last=0, weight=0.0) == [9, 3, 4]
    assert r.rerank([9, 3, 4], [-1.0, -1.0, -1.0], last=0, weight=0.5) == [3, 9, 4]
    assert r.rerank([9, 4, 6], [-1.0, -1.0, -1.0], last=0, weight=3.0) == [9, 4, 6]


def test_hybrid_ranks_equal_a_brute_force_scoring():
    rng = np.random.default_rng(0)
    table = _table()
    counts = {(int(s), int(d)): int(c) for s, d, c in zip(table.src, table.dst, table.counts)}
    samples, records = [], []
    for i in range(200):
        hist = [int(x) for x in rng.integers(0, 3, size=rng.integers(0, 3))]
        items = [int(x) for x in rng.permutation(10)[:6]]
        scores = np.sort(rng.normal(size=6))[::-1].round(1).tolist()  # rounded: real ties occur
        target = int(rng.integers(0, 10))
        samples.append(Sample(str(i), hist, target))
        records.append({"index": i, "target": target, "ranked": items, "scores": scores})
    for w in (0.0, 0.3, 1.0, 7.0):
        got = hybrid_ranks(records, samples, table, w)
        for rec, s, g in zip(records, samples, got):
            last = s.history[-1] if s.history else None
            key = [(-(sc + w * math.log1p(counts.get((last, it), 0))), j)
                   for j, (it, sc) in enumerate(zip(rec["ranked"], rec["scores"]))]
            order = [rec["ranked"][j] for _, j in sorted(key)]
            assert g == (order.index(s.target) if s.target in order else -1)
    model_ranks = [r["ranked"].index(r["target"]) if r["target"] in r["ranked"] else -1 for r in records]
    assert hybrid_ranks(records, samples, table, 0.0).tolist() == model_ranks


def test_select_weight_picks_the_best_and_ties_go_to_the_smaller_weight():
    table = _table()
    # the model ranks 3 above 5; the target is 5, the last item's most frequent successor
    samples = [Sample("u", [0], 5)]
    records = [{"index": 0, "target": 5, "ranked": [3, 5], "scores": [-1.0, -2.0]}]
    best, values = select_weight(records, samples, table, [0.0, 4.0, 2.0, 0.5])
    # -2 + w ln 4 > -1 + w ln 2  <=>  w > 1 / ln 2 = 1.44: weights 2 and 4 put 5 first and tie; 2 is chosen
    assert best == 2.0 and list(values) == [0.0, 0.5, 2.0, 4.0]
    assert values[2.0] == values[4.0] == 1.0 and values[0.0] == values[0.5] == pytest.approx(1 / math.log2(3))


def test_bad_input_is_refused():
    table = _table()
    samples = [Sample("u", [0], 5)]
    rec = {"index": 0, "target": 5, "ranked": [3, 5], "scores": [-1.0, -2.0]}
    with pytest.raises(ValueError, match="finite number >= 0"):
        hybrid_lists([rec], samples, table, -1.0)
    with pytest.raises(ValueError, match="finite number >= 0"):
        select_weight([rec], samples, table, [1.0, float("nan")])
    with pytest.raises(ValueError, match="no beam scores"):
        hybrid_lists([{k: v for k, v in rec.items() if k != "scores"}], samples, table, 1.0)
    with pytest.raises(ValueError, match="1 prediction records for 2 samples"):
        hybrid_lists([rec], samples * 2, table, 1.0)
    with pytest.raises(ValueError, match="record 0 has target 4, its sample 5"):
        hybrid_lists([{**rec, "target": 4}], samples, table, 1.0)
    with pytest.raises(ValueError, match="2 items but 1 scores"):
        TransitionReranker(table).rerank([3, 5], [-1.0], last=0, weight=1.0)
    with pytest.raises(ValueError, match="no weights"):
        select_weight([rec], samples, table, [])


def test_evaluate_split_hybrid_row(tiny_setup, capsys):
    from genrec_fast.eval import evaluate_split
    from genrec_fast.eval.metrics import metrics_from_ranks

    data, model, tok, vocab = tiny_setup
    kw = dict(num_beams=5, batch_size=4, ks=(1, 5), sasrec=False, num_resamples=100, max_samples=8)
    res = evaluate_split(model, tok, vocab, data, "test", hybrid_weight=0.0, **kw)
    ranks = res["per_sample"]["ranks"]
    assert ranks["hybrid"] == ranks["model"]  # weight 0: the beams' own order
    assert res["hybrid"]["weight"] == 0.0 and res["hybrid"]["vs_model"]["NDCG@5"]["diff"] == 0.0
    res = evaluate_split(model, tok, vocab, data, "test", hybrid_weight=50.0, **kw)
    h = res["hybrid"]
    got = metrics_from_ranks(res["per_sample"]["ranks"]["hybrid"], (1, 5))
    assert all(h[k] == pytest.approx(got[k]) for k in ("HR@1", "HR@5", "NDCG@5"))
    assert h["HR@5"] == res["model"]["HR@5"]  # the same items, re-ordered
    assert set(h["paired"]) == {"NDCG@5", "HR@5"} and h["paired"]["NDCG@5"]["baseline"] in ("popularity", "transition")
    assert set(res["intervals"]) == {"model", "hybrid", "popularity", "transition"}
    table = capsys.readouterr().out
    assert "model + transition (w 50)" in table and "hybrid - best baseline" in table and "hybrid - model" in table
    res = evaluate_split(model, tok, vocab, data, "valid", hybrid_grid=[0.0, 1.0, 50.0], **kw)
    assert set(res["hybrid"]["grid"]) == {"0.0", "1.0", "50.0"}
    h = res["hybrid"]
    assert h["grid_metric"] == "NDCG@5" and h["NDCG@5"] == max(h["grid"].values())
    assert h["grid"][repr(h["weight"])] == h["NDCG@5"]
    assert "hybrid weight chosen on this split by NDCG@5" in capsys.readouterr().out


def test_evaluate_split_hybrid_options_are_checked_before_decoding(tiny_setup):
    from genrec_fast.eval import evaluate_split

    data, model, tok, vocab = tiny_setup
    with pytest.raises(ValueError, match="chosen on the valid split, not on 'test'"):
        evaluate_split(model, tok, vocab, data, "test", hybrid_grid=[1.0], num_beams=5)
    with pytest.raises(ValueError, match="not both"):
        evaluate_split(model, tok, vocab, data, "valid", hybrid_weight=1.0, hybrid_grid=[1.0], num_beams=5)
    with pytest.raises(ValueError, match="hybrid weight must be a finite number"):
        evaluate_split(model, tok, vocab, data, "test", hybrid_weight=-2.0, num_beams=5)
    with pytest.raises(ValueError, match="grid is empty"):
        evaluate_split(model, tok, vocab, data, "valid", hybrid_grid=[], num_beams=5)
