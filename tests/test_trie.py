"""SIDTrie against a pure-Python dict trie, persistence, error paths and device arrays."""
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from genrec_fast import SIDTrie


class DictTrie:
    """The obvious Python model: prefix tuple -> sorted set of next codes; SID -> item ids."""

    def __init__(self, codes, item_ids):
        self.next = defaultdict(set)
        self.items = defaultdict(list)
        for row, item in zip(map(tuple, codes), item_ids):
            for d in range(len(row)):
                self.next[row[:d]].add(row[d])
            self.items[row].append(int(item))


@st.composite
def catalogues(draw):
    L = draw(st.integers(1, 5))
    sizes = [draw(st.integers(1, 300)) for _ in range(L)]
    n = draw(st.integers(1, 200))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    # narrow the effective code range sometimes so prefixes are shared and duplicates happen
    hi = [draw(st.sampled_from([k, max(1, min(k, 3))])) for k in sizes]
    codes = np.stack([rng.integers(0, h, size=n) for h in hi], axis=1).astype(np.int64)
    dup = draw(st.booleans())
    return codes, sizes, dup, rng


def _dedup(codes):
    _, first = np.unique(codes, axis=0, return_index=True)
    return codes[np.sort(first)]


@settings(max_examples=60, deadline=None)
@given(catalogues())
def test_matches_dict_trie(cat):
    codes, sizes, dup, rng = cat
    if not dup:
        codes = _dedup(codes)
    item_ids = rng.permutation(10 * len(codes))[: len(codes)]
    trie = SIDTrie(codes, sizes, item_ids=item_ids, allow_duplicates=dup)
    ref = DictTrie(codes, item_ids)
    L = codes.shape[1]

    assert trie.num_items == len(codes) and trie.num_levels == L and trie.codebook_sizes == tuple(sizes)
    for d in range(L + 1):
        assert trie.num_nodes(d) == len({tuple(r[:d]) for r in codes.tolist()})
    for prefix, nxt in ref.next.items():
        got = trie.allowed(prefix)
        assert got.dtype == np.int32
        assert got.tolist() == sorted(nxt)
    for sid, items in ref.items.items():
        assert trie.items(sid).tolist() == items  # construction order within a leaf

    # random queries, present and absent
    queries = np.stack([rng.integers(0, k, size=64) for k in sizes], axis=1)
    queries = np.concatenate([queries, codes[:8]])
    expect = np.array([tuple(q) in ref.items for q in queries.tolist()])
    assert (trie.contains(queries) == expect).all()
    leaves = trie.lookup(queries)
    assert ((leaves >= 0) == expect).all()
    for q, leaf in zip(queries.tolist(), leaves.tolist()):
        if leaf >= 0:
            assert trie.leaf_items(leaf).tolist() == ref.items[tuple(q)]
    for q in queries.tolist():
        for d in range(1, L):
            if tuple(q[:d]) not in ref.next:
                with pytest.raises(KeyError):
                    trie.allowed(q[:d])
                break


@settings(max_examples=30, deadline=None)
@given(catalogues(), st.sampled_from(["dense", "csr", "auto"]))
def test_device_step_matches_host(cat, layout):
    codes, sizes, dup, rng = cat
    trie = SIDTrie(codes, sizes, allow_duplicates=True)
    da = trie.device_arrays("cpu", layout=layout)
    L = codes.shape[1]
    # walk every SID through step() and compare with allowed() on the host
    uniq = np.unique(codes, axis=0)
    nodes = torch.zeros(len(uniq), dtype=torch.int64)
    for d in range(L):
        allowed, child = da.step(d, nodes)
        assert allowed.shape == (len(uniq), sizes[d]) and child.dtype == torch.int32
        for r, row in enumerate(uniq.tolist()):
            assert torch.nonzero(allowed[r]).flatten().tolist() == trie.allowed(row[:d]).tolist()
        assert torch.equal(allowed, child >= 0)
        nodes = child[torch.arange(len(uniq)), torch.from_numpy(uniq[:, d])].long()
        assert (nodes >= 0).all()
    # after L steps the node is the leaf: items match
    for r, row in enumerate(uniq.tolist()):
        leaf = int(nodes[r])
        got = da.leaf_items[da.leaf_ptr[leaf]:da.leaf_ptr[leaf + 1]].tolist()
        assert sorted(got) == sorted(trie.items(row).tolist())
    # padding rows allow nothing
    allowed, child = da.step(0, torch.tensor([-1]))
    assert not allowed.any() and (child == -1).all()


def test_layouts_agree():
    rng = np.random.default_rng(0)
    codes = _dedup(rng.integers(0, 256, size=(20000, 3)))
    trie = SIDTrie(codes, 256)
    dense, csr, auto = (trie.device_arrays("cpu", layout=lay) for lay in ("dense", "csr", "auto"))
    for a, b in ((dense, csr), (dense, auto)):
        for d in range(3):
            n = torch.arange(trie.num_nodes(d))
            assert all(torch.equal(x, y) for x, y in zip(a.step(d, n), b.step(d, n)))
    assert auto.levels[2].layout == "csr" and auto.levels[0].layout == "dense"


def test_device_bytes_per_item_1m():
    """The design target: <= 16 bytes of device arrays per item for 1M random SIDs (L=3, K=256)."""
    rng = np.random.default_rng(0)
    codes = _dedup(rng.integers(0, 256, size=(1_000_000, 3)))
    da = SIDTrie(codes, 256).device_arrays("cpu")
    assert da.nbytes / len(codes) <= 16


def test_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 7, size=(300, 3))
    trie = SIDTrie(codes, [7, 7, 7], item_ids=np.arange(300) * 3, allow_duplicates=True)
    path = tmp_path / "sub" / "catalogue.trie"
    trie.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["catalogue.trie"]  # no temp file left
    back = SIDTrie.load(path)
    assert back.codebook_sizes == trie.codebook_sizes and back.allow_duplicates
    assert np.array_equal(back.codes, trie.codes) and np.array_equal(back.item_ids, trie.item_ids)
    for d in range(3):
        assert back.num_nodes(d) == trie.num_nodes(d)
    for row in np.unique(codes, axis=0).tolist():
        assert back.items(row).tolist() == trie.items(row).tolist()
    a, b = trie.device_arrays(), back.device_arrays()
    assert torch.equal(a.leaf_items, b.leaf_items) and torch.equal(a.leaf_ptr, b.leaf_ptr)


def test_load_rejects_corrupt_and_foreign_files(tmp_path):
    trie = SIDTrie([[0, 1], [1, 0]], 2)
    good = tmp_path / "t.trie"
    trie.save(good)
    data = bytearray(good.read_bytes())

    foreign = tmp_path / "foreign.bin"
    foreign.write_bytes(b"PK\x03\x04 not a trie at all")
    with pytest.raises(ValueError, match="not a genrec_fast trie"):
        SIDTrie.load(foreign)

    flipped = tmp_path / "flipped.trie"
    bad = bytearray(data)
    bad[-6] ^= 0xFF
    flipped.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="checksum"):
        SIDTrie.load(flipped)

    truncated = tmp_path / "truncated.trie"
    truncated.write_bytes(bytes(data[:-3]))
    with pytest.raises(ValueError, match="corrupt"):
        SIDTrie.load(truncated)

    version = tmp_path / "version.trie"
    bad = bytearray(data)
    bad[8] = 99
    version.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="version 99"):
        SIDTrie.load(version)


@pytest.mark.parametrize(
    "codes, kwargs, match",
    [
        (np.zeros((0, 3), dtype=np.int32), {}, "empty catalogue"),
        (np.zeros(5, dtype=np.int32), {}, "2-D"),
        (np.zeros((2, 2, 2), dtype=np.int32), {}, "2-D"),
        (np.zeros((2, 3), dtype=np.float32), {}, "integer dtype"),
        (np.zeros((2, 3), dtype=bool), {}, "integer dtype"),
        (np.array([[0, 1], [0, -1]]), {"codebook_sizes": 4}, r"row\(s\) 1 \(0, -1\)"),
        (np.array([[0, 1], [0, -1]]), {}, r"negative codes in row\(s\) \[1\]"),
        (np.array([[0, 1], [2, 5], [3, 9]]), {"codebook_sizes": [4, 6]}, r"row\(s\) 2 \(3, 9\)"),
        (np.array([[0, 1], [0, 2]]), {"codebook_sizes": [4, 4, 4]}, "3 entries, codes has 2 levels"),
        (np.array([[0, 1], [0, 1]]), {"codebook_sizes": [0, 4]}, "codebook size of level 0"),
        (np.array([[0, 1], [0, 2]]), {"codebook_sizes": 5.0}, r"codebook_sizes must be an int or 2 ints .* got 5.0"),
        (np.array([[0, 1], [0, 2]]), {"codebook_sizes": [4, 4.5]}, r"codebook_sizes must be an int or 2 ints"),
        (np.array([[0, 1], [2, 2], [0, 1], [2, 2]]), {}, "rows 0 and 2 share .*rows 1 and 3 share"),
        (np.array([[0, 1], [0, 2]]), {"item_ids": [1, 2, 3]}, "item_ids must be 1-D with 2 entries"),
        (np.array([[0, 1], [0, 2]]), {"item_ids": [1.0, 2.0]}, "item_ids must be integers"),
    ],
)
def test_bad_input_raises_value_error(codes, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SIDTrie(codes, **kwargs)


def test_query_errors():
    trie = SIDTrie([[0, 1, 2], [0, 1, 3]], 4)
    with pytest.raises(KeyError, match=r"\(0, 2\)"):
        trie.allowed([0, 2])
    with pytest.raises(KeyError):
        trie.allowed([9])
    with pytest.raises(ValueError, match="longer than the SID length"):
        trie.allowed([0, 1, 2, 3])
    assert trie.allowed([0, 1, 2]).size == 0  # a full SID has no continuation
    with pytest.raises(KeyError):
        trie.items([0, 1, 0])
    with pytest.raises(ValueError, match="3 codes"):
        trie.items([0, 1])
    with pytest.raises(ValueError, match=r"shape \[M, 3\]"):
        trie.contains(np.zeros((2, 2), dtype=np.int32))
    assert trie.contains([[0, 1, 9], [0, 1, -1], [0, 1, 3]]).tolist() == [False, False, True]
    with pytest.raises(IndexError):
        trie.device_arrays().step(1, torch.tensor([5]))
    assert [trie.num_nodes(d) for d in range(4)] == [1, 1, 1, 2] and trie.max_branch(2) == 2
    for bad in (-1, 4):
        with pytest.raises(IndexError, match=r"depth must be in 0\.\.3"):
            trie.num_nodes(bad)
    for bad in (-1, 3):
        with pytest.raises(IndexError, match=r"depth must be in 0\.\.2"):
            trie.max_branch(bad)
    with pytest.raises(TypeError):
        trie.num_nodes(1.5)
    assert trie.leaf_items(1).tolist() == [1]
    for bad in (-1, 2):
        with pytest.raises(IndexError, match=r"leaf id .* out of range 0\.\.1"):
            trie.leaf_items(bad)


def test_torch_inputs_and_defaults():
    codes = torch.tensor([[3, 0], [1, 2]])
    trie = SIDTrie(codes)
    assert trie.codebook_sizes == (4, 3)
    assert trie.item_ids.tolist() == [0, 1] and trie.codes.dtype == np.int32
    assert trie.items([3, 0]).tolist() == [0]


@pytest.mark.parametrize("levels, k", [(3, 1 << 20), (4, 1 << 20), (2, 1 << 30), (6, 2)])
def test_every_sort_path(levels, k):
    """Packed-key radix (small keys), (key, index) radix (key + index > 64 bits) and the comparison
    sort (key > 64 bits) must all give the same trie as the dict model, duplicates in order."""
    rng = np.random.default_rng(levels)
    base = rng.integers(0, min(k, 50), size=(120, levels))
    codes = np.concatenate([base, base[:30]])  # duplicates
    trie = SIDTrie(codes, k, allow_duplicates=True)
    ref = DictTrie(codes, np.arange(len(codes)))
    for prefix, nxt in ref.next.items():
        assert trie.allowed(prefix).tolist() == sorted(nxt)
    for sid, items in ref.items.items():
        assert trie.items(sid).tolist() == items


def test_binding_never_touches_python_objects_without_the_gil(tmp_path):
    """Build the extension with pybind11's own assertions on (no NDEBUG): every method, the constructor
    (which releases the GIL) included, runs on temporaries without a refcount change outside the GIL.
    A by-value array argument aborted here with 'dec_ref() PyGILState_Check() failure'."""
    import shutil
    import subprocess
    import sys
    import sysconfig

    import pybind11

    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / f"_trie{sysconfig.get_config_var('EXT_SUFFIX')}"
    subprocess.run([cxx, "-O0", "-UNDEBUG", "-shared", "-fPIC", "-std=c++17", f"-I{pybind11.get_include()}",
                    f"-I{sysconfig.get_paths()['include']}", str(root / "csrc" / "trie.cpp"), "-o", str(out)],
                   check=True, capture_output=True, timeout=300)
    code = (
        "import numpy as np, _trie\n"
        "for _ in range(50):\n"
        "    t = _trie.Trie(np.array([[0, 1], [1, 0], [1, 1]], dtype=np.int32), [2, 2], np.arange(3), False)\n"
        "    assert list(t.allowed([1])) == [0, 1] and t.num_items() == 3\n"
        "    t.lookup(np.array([[1, 0], [0, 0]], dtype=np.int32)); t.leaf_items(0); t.order()\n"
        "    assert t.error() == ''\n"
        # bad input comes back as values, never as a C++ exception through the binding
        "    assert t.allowed([1, 1, 0]) is None and t.allowed([5]) is None and t.allowed([0, 0]) is None\n"
        "    assert t.leaf_items(99) is None and t.num_nodes(7) == -1 and t.max_branch(-1) == -1\n"
        "    assert t.lookup(np.zeros((2, 3), dtype=np.int32)) is None and len(t.indptr(9)) == 0\n"
        "    bad = _trie.Trie(np.array([[0, 5]], dtype=np.int32), [2, 2], np.arange(1), False)\n"
        "    assert 'out of range' in bad.error() and bad.allowed([]) is None\n"
        "    dup = _trie.Trie(np.array([[0, 1], [0, 1]], dtype=np.int32), [2, 2], np.arange(2), False)\n"
        "    assert 'duplicate SIDs' in dup.error()\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_trie_owns_its_inputs_and_answers_for_any_integer_code(tmp_path):
    codes = np.array([[0, 1], [1, 0]], dtype=np.int32)
    ids = np.array([10, 11], dtype=np.int64)
    t = SIDTrie(codes, 2, item_ids=ids)
    codes[0] = [1, 1]  # the caller's arrays change afterwards: neither the trie nor its file follow
    ids[:] = 99
    t.save(tmp_path / "t.trie")
    again = SIDTrie.load(tmp_path / "t.trie")
    for tr in (t, again):
        assert tr.contains([[0, 1]]).tolist() == [True] and tr.contains([[1, 1]]).tolist() == [False]
        assert tr.items([0, 1]).tolist() == [10]
    # codes beyond int32 or below 0 are in no codebook: not found, never an error
    assert t.contains(np.array([[0, 2 ** 40], [-5, 0], [1, 0]])).tolist() == [False, False, True]
    with pytest.raises(KeyError):
        t.items([0, 2 ** 40])
