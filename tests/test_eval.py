import numpy as np
import pytest

from genrec_fast import SIDTrie
from genrec_fast.data.types import Catalog, Sample
from genrec_fast.eval.beams import BeamRanker, catalog_trie, predict
from genrec_fast.eval.evaluate import metrics_from_records, shard_range
from genrec_fast.prompts import rec_prompt

NEG = -np.inf


def _trie():
    # items 0..4; items 1 and 3 share SID (0, 1); item 4 alone at (1, 0)
    codes = np.array([[0, 0], [0, 1], [1, 1], [0, 1], [1, 0]])
    return SIDTrie(codes, codebook_sizes=(2, 2), allow_duplicates=True)


def test_beams_to_ranked_items_shared_sids_invalid_and_padding():
    r = BeamRanker(_trie())
    codes = np.array([
        [[0, 1], [1, 0], [0, 1], [0, 0]],        # shared SID twice: items 1, 3 once; then 4; then 0
        [[1, 1], [-1, -1], [5, 0], [1, 0]],      # padding beam (-inf), out-of-range code (invalid), valid
    ])
    scores = np.array([[-0.1, -0.5, -0.7, -1.0], [-0.2, NEG, -0.3, -0.4]])
    lists, n_ret, n_bad = r.rank(codes, scores, top_n=10)
    # the invalid beam keeps its rank (-1, never a hit); the padding beam takes none
    assert lists == [[1, 3, 4, 0], [2, -1, 4]]
    assert n_ret.tolist() == [4, 3] and n_bad.tolist() == [0, 1]
    lists, _, _ = r.rank(codes, scores, top_n=2)
    assert lists == [[1, 3], [2, -1]]
    # each entry's beam score beside it: a shared SID's items share it, an invalid beam's slot keeps its own
    lists, item_scores, _, _ = r.rank_scored(codes, scores, top_n=10)
    assert lists == [[1, 3, 4, 0], [2, -1, 4]]
    assert item_scores == [[-0.1, -0.1, -0.5, -1.0], [-0.2, -0.3, -0.4]]


def test_invalid_sid_in_range_counts_as_invalid():
    codes = np.array([[0, 0], [1, 1]])
    r = BeamRanker(SIDTrie(codes, codebook_sizes=(2, 2)))
    lists, n_ret, n_bad = r.rank(np.array([[[0, 1], [1, 1], [1, 0]]]), np.array([[-1.0, -2.0, -3.0]]), top_n=5)
    assert lists == [[-1, 1, -1]] and n_ret.tolist() == [3] and n_bad.tolist() == [2]
    # a target behind an invalid beam is at rank 1, not moved up to rank 0
    m = metrics_from_records([{"index": 0, "target": 1, "ranked": lists[0], "num_beams": 3, "num_invalid": 2}],
                             ks=(1, 3))
    assert m["HR@1"] == 0.0 and m["HR@3"] == 1.0 and m["NDCG@3"] == pytest.approx(1 / np.log2(3))
    with pytest.raises(ValueError, match="3 levels, the trie 2"):
        r.rank(np.zeros((1, 1, 3), dtype=np.int64), np.zeros((1, 1)), top_n=1)


def test_metrics_from_records_invalid_rate():
    recs = [{"index": 0, "target": 3, "ranked": [1, 3], "num_beams": 4, "num_invalid": 1},
            {"index": 1, "target": 9, "ranked": [2], "num_beams": 4, "num_invalid": 0}]
    m = metrics_from_records(recs, ks=(1, 5))
    assert m["HR@1"] == 0.0 and m["HR@5"] == 0.5
    assert m["invalid_rate"] == pytest.approx(1 / 8) and m["num_samples"] == 2


@pytest.mark.parametrize("n,world", [(0, 1), (7, 1), (7, 2), (10, 3), (2, 4), (101, 8)])
def test_shard_range_partitions(n, world):
    shards = [shard_range(n, world, r) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert flat == list(range(n))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        shard_range(n, world, world)


def test_catalog_trie_keeps_shared_sids_and_needs_codes():
    cat = Catalog(["a", "b", "c"], ["A", "B", "C"], ["A", "B", "C"], codes=np.array([[1, 2], [1, 2], [0, 3]]),
                  codebook_sizes=(4, 4))
    t = catalog_trie(cat)
    assert sorted(t.items([1, 2]).tolist()) == [0, 1] and t.codebook_sizes == (4, 4)
    with pytest.raises(ValueError, match="no Semantic IDs"):
        catalog_trie(Catalog(["a"], ["A"], ["A"]))


# ---- end to end with a tiny random Qwen2 -------------------------------------------------------

def test_evaluate_matches_direct_beam_search(tiny_setup):
    from genrec_fast.decode import beam_search
    from genrec_fast.eval import evaluate
    from genrec_fast.model import encode_prompts
    from genrec_fast.prompts import rec_prompt

    data, model, tok, vocab = tiny_setup
    trie = catalog_trie(data.catalog)
    m, recs = evaluate(model, tok, vocab, trie, data.test, data.catalog, num_beams=5, batch_size=4, ks=(1, 3, 5),
                       return_records=True)
    assert [r["index"] for r in recs] == list(range(len(data.test)))
    assert m["invalid_rate"] == 0.0 and m["num_samples"] == len(data.test)
    # independent path: one unbatched beam search per sample, items from BeamSearchResult.item_ids
    for s, r in zip(data.test, recs):
        ids, mask = encode_prompts(tok, [rec_prompt(s.history, data.catalog)])
        res = beam_search(model, ids, mask, trie, vocab, 5)
        want = []
        for items in res.item_ids[0]:
            want += [int(x) for x in sorted(items) if int(x) not in want]
        assert r["ranked"] == want[:5]
        assert r["num_beams"] == 5
    want_hr1 = np.mean([r["ranked"][:1] == [s.target] for r, s in zip(recs, data.test)])
    assert m["HR@1"] == pytest.approx(want_hr1)


def test_all_beams_rank_every_item_including_shared_sid(tiny_setup):
    from genrec_fast.eval import predict

    data, model, tok, vocab = tiny_setup
    trie = catalog_trie(data.catalog)
    # 11 distinct SIDs: asking for all of them ranks the whole catalogue (12 items: 10 and 11 share a SID)
    recs = predict(model, tok, vocab, trie, data.test, data.catalog, num_beams=11, batch_size=3, top_n=12)
    assert all(sorted(r["ranked"]) == list(range(12)) for r in recs)
    r0 = recs[0]["ranked"]
    assert r0.index(11) == r0.index(10) + 1  # shared SID -> items in ascending order, adjacent


def test_cut_offs_above_num_beams(tiny_setup):
    """Default cut-offs stop at num_beams; an explicit K > num_beams is refused (it would be a lower bound
    set beside baselines that rank the whole catalogue)."""
    from genrec_fast.eval import evaluate, evaluate_split
    from genrec_fast.eval.metrics import ks_for_beams

    assert ks_for_beams(None, 50) == (1, 3, 5, 10, 20, 50)
    assert ks_for_beams(None, 12) == (1, 3, 5, 10)
    assert ks_for_beams(None, 2) == (1,)
    assert ks_for_beams([10, 5, 5], 10) == (5, 10)
    with pytest.raises(ValueError, match=r"cut-off K=20 is above num_beams=10.*drop the cut-offs \[20\]"):
        ks_for_beams((5, 20), 10)
    data, model, tok, vocab = tiny_setup
    trie = catalog_trie(data.catalog)
    m = evaluate(model, tok, vocab, trie, data.test[:3], data.catalog, num_beams=4, batch_size=4)
    assert sorted(k for k in m if k.startswith("HR@")) == ["HR@1", "HR@3"]
    with pytest.raises(ValueError, match="evaluate_split: cut-off K=5 is above num_beams=4"):
        evaluate_split(model, tok, vocab, data, "test", num_beams=4, ks=(1, 5))


def test_predict_shards_reassemble(tiny_setup):
    from genrec_fast.eval import predict

    data, model, tok, vocab = tiny_setup
    trie = catalog_trie(data.catalog)
    full = predict(model, tok, vocab, trie, data.test, data.catalog, num_beams=4, batch_size=8, top_n=4)
    parts = [predict(model, tok, vocab, trie, data.test, data.catalog, num_beams=4, batch_size=2, top_n=4,
                     indices=shard_range(len(data.test), 3, r)) for r in range(3)]
    assert [x for p in parts for x in p] == full


def test_predict_graph_path_ranks_as_eager(tiny_setup):
    """predict(cuda_graphs=...) reaches beam_search: its static-buffer protocol ("emulate" on CPU) ranks
    the same items, across batches of different prompt widths and a short last batch; True needs CUDA."""
    from genrec_fast.eval import predict

    data, model, tok, vocab = tiny_setup
    trie = catalog_trie(data.catalog)
    eager = predict(model, tok, vocab, trie, data.test, data.catalog, num_beams=5, batch_size=4, top_n=12)
    graphed = predict(model, tok, vocab, trie, data.test, data.catalog, num_beams=5, batch_size=4, top_n=12,
                      cuda_graphs="emulate")
    assert graphed == eager
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        predict(model, tok, vocab, trie, data.test[:2], data.catalog, num_beams=5, cuda_graphs=True)


def test_predict_search_options_rank_as_the_default(tiny_setup):
    """predict(search_options=...) reaches beam_search: the shared-prefix layout with the fused log-sum-exp, and the
    whole-search graph (emulated), rank the same items as the default search; an unknown option is an error."""
    from genrec_fast.eval import predict

    data, model, tok, vocab = tiny_setup
    trie = catalog_trie(data.catalog)
    kw = dict(num_beams=5, batch_size=4, top_n=12)
    default = predict(model, tok, vocab, trie, data.test, data.catalog, **kw)
    for options, graphs in (({"shared_prefix": True, "lse_backend": "triton"}, False),
                            ({"graph_scope": "search"}, "emulate")):
        got = predict(model, tok, vocab, trie, data.test, data.catalog, cuda_graphs=graphs, search_options=options,
                      **kw)
        assert got == default, options
    with pytest.raises(ValueError, match=r"search_options \['num_beams'\] are not among"):
        predict(model, tok, vocab, trie, data.test[:2], data.catalog, search_options={"num_beams": 3}, **kw)


def test_evaluate_split_writes_json_with_baselines(tiny_setup, tmp_path, capsys):
    import json

    from genrec_fast.eval import evaluate_split
    from genrec_fast.eval.metrics import metrics_from_ranks
    from genrec_fast.eval.stats import per_sample

    data, model, tok, vocab = tiny_setup
    out = tmp_path / "res" / "metrics.json"
    res = evaluate_split(model, tok, vocab, data, "test", num_beams=5, batch_size=4, ks=(1, 5), max_samples=6,
                         out=str(out), num_resamples=200)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(res))
    assert saved["num_samples"] == 6 and saved["model"]["num_samples"] == 6
    assert set(saved["baselines"]) == {"popularity", "transition", "sasrec"}
    assert saved["baselines"]["transition"]["num_samples"] == 6
    assert saved["baselines"]["sasrec"]["epochs"] >= 1
    for block in [saved["model"], *saved["baselines"].values()]:
        assert 0.0 <= block["HR@1"] <= block["HR@5"] <= 1.0
        assert 0.0 <= block["NDCG@1"] <= block["NDCG@5"] <= block["HR@5"]
    # the saved per-sample ranks give back every row's metrics; intervals hold the point estimates
    ps = saved["per_sample"]
    assert len(ps["user_id"]) == 6 and set(ps["ranks"]) == {"model", "popularity", "transition", "sasrec"}
    for name, ranks in ps["ranks"].items():
        row = saved["model"] if name == "model" else saved["baselines"][name]
        got = metrics_from_ranks(ranks, (1, 5))
        assert all(got[k] == pytest.approx(row[k]) for k in ("HR@1", "HR@5", "NDCG@5")), name
        for metric in ("NDCG@5", "HR@5"):  # no K=10 here: the largest cut-off
            lo, hi = saved["intervals"][name][metric]
            assert lo <= row[metric] <= hi
    best = max(("popularity", "transition", "sasrec"), key=lambda b: saved["baselines"][b]["NDCG@5"])
    assert saved["baselines"][saved["paired"]["NDCG@5"]["baseline"]]["NDCG@5"] == saved["baselines"][best]["NDCG@5"]
    assert saved["paired"]["NDCG@5"]["diff"] == pytest.approx(
        per_sample(ps["ranks"]["model"], "NDCG@5").mean() - saved["baselines"][best]["NDCG@5"])
    table = capsys.readouterr().out
    assert "transition baseline" in table and "popularity baseline" in table and "sasrec baseline" in table
    assert "95% bootstrap intervals" in table and "model - best baseline" in table
    assert list(tmp_path.joinpath("res").iterdir()) == [out]  # no temp file left behind


def test_evaluate_split_results_compare_paired(tiny_setup):
    from genrec_fast.eval import compare_results, evaluate_split

    data, model, tok, vocab = tiny_setup
    kw = dict(num_beams=5, batch_size=4, ks=(1, 5), print_table=False, sasrec=False, num_resamples=100)
    a = evaluate_split(model, tok, vocab, data, "test", max_samples=6, **kw)
    assert set(a["baselines"]) == {"popularity", "transition"}
    b = evaluate_split(model, tok, vocab, data, "test", max_samples=6, **kw)
    cmp = compare_results(a, b, metrics=("NDCG@5", "HR@5"))
    assert cmp["NDCG@5"]["diff"] == 0.0 and cmp["NDCG@5"]["ci"] == [0.0, 0.0]
    vs_pop = compare_results(a, b, method_b="popularity", metrics=("HR@5",))
    assert vs_pop["HR@5"]["diff"] == pytest.approx(a["model"]["HR@5"] - a["baselines"]["popularity"]["HR@5"])
    c = evaluate_split(model, tok, vocab, data, "test", max_samples=6, seed=1, **kw)
    with pytest.raises(ValueError, match="cover different samples"):
        compare_results(a, c)


def test_predict_refuses_a_prompt_longer_than_the_model_positions(tiny_setup, monkeypatch):
    """A prompt + its SID tokens past max_position_embeddings is an error naming the sample (never cut
    silently); ``max_prompt_length`` keeps the last tokens when asked for."""
    data, model, tok, vocab = tiny_setup
    trie = catalog_trie(data.catalog)
    samples = [Sample("short", [1], 2), Sample("long", list(range(10)) * 3, 3), Sample("mid", [1, 2, 3], 4)]
    n_long = len(tok(rec_prompt(samples[1].history, data.catalog), add_special_tokens=False)["input_ids"])
    monkeypatch.setattr(model.config, "max_position_embeddings", n_long + 1)  # one position short for 2 levels
    with pytest.raises(ValueError, match=rf"sample 1 \(user long\): its prompt is {n_long} tokens, \+ 2 SID tokens > "
                                         rf"the model's {n_long + 1} positions"):
        predict(model, tok, vocab, trie, samples, data.catalog, num_beams=3)
    recs = predict(model, tok, vocab, trie, samples, data.catalog, num_beams=3, max_prompt_length=n_long - 1)
    assert [r["index"] for r in recs] == [0, 1, 2]
    monkeypatch.setattr(model.config, "max_position_embeddings", n_long + 2)  # fits exactly
    assert len(predict(model, tok, vocab, trie, samples, data.catalog, num_beams=3)) == 3
