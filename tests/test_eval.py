import numpy as np
import pytest

from genrec_fast import SIDTrie
from genrec_fast.data.types import Catalog
from genrec_fast.eval.evaluate import BeamRanker, catalog_trie, metrics_from_records, shard_range

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
    assert lists == [[1, 3, 4, 0], [2, 4]]
    assert n_ret.tolist() == [4, 3] and n_bad.tolist() == [0, 1]
    lists, _, _ = r.rank(codes, scores, top_n=2)
    assert lists == [[1, 3], [2, 4]]


def test_invalid_sid_in_range_counts_as_invalid():
    codes = np.array([[0, 0], [1, 1]])
    r = BeamRanker(SIDTrie(codes, codebook_sizes=(2, 2)))
    lists, n_ret, n_bad = r.rank(np.array([[[0, 1], [1, 1], [1, 0]]]), np.array([[-1.0, -2.0, -3.0]]), top_n=5)
    assert lists == [[1]] and n_ret.tolist() == [3] and n_bad.tolist() == [2]
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
