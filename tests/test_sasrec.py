import numpy as np
import pytest
import torch

from genrec_fast.data import build_samples, user_sequences
from genrec_fast.data.types import Catalog, RecData, Sample
from genrec_fast.eval.baselines import baseline_metrics, baseline_ranks
from genrec_fast.eval.metrics import metrics_from_ranks
from genrec_fast.eval.sasrec import SASRecConfig, fit_sasrec, fitted_for_split, stopping_split, training_windows

torch.set_num_threads(1)


def cycle_data(num_items=20, users=60, length=9, max_history=4, seed=0, noise=0.0, min_length=None):
    """Each user walks the catalogue in steps of +1 (mod num_items) from a random start; leave-one-out.
    With ``min_length`` the users' lengths are drawn from min_length..length (short histories: padding)."""
    rng = np.random.default_rng(seed)
    u, it, ts = [], [], []
    for k in range(users):
        start = int(rng.integers(num_items))
        n = length if min_length is None else int(rng.integers(min_length, length + 1))
        for t in range(n):
            item = (start + t) % num_items
            if noise and rng.random() < noise:
                item = int(rng.integers(num_items))
            u.append(f"u{k}")
            it.append(item)
            ts.append(float(t))
    train, valid, test = build_samples(u, it, ts, max_history=max_history)
    ids = [str(i) for i in range(num_items)]
    return RecData(Catalog(ids, ids, ids), train, valid, test)


FAST = dict(hidden=32, num_layers=1, num_heads=1, dropout=0.1, batch_size=32, max_epochs=40, patience=5,
            lr=3e-3, stop_frac=0.25)


def test_build_sequences_rebuilds_sliding_windows_per_user():
    s = [Sample("a", [], 0), Sample("a", [0], 1), Sample("a", [0, 1], 2), Sample("a", [1, 2], 3),
         Sample("b", [5], 6), Sample("a", [2, 3], 4),
         Sample("a", [9, 4], 7),          # history is not the end of a's sequence: a new one
         Sample("b", [5, 6], 5)]
    assert user_sequences(s, max_history=2) == [[0, 1, 2, 3, 4], [5, 6, 5], [9, 4, 7]]
    assert user_sequences(s) == user_sequences(s, max_history=2)  # default: the longest history given
    X, Y = training_windows([[0, 1, 2, 3, 4], [5, 6, 5], [9]], max_len=3)
    # from the newest end, no overlap: [2,3,4] then [0,1,2]; [5,6,5]; a single item gives no window
    assert X.tolist() == [[3, 4], [1, 2], [6, 7]] and Y.tolist() == [[4, 5], [2, 3], [7, 6]]
    X, Y = training_windows([[0, 1, 2]], max_len=4)
    assert X.tolist() == [[0, 1, 2]] and Y.tolist() == [[0, 2, 3]]  # left-padded
    X, Y = training_windows([[0, 1, 2, 3]], max_len=3, stride=1)
    assert Y.tolist() == [[3, 4], [2, 3], [0, 2]]
    data = cycle_data()
    seqs = user_sequences(data.train + data.valid, max_history=4)
    assert len(seqs) == 60 and all(len(q) == 8 for q in seqs)  # one sequence per user: the first 8 items


def test_stopping_split_holds_out_users():
    data = cycle_data(users=40)
    cfg = SASRecConfig(stop_frac=0.25)
    fit, stop = stopping_split(data, "test", cfg)
    assert len(stop) == 10 and len(fit) == len(data.train) + 30
    held = {s.user_id for s in stop}
    assert all(s.user_id not in held for s in fit if s in data.valid)
    fit, stop = stopping_split(data, "valid", cfg)
    assert len(stop) == 10 and len(fit) == len(data.train) - 10
    last = {}
    for s in data.train:
        last[s.user_id] = s
    assert all(last[s.user_id] is s for s in stop)  # the user's last train sample
    assert stopping_split(data, "valid", SASRecConfig(stop_frac=0.25, stop_seed=1))[1] != stop


def test_sasrec_learns_next_item_pattern():
    data = cycle_data()
    fitted = fitted_for_split(data, "test", SASRecConfig(**FAST))
    r = fitted.ranks(data.test)
    assert metrics_from_ranks(r, (1,))["HR@1"] >= 0.9, fitted.info


def test_sasrec_metrics_equal_brute_force_scoring():
    data = cycle_data(num_items=25, users=50, noise=0.3, seed=3, max_history=6, min_length=3)
    assert min(len(s.history) for s in data.test) < 6  # some eval histories are padded
    cfg = SASRecConfig(**{**FAST, "max_epochs": 6})
    ks = (1, 3, 5, 10)
    res = baseline_metrics(data, "test", ks=ks, sasrec=cfg)
    fitted = fitted_for_split(data, "test", cfg)
    model = fitted.model
    ranks = []
    with torch.no_grad():
        for s in data.test:
            # one sample at a time, unpadded: the padding mask must make this equal the batched scores
            h = model(torch.tensor([[x + 1 for x in s.history]]))[0, -1]
            logits = model.item_logits(h).numpy()
            order = np.argsort(-logits, kind="stable")  # ties: lower index first
            ranks.append(int(np.nonzero(order == s.target)[0][0]))
    ranks = np.asarray(ranks)
    np.testing.assert_allclose(fitted.logits(data.test)[3], model.item_logits(
        model(torch.tensor([[x + 1 for x in data.test[3].history]]))[0, -1]).detach().numpy(), rtol=1e-5, atol=1e-6)
    assert (fitted.ranks(data.test) == ranks).all()
    want = {}
    for k in ks:
        hit = ranks < k
        want[f"HR@{k}"] = hit.mean()
        want[f"NDCG@{k}"] = np.where(hit, 1 / np.log2(ranks + 2), 0).mean()
    for k, v in want.items():
        assert res["sasrec"][k] == pytest.approx(v, abs=1e-12), k
    assert 0 < res["sasrec"]["HR@10"] < 1  # not a degenerate case
    assert res["sasrec"]["epochs"] == 6 or res["sasrec"]["epochs"] < 6


def test_sasrec_is_seeded_and_leaves_global_rng_alone():
    data = cycle_data(noise=0.2)
    cfg = dict(FAST, max_epochs=3)
    fit, stop = stopping_split(data, "test", SASRecConfig(**cfg))
    torch.manual_seed(123)
    a = fit_sasrec(fit, stop, 20, SASRecConfig(**cfg))
    after = torch.rand(3)
    torch.manual_seed(123)
    b = fit_sasrec(fit, stop, 20, SASRecConfig(**cfg))
    assert torch.equal(after, torch.rand(3))  # the fit ran in a forked RNG
    c = fit_sasrec(fit, stop, 20, SASRecConfig(**cfg, seed=1))
    la, lb, lc = (f.logits(data.test) for f in (a, b, c))
    assert np.array_equal(la, lb) and a.info["loss_curve"] == b.info["loss_curve"]
    assert not np.allclose(la, lc)


def test_baseline_ranks_sasrec_option_and_errors():
    data = cycle_data(users=20)
    ranks, info = baseline_ranks(data, "test", ks=(1, 5), sasrec=False)
    assert set(ranks) == {"popularity", "transition"} and info == {}
    ranks, info = baseline_ranks(data, "valid", ks=(1, 5), sasrec=dict(FAST, max_epochs=2))
    assert set(ranks) == {"popularity", "transition", "sasrec"} and len(ranks["sasrec"]) == len(data.valid)
    assert info["sasrec"]["epochs"] <= 2 and info["sasrec"]["stop_samples"] == 5
    assert ((ranks["sasrec"] >= -1) & (ranks["sasrec"] < 5)).all()
    with pytest.raises(ValueError, match="multiple of num_heads"):
        baseline_ranks(data, "test", sasrec=dict(hidden=30, num_heads=4))
    with pytest.raises(ValueError, match="SASRec fit sample 0: item index 99"):
        fit_sasrec([Sample("a", [1], 99)], [], 20)


def test_fits_are_kept_on_disk_and_reloaded_as_they_were(tmp_path, monkeypatch):
    """With a cache folder, a second process (here: the in-process memo emptied) loads the fit instead of training:
    the same logits and info as the fresh fit, plus the file it came from; another config or thread count is another
    entry; an unreadable entry is warned about and refitted; "off" writes nothing."""
    from genrec_fast.eval import sasrec

    data = cycle_data(noise=0.2)
    cfg = SASRecConfig(**dict(FAST, max_epochs=3))
    monkeypatch.setenv(sasrec.DISK_CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(sasrec, "_CACHE", {})
    fits = []
    real_fit = sasrec.fit_sasrec

    def counting_fit(*args, **kwargs):
        fits.append(1)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(sasrec, "fit_sasrec", counting_fit)
    fresh = fitted_for_split(data, "test", cfg)
    files = list((tmp_path / "cache").glob("*.pt"))
    assert len(fits) == 1 and len(files) == 1 and "cache" not in fresh.info
    sasrec._CACHE.clear()
    loaded = fitted_for_split(data, "test", cfg)
    assert len(fits) == 1 and loaded is not fresh
    assert np.array_equal(loaded.logits(data.test), fresh.logits(data.test))
    assert loaded.info == {**fresh.info, "cache": str(files[0])}
    sasrec._CACHE.clear()
    fitted_for_split(data, "test", SASRecConfig(**dict(FAST, max_epochs=3, seed=1)))  # another config
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        sasrec._CACHE.clear()
        fitted_for_split(data, "test", cfg)  # another thread count: other float sums, another entry
    finally:
        torch.set_num_threads(threads)
    assert len(fits) == 3 and len(list((tmp_path / "cache").glob("*.pt"))) == 3
    files[0].write_bytes(b"not a torch file")
    sasrec._CACHE.clear()
    with pytest.warns(UserWarning, match="unreadable .* fitting again"):
        again = fitted_for_split(data, "test", cfg)
    assert len(fits) == 4 and np.array_equal(again.logits(data.test), fresh.logits(data.test))
    sasrec._CACHE.clear()
    assert "cache" in fitted_for_split(data, "test", cfg).info  # the entry was rewritten
    monkeypatch.setenv(sasrec.DISK_CACHE_ENV, "off")
    assert sasrec.disk_cache_dir() is None
    sasrec._CACHE.clear()
    fitted_for_split(data, "test", cfg)
    assert len(fits) == 5 and len(list((tmp_path / "cache").glob("*.pt"))) == 3
    assert not list((tmp_path / "cache").glob(".*.tmp"))
