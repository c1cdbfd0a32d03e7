"""Where the time of one constrained beam search goes (a diagnostic, not a ratio bench).

Per setting of bench_decode (same model, catalogue and prompts): the median wall time of
``beam_search(cuda_graphs=True)``; then, from the captured graph set, the replay time of the
prefill graph and of each level's step graph alone; the full-vocabulary log-sum-exp alone at each
level's row count (on a GPU also the fused Triton one, ``lse_fused_ms``); and the rest (beam ops, trie steps,
host work) by difference. Then the same search with
graph_scope="search" (forwards and scoring captured as one graph): its wall time, and on a GPU the replay of
that one graph alone (its host share by difference). With --trace, the torch.profiler tables (GPU time by op,
host time by op) of a few searches.

  python benches/profile_decode.py [--device cuda] [--settings gpu_8x50_3.7k,...] [--trace] [--shared-prefix]
(--shared-prefix: both searches with shared_prefix=True, the prompt K/V once per prompt.)
On CPU (tiny model) it runs cuda_graphs="emulate", only as a smoke test of this script.
"""
from __future__ import annotations

import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from genrec_fast import SIDTrie  # noqa: E402
from genrec_fast.decode import beam_search, graphs  # noqa: E402
from genrec_fast.decode.search import full_vocab_lse  # noqa: E402
from genrec_fast.ops.lse import lm_head_lse  # noqa: E402

import bench_decode as bd  # noqa: E402
from common import bench_parser, pick_settings, print_table, sync, write_json  # noqa: E402


def median_time(fn, device, repeat: int) -> float:
    fn()
    sync(device)
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def run(name: str, device: torch.device, spec: dict, repeat: int, trace: bool, shared_prefix: bool = False) -> dict:
    _, users, beams, items, length, _, _ = bd.SETTINGS[name]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model, vocab = bd.build_model(spec, device, dtype)
    trie = SIDTrie(bd.random_catalogue(items, seed=1), bd.SIZES)
    ids, mask = bd.prompts(users, length, spec["base_vocab"], device, seed=2)
    mode = True if device.type == "cuda" else "emulate"
    row = {"setting": name, "users": users, "beams": beams, "shared_prefix": shared_prefix}
    with torch.inference_mode():
        search = functools.partial(beam_search, model, ids, mask, trie, vocab, beams, cuda_graphs=mode,
                                   shared_prefix=shared_prefix)
        row["search_ms"] = 1e3 * median_time(search, device, repeat)
        row["users_per_s"] = users / row["search_ms"] * 1e3
        eager = functools.partial(beam_search, model, ids, mask, trie, vocab, beams, shared_prefix=shared_prefix)
        row["eager_search_ms"] = 1e3 * median_time(eager, device, repeat)
        gs = list(graphs._sets[model.model].values())[-1]
        if device.type == "cuda":
            row["prefill_replay_ms"] = 1e3 * median_time(gs.prefill_graph.graph.replay, device, repeat)
            steps = [1e3 * median_time(g.graph.replay, device, repeat) for g in gs.step_graphs[1:]]
            row["step_replays_ms"] = sum(steps)
            row["step_replay_each_ms"] = "/".join(f"{t:.2f}" for t in steps)
        head = model.get_output_embeddings().weight
        h0 = torch.randn(users, head.shape[1], device=device, dtype=dtype)
        h1 = torch.randn(users * beams, head.shape[1], device=device, dtype=dtype)
        lse0 = 1e3 * median_time(lambda: full_vocab_lse(h0, head), device, repeat)
        lse1 = 1e3 * median_time(lambda: full_vocab_lse(h1, head), device, repeat)
        row["lse_ms"] = lse0 + (len(bd.SIZES) - 1) * lse1
        if device.type == "cuda":  # the fused kernel (beam_search(lse_backend="triton")) on the same rows
            fused0 = 1e3 * median_time(lambda: lm_head_lse(h0, head, backend="triton"), device, repeat)
            fused1 = 1e3 * median_time(lambda: lm_head_lse(h1, head, backend="triton"), device, repeat)
            row["lse_fused_ms"] = fused0 + (len(bd.SIZES) - 1) * fused1
        if device.type == "cuda":
            row["rest_ms"] = row["search_ms"] - row["prefill_replay_ms"] - row["step_replays_ms"] - row["lse_ms"]
        whole = functools.partial(search, graph_scope="search")
        row["search_graph_ms"] = 1e3 * median_time(whole, device, repeat)
        if device.type == "cuda":
            row["search_graph_replay_ms"] = 1e3 * median_time(gs.search_graph[1].graph.replay, device, repeat)
            row["search_graph_host_ms"] = row["search_graph_ms"] - row["search_graph_replay_ms"]
        if trace:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=acts) as prof:
                for _ in range(3):
                    search()
                sync(device)
            key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
            print(f"\n### {name}: 3 graph searches, by device time")
            print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=70))
            print(f"\n### {name}: 3 graph searches, by host self time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=70))
    graphs.clear_graphs()
    del model, search, eager, whole
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    p = bench_parser(__doc__.splitlines()[0])
    p.add_argument("--settings", default=None)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--trace", action="store_true")
    p.add_argument("--shared-prefix", action="store_true", help="search with shared_prefix=True")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    names = pick_settings(bd.SETTINGS, args.settings, device, "profile_decode")
    spec = bd.GPU_MODEL if device.type == "cuda" else bd.CPU_MODEL
    rows = [run(n, device, spec, args.repeat, args.trace, args.shared_prefix) for n in names]
    print_table(rows, title=f"where one graph search's time goes ({device.type})")
    write_json("profile_decode", {"rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
