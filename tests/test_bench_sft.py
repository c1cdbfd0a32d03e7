"""benches/bench_sft.py runs on CPU (eager only, one round) and its check passes: our first-batch loss
equals the padded HF baseline's (fp32: relative difference <= 1e-4)."""
import json
import sys
from pathlib import Path

import torch

BENCHES = Path(__file__).resolve().parent.parent / "benches"


def test_bench_sft_cpu_same_loss_as_hf(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHES))
    monkeypatch.delenv("OUT", raising=False)
    import bench_sft

    out = tmp_path / "sft.json"
    threads = torch.get_num_threads()  # the bench pins 1 thread on CPU
    try:
        assert bench_sft.main(["--device", "cpu", "--compile-modes", "--rounds", "1", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop("bench_sft", None)
    payload = json.loads(out.read_text())
    assert not payload["bf16"]
    assert [r["step"] for r in payload["rows"]] == ["HF padded, full-vocab CE", "ours packed, response-only CE"]
    assert all(r["tokens/s"] > 0 for r in payload["rows"])
    assert set(payload["loss_first_batch"]) == {"HF padded, full-vocab CE", "ours packed, response-only CE"}
    assert payload["loss_rel_diff_vs_baseline"]["ours packed, response-only CE"] <= 1e-4
    assert payload["failed"] == []
    c, = payload["checks"]
    assert (c["metric"], c["threshold"], c["ok"]) == ("loss_rel_diff_vs_baseline", 1e-4, True)


def test_bench_sft_reports_a_compiled_variant_that_crashes_and_times_the_rest(tmp_path, monkeypatch, capsys):
    """A compiled variant failing at its compile (first forward) or while its first round runs (CUDA graphs
    are recorded there) is FAILED with its error, left out of the table, and the eager variants stand."""
    monkeypatch.syspath_prepend(str(BENCHES))
    monkeypatch.delenv("OUT", raising=False)
    import bench_sft

    real = bench_sft.ResponseLoss

    def fake_loss(model, compile=False, compile_mode=None):
        if not compile:
            return real(model)
        eager, calls = real(model), []
        fail_after = 0 if compile_mode is None else 1  # "default": at compile; "reduce-overhead": in round 0

        def loss(batch):
            calls.append(1)
            if len(calls) > fail_after:
                raise RuntimeError(f"boom {compile_mode}")
            return eager(batch)
        return loss

    monkeypatch.setattr(bench_sft, "ResponseLoss", fake_loss)
    out = tmp_path / "sft.json"
    threads = torch.get_num_threads()
    try:
        assert bench_sft.main(["--device", "cpu", "--compile-modes", "default", "reduce-overhead", "--rounds", "1",
                               "--json", str(out)]) == 1
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop("bench_sft", None)
    payload = json.loads(out.read_text())
    assert [r["step"] for r in payload["rows"]] == ["HF padded, full-vocab CE", "ours packed, response-only CE"]
    assert payload["errors"] == {"ours + torch.compile": "RuntimeError: boom None",
                                 "ours + torch.compile (reduce-overhead)": "RuntimeError: boom reduce-overhead"}
    assert sorted(payload["failed"]) == ["FAILED ours + torch.compile (reduce-overhead): RuntimeError: boom "
                                         "reduce-overhead", "FAILED ours + torch.compile: RuntimeError: boom None"]
    # the one that compiled has its first-batch loss checked like the eager one
    assert set(payload["loss_rel_diff_vs_baseline"]) == {"ours packed, response-only CE",
                                                         "ours + torch.compile (reduce-overhead)"}
    assert all(c["ok"] for c in payload["checks"])
    assert "FAILED ours + torch.compile: RuntimeError: boom None" in capsys.readouterr().out
