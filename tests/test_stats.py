import json

import numpy as np
import pytest

from genrec_fast.data.types import Sample
from genrec_fast.eval.metrics import metrics_from_ranks
from genrec_fast.eval.stats import (
    bootstrap_interval,
    compare_results,
    method_intervals,
    paired_interval,
    paired_vs_best,
    per_sample,
    samples_fingerprint,
    unpaired_interval,
)


def test_per_sample_matches_metrics_from_ranks():
    ranks = np.array([0, 3, -1, 9, 10, 1, 49])
    m = metrics_from_ranks(ranks, (1, 10, 50))
    for k in ("HR@1", "HR@10", "NDCG@10", "NDCG@50"):
        assert per_sample(ranks, k).mean() == pytest.approx(m[k], abs=1e-15)
    with pytest.raises(ValueError, match="HR@K or NDCG@K"):
        per_sample(ranks, "MRR@10")


def test_bootstrap_interval_covers_mean_and_is_seeded():
    rng = np.random.default_rng(0)
    x = rng.random(500) < 0.3
    a = bootstrap_interval(x, num_resamples=1000, seed=1)
    assert a == bootstrap_interval(x, num_resamples=1000, seed=1)
    assert a != bootstrap_interval(x, num_resamples=1000, seed=2)
    lo, hi = a["ci"]
    assert lo < a["mean"] < hi
    se = np.sqrt(x.mean() * (1 - x.mean()) / len(x))
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)  # the normal-approximation width


def test_users_are_the_resampling_unit():
    # 50 users with 10 identical samples each: resampling samples would make the interval ~sqrt(10) narrower
    per_user = np.random.default_rng(0).random(50) < 0.5
    x = np.repeat(per_user, 10).astype(float)
    users = np.repeat(np.arange(50), 10)
    by_user = bootstrap_interval(x, users, num_resamples=2000)
    by_sample = bootstrap_interval(x, None, num_resamples=2000)
    w_user, w_sample = np.diff(by_user["ci"])[0], np.diff(by_sample["ci"])[0]
    assert w_user / w_sample == pytest.approx(np.sqrt(10), rel=0.2)


def test_paired_interval_known_difference_and_identical_methods():
    rng = np.random.default_rng(5)
    n = 3000
    base = rng.random(n)                                  # per-user difficulty, shared by both methods
    a = (rng.random(n) < 0.2 + 0.6 * base).astype(float)  # mean 0.5
    b = np.where(rng.random(n) < 0.8, a, 0.0)             # b = a with 20 % of a's hits removed: diff 0.1
    res = paired_interval(a, b, num_resamples=2000, seed=0)
    true_diff = 0.2 * 0.5
    lo, hi = res["ci"]
    assert lo < true_diff < hi and lo > 0
    assert res["diff"] == pytest.approx(a.mean() - b.mean())
    same = paired_interval(a, a.copy(), num_resamples=500)
    assert same["diff"] == 0.0 and same["ci"] == [0.0, 0.0]
    unpaired = unpaired_interval(a, b, num_resamples=2000, seed=0)
    assert np.diff(res["ci"])[0] < 0.6 * np.diff(unpaired["ci"])[0]  # correlated methods: pairing is narrower
    with pytest.raises(ValueError, match="differ in length"):
        paired_interval(a, b[:-1])


def test_method_intervals_and_paired_vs_best():
    rng = np.random.default_rng(1)
    n = 400
    ranks = {"model": rng.integers(-1, 20, n), "pop": rng.integers(-1, 60, n), "trans": rng.integers(-1, 15, n)}
    users = [f"u{i // 2}" for i in range(n)]
    iv = method_intervals(ranks, users, ("NDCG@10", "HR@10"), num_resamples=300)
    for m, r in ranks.items():
        for metric in ("NDCG@10", "HR@10"):
            lo, hi = iv[m][metric]
            assert lo <= per_sample(r, metric).mean() <= hi
    best = paired_vs_best(ranks, ["pop", "trans"], users, ("NDCG@10", "HR@10"), num_resamples=300)
    assert best["HR@10"]["baseline"] == "trans"  # highest HR@10 of the baselines
    assert best["HR@10"]["diff"] == pytest.approx(per_sample(ranks["model"], "HR@10").mean()
                                                  - per_sample(ranks["trans"], "HR@10").mean())
    json.dumps(best) and json.dumps(iv)


def _result(samples, ranks, split="test"):
    return {"split": split, "per_sample": {"user_id": [s.user_id for s in samples],
                                           "target": [s.target for s in samples],
                                           "samples_sha1": samples_fingerprint(samples), "ranks": ranks}}


def test_compare_results_paired_and_checks_samples():
    samples = [Sample(f"u{i}", [i % 7], (i * 3) % 11) for i in range(200)]
    rng = np.random.default_rng(2)
    r1 = rng.integers(-1, 10, 200).tolist()
    r2 = [0 if i % 4 == 0 else r for i, r in enumerate(r1)]  # the second model puts 25 % of targets first
    a, b = _result(samples, {"model": r2}), _result(samples, {"model": r1})
    cmp = compare_results(a, b, num_resamples=500)
    assert cmp["HR@10"]["diff"] == pytest.approx(cmp["HR@10"]["a"] - cmp["HR@10"]["b"])
    assert cmp["NDCG@10"]["ci"][0] > 0
    assert compare_results(a, a, num_resamples=100)["NDCG@10"]["ci"] == [0.0, 0.0]
    other = [Sample(s.user_id, s.history, s.target) for s in samples]
    other[5] = Sample("u5", [1, 2], other[5].target)
    with pytest.raises(ValueError, match="cover different samples"):
        compare_results(a, _result(other, {"model": r1}))
    with pytest.raises(ValueError, match="no method 'sasrec'"):
        compare_results(a, b, method_b="sasrec")
    with pytest.raises(ValueError, match="no per-sample ranks"):
        compare_results(a, {"model": {}})
