"""benches/bench_rq.py runs on CPU with its checks passing (same codes and reconstruction error as
cdist + argmin), and a wrong op makes it print FAILED lines, record them in the JSON and exit 1."""
import json
import sys
from pathlib import Path

BENCHES = Path(__file__).resolve().parent.parent / "benches"


def _run(tmp_path, monkeypatch, perturb=False, rows=None):
    monkeypatch.syspath_prepend(str(BENCHES))
    monkeypatch.delenv("OUT", raising=False)
    import bench_rq

    try:
        if perturb:  # ours picks another last-level code for 5 % of the rows and reconstructs them worse
            real = bench_rq.residual_quantize

            def wrong(x, codebooks):
                codes, xhat = real(x, codebooks)
                codes, xhat, bad = codes.clone(), xhat.clone(), slice(0, len(x) // 20)
                codes[bad, -1] = (codes[bad, -1] + 1) % codebooks.shape[1]
                xhat[bad] += 0.5
                return codes, xhat

            monkeypatch.setattr(bench_rq, "residual_quantize", wrong)
        out = tmp_path / "rq.json"
        rc = bench_rq.main(["--device", "cpu", "--json", str(out)] + (["--rows", str(rows)] if rows else []))
    finally:
        sys.modules.pop("bench_rq", None)
    return rc, json.loads(out.read_text())


def test_bench_rq_cpu_checks_pass(tmp_path, monkeypatch):
    rc, payload = _run(tmp_path, monkeypatch)
    assert rc == 0
    r, = payload["rows"]
    assert r["setting"] == "cpu_100k_fp32" and r["N"] == 100_000
    assert r["same_codes"] >= 0.99 and r["mse_ours"] <= r["mse_cdist"] * (1 + 1e-3)
    assert r["ours_ms"] > 0 and r["cdist_ms"] > 0
    assert payload["failed"] == []
    assert [(c["metric"], c["ok"]) for c in payload["checks"]] == [("same_codes", True), ("mse_ours", True)]


def test_bench_rq_gate_fires_on_wrong_codes(tmp_path, monkeypatch, capsys):
    rc, payload = _run(tmp_path, monkeypatch, perturb=True, rows=20_000)
    assert rc == 1
    failed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 2 and failed == payload["failed"]
    assert failed[0].startswith("FAILED cpu_100k_fp32 same_codes = 0.95 (threshold: >= 0.99)")
    assert failed[1].startswith("FAILED cpu_100k_fp32 mse_ours = ")
    assert [c["ok"] for c in payload["checks"]] == [False, False]
