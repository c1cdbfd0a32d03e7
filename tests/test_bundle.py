"""The model bundle: write / read round trip, fingerprints, clear errors on a missing or corrupt bundle."""
import json
import warnings

import numpy as np
import pytest

from genrec_fast.bundle import (
    BUNDLE_FILE,
    SID_INDEX_DIR,
    BundleMismatchError,
    catalog_fingerprint,
    check_model_matches,
    read_bundle,
    sid_fingerprint,
    write_bundle,
)
from genrec_fast.data import Catalog


def _catalog(codes=None, ids=None):
    ids = ids or ["i0", "i1", "i2", "i3"]
    codes = np.array([[0, 1], [1, 0], [1, 1], [2, 3]]) if codes is None else np.asarray(codes)
    titles = [f"title of {i} é" for i in ids]
    return Catalog(ids, titles, [t + " text" for t in titles], codes=codes, codebook_sizes=(4, 4))


def test_round_trip(tmp_path):
    cat = _catalog()
    write_bundle(tmp_path, cat, "compact")
    assert (tmp_path / BUNDLE_FILE).is_file() and (tmp_path / SID_INDEX_DIR / "index.json").is_file()
    b = read_bundle(tmp_path)
    assert b.prompt_style == "compact" and b.item_ids == cat.item_ids and b.titles == cat.titles
    assert b.codebook_sizes == (4, 4) and np.array_equal(b.codes, cat.codes)
    assert b.sid_fingerprint == catalog_fingerprint(cat)
    back = b.catalog()
    assert back.item_ids == cat.item_ids and np.array_equal(back.codes, cat.codes)
    assert not [p.name for p in tmp_path.rglob("*.tmp")]  # nothing half-written left behind


def test_fingerprint_ignores_row_order_but_not_codes_or_ids():
    cat = _catalog()
    fp = catalog_fingerprint(cat)
    perm = [2, 0, 3, 1]
    assert sid_fingerprint([cat.item_ids[i] for i in perm], cat.codes[perm]) == fp
    other = cat.codes.copy()
    other[[0, 1]] = other[[1, 0]]  # two items swap SIDs: the same set of codes, another table
    assert sid_fingerprint(cat.item_ids, other) != fp
    assert sid_fingerprint(["i0", "i1", "i2", "x"], cat.codes) != fp


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="genrec_bundle.json: no model bundle"):
        read_bundle(tmp_path)
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        read_bundle(tmp_path / "nope")
    write_bundle(tmp_path, _catalog(), "minionerec")
    path = tmp_path / BUNDLE_FILE
    good = path.read_text()
    path.write_text(good[:40])
    with pytest.raises(ValueError, match=r"genrec_bundle.json:\d+: invalid JSON"):
        read_bundle(tmp_path)
    meta = json.loads(good)
    path.write_text(json.dumps({**meta, "prompt_style": "fancy"}))
    with pytest.raises(ValueError, match="genrec_bundle.json: unknown prompt style 'fancy'"):
        read_bundle(tmp_path)
    path.write_text(json.dumps({**meta, "titles": meta["titles"][:2]}))
    with pytest.raises(ValueError, match="4 item ids but 2 titles"):
        read_bundle(tmp_path)
    # the SID index edited under the bundle: the fingerprint says so
    path.write_text(good)
    index = tmp_path / SID_INDEX_DIR / "index.json"
    table = json.loads(index.read_text())
    table["i0"], table["i1"] = table["i1"], table["i0"]
    index.write_text(json.dumps(table))
    (tmp_path / SID_INDEX_DIR / "sids_meta.json").unlink()
    with pytest.raises(ValueError, match="SID fingerprint .* does not match its SID index .*corrupt"):
        read_bundle(tmp_path)
    index.unlink()
    with pytest.raises(FileNotFoundError, match="sid_index/index.json: missing"):
        read_bundle(tmp_path)


def test_check_model_matches(tmp_path):
    cat = _catalog()
    write_bundle(tmp_path, cat, "minionerec")
    assert check_model_matches(tmp_path, cat, "DATA").sid_fingerprint == catalog_fingerprint(cat)
    other = _catalog(codes=[[1, 0], [0, 1], [1, 1], [2, 3]])  # same shape, other SIDs
    with pytest.raises(BundleMismatchError, match=f"model {tmp_path} was trained on other Semantic IDs than those of "
                                                  "DATA"):
        check_model_matches(tmp_path, other, "DATA")
    with pytest.warns(UserWarning, match="has no genrec_bundle.json"):
        assert check_model_matches(tmp_path / "older", cat, "DATA") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_model_matches(tmp_path, cat, "DATA")  # a match: no warning


def test_write_bundle_refuses_a_catalogue_without_sids(tmp_path):
    with pytest.raises(ValueError, match="no Semantic IDs"):
        write_bundle(tmp_path, Catalog(["a"], ["t"], ["t"]), "minionerec")
    with pytest.raises(ValueError, match="unknown prompt style"):
        write_bundle(tmp_path, _catalog(), "nope")


def test_bad_codebook_sizes_name_the_file(tmp_path):
    write_bundle(tmp_path, _catalog(), "minionerec")
    path = tmp_path / BUNDLE_FILE
    meta = json.loads(path.read_text())
    for bad in ([4, None], [], [4, "4"], [4, 0]):
        path.write_text(json.dumps({**meta, "codebook_sizes": bad}))
        with pytest.raises(ValueError, match="genrec_bundle.json: field 'codebook_sizes' must be a non-empty list"):
            read_bundle(tmp_path)
    path.write_text(json.dumps({**meta, "codebook_sizes": [2, 4]}))  # codes of level 0 reach 2
    with pytest.raises(ValueError, match=r"sid_index/index.json: corrupt SID index of the bundle: .*level 0"):
        read_bundle(tmp_path)
