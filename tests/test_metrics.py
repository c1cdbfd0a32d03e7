import math

import numpy as np
import pytest

from genrec_fast.eval.metrics import (
    DEFAULT_KS,
    check_ks,
    format_table,
    metrics_from_ranks,
    ranking_metrics,
    target_ranks,
)


def test_hand_computed():
    lists = [[3, 1, 2], [5, 6], [7], [4, 8, 9, 10]]
    targets = [1, 9, 7, 10]
    m = ranking_metrics(lists, targets, ks=(1, 3))
    assert m["num_samples"] == 4
    assert m["HR@1"] == pytest.approx(1 / 4)
    assert m["HR@3"] == pytest.approx(2 / 4)
    assert m["NDCG@1"] == pytest.approx(1 / 4)
    assert m["NDCG@3"] == pytest.approx((1 / math.log2(3) + 1.0) / 4)


def _brute(lists, targets, k):
    hr = nd = 0.0
    for lst, t in zip(lists, targets):
        for r, x in enumerate(lst[:k]):
            if x == t:
                hr += 1
                nd += 1 / math.log2(r + 2)
    return hr / len(targets), nd / len(targets)


def test_random_against_brute_force():
    rng = np.random.default_rng(0)
    lists, targets = [], []
    for _ in range(301):
        n = int(rng.integers(0, 60))
        lists.append(rng.permutation(80)[:n].tolist())
        targets.append(int(rng.integers(0, 80)))
    m = ranking_metrics(lists, targets)
    for k in DEFAULT_KS:
        hr, nd = _brute(lists, targets, k)
        assert m[f"HR@{k}"] == pytest.approx(hr)
        assert m[f"NDCG@{k}"] == pytest.approx(nd)
    # monotone in K
    assert all(m[f"HR@{a}"] <= m[f"HR@{b}"] for a, b in zip(DEFAULT_KS, DEFAULT_KS[1:]))


def test_ranks_and_errors():
    assert target_ranks([[5, 4], [1], []], [4, 2, 0]).tolist() == [1, -1, -1]
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        target_ranks([[1, 2], [3, 3]], [1, 3])
    # invalid-beam slots (-1) may repeat, take a rank each and are never a hit
    assert target_ranks([[-1, -1, 7], [-1, 2]], [7, 3]).tolist() == [2, -1]
    with pytest.raises(ValueError, match="row 0: target -1 is the invalid-beam marker"):
        target_ranks([[-1, 2]], [-1])
    with pytest.raises(ValueError, match="2 ranked lists but 1 targets"):
        ranking_metrics([[1], [2]], [1])
    with pytest.raises(ValueError, match="positive"):
        metrics_from_ranks(np.array([0]), ks=(0, 5))
    with pytest.raises(ValueError, match="no samples"):
        metrics_from_ranks(np.array([], dtype=np.int64))


def test_format_table():
    t = format_table({"model": {"HR@10": 0.125, "NDCG@10": 0.0945, "invalid_rate": 0.0},
                      "popularity baseline": {"HR@10": 0.06, "NDCG@10": 0.0443}}, ks=(10,))
    lines = t.splitlines()
    assert lines[0].split() == ["method", "HR@10", "NDCG@10", "invalid_rate"]
    assert lines[1].split() == ["model", "0.1250", "0.0945", "0.0000"]
    assert lines[2].split() == ["popularity", "baseline", "0.0600", "0.0443", "-"]


def test_check_ks_names_what_it_got():
    assert check_ks((10, 1, 10)) == (1, 10)
    with pytest.raises(ValueError, match=r"positive cut-offs, got \[5, 0\]"):
        check_ks(k for k in (5, 0))  # a generator is reported, not an exhausted []
    with pytest.raises(ValueError, match=r"got \[\]"):
        check_ks([])
