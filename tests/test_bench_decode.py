"""benches/bench_decode.py runs on CPU, prints the floor with L and with L-1 cached steps, and its checks
(same ranking as HF in fp32, no invalid SID) pass; the gates themselves fire on a bad row."""
import json
import sys
from pathlib import Path

import torch

BENCHES = Path(__file__).resolve().parent.parent / "benches"


def test_bench_decode_cpu_checks_pass(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHES))
    monkeypatch.delenv("OUT", raising=False)
    import bench_decode

    out = tmp_path / "decode.json"
    threads = torch.get_num_threads()  # the bench pins 1 thread; give the rest of the session its threads back
    try:
        assert bench_decode.main(["--device", "cpu", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop("bench_decode", None)
    printed = capsys.readouterr().out
    assert "floor_search_steps_users_per_s" in printed and "ours_over_floor_search_steps" in printed
    assert "FAILED" not in printed
    payload = json.loads(out.read_text())
    rows = payload["rows"]
    assert [r["setting"] for r in rows] == ["cpu_32x20_3k"]
    r = rows[0]
    for key in ("hf_constrained_users_per_s", "floor_users_per_s", "floor_search_steps_users_per_s",
                "ours_users_per_s", "ours_over_floor", "ours_over_floor_search_steps"):
        assert r[key] > 0, key
    assert r["same_ranking_as_hf"] == 1.0 and r["same_set_as_hf"] == 1.0 and r["invalid_rate"] == 0.0
    assert payload["failed"] == []
    assert {(c["metric"], c["ok"]) for c in payload["checks"]} == {("invalid_rate", True), ("same_ranking_as_hf", True)}


def test_bench_decode_gates_fire(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHES))
    import bench_decode

    try:
        good = dict(setting="s", dtype="bfloat16", invalid_rate=0.0, same_ranking_as_hf=0.3, same_set_as_hf=0.99,
                    graphs_same_ranking_as_ours=0.9, graphs_same_set_as_ours=0.995)
        assert bench_decode.check_rows([good]).failed() == []  # bf16: the sets count, not the rankings
        bad = dict(good, invalid_rate=0.01, same_set_as_hf=0.9, graphs_same_set_as_ours=0.98)
        failed = bench_decode.check_rows([bad]).failed()
        assert [line.split()[2] for line in failed] == ["invalid_rate", "same_set_as_hf", "graphs_same_set_as_ours"]
        assert failed[1] == "FAILED s same_set_as_hf = 0.9 (threshold: >= 0.95)"
        fp32 = dict(good, dtype="float32", same_ranking_as_hf=0.97, errors={"ours_graphs": "RuntimeError: x"})
        assert bench_decode.check_rows([fp32]).failed() == [
            "FAILED s ours_graphs: RuntimeError: x", "FAILED s same_ranking_as_hf = 0.97 (threshold: == 1)",
            "FAILED s graphs_same_ranking_as_ours = 0.9 (threshold: == 1)"]
    finally:
        sys.modules.pop("bench_decode", None)
