"""benches/bench_trie.py runs (small sizes) and its checks pass: the C++ trie answers allowed() as the
Python dict baseline does and contains every SID; a --dict-size outside --sizes is an error."""
import json
import sys
from pathlib import Path

import pytest

BENCHES = Path(__file__).resolve().parent.parent / "benches"


def test_bench_trie_small_same_as_dict(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHES))
    monkeypatch.delenv("OUT", raising=False)
    import bench_trie

    out = tmp_path / "trie.json"
    try:
        assert bench_trie.main(["--sizes", "20000", "50000", "--dict-size", "20000", "--queries", "3000",
                                "--repeat", "1", "--json", str(out)]) == 0
        with pytest.raises(SystemExit):
            bench_trie.main(["--sizes", "1000", "--dict-size", "5"])
    finally:
        sys.modules.pop("bench_trie", None)
    payload = json.loads(out.read_text())
    small = payload["sizes"]["20000"]
    assert small["same allowed as dict"] == 1.0 and small["allowed speedup"] > 0 and small["build speedup"] > 0
    assert "dict build s" not in payload["sizes"]["50000"]
    assert payload["failed"] == [] and [c["ok"] for c in payload["checks"]] == [True, True]
