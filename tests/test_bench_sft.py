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
