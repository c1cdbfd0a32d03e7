"""genrec_fast.sid: k-means, balanced assignment, collision resolver, RQ-VAE, index files, CLI."""
import json
import os

import numpy as np
import pytest
import torch

from genrec_fast import SIDTrie
from genrec_fast.cli import main as cli_main
from genrec_fast.sid import (
    RQVAE,
    ResidualKMeans,
    build_sids,
    collision_groups,
    kmeans,
    make_unique,
    read_index,
    read_item_json,
    sid_stats,
    train_rqvae,
    write_index,
)
from genrec_fast.sid.assign import balanced_assign
from genrec_fast.sid.collisions import add_dedup_level, resolve_last_level


def _blobs(n_per, centers, dim, noise, seed):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, dim, generator=g) * 5
    labels = torch.arange(centers).repeat_interleave(n_per)
    return c[labels] + noise * torch.randn(labels.numel(), dim, generator=g), labels


def test_kmeans_recovers_separated_clusters():
    x, labels = _blobs(30, 6, 5, 0.1, seed=0)
    centroids, assign = kmeans(x, 6, seed=1)
    # each true cluster maps to exactly one k-means cluster and vice versa
    pairs = {(int(a), int(b)) for a, b in zip(labels, assign)}
    assert len(pairs) == 6 and len({a for a, _ in pairs}) == 6 and len({b for _, b in pairs}) == 6
    for a, b in pairs:
        assert torch.allclose(centroids[b], x[labels == a].mean(0), atol=1e-4)
    with pytest.raises(ValueError, match="kmeans: iters must be >= 1, got 0"):
        kmeans(x, 6, iters=0)
    with pytest.raises(ValueError, match="iters must be >= 1"):
        ResidualKMeans(levels=2, codebook_size=6, iters=0)


def test_kmeans_is_the_same_run_to_run_with_several_threads():
    from genrec_fast.sid.kmeans import _cluster_sums

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3011, 448, generator=g)  # the demo's shape: MiniLM 384 + 64 collaborative dims
    assign = torch.randint(0, 32, (3011,), generator=g)
    want = torch.zeros(32, 448, dtype=torch.float64).index_put_((assign,), x.double(), accumulate=True)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # index_put_(accumulate=True) summed in a varying order with 2 threads
    try:
        sums = [_cluster_sums(x, assign, 32) for _ in range(8)]
        assert all(torch.equal(sums[0], s) for s in sums[1:])
        assert torch.allclose(sums[0].double(), want, atol=1e-4)
        fits = [ResidualKMeans(2, 32, iters=5, seed=0, balanced=True).fit(x[:600]) for _ in range(4)]
        assert all(torch.equal(fits[0], f) for f in fits[1:])
    finally:
        torch.set_num_threads(before)


def test_kmeans_balanced_caps_cluster_sizes():
    x, _ = _blobs(40, 2, 4, 0.5, seed=2)  # two big blobs, 8 clusters wanted
    x = torch.cat([x, torch.randn(7, 4) * 20])  # plus outliers: N = 87
    _, plain = kmeans(x, 8, seed=0)
    _, bal = kmeans(x, 8, seed=0, balanced=True)
    cap = -(-x.shape[0] // 8)
    assert torch.bincount(bal, minlength=8).max() <= cap
    assert torch.bincount(plain, minlength=8).max() > cap  # the plain version is not balanced here


def test_balanced_assign_respects_capacity_and_forbidden():
    cost = torch.tensor([[0.0, 1.0, 5.0], [0.1, 2.0, 5.0], [0.2, 0.3, 5.0], [float("inf"), 9.0, 1.0]])
    a = balanced_assign(cost, torch.tensor([1, 2, 1]))
    assert torch.bincount(a, minlength=3).tolist() == [1, 2, 1]
    # the min-cost assignment (1.4 in total): row 1 loses least by taking column 0, row 3 cannot
    assert a.tolist() == [1, 0, 1, 2]
    with pytest.raises(ValueError, match="capacity"):
        balanced_assign(cost, torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="no allowed column"):
        balanced_assign(torch.tensor([[float("inf"), float("inf")]]), torch.tensor([1, 1]))


def test_sid_stats_by_hand():
    codes = np.array([[0, 1], [0, 1], [0, 2], [3, 1], [3, 1], [3, 1]])
    s = sid_stats(codes, (4, 3))
    assert s["collision_groups"] == 2 and s["colliding_items"] == 5 and s["num_unique_sids"] == 3
    assert s["used_codes"] == [2, 2]
    assert s["perplexity"][0] == pytest.approx(2.0)
    p = np.array([5, 1]) / 6
    assert s["perplexity"][1] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())))
    assert collision_groups(codes) == [[0, 1], [3, 4, 5]]
    with pytest.raises(ValueError, match="rows \\[1\\]"):
        sid_stats(np.array([[0, 0], [-1, 0]]))


def test_resolver_moves_colliders_to_nearest_free_codes():
    # prefix (0,) holds items 0,1,2 on code 1 and item 3 on code 2; K = 5
    codes = np.array([[0, 1], [0, 1], [0, 1], [0, 2], [1, 1]])
    book = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])
    resid = torch.tensor([[1.0], [3.9], [0.2], [2.0], [1.0]])
    out, moved = resolve_last_level(codes, 5, resid, book)
    assert out[:, 0].tolist() == codes[:, 0].tolist()
    assert out[3, 1] == 2 and out[4, 1] == 1  # untouched
    assert out[0, 1] == 1 and out[1, 1] == 4 and out[2, 1] == 0  # nearest free codewords
    assert moved == 2 and not collision_groups(out)


def test_make_unique_adds_dedup_level_when_a_prefix_is_full():
    codes = np.array([[0, 0], [0, 0], [0, 0], [0, 1], [1, 0]])  # prefix 0 has 4 items, K_last = 2
    out, sizes, rep = make_unique(codes, (2, 2))
    assert out.dtype == np.int32 and out.shape == (5, 3)
    assert len({tuple(r) for r in out.tolist()}) == 5
    assert rep["before"]["collision_groups"] == 1 and rep["after"]["collision_groups"] == 0
    # the crowded prefix is spread over both codes first: the dedup level needs ceil(4 / 2) = 2 codes, not 3
    assert rep["dedup_level"] and rep["dedup_size"] == 2 and sizes == (2, 2, 2)
    assert out[3].tolist()[:2] == [0, 1] and out[4].tolist() == [1, 0, 0]  # unique items keep their SIDs
    # many items on few codes: dedup size = the largest prefix's ceil(m / K)
    rng = np.random.default_rng(0)
    many = np.stack([rng.integers(0, 3, 200), np.zeros(200, dtype=np.int64)], 1)  # 3 prefixes, one code each
    out, sizes, rep = make_unique(many, (3, 8))
    m = np.bincount(many[:, 0]).max()
    assert sizes[-1] == -(-m // 8) and len({tuple(r) for r in out.tolist()}) == 200
    assert (out[:, 1] < 8).all() and (out[:, 2] < sizes[-1]).all()
    with pytest.raises(ValueError, match=r"codes >= their level's codebook size \(2, 2\) in rows \[1\]"):
        make_unique([[1, 0], [5, 0]], (2, 2))
    with pytest.raises(ValueError, match="3 codebook sizes for 2 levels"):
        make_unique([[0, 0], [0, 1]], (2, 2, 2))
    extra, size = add_dedup_level(np.array([[0], [1], [0]]))
    assert extra[:, 1].tolist() == [0, 0, 1] and size == 2


def test_build_sids_rqkmeans_unique_and_deterministic():
    x, _ = _blobs(25, 12, 16, 0.3, seed=3)
    x[5] = x[6]  # exact duplicates must still get distinct SIDs
    x[7] = x[6]
    res = build_sids(x.numpy(), method="rqkmeans", levels=3, codebook_size=16, seed=0, progress=False)
    assert res.codes.dtype == np.int32 and res.codes.shape == (300, 3) and res.codebook_sizes == (16, 16, 16)
    assert len({tuple(r) for r in res.codes.tolist()}) == 300
    rep = res.report
    assert rep["after"]["collision_groups"] == 0 and rep["before"]["collision_groups"] >= 1
    assert rep["after"]["used_codes"][0] == 16
    again = build_sids(x, method="rqkmeans", levels=3, codebook_size=16, seed=0, progress=False)
    assert np.array_equal(again.codes, res.codes)
    trie = SIDTrie(res.codes, codebook_sizes=res.codebook_sizes)
    assert trie.num_items == 300 and trie.contains(res.codes).all()


def test_build_sids_rejects_bad_input():
    with pytest.raises(ValueError, match="rows \\[2\\]"):
        build_sids(np.array([[0.0, 1.0], [1.0, 0.0], [np.nan, 0.0]]), progress=False)
    with pytest.raises(ValueError, match="method"):
        build_sids(np.zeros((3, 2)), method="vq", progress=False)
    # checked before any fitting: 8 levels + a dedup level cannot be spelled <a_..>..<h_..>
    with pytest.raises(ValueError, match=r"levels \(--levels\) must be in 1\.\.7, got 8"):
        build_sids(np.zeros((3, 2)), levels=8, progress=False)
    with pytest.raises(ValueError, match=r"rqvae_epochs \(--epochs\) must be >= 1"):
        build_sids(np.zeros((3, 2)), method="rqvae", rqvae_epochs=0, progress=False)


def test_residual_kmeans_encode_matches_fit_without_balancing():
    x, _ = _blobs(20, 10, 8, 0.5, seed=4)
    rkm = ResidualKMeans(levels=2, codebook_size=6, seed=0, balanced=False)
    codes = rkm.fit(x)
    assert torch.equal(rkm.encode(x), codes)
    assert rkm.codebooks.shape == (2, 6, 8) and rkm.residuals.shape == x.shape


def test_rqvae_trains_and_gives_unique_sids():
    x, _ = _blobs(20, 10, 24, 0.3, seed=5)
    x = torch.nn.functional.normalize(x, dim=-1)
    model, rep = train_rqvae(x, levels=2, codebook_size=8, latent_dim=8, hidden=(32,), epochs=30,
                             batch_size=64, eval_every=10, lr=3e-3, seed=0, device="cpu", progress=False)
    hist = rep["history"]
    assert [h["epoch"] for h in hist] == [10, 20, 30]
    assert hist[-1]["recon"] < hist[0]["recon"]
    assert rep["best_collisions"] == min(h["collisions"] for h in hist)
    codes, last = model.encode(x)
    assert codes.shape == (200, 2) and last.shape == (200, 8)
    assert int(200 - torch.unique(codes, dim=0).shape[0]) == rep["best_collisions"]
    res = build_sids(x, method="rqvae", levels=2, codebook_size=8, rqvae_epochs=5, progress=False, device="cpu")
    assert len({tuple(r) for r in res.codes.tolist()}) == 200


def test_rqvae_losses_and_dead_code_reset():
    torch.manual_seed(0)
    model = RQVAE(6, latent_dim=4, hidden=(8,), levels=2, codebook_size=5)
    x = torch.randn(16, 6)
    x_rec, codes, rec, rq = model(x)
    (rec + rq).backward()
    assert x_rec.shape == x.shape and codes.shape == (16, 2)
    assert model.encoder[0].weight.grad.abs().sum() > 0  # straight-through reaches the encoder
    used = torch.zeros(2, 5, dtype=torch.bool)
    for lvl in range(2):
        used[lvl, codes[:, lvl].long()] = True
    assert (model.codebooks.grad.abs().sum(-1) > 0).equal(used)  # only chosen codewords get gradient
    usage = torch.ones(2, 5, dtype=torch.long)
    usage[1, 3] = 0
    residuals = torch.randn(2, 16, 4)
    before = model.codebooks.detach().clone()
    assert model.reset_dead_codes(usage, residuals, torch.Generator().manual_seed(0)) == 1
    after = model.codebooks.detach()
    assert torch.equal(after[0], before[0]) and not torch.equal(after[1, 3], before[1, 3])
    assert any(torch.equal(after[1, 3], residuals[1, i]) for i in range(16))


def test_index_roundtrip_and_trie(tmp_path):
    ids = ["B0001", "x-2", "7"]
    codes = np.array([[3, 0, 9], [3, 1, 0], [0, 0, 0]])
    path = write_index(tmp_path, ids, codes, (4, 2, 10), report={"note": "t"})
    assert json.loads(path.read_text()) == {"B0001": ["<a_3>", "<b_0>", "<c_9>"], "x-2": ["<a_3>", "<b_1>", "<c_0>"],
                                            "7": ["<a_0>", "<b_0>", "<c_0>"]}
    assert np.array_equal(np.load(tmp_path / "codes.npy"), codes) and np.load(tmp_path / "codes.npy").dtype == np.int32
    assert sorted(os.listdir(tmp_path)) == ["codes.npy", "index.json", "sids_meta.json"]  # no temp files left
    idx = read_index(tmp_path)
    assert idx.item_ids == ids and idx.codebook_sizes == (4, 2, 10) and np.array_equal(idx.codes, codes)
    assert read_index(path, codebook_sizes=(5, 5, 12)).codebook_sizes == (5, 5, 12)
    trie = SIDTrie(idx.codes, codebook_sizes=idx.codebook_sizes)
    assert trie.allowed([3]).tolist() == [0, 1]


def test_index_errors_name_file_and_item(tmp_path):
    with pytest.raises(ValueError, match="level 1: codes outside \\[0, 2\\) in rows \\[1\\]"):
        write_index(tmp_path, ["a", "b"], np.array([[0, 0], [0, 2]]), (1, 2))
    with pytest.raises(ValueError, match="appears twice"):
        write_index(tmp_path, ["a", "a"], np.array([[0], [1]]))
    p = tmp_path / "index.json"
    p.write_text(json.dumps({"1": ["<a_1>", "<b_2>"], "2": ["<a_1>", "<c_2>"]}))
    with pytest.raises(ValueError, match=f"{p}: item '2'"):
        read_index(p)
    p.write_text(json.dumps({"1": ["<a_1>", "<b_2>"], "2": ["<a_1>"]}))
    with pytest.raises(ValueError, match="item '2' has 1 SID levels"):
        read_index(p)
    p.write_text('{"1": ["<a_1>"],\n "2": [}')
    with pytest.raises(ValueError, match=f"{p}:2: invalid JSON"):
        read_index(p)


def _item_json(tmp_path, n):
    items = {str(i): {"title": f"item {i}", "description": f"['thing number {i}']", "brand": "b"} for i in range(n)}
    path = tmp_path / "item.json"
    path.write_text(json.dumps(items))
    return path


def test_read_item_json(tmp_path):
    ids, texts = read_item_json(_item_json(tmp_path, 3))
    assert ids == ["0", "1", "2"] and "item 1" in texts[1] and "thing number 1" in texts[1]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"1": {"title": "x"}, "2": "oops"}))
    with pytest.raises(ValueError, match="item '2'"):
        read_item_json(bad)


def test_cli_sids_with_precomputed_embeddings(tmp_path, capsys):
    items = _item_json(tmp_path, 120)
    x, _ = _blobs(12, 10, 16, 0.2, seed=6)
    np.save(tmp_path / "emb.npy", x.numpy())
    out = tmp_path / "sids"
    rc = cli_main(["sids", "--items", str(items), "--out", str(out), "--embeddings", str(tmp_path / "emb.npy"),
                   "--levels", "2", "--codebook", "16", "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["collisions_after"] == 0 and summary["items"] == 120
    idx = read_index(out)
    assert idx.item_ids == [str(i) for i in range(120)] and len({tuple(r) for r in idx.codes.tolist()}) == 120
    assert idx.codebook_sizes[:2] == (16, 16)
    np.save(tmp_path / "short.npy", x.numpy()[:5])
    with pytest.raises(ValueError, match="short.npy has shape \\(5, 16\\) dtype float32, expected \\[120, H\\]"):
        cli_main(["sids", "--items", str(items), "--out", str(out), "--embeddings", str(tmp_path / "short.npy")])


def test_cli_sids_from_an_interaction_log(tmp_path, tiny_encoder, capsys):
    """`genrec-fast sids --log --meta` turns a user's own log into a release-format dataset with SIDs
    that the SFT / eval readers load: same samples as load_interactions, SIDs unique and as in codes.npy."""
    from genrec_fast.cli import entry
    from genrec_fast.data import load_interactions, load_minionerec

    rng = np.random.default_rng(0)
    log = tmp_path / "log.csv"
    rows = ["user,asin,time"] + [f"u{u},i{int(rng.integers(0, 40))},{t}" for u in range(25) for t in range(6)]
    log.write_text("\n".join(rows) + "\n")
    meta = tmp_path / "meta.tsv"
    meta.write_text("asin\tname\tgenre\n" + "".join(f"i{i}\tthing {i}\tgenre {i % 4}\n" for i in range(40)))
    out = tmp_path / "ds"
    argv = ["sids", "--log", str(log), "--meta", str(meta), "--item-col", "asin", "--user-col", "user",
            "--time-col", "time", "--title-col", "name", "--max-history", "3", "--out", str(out),
            "--encoder", tiny_encoder, "--cache-dir", str(tmp_path / "cache"), "--levels", "2", "--codebook", "8",
            "--kmeans-iters", "5", "--no-progress"]
    assert cli_main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    want = load_interactions(log, meta, item_col="asin", user_col="user", time_col="time", title_col="name",
                             max_history=3)
    assert (summary["train"], summary["valid"], summary["test"]) == (len(want.train), len(want.valid), len(want.test))
    assert summary["collisions_after"] == 0 and summary["items"] == len(want.catalog)
    got = load_minionerec(out)
    assert list(got.catalog.item_ids) == list(want.catalog.item_ids)
    assert list(got.catalog.titles) == list(want.catalog.titles)
    text = got.catalog.texts[got.catalog.index("i7")]
    assert "thing 7. genre 3" in text and "i7" not in text
    for split in ("train", "valid", "test"):
        assert [(s.user_id, s.history, s.target) for s in getattr(got, split)] == \
               [(s.user_id, s.history, s.target) for s in getattr(want, split)]
    assert np.array_equal(got.catalog.codes, np.load(out / "codes.npy"))
    assert len({tuple(c) for c in got.catalog.codes.tolist()}) == len(got.catalog)
    # exactly one input; bad input is one line from the console script
    with pytest.raises(ValueError, match="exactly one of --items"):
        cli_main(["sids", "--out", str(out)])
    assert entry(["sids", "--log", str(log), "--out", str(out), "--item-col", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("genrec-fast: error: ")
    assert "log.csv:1: missing column(s) ['user_id', 'nope', 'timestamp']" in err
