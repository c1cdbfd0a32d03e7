"""benches/bench_rl.py runs on CPU (1 thread) and its checks pass: our rollout groups, default and with the shared
prefix, hold the same SIDs as HF's constrained generate on the same weights (fp32: every group), all of them SIDs of
the catalogue."""
import json
import sys
from pathlib import Path

import torch

BENCHES = Path(__file__).resolve().parent.parent / "benches"


def test_bench_rl_cpu_same_groups_as_hf(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHES))
    monkeypatch.delenv("OUT", raising=False)
    import bench_rl

    out = tmp_path / "rl.json"
    threads = torch.get_num_threads()
    try:
        assert bench_rl.main(["--device", "cpu", "--json", str(out)]) == 0
        assert torch.get_num_threads() == 1  # pinned like bench_decode / bench_beam
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop("bench_rl", None)
    payload = json.loads(out.read_text())
    r, = payload["rows"]
    assert r["dtype"] == "float32" and r["rollout_s_ours"] > 0 and r["rollout_s_hf_callback"] > 0
    assert r["same_set_groups_as_hf"] == 1.0 and r["same_set_as_hf"] == 1.0 and r["invalid_rate"] == 0.0
    # the shared-prefix rollout: timed beside ours, the same groups, gated as ours
    assert r["rollout_s_ours_shared"] > 0 and r["shared_over_ours"] == r["rollout_s_ours"] / r["rollout_s_ours_shared"]
    assert r["shared_same_set_groups_as_hf"] == 1.0 and r["shared_invalid_rate"] == 0.0
    # the update as the trainer runs it (each prompt once) and with repeated prompts, timed, the same log-probs
    assert r["update_s"] > 0 and r["update_speedup_grouped"] == r["update_s_repeated_prompts"] / r["update_s"]
    assert r["grouped_logp_max_abs_diff"] <= 1e-4
    assert payload["failed"] == []
    assert [(c["metric"], c["ok"]) for c in payload["checks"]] == [
        ("grouped_logp_max_abs_diff", True), ("invalid_rate", True), ("same_set_groups_as_hf", True),
        ("shared_invalid_rate", True), ("shared_same_set_groups_as_hf", True)]


def test_bench_rl_reports_a_rollout_variant_that_crashes(tmp_path, monkeypatch):
    """One of our other rollouts crashing (a graph capture on the GPU, say) is FAILED with its error; ours, HF's,
    the update and the other rollouts are still timed, compared and checked."""
    monkeypatch.syspath_prepend(str(BENCHES))
    monkeypatch.delenv("OUT", raising=False)
    import bench_rl

    monkeypatch.setitem(bench_rl.SETTINGS, "cpu", (2, 4, 300, 16, 1, 1))
    monkeypatch.setitem(bench_rl.VARIANTS, "cpu", {"graphs": {"graph_scope": "nowhere"},
                                                   "shared": {"shared_prefix": True}})
    out = tmp_path / "rl.json"
    threads = torch.get_num_threads()
    try:
        assert bench_rl.main(["--device", "cpu", "--json", str(out)]) == 1
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop("bench_rl", None)
    payload = json.loads(out.read_text())
    r, = payload["rows"]
    assert set(r["errors"]) == {"graphs"} and r["errors"]["graphs"].startswith("ValueError: beam_search: graph_scope")
    assert payload["failed"] == [f"FAILED rl_2x4_float32 graphs: {r['errors']['graphs']}"]
    assert "rollout_s_ours_graphs" not in r and "graphs_invalid_rate" not in r
    assert r["rollout_s_ours_shared"] > 0 and r["shared_same_set_groups_as_hf"] == 1.0 and r["update_s"] > 0
    assert all(c["ok"] for c in payload["checks"])
