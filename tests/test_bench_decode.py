"""benches/bench_decode.py runs on CPU, prints the floor with L and with L-1 cached steps and the shared-prefix
column, and its checks (same ranking as HF in fp32, no invalid SID, the shared-prefix path ranking as ours)
pass; the gates themselves fire on a bad row; the roofline model equals a hand count."""
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHES = Path(__file__).resolve().parent.parent / "benches"


def test_bench_decode_cpu_checks_pass(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHES))
    monkeypatch.delenv("OUT", raising=False)
    import bench_decode

    out = tmp_path / "decode.json"
    threads = torch.get_num_threads()  # the bench pins 1 thread; give the rest of the session its threads back
    try:
        assert bench_decode.main(["--device", "cpu", "--json", str(out), "--emulate-graphs"]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "floor_search_steps_users_per_s" in printed and "ours_over_floor_search_steps" in printed
    assert "ours_shared_users_per_s" in printed and "pct_roofline_ours_shared" in printed
    # --emulate-graphs: the GPU-only graph variants ran (no capture) and were compared and checked
    assert "ours_search_graphs_over_ours_graphs" in printed and "pct_roofline_ours_shared_search_graphs" in printed
    assert "FAILED" not in printed
    payload = json.loads(out.read_text())
    rows = payload["rows"]
    assert [r["setting"] for r in rows] == ["cpu_32x20_3k"]
    r = rows[0]
    for key in ("hf_constrained_users_per_s", "floor_users_per_s", "floor_search_steps_users_per_s",
                "ours_users_per_s", "ours_over_floor", "ours_over_floor_search_steps"):
        assert r[key] > 0, key
    assert r["same_ranking_as_hf"] == 1.0 and r["same_set_as_hf"] == 1.0 and r["invalid_rate"] == 0.0
    assert r["ours_shared_users_per_s"] > 0 and r["shared_same_ranking_as_hf"] == 1.0
    assert r["roofline_ms"] == "n/a" and r["pct_roofline_ours"] == "n/a" and r["roofline_gflop"] > 0  # CPU: no peaks
    assert payload["failed"] == []
    assert r["search_graphs_same_ranking_as_ours"] == 1.0 and r["shared_search_graphs_same_ranking_as_hf"] == 1.0
    assert r["ours_shared_search_graphs_over_ours_graphs"] > 0
    assert {(c["metric"], c["ok"]) for c in payload["checks"]} == {
        ("invalid_rate", True), ("same_ranking_as_hf", True), ("graphs_same_ranking_as_ours", True)} | {
        (f"{key}_{m}", True) for key in ("shared", "shared_graphs", "search_graphs", "shared_search_graphs")
        for m in ("invalid_rate", "same_ranking_as_ours")}
    # the one-table summary benches/run_gpu.sh ends with, from this JSON
    capsys.readouterr()
    try:
        assert bench_decode.main(["--summary", str(out)]) == 0
    finally:
        sys.modules.pop("bench_decode", None)
    summary = capsys.readouterr().out
    assert "| shared graphs/graphs" in summary and "| search graph/graphs" in summary
    assert "cpu_32x20_3k | float32" in summary and "n/a" in summary


def test_a_crashing_fast_path_is_reported_and_the_others_timed(monkeypatch, capsys):
    """A fast path (graph capture, shared prefix) that crashes in its warm-up is reported and left out; the
    other methods are timed as usual; a crash of ours or of a baseline stops the bench."""
    monkeypatch.syspath_prepend(str(BENCHES))
    import bench_decode

    calls = []

    def boom():
        raise RuntimeError("capture failed")

    methods = {"ours": (lambda: calls.append("ours"), 2), "ours_graphs": (boom, 2)}
    try:
        times, errors = bench_decode.time_methods("s", methods, torch.device("cpu"))
        assert list(times) == ["ours"] and len(times["ours"]) == 2 and calls == ["ours"] * 3  # warm-up + 2
        assert errors == {"ours_graphs": "RuntimeError: capture failed"}
        assert list(methods) == ["ours", "ours_graphs"]  # the caller's dict is left as it was
        assert "s: ours_graphs failed: RuntimeError: capture failed" in capsys.readouterr().err
        with pytest.raises(RuntimeError, match="capture failed"):
            bench_decode.time_methods("s", {"ours": (boom, 1)}, torch.device("cpu"))
    finally:
        sys.modules.pop("bench_decode", None)


def test_a_crashing_setting_is_failed_and_a_cut_run_leaves_a_partial_json(monkeypatch, tmp_path, capsys):
    """A setting that crashes is FAILED and the next ones still run; after each setting but the last the JSON holds
    the rows so far, marked partial with the settings left, so a run its time cap cuts still has a summary (which
    says PARTIAL and exits 1)."""
    monkeypatch.syspath_prepend(str(BENCHES))
    monkeypatch.delenv("OUT", raising=False)
    import bench_decode

    out = tmp_path / "decode.json"
    settings = {f"cpu_{i}": ("cpu", 2, 2, 10, 4, 1, 1) for i in range(3)}
    seen = []

    def fake_run(name, device, spec, emulate):
        seen.append((name, json.loads(out.read_text()) if out.exists() else None))
        if name == "cpu_1":
            raise torch.cuda.OutOfMemoryError("no room")
        return dict(setting=name, device="cpu", dtype="float32", invalid_rate=0.0, same_ranking_as_hf=1.0,
                    same_set_as_hf=1.0, users=2, beams=2, items=10)

    monkeypatch.setattr(bench_decode, "SETTINGS", settings)
    monkeypatch.setattr(bench_decode, "run_setting", fake_run)
    threads = torch.get_num_threads()
    try:
        assert bench_decode.main(["--device", "cpu", "--json", str(out)]) == 1
        assert [name for name, _ in seen] == ["cpu_0", "cpu_1", "cpu_2"]
        assert seen[0][1] is None
        after_0, after_1 = seen[1][1], seen[2][1]
        assert [r["setting"] for r in after_0["rows"]] == ["cpu_0"] and after_0["partial"] is True
        assert after_0["settings_left"] == ["cpu_1", "cpu_2"] and after_0["failed"] == []
        assert after_1["settings_left"] == ["cpu_2"]
        assert after_1["failed"] == ["FAILED cpu_1: OutOfMemoryError: no room"]
        final = json.loads(out.read_text())
        assert [r["setting"] for r in final["rows"]] == ["cpu_0", "cpu_2"] and "partial" not in final
        assert final["failed"] == ["FAILED cpu_1: OutOfMemoryError: no room"]
        assert "cpu_1 failed: OutOfMemoryError: no room" in capsys.readouterr().err
        cut = tmp_path / "cut.json"
        cut.write_text(json.dumps(after_0))
        assert bench_decode.main(["--summary", str(cut)]) == 1
        assert "PARTIAL run: not run: cpu_1, cpu_2" in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop("bench_decode", None)


def test_summary_reads_issue_14_targets_and_default_candidates(monkeypatch, tmp_path, capsys):
    """The summary's targets table picks each GPU setting's fastest path over the graph path and says whether the
    speed, roofline and SID targets are met; a fast path is a default candidate only when faster with >= 99 % the
    same SIDs in every setting; missing numbers say so."""
    monkeypatch.syspath_prepend(str(BENCHES))
    import bench_decode

    def row(setting, shared, search, both, pct, same=1.0):
        return {"setting": setting, "dtype": "bfloat16", "device": "H100",
                "ours_shared_graphs_over_ours_graphs": shared, "ours_search_graphs_over_ours_graphs": search,
                "ours_shared_search_graphs_over_ours_graphs": both, "shared_graphs_same_set_as_ours": same,
                "search_graphs_same_set_as_ours": 1.0, "shared_search_graphs_same_set_as_ours": same,
                "pct_roofline_ours_shared_search_graphs": pct, "pct_roofline_ours_search_graphs": pct / 2,
                "pct_roofline_ours_shared_graphs": pct / 3}

    try:
        rows = [row("gpu_8x50_3.7k", 1.5, 1.2, 2.5, 20.0), row("gpu_64x16_3.7k", 2.0, 1.4, 3.2, 38.0),
                row("gpu_256x20_200k", 1.1, 0.9, 3.5, 30.0, same=0.985)]
        got = {t["setting"]: t for t in bench_decode.target_rows(rows)}
        assert {k: (t["best fast path"], t["met"]) for k, t in got.items()} == {
            "gpu_8x50_3.7k": ("ours_shared_search_graphs", "yes"),
            "gpu_64x16_3.7k": ("ours_shared_search_graphs", "no"),  # 38 % < 40 % of the roofline
            "gpu_256x20_200k": ("ours_shared_search_graphs", "no")}  # 98.5 % same SIDs
        cands = {c["fast path"]: c["default candidate"] for c in bench_decode.default_candidates(rows)}
        assert cands == {"ours_shared_graphs": "no", "ours_search_graphs": "no", "ours_shared_search_graphs": "no"}
        rows[2]["shared_graphs_same_set_as_ours"] = rows[2]["shared_search_graphs_same_set_as_ours"] = 0.995
        rows[1]["pct_roofline_ours_shared_search_graphs"] = 41.0
        assert all(t["met"] == "yes" for t in bench_decode.target_rows(rows))
        cands = {c["fast path"]: c["default candidate"] for c in bench_decode.default_candidates(rows)}
        assert cands == {"ours_shared_graphs": "yes", "ours_search_graphs": "no", "ours_shared_search_graphs": "yes"}
        del rows[0]["ours_search_graphs_over_ours_graphs"]
        assert bench_decode.default_candidates(rows)[1]["default candidate"] == "no numbers"
        path = tmp_path / "decode.json"
        path.write_text(json.dumps({"rows": rows, "failed": []}))
        capsys.readouterr()
        assert bench_decode.main(["--summary", str(path)]) == 0
        text = capsys.readouterr().out
        assert "issue 14 targets" in text and "default candidates" in text
    finally:
        sys.modules.pop("bench_decode", None)


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
        shared = dict(good, shared_invalid_rate=0.0, shared_same_ranking_as_ours=0.5, shared_same_set_as_ours=0.995,
                      shared_graphs_invalid_rate=0.02, shared_graphs_same_ranking_as_ours=1.0,
                      shared_graphs_same_set_as_ours=0.97)
        assert bench_decode.check_rows([shared]).failed() == [
            "FAILED s shared_graphs_invalid_rate = 0.02 (threshold: == 0)",
            "FAILED s shared_graphs_same_set_as_ours = 0.97 (threshold: >= 0.99)"]
        search = dict(good, search_graphs_invalid_rate=0.0, search_graphs_same_ranking_as_ours=0.2,
                      search_graphs_same_set_as_ours=0.985, shared_search_graphs_invalid_rate=0.0,
                      shared_search_graphs_same_ranking_as_ours=0.2, shared_search_graphs_same_set_as_ours=0.99)
        assert bench_decode.check_rows([search]).failed() == [  # bf16: the sets, 0.99 for every fast path
            "FAILED s search_graphs_same_set_as_ours = 0.985 (threshold: >= 0.99)"]
        assert bench_decode.check_rows([dict(shared, dtype="float32", same_ranking_as_hf=1.0,
                                             graphs_same_ranking_as_ours=1.0)]).failed() == [
            "FAILED s shared_same_ranking_as_ours = 0.5 (threshold: == 1)",
            "FAILED s shared_graphs_invalid_rate = 0.02 (threshold: == 0)"]
    finally:
        sys.modules.pop("bench_decode", None)


def test_roofline_by_hand_and_device_peaks(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHES))
    from types import SimpleNamespace

    import bench_decode

    try:
        # h 8, 1 layer, 2 heads of 4 on 1 K/V head, MLP 16, V 10: N = 64 + 64 + 64 + 384 = 576 weights per layer;
        # prompts of 3 and 1 tokens (S 4), 2 beams (R 4), 2 levels, 2 bytes per value
        cfg = SimpleNamespace(hidden_size=8, num_hidden_layers=1, vocab_size=10, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=4, intermediate_size=16)
        r = bench_decode.roofline(cfg, [3, 1], beams=2, levels=2, value_bytes=2, peaks=(1000.0, 100.0))
        # prefill 2*576*4 + 4*2*4*(6 + 1) = 4832 FLOPs, 2*(576 + 2*4*4) = 1216 bytes;
        # step 2*576*4 + 4*2*4*(2*4 + 4*1) = 4992 FLOPs, 2*(576 + 8*(4 + 4 + 4)) = 1344 bytes;
        # heads 2*8*10*2 = 320 and 2*8*10*4 = 640 FLOPs, 160 bytes each
        assert r["flops"] == 10784 and r["bytes"] == 2880
        assert abs(r["seconds"] - (12.16 + 13.44 + 1.6 + 1.6)) < 1e-9  # every phase bandwidth-bound here
        assert bench_decode.roofline(cfg, [3, 1], 2, 2, 2, None)["seconds"] is None
        peaks = bench_decode.device_peaks
        assert peaks("NVIDIA H100 80GB HBM3", torch.bfloat16) == (989e12, 3.35e12)
        assert peaks("NVIDIA H100 PCIe", torch.float16) == (756e12, 2.0e12)
        assert peaks("NVIDIA H200", torch.bfloat16) == (989e12, 4.8e12)
        assert peaks("NVIDIA H100 80GB HBM3", torch.float32) is None and peaks("cpu", torch.bfloat16) is None
    finally:
        sys.modules.pop("bench_decode", None)


def test_run_gpu_script_parses_and_dry_runs(tmp_path):
    """benches/run_gpu.sh is valid bash and its dry run lists the GPU tests (the interpreter-only ones included),
    the decode bench and the summary, without touching $OUT."""
    import subprocess

    script = BENCHES / "run_gpu.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(script)], env={"PATH": "/usr/bin:/bin", "DRY_RUN": "1", "OUT": str(out)},
                         capture_output=True, text=True, check=True)
    lines = res.stdout.splitlines()
    assert lines[0] == "DRY RUN: steps: install tests beam decode rl summary"
    assert all(f"tests/test_{name}.py" in lines[1] for name in ("cascade_attention", "decode_shared_prefix",
                                                                "decode_search_graph", "lse", "sdpo_logprobs"))
    assert lines[1].startswith("tests: timeout 230 ")
    assert lines[2].startswith("bench_beam: timeout 60 ") and "--device cuda" in lines[2]
    assert lines[3].startswith("bench_decode: timeout 240 ") and "--device cuda" in lines[3]
    assert lines[4].startswith("bench_rl: timeout 40 ") and "--device cuda" in lines[4]
    assert lines[5].startswith("summary:") and not out.exists()
    caps = [int(line.split("timeout ")[1].split()[0]) for line in lines[1:5]]
    assert 15 + sum(caps) <= 590  # the default run's worst case fits one 10-minute device call
    bad = subprocess.run(["bash", str(script)], env={"PATH": "/usr/bin:/bin", "DRY_RUN": "1", "OUT": str(out),
                                                    "BENCHES": "nope"}, capture_output=True, text=True)
    assert bad.returncode == 1 and "FAILED bench_nope (no such bench)" in bad.stdout


def test_profile_decode_cpu_smoke(tmp_path, monkeypatch):
    """benches/profile_decode.py runs its CPU path (emulated graphs, both graph scopes) and writes its row."""
    monkeypatch.syspath_prepend(str(BENCHES))
    monkeypatch.delenv("OUT", raising=False)
    import profile_decode

    out = tmp_path / "profile.json"
    threads = torch.get_num_threads()
    try:
        assert profile_decode.main(["--device", "cpu", "--repeat", "1", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop("profile_decode", None)
        sys.modules.pop("bench_decode", None)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["setting"] == "cpu_32x20_3k"
    for key in ("search_ms", "eager_search_ms", "lse_ms", "search_graph_ms"):
        assert row[key] > 0, key
