"""Bad input to the readers, the config files and `genrec-fast sids`: a clear error naming the file, line and
field (one `genrec-fast: error: ...` line, exit status 2, from the console script), never a traceback, a
silently wrong value or a half-written folder."""
import json
import os

import numpy as np
import pytest

from genrec_fast import cli
from genrec_fast.config_cli import apply_config
from genrec_fast.data import (
    Catalog,
    DataFormatError,
    RecData,
    Sample,
    load_catalog,
    load_interactions,
    load_minionerec,
    minionerec,
    save_minionerec,
)
from genrec_fast.sid import read_index, read_item_json


def _entry(capsys, argv):
    """(exit status, stderr) of the console script."""
    capsys.readouterr()
    rc = cli.entry(argv)
    return rc, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    assert err.startswith("genrec-fast: error: ") and err.count("\n") == 1, err
    return err


def _dataset(n_items=4, title=lambda i: f"item {i}"):
    cat = Catalog(item_ids=[str(i) for i in range(n_items)], titles=[title(i) for i in range(n_items)],
                  texts=[f"text {i}" for i in range(n_items)], codes=np.arange(n_items)[:, None] * [1, 0] + [0, 1],
                  codebook_sizes=(8, 8))
    s = [Sample("u1", [0], 1), Sample("u1", [0, 1], 2), Sample("u2", [1], 3)]
    return RecData(catalog=cat, train=s[:1], valid=s[1:2], test=s[2:])


def _log(tmp_path, rows, header="user_id,item_id,timestamp", name="log.csv"):
    p = tmp_path / name
    p.write_text(header + "\n" + "".join(r + "\n" for r in rows))
    return p


GOOD_ROWS = [f"u{u},i{(u + t) % 5},{10 * u + t}" for u in range(4) for t in range(4)]


# ---- 1. the dataset folder is written as a whole ---------------------------------------------------------

def _snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_save_minionerec_failing_midway_leaves_the_previous_folder(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    save_minionerec(_dataset(title=lambda i: f"old {i}"), out)
    before = _snapshot(out)

    def boom(*a, **k):  # the split csvs are written first: without atomic_dir they would now be the new ones
        raise OSError("disk full")

    monkeypatch.setattr(minionerec, "write_index", boom)
    with pytest.raises(OSError, match="disk full"):
        save_minionerec(_dataset(title=lambda i: f"new {i}"), out)
    assert _snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["ds"]  # no temp folder left beside it
    monkeypatch.undo()
    save_minionerec(_dataset(title=lambda i: f"new {i}"), out)
    assert load_minionerec(out).catalog.titles == [f"new {i}" for i in range(4)]


def test_save_minionerec_refuses_a_folder_holding_other_files(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"mine holds files that are not part of a dataset \(notes\.txt\)"):
        save_minionerec(_dataset(), out)
    assert os.listdir(out) == ["notes.txt"]


def test_sids_items_refuses_an_out_holding_a_dataset(tmp_path, capsys):
    ds = save_minionerec(_dataset(), tmp_path / "ds")
    items = tmp_path / "item.json"
    items.write_text(json.dumps({str(i): {"title": f"item {i}"} for i in range(4)}))
    np.save(tmp_path / "emb.npy", np.eye(4, dtype=np.float32))
    before = _snapshot(ds)
    rc, err = _entry(capsys, ["sids", "--items", str(items), "--out", str(ds), "--embeddings",
                              str(tmp_path / "emb.npy"), "--levels", "1", "--codebook", "4", "--no-progress"])
    assert rc == 2 and "holds a dataset (info.txt, train.csv, valid.csv, test.csv)" in _one_error_line(err)
    assert _snapshot(ds) == before
    load_minionerec(ds)  # still consistent


# ---- 2, 3. config values go through the flags' checks; every CLI error is one line, exit 2 ---------------

@pytest.mark.parametrize("text, message", [
    ("split: train\n", "key 'split': 'train' is not one of valid, test"),
    ("num_beams: 2.5\n", "key 'num_beams': invalid int value 2.5"),
    ("cuda_graphs: 'false'\n", "key 'cuda_graphs': expected true or false, got 'false'"),
    ("ks: [1, x]\n", "key 'ks': invalid int value 'x'"),
    ("model: [a, b]\n", "key 'model': expected one value, got a list"),
    ("num_beams: true\n", "key 'num_beams': expected a value, got True (YAML reads an unquoted yes / no"),
    ("ks: [{a: 1}]\n", "key 'ks': expected a single value, got {'a': 1}"),
    ("split: null\n", "key 'split': null is not a value of this option"),
    ("nope: 1\nhelp: 1\n", "has unknown option(s): help, nope"),
    ("a: [1\nb: 2\n", ":2: invalid YAML: expected ',' or ']', but got ':'"),
])
def test_config_values_are_checked_like_flags(tmp_path, capsys, text, message):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(text)
    rc, err = _entry(capsys, ["eval", "--config", str(cfg), "--model", "m", "--data", "d"])
    assert rc == 2 and f"genrec-fast: error: config {cfg}" in _one_error_line(err) and message in err


def test_config_values_are_converted_like_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("levels: '2'\nno_balanced: 1\n")
    with pytest.raises(ValueError, match="unknown option"):  # the key is the option's dest: 'balanced'
        cli.main(["sids", "--config", str(cfg), "--out", "o"])
    cfg.write_text("levels: '2'\nbalanced: false\nmax_users: null\n")
    args = apply_config(cli.build_parser("sids"), ["--config", str(cfg), "--out", "o"])
    assert args.levels == 2 and args.balanced is False and args.max_users is None
    cfg.write_text("ks: 5\nmax_samples: '7'\n")
    args = apply_config(cli.build_parser("eval"), ["--config", str(cfg), "--model", "m", "--data", "d"])
    assert args.ks == [5] and args.max_samples == 7  # as `--ks 5 --max-samples 7` give


def test_cli_errors_are_one_line_with_status_2(tmp_path, capsys):
    rc, err = _entry(capsys, ["eval", "--config", str(tmp_path / "nope.yaml")])
    assert rc == 2 and "config file not found" in _one_error_line(err)
    bad = tmp_path / "c.json"
    bad.write_bytes(b'{"split":\n "t\xe9st"}')
    rc, err = _entry(capsys, ["eval", "--config", str(bad)])
    assert rc == 2 and f"config {bad}:2: not UTF-8 text" in _one_error_line(err)
    rc, err = _entry(capsys, ["nosuchcommand"])
    assert rc == 2 and "unknown command 'nosuchcommand'" in _one_error_line(err)
    items = tmp_path / "item.json"
    items.write_text(json.dumps({str(i): {"title": f"item {i}"} for i in range(4)}))
    np.save(tmp_path / "emb5.npy", np.zeros((5, 3), dtype=np.float32))
    rc, err = _entry(capsys, ["sids", "--items", str(items), "--out", str(tmp_path / "o"),
                              "--embeddings", str(tmp_path / "emb5.npy")])
    assert rc == 2 and "emb5.npy has shape (5, 3) dtype float32, expected [4, H]" in _one_error_line(err)


# ---- 4, 5. titles -----------------------------------------------------------------------------------------

def test_titles_with_line_breaks_are_collapsed_and_the_writer_refuses_them(tmp_path):
    log = _log(tmp_path, GOOD_ROWS)
    meta = tmp_path / "items.csv"
    meta.write_text("item_id,title\n" + "".join(f'i{i},"Item\t{i}\r\n  part two"\n' for i in range(5)))
    data = load_interactions(log, meta)
    assert data.catalog.titles[0] == "Item 0 part two"
    data.catalog.set_codes(np.arange(5)[:, None], (8,))
    back = load_minionerec(save_minionerec(data, tmp_path / "ds"))
    assert back.catalog.titles == data.catalog.titles
    bad = _dataset(title=lambda i: f"two\nlines {i}")
    with pytest.raises(ValueError, match=r"item '0': its title 'two\\nlines 0' holds a tab or line break"):
        save_minionerec(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_meta_without_the_title_column_is_an_error(tmp_path):
    log = _log(tmp_path, GOOD_ROWS)
    meta = tmp_path / "items.csv"
    meta.write_text("item_id,name\n" + "".join(f"i{i},Item {i}\n" for i in range(5)))
    with pytest.raises(DataFormatError, match=r"items\.csv:1: missing column\(s\) \['title'\]"):
        load_interactions(log, meta)
    assert load_interactions(log, meta, title_col="name").catalog.titles[0] == "Item 0"


# ---- 6, 7. JSON and text input ------------------------------------------------------------------------------

def test_duplicate_json_keys_are_errors(tmp_path):
    d = save_minionerec(_dataset(), tmp_path / "ds")
    (d / "item.json").write_text('{"0": {"title": "a"},\n "0": {"title": "b"}}')
    with pytest.raises(DataFormatError, match=r"item\.json: key '0' appears twice"):
        load_catalog(d)
    p = tmp_path / "index.json"
    p.write_text('{"1": ["<a_1>"], "2": ["<a_2>"], "1": ["<a_3>"]}')
    with pytest.raises(ValueError, match=r"index\.json: key '1' appears twice"):
        read_index(p)
    p.write_text('{"1": {"title": "x", "title": "y"}}')
    with pytest.raises(ValueError, match="key 'title' appears twice"):
        read_item_json(p)


def test_json_of_the_wrong_shape_names_the_file(tmp_path):
    d = save_minionerec(_dataset(), tmp_path / "ds")
    item_json = (d / "item.json").read_text()
    (d / "item.json").write_text(json.dumps({"0": "just a title"}))
    with pytest.raises(DataFormatError, match=r"item\.json: item '0': record must be an object, got str"):
        load_catalog(d)
    (d / "item.json").write_text(item_json)
    (d / "index.json").write_text(json.dumps([["<a_0>"]]))
    with pytest.raises(DataFormatError, match=r"index\.json: expected a non-empty JSON object"):
        load_catalog(d)


def test_bytes_that_are_not_utf8_name_file_and_line(tmp_path):
    log = tmp_path / "log.csv"
    log.write_bytes(b"user_id,item_id,timestamp\nu1,i1,1\nu1,caf\xe9,2\n")
    with pytest.raises(DataFormatError, match=r"log\.csv:3: not UTF-8 text \(invalid continuation byte: byte\(s\) e9"):
        load_interactions(log)
    d = save_minionerec(_dataset(), tmp_path / "ds")
    for name in ("info.txt", "item.json", "index.json", "train.csv"):
        saved = (d / name).read_bytes()
        at = len(saved.rstrip()) - 1  # inside the last line
        (d / name).write_bytes(saved[:at] + b"\xff" + saved[at:])
        line = saved[:at].count(b"\n") + 1
        with pytest.raises(DataFormatError, match=rf"{name}:{line}: not UTF-8 text"):
            load_minionerec(d)
        (d / name).write_bytes(saved)


def test_csv_separator_field_size_and_byte_order_mark(tmp_path):
    log = _log(tmp_path, GOOD_ROWS)
    with pytest.raises(ValueError, match=r"sep \(--sep\) must be a single character, got '::'"):
        load_interactions(log, sep="::")
    meta = tmp_path / "items.csv"
    meta.write_text("item_id,title,description\n" + "".join(f"i{i},Item {i},{'long ' * 40000}\n" for i in range(5)))
    assert len(load_interactions(log, meta).catalog.texts[0]) > 200000  # fields over csv's default 128 KiB
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + log.read_bytes())  # as spreadsheet programs save 'CSV UTF-8'
    assert len(load_interactions(bom).test) == 4


# ---- 8. interaction rows and options ------------------------------------------------------------------------

@pytest.mark.parametrize("row, message", [
    ("u9,i1,nan", r"log\.csv:4: timestamp 'nan' is not a finite number"),
    ("u9,i1,-inf", r"log\.csv:4: timestamp '-inf' is not a finite number"),
    (" ,i1,7", r"log\.csv:4: column 'user_id' is empty"),
    ("u9,,7", r"log\.csv:4: column 'item_id' is empty"),
])
def test_bad_interaction_rows_name_the_line(tmp_path, row, message):
    with pytest.raises(DataFormatError, match=message):
        load_interactions(_log(tmp_path, GOOD_ROWS[:2] + [row] + GOOD_ROWS[2:]))


def test_a_log_without_samples_and_bad_limits_are_errors(tmp_path):
    with pytest.raises(DataFormatError, match=r"log\.csv: no samples: none of the 3 kept users has two"):
        load_interactions(_log(tmp_path, ["u1,i1,1", "u2,i1,2", "u3,i2,3"]))
    log = _log(tmp_path, GOOD_ROWS)
    for kwargs, flag in (({"max_users": 0}, "max-users"), ({"max_interactions_per_user": -1},
                                                           "max-interactions-per-user")):
        with pytest.raises(ValueError, match=rf"\(--{flag}\) must be >= 1"):
            load_interactions(log, **kwargs)


# ---- 9. `genrec-fast sids` options ----------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--max-users", "5"], "--items reads item.json only; --max-users go(es) with --log"),
    (["--split", "temporal", "--sep", ";"], "--sep, --split go(es) with --log"),
    (["--levels", "9"], "--levels must be in 1..7, got 9"),
    (["--codebook", "0"], "--codebook must be >= 1, got 0"),
    (["--kmeans-iters", "0"], "--kmeans-iters must be >= 1, got 0"),
    (["--method", "rqvae", "--epochs", "0"], "--epochs must be >= 1, got 0"),
])
def test_sids_options_are_checked_before_the_encoder_runs(tmp_path, capsys, monkeypatch, extra, message):
    import genrec_fast.sid.cli as sid_cli

    def no_encoder(*a, **k):
        raise AssertionError("the encoder ran before the options were checked")

    monkeypatch.setattr(sid_cli, "embed_items", no_encoder)
    items = tmp_path / "item.json"
    items.write_text(json.dumps({str(i): {"title": f"item {i}"} for i in range(4)}))
    rc, err = _entry(capsys, ["sids", "--items", str(items), "--out", str(tmp_path / "o"), *extra])
    assert rc == 2 and message in _one_error_line(err)
    assert not (tmp_path / "o").exists()


def test_sids_log_mode_checks_out_before_the_encoder_runs(tmp_path, capsys, monkeypatch):
    import genrec_fast.sid.cli as sid_cli

    monkeypatch.setattr(sid_cli, "embed_items", lambda *a, **k: pytest.fail("the encoder ran"))
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("x")
    rc, err = _entry(capsys, ["sids", "--log", str(_log(tmp_path, GOOD_ROWS)), "--out", str(out)])
    assert rc == 2 and "holds files that are not part of a dataset (thesis.tex)" in _one_error_line(err)
    assert os.listdir(out) == ["thesis.tex"]
