"""genrec_fast.sid.cf: collaborative item vectors (train interactions only) and the text+cf mix for SIDs."""
import numpy as np
import pytest

from genrec_fast.data import Sample
from genrec_fast.sid import build_sids
from genrec_fast.sid.cf import cf_embeddings, cooccurrence, mix_embeddings


def _two_communities(n_users=60, seed=0):
    """Items 0-5 are watched together, items 6-11 together; item 12 never occurs."""
    rng = np.random.default_rng(seed)
    samples = []
    for u in range(n_users):
        pool = np.arange(6) if u % 2 == 0 else np.arange(6, 12)
        seq = rng.choice(pool, size=5, replace=False).tolist()
        samples += [Sample(f"u{u}", seq[max(0, t - 3):t], seq[t]) for t in range(1, 5)]
    return samples


def test_cooccurrence_weights_pairs_by_distance():
    a = cooccurrence([Sample("u", [0, 1], 2), Sample("u", [2], 0)], 3, decay=0.5)
    expect = np.zeros((3, 3))
    expect[1, 2], expect[0, 2], expect[2, 0] = 1.0, 0.5, 1.0
    np.testing.assert_allclose(a, expect)
    np.testing.assert_allclose(cooccurrence([Sample("u", [0, 1], 2)], 3, decay=0.0)[0], 0.0)  # last item only
    with pytest.raises(ValueError, match="decay"):
        cooccurrence([], 3, decay=1.5)
    with pytest.raises(ValueError, match="out of range"):
        cooccurrence([Sample("u", [0], 5)], 3)


def test_cf_embeddings_separate_communities_and_zero_unseen_items():
    emb = cf_embeddings(_two_communities(), 13, dim=4)
    assert emb.shape == (13, 4) and emb.dtype == np.float32
    np.testing.assert_allclose(emb[12], 0.0)  # never in the fitting samples
    np.testing.assert_allclose(np.linalg.norm(emb[:12], axis=1), 1.0, atol=1e-5)
    sim = emb[:12] @ emb[:12].T
    same = sim[:6, :6].mean(), sim[6:, 6:].mean()
    assert min(same) > 0.9 and abs(sim[:6, 6:]).max() < 0.1  # two groups, orthogonal
    with pytest.raises(ValueError, match="dim"):
        cf_embeddings([], 3, dim=0)


def test_mix_embeddings_shares_the_squared_distance():
    text = np.array([[3.0, 4.0], [0.0, 2.0]])
    cf = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    m = mix_embeddings(text, cf, cf_weight=0.25)
    assert m.shape == (2, 5)
    np.testing.assert_allclose(m[0], [np.sqrt(0.75) * 0.6, np.sqrt(0.75) * 0.8, 0.5, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(m[1, 2:], 0.0)  # an unseen item keeps its text part only
    np.testing.assert_allclose(mix_embeddings(text, cf, 0.0)[:, 2:], 0.0)
    with pytest.raises(ValueError, match="cf_weight"):
        mix_embeddings(text, cf, 1.5)
    with pytest.raises(ValueError, match="rows"):
        mix_embeddings(text, cf[:1], 0.5)


def test_build_sids_text_plus_cf_puts_co_watched_items_under_one_prefix():
    samples = _two_communities()
    rng = np.random.default_rng(1)
    text = rng.normal(size=(13, 8)).astype(np.float32)  # text that says nothing about the communities
    res = build_sids(text, levels=2, codebook_size=2, seed=0, kmeans_iters=10, progress=False,
                     embedding="text+cf", interactions=samples, cf_weight=0.9, cf_dim=4)
    first = res.codes[:12, 0]
    assert len(set(first[:6])) == 1 and len(set(first[6:])) == 1 and first[0] != first[6]
    assert res.report["embedding"] == "text+cf" and res.report["cf_weight"] == 0.9
    assert len({tuple(r) for r in res.codes}) == 13  # still unique
    with pytest.raises(ValueError, match="interactions"):
        build_sids(text, levels=2, codebook_size=2, embedding="text+cf", progress=False)
    with pytest.raises(ValueError, match="embedding"):
        build_sids(text, levels=2, codebook_size=2, embedding="cf-only", progress=False)


def test_cli_sids_text_plus_cf_from_a_log(tmp_path, tiny_encoder, capsys):
    import json

    from genrec_fast.cli import main as cli_main

    rng = np.random.default_rng(0)
    log = tmp_path / "log.csv"
    rows = ["user,asin,time"] + [f"u{u},i{int(rng.integers(0, 40))},{t}" for u in range(25) for t in range(6)]
    log.write_text("\n".join(rows) + "\n")
    meta = tmp_path / "meta.tsv"
    meta.write_text("asin\tname\n" + "".join(f"i{i}\tthing {i}\n" for i in range(40)))
    out = tmp_path / "ds"
    argv = ["sids", "--log", str(log), "--meta", str(meta), "--item-col", "asin", "--user-col", "user",
            "--time-col", "time", "--title-col", "name", "--max-history", "3", "--out", str(out),
            "--encoder", tiny_encoder, "--cache-dir", str(tmp_path / "cache"), "--levels", "2", "--codebook", "8",
            "--kmeans-iters", "5", "--no-progress", "--embedding", "text+cf", "--cf-weight", "0.7", "--cf-dim", "8"]
    assert cli_main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["collisions_after"] == 0
    report = json.loads((out / "sids_meta.json").read_text())["report"]
    assert report["embedding"] == "text+cf" and report["cf_weight"] == 0.7 and report["cf_dim"] == 8
    items = tmp_path / "item.json"
    items.write_text(json.dumps({"a": {"title": "A"}, "b": {"title": "B"}}))
    with pytest.raises(ValueError, match="needs --log or --data"):
        cli_main(["sids", "--items", str(items), "--out", str(tmp_path / "o"), "--embedding", "text+cf"])

    # --data: new SIDs for a dataset in the release format, written with the whole dataset to --out;
    # the collaborative vectors come from its train split (or train + valid with --cf-fit)
    from genrec_fast.data import load_minionerec
    from genrec_fast.sid.cf import cf_embeddings

    src = load_minionerec(out)
    common = ["--encoder", tiny_encoder, "--cache-dir", str(tmp_path / "cache"), "--levels", "2", "--codebook", "4",
              "--kmeans-iters", "5", "--no-progress", "--embedding", "text+cf", "--cf-dim", "8"]
    for fit, samples in (("train", src.train), ("train+valid", list(src.train) + list(src.valid))):
        dst = tmp_path / f"re_{fit}"
        assert cli_main(["sids", "--data", str(out), "--out", str(dst), "--cf-fit", fit, *common]) == 0
        got = load_minionerec(dst)
        assert got.catalog.item_ids == src.catalog.item_ids and got.catalog.texts == src.catalog.texts
        for split in ("train", "valid", "test"):
            assert [(s.user_id, s.history, s.target) for s in getattr(got, split)] == \
                   [(s.user_id, s.history, s.target) for s in getattr(src, split)]
        assert got.catalog.codebook_sizes[0] == 4
        assert len({tuple(c) for c in got.catalog.codes.tolist()}) == len(got.catalog)
        report = json.loads((dst / "sids_meta.json").read_text())["report"]
        assert report["cf_samples"] == len(samples)
    assert not np.array_equal(cf_embeddings(src.train, len(src.catalog), 8),
                              cf_embeddings(list(src.train) + list(src.valid), len(src.catalog), 8))
    with pytest.raises(ValueError, match="is the --data folder"):
        cli_main(["sids", "--data", str(out), "--out", str(out), *common])
    with pytest.raises(ValueError, match="--max-history go"):
        cli_main(["sids", "--data", str(out), "--out", str(tmp_path / "o2"), "--max-history", "4", *common])
    with pytest.raises(ValueError, match="--cf-fit goes with --embedding text\\+cf"):
        cli_main(["sids", "--data", str(out), "--out", str(tmp_path / "o3"), "--cf-fit", "train+valid",
                  "--levels", "2", "--codebook", "4"])
