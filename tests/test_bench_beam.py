"""benches/bench_beam.py runs on CPU and its step (ours) picks the same beams as HF's own
PrefixConstrainedLogitsProcessor step on the same hidden states."""
import json
import os
import sys
from pathlib import Path

import torch

BENCHES = Path(__file__).resolve().parent.parent / "benches"


def test_bench_beam_cpu_same_beams_as_hf(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHES))
    monkeypatch.delenv("OUT", raising=False)
    import bench_beam

    out = tmp_path / "beam.json"
    threads = torch.get_num_threads()  # the bench pins 1 thread; give the rest of the session its threads back
    try:
        # --kernels: each Triton kernel against its reference, in the interpreter (conftest sets
        # TRITON_INTERPRET=1 when there is no GPU; on a GPU machine the kernels need CUDA tensors)
        kernels = os.environ.get("TRITON_INTERPRET") == "1"
        args = ["--device", "cpu", "--repeat", "2", "--json", str(out)] + (["--kernels"] if kernels else [])
        assert bench_beam.main(args) == 0
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop("bench_beam", None)
    rows = json.loads(out.read_text())["steps"]
    assert [r["setting"] for r in rows] == ["cpu_32x20_3k"]
    r = rows[0]
    assert r["same_beams_as_hf"] == 1.0 and r["same_beams_up_to_ties"] == 1.0
    assert r["max_score_diff"] < 1e-4
    payload = json.loads(out.read_text())
    assert payload["failed"] == [] and all(c["ok"] for c in payload["checks"])
    gates = [c["metric"] for c in payload["checks"]]
    assert gates == ["max_score_diff", "same_beams_as_hf"] + (["same", "max_abs_diff"] * 3 if kernels else [])
    assert r["ours_full_vocab_ms"] > 0 and r["hf_processor_ms"] > 0
    if kernels:
        rows = json.loads(out.read_text())["kernels"]
        assert [k["op"] for k in rows] == ["trie_log_softmax", "grouped_topk", "lm_head_lse"]
        assert all(k["same"] == 1.0 for k in rows) and all(k["max_abs_diff"] < 1e-4 for k in rows)
        assert rows[2]["torch_max_abs_diff"] < 1e-4  # fp32: the reference's logits are fp32 too
