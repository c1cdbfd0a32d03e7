"""`Recommender.from_pretrained(dir).recommend(histories, k)` and `genrec-fast recommend` on a tiny trained model."""
import json
import shutil

import numpy as np
import pytest
import torch

from genrec_fast import Recommender, cli
from genrec_fast.bundle import BUNDLE_FILE, read_bundle, write_bundle
from genrec_fast.data import Catalog
from genrec_fast.eval import catalog_trie, predict
from genrec_fast.recommend import Recommendation, format_recommendations
from genrec_fast.train.sft import SFTConfig, train_sft

from test_sft import SMALL, _data

HISTORIES = [[str(i), str(i + 1)] for i in range(10)]  # the next item is always the last + 1


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained on "next = last + 1" over 12 items (2 x 4 SIDs), with its bundle written as SFT
    writes it; returns (data, model_dir)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    data = _data()
    root = tmp_path_factory.mktemp("recommend")
    cfg = SFTConfig(output_dir=str(root / "run"), tasks=("sid_seq",), lr=3e-3, batch_tokens=256, pack_length=128,
                    max_length=128, max_steps=300, eval_every=-1, model_overrides=SMALL, tokenizer_vocab_size=300,
                    log_every=50, progress=False)
    res = train_sft(cfg, data=data)
    model_dir = root / "model"  # alone: no data folder beside it
    shutil.copytree(res.model_dir, model_dir)
    write_bundle(model_dir, data.catalog, "minionerec")
    yield data, model_dir
    torch.set_num_threads(before)


def test_recommend_learned_and_equals_evaluation_ranking(trained):
    data, model_dir = trained
    rec = Recommender.from_pretrained(model_dir)
    assert rec.prompt_style == "minionerec"
    out = rec.recommend(HISTORIES, k=3)
    assert len(out) == len(HISTORIES) and all(isinstance(r, Recommendation) for r in out)
    for r in out:
        assert len(r.item_ids) == 3 and len(set(r.item_ids)) == 3
        assert r.scores == sorted(r.scores, reverse=True) and max(r.scores) <= 0.0  # beam log-probabilities
        assert r.titles == [data.catalog.titles[data.catalog.index(i)] for i in r.item_ids]
    top1 = sum(r.item_ids[0] == str(int(h[-1]) + 1) for h, r in zip(HISTORIES, out))
    assert top1 >= 6, [r.item_ids for r in out]  # chance: 10 / 12
    # the same ranking as evaluation's predict on the data's own catalogue
    samples = [type(data.test[0])(str(u), [data.catalog.index(i) for i in h], -1) for u, h in enumerate(HISTORIES)]
    recs = predict(rec.model, rec.tokenizer, rec.sid_vocab, catalog_trie(data.catalog), samples, data.catalog,
                   num_beams=3, top_n=3)
    assert [[data.catalog.item_ids[i] for i in r["ranked"]] for r in recs] == [r.item_ids for r in out]
    # one user alone: the same items, the same scores up to float rounding of the batch
    alone = rec.recommend([HISTORIES[4]], k=3)[0]
    assert alone.item_ids == out[4].item_ids and alone.scores == pytest.approx(out[4].scores, abs=1e-4)
    # more beams than k: the top k of a wider search
    wide = rec.recommend(HISTORIES[:2], k=2, num_beams=6)
    assert all(len(r.item_ids) == 2 for r in wide)


def test_recommend_hybrid_reranks_the_beams_with_transition_counts(trained):
    import math

    _, model_dir = trained
    rec = Recommender.from_pretrained(model_dir)
    # counts that contradict the learned "next = last + 1": after 3 comes 7 (five times) and 0 (once)
    table = rec.transitions([["3", "7"]] * 5 + [["2", "3", "0"]])
    assert table.successors(rec.catalog.index("3")).tolist() == [rec.catalog.index("7"), rec.catalog.index("0")]
    base = rec.recommend([["2", "3"], ["5", "6"]], k=12)  # every item: the model's own scores
    out = rec.recommend([["2", "3"], ["5", "6"]], k=4, transitions=table, hybrid_weight=2.0)
    model_score = dict(zip(base[0].item_ids, base[0].scores))
    want = sorted(model_score, key=lambda i: -(model_score[i] + 2.0 * math.log1p({"7": 5, "0": 1}.get(i, 0))))[:4]
    assert out[0].item_ids == want and {"0", "7"} <= set(want) and want != base[0].item_ids[:4]
    assert out[0].scores == pytest.approx([model_score[i] + 2.0 * math.log1p({"7": 5, "0": 1}.get(i, 0))
                                           for i in want], abs=1e-4)
    assert out[1].item_ids == base[1].item_ids[:4]  # last item 6 has no counted successor: the model's order
    assert out[0].scores == sorted(out[0].scores, reverse=True)
    # weight 0 is the model's own list
    assert rec.recommend([["2", "3"]], k=4, transitions=table, hybrid_weight=0.0)[0].item_ids == base[0].item_ids[:4]
    with pytest.raises(ValueError, match="give both or neither"):
        rec.recommend([["1"]], k=2, transitions=table)
    with pytest.raises(ValueError, match="recommend: hybrid_weight must be a finite number >= 0, got -1"):
        rec.recommend([["1"]], k=2, transitions=table, hybrid_weight=-1.0)
    with pytest.raises(ValueError, match="user 1: item id 'nope'"):
        rec.transitions([["1", "2"], ["nope", "2"]])
    with pytest.raises(ValueError, match="no sequence holds two items"):
        rec.transitions([["1"], ["2"]])


def test_unknown_items_and_bad_arguments_name_the_user(trained):
    _, model_dir = trained
    rec = Recommender.from_pretrained(model_dir)
    with pytest.raises(ValueError, match=r"user 1: item id 'nope' \(position 1 of the history\) is not in the model's "
                                         rf"catalogue \(12 items, .*{BUNDLE_FILE}\)"):
        rec.recommend([["1"], ["2", "nope"]], k=2)
    with pytest.raises(ValueError, match="user 0: a history must be a list of item ids, got str '1'"):
        rec.recommend(["1", "2"], k=2)
    with pytest.raises(ValueError, match="histories must be a list of histories"):
        rec.recommend("1 2", k=2)
    with pytest.raises(ValueError, match="user 1: empty history"):
        rec.recommend([["1"], []], k=2)
    with pytest.raises(ValueError, match="k must be an integer >= 1, got 0"):
        rec.recommend([["1"]], k=0)
    with pytest.raises(ValueError, match="num_beams must be an integer >= k=3, got 2"):
        rec.recommend([["1"]], k=3, num_beams=2)
    assert rec.recommend([[1, 2]], k=1)[0].item_ids == rec.recommend([["1", "2"]], k=1)[0].item_ids  # ids as ints


def test_prompt_style_from_the_bundle_or_given(trained, tmp_path):
    data, model_dir = trained
    compact_dir = shutil.copytree(model_dir, tmp_path / "compact")
    write_bundle(compact_dir, data.catalog, "compact")
    rec = Recommender.from_pretrained(compact_dir)
    assert rec.prompt_style == "compact"
    assert Recommender.from_pretrained(compact_dir, prompt_style="minionerec").prompt_style == "minionerec"
    # the style reaches the prompts: the same ranking as predict in that style, not the other one's
    samples = [type(data.test[0])(str(u), [data.catalog.index(i) for i in h], -1) for u, h in enumerate(HISTORIES)]
    trie = catalog_trie(data.catalog)
    got = rec.recommend(HISTORIES, k=4)
    for style, same in (("compact", True), ("minionerec", False)):
        want = predict(rec.model, rec.tokenizer, rec.sid_vocab, trie, samples, data.catalog, num_beams=4, top_n=4,
                       prompt_style=style, with_scores=True)
        scores = [r.scores for r in got]
        assert (np.allclose(scores, [w["scores"] for w in want], atol=1e-4)) == same, style
    with pytest.raises(ValueError, match="unknown prompt style 'chat'"):
        Recommender.from_pretrained(model_dir, prompt_style="chat")


def test_items_sharing_a_sid_share_its_score(trained, tmp_path):
    data, model_dir = trained
    codes = data.catalog.codes.copy()
    codes[11] = codes[10]
    shared = Catalog(data.catalog.item_ids, data.catalog.titles, data.catalog.texts, codes=codes,
                     codebook_sizes=data.catalog.codebook_sizes)
    d = shutil.copytree(model_dir, tmp_path / "shared")
    write_bundle(d, shared, "minionerec")
    r = Recommender.from_pretrained(d).recommend([["3", "4"]], k=12)[0]
    assert sorted(r.item_ids) == sorted(data.catalog.item_ids)  # 11 SIDs hold the 12 items
    a, b = r.item_ids.index("10"), r.item_ids.index("11")
    assert b == a + 1 and r.scores[a] == r.scores[b]


def test_a_model_without_a_bundle_is_refused(trained, tmp_path):
    _, model_dir = trained
    bare = shutil.copytree(model_dir, tmp_path / "bare")
    (bare / BUNDLE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{BUNDLE_FILE}: no model bundle"):
        Recommender.from_pretrained(bare)


def test_recommend_cli_prints_a_table(trained, capsys):
    data, model_dir = trained
    assert cli.main(["recommend", "--model", str(model_dir), "--history", "3", "4", "--k", "3"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    want = Recommender.from_pretrained(model_dir).recommend([["3", "4"]], k=3)[0]
    assert printed == format_recommendations(want).splitlines()
    assert printed[0].split() == ["rank", "item_id", "score", "title"] and len(printed) == 4
    assert printed[1].split()[:2] == ["1", want.item_ids[0]] and printed[1].endswith(want.titles[0])
    capsys.readouterr()
    assert cli.entry(["recommend", "--model", str(model_dir), "--history", "3", "x9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("genrec-fast: error: user 0: item id 'x9'") and "Traceback" not in err
    assert cli.entry(["recommend", "--model", str(model_dir), "--history", "3", "--k", "4", "--num-beams", "2"]) == 2
    assert "--num-beams must be >= --k (4), got 2" in capsys.readouterr().err


def test_recommend_from_a_config_file(trained, tmp_path, capsys):
    _, model_dir = trained
    cfg = tmp_path / "rec.json"
    cfg.write_text(json.dumps({"model": str(model_dir), "history": ["3", "4"], "k": 2}))
    assert cli.main(["recommend", "--config", str(cfg)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3


def test_a_bundle_of_other_codebook_sizes_is_refused(trained, tmp_path):
    data, model_dir = trained
    d = shutil.copytree(model_dir, tmp_path / "sizes")
    wider = Catalog(data.catalog.item_ids, data.catalog.titles, data.catalog.texts, codes=data.catalog.codes,
                    codebook_sizes=(4, 8))
    write_bundle(d, wider, "minionerec")
    with pytest.raises(ValueError, match=r"tokenizer has only part of the SID token block|codebook sizes \[4, 8\]"):
        Recommender.from_pretrained(d)
    rec = Recommender.from_pretrained(model_dir)
    with pytest.raises(ValueError, match=r"genrec_bundle.json: codebook sizes \[4, 8\], but the model's SID tokens "
                                         r"have \[4, 4\]"):
        Recommender(rec.model, rec.tokenizer, rec.sid_vocab, read_bundle(d))


def _resid_copy(data, model_dir, dest, seed=1):
    """A copy of the model whose bundle gives the items other SIDs (permuted among them): another member."""
    d = shutil.copytree(model_dir, dest)
    perm = np.random.default_rng(seed).permutation(len(data.catalog))
    other = Catalog(data.catalog.item_ids, data.catalog.titles, data.catalog.texts, codes=data.catalog.codes[perm],
                    codebook_sizes=data.catalog.codebook_sizes)
    write_bundle(d, other, "minionerec")
    return d, other


def test_recommend_ensemble_ranks_by_the_members_mean(trained, tmp_path, capsys):
    from genrec_fast.eval.ensemble import Member, ensemble_predict

    data, model_dir = trained
    other_dir, other_cat = _resid_copy(data, model_dir, tmp_path / "other")
    rec, other = Recommender.from_pretrained(model_dir), Recommender.from_pretrained(other_dir)
    out = rec.recommend(HISTORIES, k=3, num_beams=3, ensemble=[other])
    samples = [type(data.test[0])(str(u), [data.catalog.index(i) for i in h], -1) for u, h in enumerate(HISTORIES)]
    want = ensemble_predict([Member(rec.model, rec.tokenizer, rec.sid_vocab, data.catalog, "minionerec"),
                             Member(other.model, other.tokenizer, other.sid_vocab, other_cat, "minionerec")],
                            samples, num_beams=3, top_n=3)
    for r, w in zip(out, want):
        assert r.item_ids == [data.catalog.item_ids[i] for i in w["ranked"]]
        assert r.scores == pytest.approx(w["scores"], abs=1e-5)
        assert r.titles == [data.catalog.titles[i] for i in w["ranked"]]
    # with itself only: its own beams' items, in its own order
    alone, self_ens = rec.recommend(HISTORIES, k=3), rec.recommend(HISTORIES, k=3, ensemble=[rec])
    assert [r.item_ids for r in self_ens] == [r.item_ids for r in alone]
    # the command line: the same table
    argv = ["recommend", "--model", str(model_dir), "--history", "3", "4", "--k", "3", "--num-beams", "3"]
    assert cli.main([*argv, "--ensemble-models", str(other_dir)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed == format_recommendations(rec.recommend([["3", "4"]], k=3, num_beams=3,
                                                           ensemble=[other])[0]).splitlines()
    # a member of other items is refused before any model is loaded
    fewer = shutil.copytree(model_dir, tmp_path / "fewer")
    cat = data.catalog
    write_bundle(fewer, Catalog(cat.item_ids[:-1], cat.titles[:-1], cat.texts[:-1], codes=cat.codes[:-1],
                                codebook_sizes=cat.codebook_sizes), "minionerec")
    with pytest.raises(ValueError, match=rf"--ensemble-models {fewer}: its bundle lists other items"):
        cli.main([*argv, "--ensemble-models", str(fewer)])


def test_recommend_takes_the_search_options(trained, capsys):
    """The search options reach the recommender's searches (its own and an ensemble's): the emulated graph protocol
    as one graph per search with the shared-prefix K/V recommends what the default search does (fp32); the CLI takes
    the same flags; graph_scope without cuda_graphs is refused by name."""
    from genrec_fast.decode.options import SearchOptions

    _, model_dir = trained
    fast = SearchOptions(cuda_graphs="emulate", graph_scope="search", shared_prefix=True)
    rec, quick = Recommender.from_pretrained(model_dir), Recommender.from_pretrained(model_dir, search=fast)
    for kw in ({}, {"ensemble": [rec]}):
        want, got = rec.recommend(HISTORIES, k=4, **kw), quick.recommend(HISTORIES, k=4, **kw)
        assert [r.item_ids for r in got] == [r.item_ids for r in want]
        for a, b in zip(got, want):
            assert a.scores == pytest.approx(b.scores, abs=1e-4)
    argv = ["recommend", "--model", str(model_dir), "--history", "3", "4", "--k", "3"]
    assert cli.main(argv) == 0
    plain = capsys.readouterr().out
    assert cli.main([*argv, "--shared-prefix"]) == 0
    assert capsys.readouterr().out == plain
    assert cli.entry([*argv, "--graph-scope", "search"]) == 2
    assert "recommend: graph_scope 'search' needs cuda_graphs" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Recommender: shared_prefix must be true or false, got 'yes'"):
        Recommender.from_pretrained(model_dir, search=SearchOptions(shared_prefix="yes"))
