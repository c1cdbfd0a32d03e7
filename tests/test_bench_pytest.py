"""benches/test_cpu_benchmarks.py (`make bench-pytest`): the CPU micro-benchmarks under pytest-benchmark save
a run with each bench's same-run ratio to its baseline, and a bench fails when ours computes something else
than its baseline."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY = "benches/test_cpu_benchmarks.py"

WRONG_RQ = '''
import sys
sys.path.insert(0, {benches!r})
import bench_rq

real = bench_rq.residual_quantize


def wrong(x, codebooks):  # another last-level code for 5 % of the rows, reconstructed worse
    codes, xhat = real(x, codebooks)
    codes, xhat, bad = codes.clone(), xhat.clone(), slice(0, len(x) // 20)
    codes[bad, -1] = (codes[bad, -1] + 1) % codebooks.shape[1]
    xhat[bad] += 0.5
    return codes, xhat


bench_rq.residual_quantize = wrong
'''


def _pytest(tmp_path, *args, pythonpath=""):
    # PYTEST_XDIST_* (this run under pytest-xdist) would make the inner run a worker: no benchmark is saved
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (pythonpath, os.environ.get("PYTHONPATH", "")) if p))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", ENTRY, *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def test_the_benchmarks_run_and_save_their_ratios(tmp_path):
    store = tmp_path / "store"
    proc = _pytest(tmp_path, f"--benchmark-storage={store}", "--benchmark-autosave")
    assert proc.returncode == 0 and "3 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved, = store.rglob("*.json")
    runs = {b["name"]: b for b in json.loads(saved.read_text())["benchmarks"]}
    assert sorted(runs) == ["test_beam_level_step_vs_hf", "test_residual_quantize_vs_cdist",
                            "test_trie_build_vs_dict_trie"]
    ratios = {"test_trie_build_vs_dict_trie": "build speedup", "test_residual_quantize_vs_cdist": "speedup",
              "test_beam_level_step_vs_hf": "ours_over_hf_processor"}
    for name, key in ratios.items():
        run = runs[name]
        assert run["stats"]["rounds"] == 5 and run["stats"]["median"] > 0
        assert run["extra_info"][key] > 0, (name, run["extra_info"])
    assert runs["test_residual_quantize_vs_cdist"]["extra_info"]["same_codes"] >= 0.99
    assert runs["test_beam_level_step_vs_hf"]["extra_info"]["same_beams_as_hf"] == 1.0
    # the same run's ours timing is what the fixture measured
    rq = runs["test_residual_quantize_vs_cdist"]
    assert rq["extra_info"]["ours_ms"] == rq["stats"]["median"] * 1e3


def test_a_benchmark_fails_when_ours_computes_something_else(tmp_path):
    (tmp_path / "wrong_rq.py").write_text(WRONG_RQ.format(benches=str(ROOT / "benches")))
    proc = _pytest(tmp_path, "--benchmark-disable", "-p", "wrong_rq", pythonpath=str(tmp_path))
    out = proc.stdout
    assert proc.returncode == 1 and "1 failed, 2 passed" in out, out[-3000:] + proc.stderr[-3000:]
    assert "FAILED cpu_100k_fp32 same_codes = 0.95 (threshold: >= 0.99)" in out
    assert "test_residual_quantize_vs_cdist" in out
