"""Product-of-experts ensembles over members with their own SIDs (genrec_fast.eval.ensemble)."""
import numpy as np
import pytest
import torch


def _other_sids(catalog, seed=1):
    """The same items with their SIDs permuted among them: another tokenization of the catalogue."""
    from genrec_fast.data.types import Catalog

    codes = np.asarray(catalog.codes)
    perm = np.random.default_rng(seed).permutation(len(codes))
    return Catalog(catalog.item_ids, catalog.titles, catalog.texts, codes=codes[perm],
                   codebook_sizes=catalog.codebook_sizes)


def test_one_member_reproduces_its_beam_ranking(tiny_setup):
    from genrec_fast.eval import catalog_trie, predict
    from genrec_fast.eval.ensemble import Member, ensemble_predict

    data, model, tok, vocab = tiny_setup
    samples = data.test
    # 11 beams: every SID, so items 10 and 11 (one SID, equal scores) are ranked too: lower index first, as predict
    recs = ensemble_predict([Member(model, tok, vocab, data.catalog)], samples, num_beams=11, top_n=12)
    beams = predict(model, tok, vocab, catalog_trie(data.catalog), samples, data.catalog, num_beams=11, top_n=12,
                    with_scores=True)
    for r, b in zip(recs, beams):
        assert len(r["ranked"]) == 12
        assert r["ranked"] == b["ranked"] and r["target"] == b["target"]
        assert r["scores"] == pytest.approx(b["scores"], abs=1e-4)  # the beam scores, recomputed


def test_two_members_rank_the_union_by_the_mean_log_prob(tiny_setup):
    from genrec_fast.eval import catalog_trie, predict
    from genrec_fast.eval.ensemble import Member, ensemble_predict, member_scores
    from genrec_fast.model import encode_prompts, sequence_logprobs
    from genrec_fast.prompts import model_prompt_style, rec_prompt

    data, model, tok, vocab = tiny_setup
    other = _other_sids(data.catalog)
    members = [Member(model, tok, vocab, data.catalog), Member(model, tok, vocab, other)]
    samples = data.test[:4]
    recs = ensemble_predict(members, samples, num_beams=3, top_n=20)
    style = model_prompt_style(model)
    for r, s in zip(recs, samples):
        lists = [predict(model, tok, vocab, catalog_trie(c), [s], c, num_beams=3, top_n=3)[0]["ranked"]
                 for c in (data.catalog, other)]
        union = sorted(set(lists[0]) | set(lists[1]))
        assert sorted(r["ranked"]) == union and r["num_candidates"] == len(union)
        # each candidate's score: the mean over the members of its SID's log-prob in that member's catalogue
        want = []
        for item in r["ranked"]:
            lps = []
            for c in (data.catalog, other):
                ids, mask = encode_prompts(tok, [rec_prompt(s.history, c, style)])
                resp = vocab.token_ids(torch.as_tensor(np.asarray(c.codes)[[item]]))
                with torch.no_grad():
                    lps.append(float(sequence_logprobs(model, ids, mask, resp)[0]))
            want.append(np.mean(lps))
        assert r["scores"] == pytest.approx(want, abs=1e-5)
        assert all(a >= b for a, b in zip(r["scores"], r["scores"][1:]))
    direct = member_scores(members[1], samples[:1], [[0, 5]])
    assert direct[0].shape == (2,)


def test_ensemble_refuses_members_of_other_items(tiny_setup):
    from genrec_fast.data.types import Catalog
    from genrec_fast.eval.ensemble import Member, ensemble_predict

    data, model, tok, vocab = tiny_setup
    cat = data.catalog
    fewer = Catalog(cat.item_ids[:-1], cat.titles[:-1], cat.texts[:-1], codes=np.asarray(cat.codes)[:-1],
                    codebook_sizes=cat.codebook_sizes)
    with pytest.raises(ValueError, match="member 1's catalogue lists other items"):
        ensemble_predict([Member(model, tok, vocab, cat), Member(model, tok, vocab, fewer)], data.test[:1])
    with pytest.raises(ValueError, match="ensemble: no members"):
        ensemble_predict([], data.test[:1])
    with pytest.raises(ValueError, match="num_beams and top_n must be >= 1"):
        ensemble_predict([Member(model, tok, vocab, cat)], data.test[:1], num_beams=0)


def test_evaluate_split_adds_the_ensemble_row(tiny_setup):
    from genrec_fast.eval import evaluate_split, results_table
    from genrec_fast.eval.ensemble import Member, ensemble_predict
    from genrec_fast.eval.metrics import target_ranks

    data, model, tok, vocab = tiny_setup
    other = Member(model, tok, vocab, _other_sids(data.catalog))
    kw = dict(split="test", num_beams=3, ks=(1, 3), sasrec=False, num_resamples=50, print_table=False)
    alone = evaluate_split(model, tok, vocab, data, **kw)
    both = evaluate_split(model, tok, vocab, data, ensemble=[other], **kw)
    # the model's own row is untouched by the ensemble (its lists are cut back to the largest cut-off)
    assert both["model"] == {**alone["model"], "seconds": both["model"]["seconds"]}
    assert both["per_sample"]["ranks"]["model"] == alone["per_sample"]["ranks"]["model"]
    want = ensemble_predict([Member(model, tok, vocab, data.catalog), other], data.test, num_beams=3, top_n=3)
    ranks = target_ranks([r["ranked"] for r in want], [s.target for s in data.test]).tolist()
    assert both["per_sample"]["ranks"]["ensemble"] == ranks
    ens = both["ensemble"]
    assert ens["members"] == 2 and ens["num_samples"] == len(data.test)
    assert ens["HR@3"] == pytest.approx(np.mean([0 <= r < 3 for r in ranks]))
    assert ens["num_candidates"] == pytest.approx(np.mean([r["num_candidates"] for r in want]))
    assert set(ens["vs_model"]) == {"NDCG@3", "HR@3"} and ens["paired"]["HR@3"]["baseline"] in both["baselines"]
    assert set(both["intervals"]) == {"model", "ensemble", *both["baselines"]}
    text = results_table(both)
    assert "ensemble of 2 SID sets" in text and "ensemble - model, paired, HR@3" in text
    assert "ensemble" not in results_table(alone)


def test_ensemble_predict_takes_decoded_beam_lists(tiny_setup):
    from genrec_fast.eval import catalog_trie, predict
    from genrec_fast.eval.ensemble import Member, ensemble_predict

    data, model, tok, vocab = tiny_setup
    members = [Member(model, tok, vocab, data.catalog), Member(model, tok, vocab, _other_sids(data.catalog))]
    lists = [r["ranked"] for r in predict(model, tok, vocab, catalog_trie(data.catalog), data.test, data.catalog,
                                          num_beams=3, top_n=12)]
    decoded = ensemble_predict(members, data.test, num_beams=3, top_n=5)
    given = ensemble_predict(members, data.test, num_beams=3, top_n=5, beam_lists=[lists, None], max_rows=1)
    assert [r["ranked"] for r in given] == [r["ranked"] for r in decoded]
    for a, b in zip(given, decoded):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)  # other batches: the last bits may differ
    with pytest.raises(ValueError, match=r"beam_lists has 1 entries for 2 members"):
        ensemble_predict(members, data.test, beam_lists=[lists])
    with pytest.raises(ValueError, match=r"beam_lists\[0\] has 2 lists for"):
        ensemble_predict(members, data.test, beam_lists=[lists[:2], None])


def test_members_search_and_score_as_the_model_does(tiny_setup, monkeypatch):
    """evaluate_split's cuda_graphs / search_options reach the other members' beam searches and, with
    shared_prefix, their scoring pass (prompt K/V kept once per prompt); in fp32 the ensemble ranks as without."""
    from genrec_fast.eval import ensemble, evaluate_split
    from genrec_fast.eval.ensemble import Member

    data, model, tok, vocab = tiny_setup
    other = Member(model, tok, vocab, _other_sids(data.catalog))
    kw = dict(split="test", num_beams=3, ks=(1, 3), sasrec=False, num_resamples=50, print_table=False)
    plain = evaluate_split(model, tok, vocab, data, ensemble=[other], **kw)
    searches, scorings = [], []

    def predict(*args, **kwargs):
        searches.append((kwargs["cuda_graphs"], dict(kwargs["search_options"])))
        return real_predict(*args, **kwargs)

    def score_sids(*args, **kwargs):
        scorings.append(kwargs["shared_prefix"])
        return real_score(*args, **kwargs)

    real_predict, real_score = ensemble.predict, ensemble.score_sids
    monkeypatch.setattr(ensemble, "predict", predict)
    monkeypatch.setattr(ensemble, "score_sids", score_sids)
    options = {"shared_prefix": True, "graph_scope": "search", "lse_backend": "torch"}
    fast = evaluate_split(model, tok, vocab, data, ensemble=[other], cuda_graphs="emulate", search_options=options,
                          **kw)
    assert searches == [("emulate", options)]  # member 1's search (the model's beams are reused)
    assert scorings and all(scorings)
    assert fast["per_sample"]["ranks"] == plain["per_sample"]["ranks"]
    assert fast["ensemble"]["NDCG@3"] == pytest.approx(plain["ensemble"]["NDCG@3"])


def test_beam_scores_stand_in_for_a_members_own_candidates(tiny_setup, monkeypatch):
    """With a member's beam scores given (full-vocabulary log-probs), its own candidates take them and only the others
    are scored: the same ranking as scoring all (fp32, the last bits aside), fewer rows scored; a changed score is
    what the ensemble ranks by; malformed scores are refused by name."""
    from genrec_fast.eval import catalog_trie, ensemble, predict
    from genrec_fast.eval.ensemble import Member, ensemble_predict

    data, model, tok, vocab = tiny_setup
    members = [Member(model, tok, vocab, data.catalog), Member(model, tok, vocab, _other_sids(data.catalog))]
    recs = predict(model, tok, vocab, catalog_trie(data.catalog), data.test, data.catalog, num_beams=3,
                   top_n=len(data.catalog.item_ids), with_scores=True)
    lists, scores = [r["ranked"] for r in recs], [r["scores"] for r in recs]
    rows = []

    def member_scores(member, samples, candidates, *args):
        rows.append(sum(len(c) for c in candidates))
        return real(member, samples, candidates, *args)

    real = ensemble.member_scores
    monkeypatch.setattr(ensemble, "member_scores", member_scores)
    everything = ensemble_predict(members, data.test, num_beams=3, top_n=8, beam_lists=[lists, None])
    all_rows, rows[:] = list(rows), []
    reused = ensemble_predict(members, data.test, num_beams=3, top_n=8, beam_lists=[lists, None],
                              beam_scores=[scores, None])
    assert [r["ranked"] for r in reused] == [r["ranked"] for r in everything]
    for a, b in zip(reused, everything):
        assert a["scores"] == pytest.approx(b["scores"], abs=2e-5)
    union = sum(r["num_candidates"] for r in everything)
    own = sum(len(set(x) - {-1}) for x in lists)
    # member 0 scores the union without its scores, the rest with them; member 1, decoded here, keeps its own
    assert all_rows[0] == union and rows[0] == union - own and rows[1] == all_rows[1] < union
    # the ensemble ranks by the given score: member 0's own third beam item moved far ahead
    boosted = [list(s) for s in scores]
    item = lists[0][2]
    boosted[0][2] += 100.0
    first = ensemble_predict(members, data.test[:1], num_beams=3, top_n=8, beam_lists=[lists[:1], None],
                             beam_scores=[boosted[:1], None])
    assert first[0]["ranked"][0] == item
    with pytest.raises(ValueError, match=r"beam_scores has 1 entries for 2 members"):
        ensemble_predict(members, data.test, beam_lists=[lists, None], beam_scores=[scores])
    with pytest.raises(ValueError, match=r"beam_scores\[1\] is given without beam_lists\[1\]"):
        ensemble_predict(members, data.test, beam_lists=[lists, None], beam_scores=[scores, scores])
    with pytest.raises(ValueError, match=r"beam_scores\[0\]\[0\] has 1 scores for"):
        ensemble_predict(members, data.test, beam_lists=[lists, None], beam_scores=[[s[:1] for s in scores], None])
