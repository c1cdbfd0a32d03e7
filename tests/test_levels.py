"""The level-by-level view (genrec_fast.eval.levels): prefix masses against brute force, the model's levels
against its own beam-search scores."""
import numpy as np
import pytest
import torch


def _brute_levels(log_probs: np.ndarray, codes: np.ndarray, target: int):
    """Per level: log P(target's code | target's prefix) and the rank among the prefix's children, by loops."""
    p = np.exp(log_probs - log_probs.max())
    logps, ranks = [], []
    for level in range(codes.shape[1]):
        under = np.all(codes[:, :level] == codes[target, :level], axis=1)
        children = sorted(set(codes[under, level].tolist()))
        mass = {c: p[under & (codes[:, level] == c)].sum() for c in children}
        mine = mass[codes[target, level]]
        logps.append(np.log(mine / sum(mass.values())))
        ranks.append(sum(m > mine for m in mass.values()))
    return logps, ranks


def test_item_level_logprobs_equal_brute_force():
    from genrec_fast.eval.levels import Prefixes, item_level_logprobs

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 3, size=(40, 3))
    codes[5] = codes[4]  # a shared SID
    codes[7] = [2, 2, 2]  # possibly a prefix with one child
    log_probs = rng.normal(size=(9, 40)) * 2
    targets = rng.integers(0, 40, size=9)
    targets[0] = 5
    # chunks of 4 rows: the chunked path gives the same as one pass
    logps, ranks = item_level_logprobs(torch.from_numpy(log_probs), codes, targets, chunk_rows=4)
    for r, t in enumerate(targets):
        want_lp, want_rank = _brute_levels(log_probs[r], codes, int(t))
        assert logps[r] == pytest.approx(want_lp, abs=1e-10)
        assert ranks[r].tolist() == want_rank
    # one distribution shared by every target == that row repeated
    shared = item_level_logprobs(torch.from_numpy(log_probs[:1]), Prefixes(codes), targets)
    repeated = item_level_logprobs(torch.from_numpy(np.repeat(log_probs[:1], 9, axis=0)), codes, targets)
    assert np.allclose(shared[0], repeated[0]) and (shared[1] == repeated[1]).all()
    # the levels sum to the log-probability of the target's SID (all items under it)
    sid_mass = [np.exp(log_probs[r])[np.all(codes == codes[t], axis=1)].sum() / np.exp(log_probs[r]).sum()
                for r, t in enumerate(targets)]
    assert logps.sum(axis=1) == pytest.approx(np.log(sid_mass), abs=1e-10)


def test_item_level_logprobs_refuse_bad_input():
    from genrec_fast.eval.levels import item_level_logprobs

    codes = np.array([[0, 0], [0, 1], [1, 0]])
    with pytest.raises(ValueError, match="sample 1: target item 3 out of range 0..2"):
        item_level_logprobs(torch.zeros(2, 3), codes, [0, 3])
    with pytest.raises(ValueError, match=r"item log-probs must be \[2 or 1, 3\], got \(2, 4\)"):
        item_level_logprobs(torch.zeros(2, 4), codes, [0, 1])
    with pytest.raises(ValueError, match="negative SID code at item 1"):
        item_level_logprobs(torch.zeros(1, 3), np.array([[0, 0], [0, -1], [1, 0]]), [0])


def test_model_levels_sum_to_the_sid_beam_scores(tiny_setup):
    """Summed over the levels, the model's per-level log-probs are the beam-search scores with score="sid"
    (each level normalised over the allowed children); the ranks agree with the siblings' log-probs."""
    from genrec_fast.data.types import Sample
    from genrec_fast.decode import beam_search
    from genrec_fast.eval import catalog_trie
    from genrec_fast.eval.levels import model_level_logprobs
    from genrec_fast.model import encode_prompts
    from genrec_fast.prompts import model_prompt_style, rec_prompt

    data, model, tok, vocab = tiny_setup
    codes = np.asarray(data.catalog.codes)
    trie = catalog_trie(data.catalog)
    history = data.test[1].history
    # every item as the target of the same history
    samples = [Sample("u", history, i) for i in range(len(codes))]
    logps, ranks = model_level_logprobs(model, tok, vocab, data.catalog, samples, batch_size=5)
    ids, mask = encode_prompts(tok, [rec_prompt(history, data.catalog, model_prompt_style(model))])
    res = beam_search(model, ids, mask, trie, vocab, 16, score="sid", backend="torch")
    beam = {tuple(c): float(s) for c, s in zip(res.codes[0].tolist(), res.scores[0].tolist()) if s > -np.inf}
    assert len(beam) == len({tuple(c) for c in codes.tolist()})  # every SID returned
    for i in range(len(codes)):
        assert logps[i].sum() == pytest.approx(beam[tuple(codes[i])], abs=1e-4)
        for level in range(codes.shape[1]):
            # siblings: the items under the same parent prefix; their level log-probs are the children's
            same_parent = np.all(codes[:, :level] == codes[i, :level], axis=1)
            child_lp = {int(codes[j, level]): logps[j, level] for j in np.nonzero(same_parent)[0]}
            assert ranks[i, level] == sum(v > logps[i, level] + 1e-6 for v in child_lp.values())
            assert np.logaddexp.reduce(list(child_lp.values())) == pytest.approx(0.0, abs=1e-5)


def test_model_levels_refuse_codes_past_the_vocabulary(tiny_setup):
    from genrec_fast.data.types import Catalog, Sample
    from genrec_fast.eval.levels import model_level_logprobs

    data, model, tok, vocab = tiny_setup
    codes = np.asarray(data.catalog.codes).copy()
    codes[3, 1] = 4  # the model has 4 codes per level
    cat = Catalog(data.catalog.item_ids, data.catalog.titles, data.catalog.texts, codes=codes, codebook_sizes=(4, 8))
    with pytest.raises(ValueError, match="level 1 of the catalogue has code 4, the model's SID vocabulary 4 codes"):
        model_level_logprobs(model, tok, vocab, cat, [Sample("u", [0], 3)])


def test_evaluate_split_levels(tiny_setup, tmp_path, capsys):
    """evaluate_split(levels=True): the report for the same samples, in the JSON and printed."""
    import json

    from genrec_fast.eval import evaluate_split
    from genrec_fast.eval.baselines import fit_samples, item_counts

    data, model, tok, vocab = tiny_setup
    out = tmp_path / "m.json"
    res = evaluate_split(model, tok, vocab, data, "test", num_beams=5, batch_size=4, ks=(1, 5), max_samples=6,
                         out=str(out), num_resamples=50, levels=True)
    rep = json.loads(out.read_text())["levels"]
    assert rep == json.loads(json.dumps(res["levels"]))
    assert rep["num_samples"] == 6 and set(rep["methods"]) == {"model", "sasrec", "popularity"}
    for m in rep["methods"].values():
        assert len(m["mean_logp"]) == len(m["top1"]) == len(m["top3"]) == 2
        assert all(a <= b for a, b in zip(m["top1"], m["top3"]))
        assert m["item_logp"] == pytest.approx(sum(m["mean_logp"]), abs=1e-5)
    # popularity: add-one counts of the fitting targets, the same for every sample
    counts = item_counts(fit_samples(data, "test"), len(data.catalog.item_ids)) + 1.0
    codes = np.asarray(data.catalog.codes)
    targets = np.asarray(res["per_sample"]["target"])
    want = np.mean([sum(_brute_levels(np.log(counts), codes, int(t))[0]) for t in targets])
    assert rep["methods"]["popularity"]["item_logp"] == pytest.approx(want, abs=1e-5)
    table = capsys.readouterr().out
    assert "per SID level (6 samples)" in table and "sasrec: log p / top1 / top3" in table
    no_sasrec = evaluate_split(model, tok, vocab, data, "test", num_beams=5, batch_size=4, ks=(1, 5), max_samples=6,
                               num_resamples=50, levels=True, sasrec=False, print_table=False)
    assert set(no_sasrec["levels"]["methods"]) == {"model", "popularity"}
    assert "levels" not in evaluate_split(model, tok, vocab, data, "test", num_beams=5, batch_size=4, ks=(1, 5),
                                          max_samples=6, num_resamples=50, sasrec=False, print_table=False)
