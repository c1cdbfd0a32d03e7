"""Constrained beam search over SIDs: users/s of
  (a) HF generate(num_beams=B, prefix_allowed_tokens_fn=f), f a Python dict prefix -> allowed tokens,
  (b) HF unconstrained beam search (same call without f),
  (c) the floor: prefill each prompt once, expand the KV cache to B rows, L cached one-token
      forward steps with full-vocabulary logits (greedy tokens, no search at all),
  (c') floor_search_steps: the same with L-1 cached steps, the forwards a search of L levels needs
      (the prefill gives level 1's logits; HF generate(max_new_tokens=L) runs as many),
  (d) ours: genrec_fast.decode.beam_search(score="full_vocab"), and ours with score="sid",
  (e) GPU only: ours with cuda_graphs=True (prefill and SID steps replayed from CUDA graphs,
      captured in the warm-up round),
  (f) ours with shared_prefix=True (the prompt's K/V kept once per prompt, beam rows hold only their
      generated tails, attention by ops.cascade.cascade_attention), eager, and on GPU (g) with cuda_graphs=True,
  (h) GPU only: ours with cuda_graphs=True, graph_scope="search" (the whole search, forwards, scoring and
      top-k, one graph per shape), and (i) the same with shared_prefix=True,
all measured in the same run, with the ratios ours/(a), ours/(c) and ours/(c') (and for (e)-(i); (g)-(i) also
over (e), the per-forward graph path), and the share of users whose ranked SIDs are identical in (a) and (d),
and in (d) and each of (e)-(i).
--emulate-graphs (CPU): runs (e), (g), (h), (i) with cuda_graphs="emulate" (the same code, no capture; their
timings mean nothing), so the GPU-only columns and checks are exercised without a GPU.

% of roofline (GPU, bf16/fp16; "n/a" on CPU or an unknown GPU): 100 x t_roofline / t_measured per search,
t_roofline = sum over the search's phases of max(FLOPs / peak FLOP/s, bytes / peak bytes/s) (``roofline``)
for the least work a search must do, b bytes per value (2 in bf16), from the model config: h hidden,
n layers, H query / Hkv K/V heads of dim D, I MLP width, V vocabulary rows; N = h*H*D + 2*h*Hkv*D + H*D*h
+ 3*h*I weights per layer (norms, biases ignored); P prompts of t_p attended tokens (S = sum t_p; padding
costs nothing in the ideal), B beams, R = P*B rows, L levels:
  prefill:        FLOPs 2*n*N*S + 4*n*H*D*sum_p t_p(t_p+1)/2;    bytes b*(n*N + 2*n*Hkv*D*S) (weights, K/V written)
  step l=1..L-1:  FLOPs 2*n*N*R + 4*n*H*D*(B*S + R*l);           bytes b*(n*N + 2*n*Hkv*D*(S + R*l + R))
                  (the prompt K/V read ONCE per prompt -- the shared-prefix layout -- plus the tails, one written)
  level head l:   FLOPs 2*h*V*r_l (r_0 = P, else R: every logit, score="full_vocab");  bytes b*V*h
Activations, the trie step and top-B are left out (small). Peaks: dense bf16 tensor FLOP/s and HBM bandwidth
from the datasheets (``PEAKS``).

Checks (a missed one prints a FAILED line, is in the JSON's "failed" and makes the exit status 1):
invalid_rate == 0; fp32: same_ranking_as_hf == 1; bf16: same_set_as_hf >= 0.95 (near-ties swap ranks,
see docs/decode.md); when (e) ran: graphs_same_ranking_as_ours == 1 in fp32, graphs_same_set_as_ours
>= 0.99 in bf16; for (f)-(i): <key>_invalid_rate == 0 and, against (d), the same ranking in fp32 and in bf16
>= 0.99 of the same SIDs (the shared-prefix ones run another attention kernel, where near-ties may round
differently; not yet run on a GPU). A variant that crashes is
FAILED and its columns are left out; a setting that crashes is FAILED and the next settings run. After each
setting but the last the JSON holds the rows so far, marked "partial" with the "settings_left", so a run cut by
a time cap still has a summary (which then says PARTIAL and exits 1).

CPU setting: tiny random Qwen2, 32 users x 20 beams, 3k items. GPU settings (bf16, sdpa):
Qwen2.5-0.5B shapes with random weights, prompt 128, 8 x 50 and 64 x 16 over 3.7k items,
256 x 20 over 200k items. L = 3 levels of 256 codes.

  python benches/bench_decode.py [--device cpu|cuda] [--json PATH] [--settings NAME,...]
  python benches/bench_decode.py --summary PATH   (one table of a finished run's JSON)
"""
from __future__ import annotations

import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from genrec_fast import SIDTrie  # noqa: E402
from genrec_fast.decode import SIDVocab, beam_search  # noqa: E402

from common import Checks, bench_parser, pick_settings, print_table, sync, write_json  # noqa: E402

SIZES = (256, 256, 256)
# method -> (results key, beam_search keyword arguments; GRAPHS: cuda_graphs=True on GPU, "emulate" when asked)
GRAPHS = object()
VARIANTS = {
    "ours_graphs": ("graphs", dict(cuda_graphs=GRAPHS)),
    "ours_shared": ("shared", dict(shared_prefix=True)),
    "ours_shared_graphs": ("shared_graphs", dict(shared_prefix=True, cuda_graphs=GRAPHS)),
    "ours_search_graphs": ("search_graphs", dict(cuda_graphs=GRAPHS, graph_scope="search")),
    "ours_shared_search_graphs": ("shared_search_graphs", dict(shared_prefix=True, cuda_graphs=GRAPHS,
                                                               graph_scope="search")),
}
OPTIONAL = tuple(VARIANTS)  # a crash is reported, the run goes on
COMPARED = tuple(key for key, _ in VARIANTS.values() if key != "graphs")  # the (f)-(i) comparisons
ROOFLINE_METHODS = ("ours", *VARIANTS)

CPU_MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, base_vocab=2000)
GPU_MODEL = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, base_vocab=151936)

# name -> (device type, users, beams, items, prompt length, repeats of the HF runs, repeats of ours/floor)
SETTINGS = {
    "cpu_32x20_3k": ("cpu", 32, 20, 3000, 64, 3, 5),
    "gpu_8x50_3.7k": ("cuda", 8, 50, 3700, 128, 3, 10),
    "gpu_64x16_3.7k": ("cuda", 64, 16, 3700, 128, 2, 10),
    "gpu_256x20_200k": ("cuda", 256, 20, 200_000, 128, 1, 5),
}


def build_model(spec: dict, device: torch.device, dtype: torch.dtype):
    base_vocab = spec["base_vocab"]
    cfg = transformers.Qwen2Config(
        vocab_size=base_vocab + sum(SIZES), hidden_size=spec["hidden_size"],
        num_hidden_layers=spec["num_hidden_layers"], num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"], intermediate_size=spec["intermediate_size"],
        eos_token_id=1, pad_token_id=0, bos_token_id=2, tie_word_embeddings=True,
    )
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # spread the logits (a random head is near-uniform, full of near-ties)
        model.get_output_embeddings().weight.normal_(0.0, 4.0 / spec["hidden_size"] ** 0.5)
    return model.eval(), SIDVocab(base_vocab, SIZES)


def random_catalogue(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    codes = np.zeros((0, len(SIZES)), dtype=np.int64)
    while len(codes) < n:
        more = np.stack([rng.integers(0, k, 2 * n) for k in SIZES], 1)
        codes = np.unique(np.concatenate([codes, more]), axis=0)
    return codes[rng.permutation(len(codes))[:n]]


def prompts(users: int, length: int, base_vocab: int, device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, base_vocab, (users, length), generator=gen)
    mask = torch.ones(users, length, dtype=torch.long)
    pad = torch.randint(0, length // 2, (users,), generator=gen)
    for u in range(users):
        mask[u, : int(pad[u])] = 0
    ids[mask == 0] = 0
    return ids.to(device), mask.to(device)


def prefix_dict(codes: np.ndarray, vocab: SIDVocab) -> dict:
    """Prefix (tuple of SID token ids) -> sorted allowed next token ids, as MiniOneRec/ReRe build it."""
    toks = vocab.token_ids(torch.as_tensor(codes)).tolist()
    allowed = {}
    for row in toks:
        for level in range(len(row)):
            allowed.setdefault(tuple(row[:level]), set()).add(row[level])
    return {k: sorted(v) for k, v in allowed.items()}


def hf_generate(model, ids, mask, beams, levels, allowed=None):
    T = ids.shape[1]
    kwargs = dict(num_beams=beams, num_return_sequences=beams, max_new_tokens=levels, length_penalty=0.0,
                  do_sample=False, early_stopping=False, pad_token_id=0, eos_token_id=1)
    if allowed is not None:
        fallback = [1]  # rows with no valid prefix only hold -inf junk beams; any non-empty list will do
        kwargs["prefix_allowed_tokens_fn"] = lambda batch_id, sent: allowed.get(tuple(sent[T:].tolist()), fallback)
    return model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, T:]


def floor_forward(model, ids, mask, beams, levels):
    """Prefill once per prompt, expand the cache to B rows, ``levels`` cached steps with full logits; no
    search. The floor runs L steps, floor_search_steps L-1 (what a search of L levels needs)."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                use_cache=True, logits_to_keep=1)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    cache.batch_repeat_interleave(beams)
    token = out.logits[:, -1].argmax(-1).repeat_interleave(beams)[:, None]
    step_mask = mask.repeat_interleave(beams, 0)
    position = mask.sum(-1).repeat_interleave(beams)[:, None]
    cache_arg = "cache" if hasattr(out, "cache") else "past_key_values"
    for level in range(levels):
        step_mask = torch.cat([step_mask, step_mask.new_ones((step_mask.shape[0], 1))], 1)
        out = model(input_ids=token, attention_mask=step_mask, position_ids=position + level, use_cache=True,
                    logits_to_keep=1, **{cache_arg: cache})
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        token = out.logits[:, -1].argmax(-1)[:, None]
    return token


def hf_codes(tokens: torch.Tensor, vocab: SIDVocab, levels: int) -> torch.Tensor:
    """HF's generated SID tokens [..., L] as codes; a row with a token outside its level's block is all -1."""
    off, size = torch.tensor(vocab.offsets[:levels]), torch.tensor(vocab.codebook_sizes[:levels])
    codes = tokens.cpu() - vocab.start - off
    return torch.where(((codes >= 0) & (codes < size)).all(-1, keepdim=True), codes, -1)


def sid_sets(x: torch.Tensor) -> list:
    """Per prompt, the set of its beams' SIDs ([users, B, L]); padding / invalid rows (-1) are no SID."""
    return [{tuple(r) for r in u.tolist() if min(r) >= 0} for u in x]


def same_set(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of the B SIDs per prompt that both lists hold, whatever their order (bf16 near-ties swap ranks)."""
    beams = a.shape[1]
    return float(np.mean([len(x & y) / beams for x, y in zip(sid_sets(a), sid_sets(b))]))


def same_set_prompts(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of prompts whose B SIDs are the same set in both (all B valid)."""
    beams = a.shape[1]
    return float(np.mean([len(x) == beams and x == y for x, y in zip(sid_sets(a), sid_sets(b))]))


# device name (substring, first match) -> (dense bf16/fp16 tensor-core FLOP/s, HBM bytes/s), datasheet values
PEAKS = (
    ("H200", 989e12, 4.8e12),
    ("H100 NVL", 835e12, 3.9e12),
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100", 989e12, 3.35e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
)


def device_peaks(device_name: str, dtype: torch.dtype):
    """(FLOP/s, bytes/s) of a known GPU in bf16/fp16, else None (CPU, fp32, unknown GPUs: no roofline)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    return next(((f, b) for key, f, b in PEAKS if key in device_name), None)


def roofline(config, prompt_lens, beams: int, levels: int, value_bytes: int, peaks) -> dict:
    """FLOPs, bytes and seconds of the least work of one search (formulas in the module doc)."""
    h, n, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    H = config.num_attention_heads
    Hkv = getattr(config, "num_key_value_heads", None) or H
    D = getattr(config, "head_dim", None) or h // H
    N = h * H * D + 2 * h * Hkv * D + H * D * h + 3 * h * config.intermediate_size
    lens = [int(t) for t in prompt_lens]
    P, S = len(lens), sum(lens)
    R = P * beams
    phases = [(2 * n * N * S + 4 * n * H * D * sum(t * (t + 1) / 2 for t in lens),
               value_bytes * (n * N + 2 * n * Hkv * D * S))]
    for level in range(1, levels):
        phases.append((2 * n * N * R + 4 * n * H * D * (beams * S + R * level),
                       value_bytes * (n * N + 2 * n * Hkv * D * (S + R * level + R))))
    for level in range(levels):
        phases.append((2 * h * V * (P if level == 0 else R), value_bytes * V * h))
    flops, nbytes = sum(f for f, _ in phases), sum(b for _, b in phases)
    seconds = None if peaks is None else sum(max(f / peaks[0], b / peaks[1]) for f, b in phases)
    return {"flops": flops, "bytes": nbytes, "seconds": seconds}


def build_methods(model, ids, mask, trie, vocab, allowed: dict, beams: int, repeats: tuple, graph_mode):
    """(name -> (fn, timed repeats), results): each search stores its output in ``results`` under its key.
    The graph variants are left out when ``graph_mode`` is None."""
    hf_repeat, our_repeat = repeats
    L = len(SIZES)
    results = {}

    def search(key, **kwargs):
        def run():
            results[key] = beam_search(model, ids, mask, trie, vocab, beams, score="full_vocab", **kwargs)
        return run

    def hf_constrained():
        results["hf"] = hf_generate(model, ids, mask, beams, L, allowed)

    methods = {  # rounds interleave the methods so load drifts hit all alike
        "hf_constrained": (hf_constrained, hf_repeat),
        "hf_unconstrained": (lambda: hf_generate(model, ids, mask, beams, L), hf_repeat),
        "floor": (lambda: floor_forward(model, ids, mask, beams, L), our_repeat),
        "floor_search_steps": (lambda: floor_forward(model, ids, mask, beams, L - 1), our_repeat),
        "ours": (search("ours"), our_repeat),
        "ours_sid": (lambda: beam_search(model, ids, mask, trie, vocab, beams, score="sid"), our_repeat),
    }
    for method, (key, kwargs) in VARIANTS.items():
        if GRAPHS in kwargs.values() and graph_mode is None:
            continue
        kwargs = {k: (graph_mode if v is GRAPHS else v) for k, v in kwargs.items()}
        methods[method] = (search(key, **kwargs), our_repeat)
    return methods, results


def time_methods(name: str, methods: dict, device: torch.device) -> tuple:
    """(method -> seconds of each timed run, method -> error): one warm-up each (Triton compiles, allocator,
    caches), then interleaved rounds. An OPTIONAL method that fails its warm-up is reported and dropped."""
    errors = {}
    methods = dict(methods)
    with torch.inference_mode():
        for method, (fn, _) in list(methods.items()):
            if method not in OPTIONAL:
                fn()
                continue
            try:  # graph captures and the shared-prefix path: a failure is reported, the other columns stand
                fn()
            except Exception as err:  # noqa: BLE001 - printed, in the JSON, and the exit status is 1
                errors[method] = f"{type(err).__name__}: {err}"
                traceback.print_exc()
                print(f"{name}: {method} failed: {errors[method]}", file=sys.stderr)
                del methods[method]
        sync(device)
        times = {method: [] for method in methods}
        for r in range(max(rep for _, rep in methods.values())):
            for method, (fn, rep) in methods.items():
                if r < rep:
                    t0 = time.perf_counter()
                    fn()
                    sync(device)
                    times[method].append(time.perf_counter() - t0)
    return times, errors


def same_ranking(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of prompts whose [beams, L] codes are equal, in order."""
    return float(np.mean([torch.equal(a[u], b[u]) for u in range(a.shape[0])]))


def same_ranking_as_hf(hf: torch.Tensor, codes: torch.Tensor) -> float:
    """Share of prompts where every HF beam is a valid SID and HF's beams equal ``codes`` in order."""
    hf_valid = (hf >= 0).flatten(1).all(1)
    return float(np.mean([bool(hf_valid[u]) and torch.equal(hf[u], codes[u]) for u in range(hf.shape[0])]))


def invalid_rate(codes: torch.Tensor, trie: SIDTrie) -> float:
    """Share of returned rows that are neither a catalogue SID nor an all-(-1) empty beam."""
    flat = codes.reshape(-1, len(SIZES))
    ok = trie.contains(flat.numpy()) | (flat < 0).all(1).numpy()
    return float(1.0 - ok.mean())


def compare_variants(results: dict, ups: dict, our_codes: torch.Tensor, hf: torch.Tensor, trie: SIDTrie) -> dict:
    """Each fast path's speed-ups and agreement with ours (and HF), keyed as in the JSON rows."""
    out = {}
    if "graphs" in results:
        graph_codes = results["graphs"].codes.cpu()
        out = {"ours_graphs_over_hf_constrained": ups["ours_graphs"] / ups["hf_constrained"],
               "ours_graphs_over_floor": ups["ours_graphs"] / ups["floor"],
               "ours_graphs_over_floor_search_steps": ups["ours_graphs"] / ups["floor_search_steps"],
               "graphs_same_set_as_ours": same_set(graph_codes, our_codes),
               "graphs_same_ranking_as_ours": same_ranking(graph_codes, our_codes)}
    for key in COMPARED:
        method = f"ours_{key}"
        if key not in results:
            continue
        c = results[key].codes.cpu()
        out.update({
            f"{method}_over_hf_constrained": ups[method] / ups["hf_constrained"],
            f"{method}_over_floor_search_steps": ups[method] / ups["floor_search_steps"],
            f"{key}_same_ranking_as_ours": same_ranking(c, our_codes),
            f"{key}_same_set_as_ours": same_set(c, our_codes),
            f"{key}_same_ranking_as_hf": same_ranking_as_hf(hf, c),
            f"{key}_invalid_rate": invalid_rate(c, trie),
        })
    for method in ("ours_shared_graphs", "ours_search_graphs", "ours_shared_search_graphs"):
        if method in ups and "ours_graphs" in ups:  # over the per-forward graph path of the same run
            out[f"{method}_over_ours_graphs"] = ups[method] / ups["ours_graphs"]
    return out


def run_setting(name: str, device: torch.device, model_spec: dict, emulate_graphs: bool = False) -> dict:
    _, users, beams, items, length, hf_repeat, our_repeat = SETTINGS[name]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model, vocab = build_model(model_spec, device, dtype)
    codes = random_catalogue(items, seed=1)
    trie = SIDTrie(codes, SIZES)
    ids, mask = prompts(users, length, model_spec["base_vocab"], device, seed=2)
    L = len(SIZES)
    graph_mode = True if device.type == "cuda" else ("emulate" if emulate_graphs else None)
    methods, results = build_methods(model, ids, mask, trie, vocab, prefix_dict(codes, vocab), beams,
                                     (hf_repeat, our_repeat), graph_mode)
    times, errors = time_methods(name, methods, device)

    hf = hf_codes(results["hf"].reshape(users, beams, L), vocab, L)
    our_codes = results["ours"].codes.cpu()
    ups = {method: users / statistics.median(ts) for method, ts in times.items()}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    roof = roofline(model.config, mask.sum(-1).tolist(), beams, L, torch.finfo(dtype).bits // 8,
                    device_peaks(device_name, dtype))
    pct = {f"pct_roofline_{m}": (100.0 * roof["seconds"] * ups[m] / users if roof["seconds"] else "n/a")
           for m in ROOFLINE_METHODS if m in ups}
    return {
        "setting": name, "device": device_name,
        "dtype": str(dtype).replace("torch.", ""), "users": users, "beams": beams, "items": items,
        "prompt_len": length,
        **{f"{k}_users_per_s": v for k, v in ups.items()},
        "ours_over_hf_constrained": ups["ours"] / ups["hf_constrained"],
        "ours_over_floor": ups["ours"] / ups["floor"],
        "ours_over_floor_search_steps": ups["ours"] / ups["floor_search_steps"],
        "same_ranking_as_hf": same_ranking_as_hf(hf, our_codes),
        "same_set_as_hf": same_set(hf, our_codes),
        "invalid_rate": invalid_rate(our_codes, trie),
        **compare_variants(results, ups, our_codes, hf, trie),
        "roofline_gflop": roof["flops"] / 1e9, "roofline_mbytes": roof["bytes"] / 1e6,
        "roofline_ms": roof["seconds"] * 1e3 if roof["seconds"] else "n/a",
        **pct,
        **({"errors": errors} if errors else {}),
    }


def main(argv=None) -> int:
    p = bench_parser(__doc__.splitlines()[0])
    p.add_argument("--settings", default=None,
                   help=f"comma list out of {', '.join(SETTINGS)} (default: all for the device)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU settings only)")
    p.add_argument("--emulate-graphs", action="store_true",
                   help='CPU: also run the graph variants with cuda_graphs="emulate" (a smoke test; no capture)')
    p.add_argument("--summary", default=None, metavar="JSON",
                   help="only print the one-table summary of a finished run's JSON (benches/run_gpu.sh ends with it)")
    args = p.parse_args(argv)
    if args.summary:
        return print_summary(args.summary)
    device = torch.device(args.device)
    names = pick_settings(SETTINGS, args.settings, device, "bench_decode")
    spec = GPU_MODEL if device.type == "cuda" else CPU_MODEL
    if device.type == "cpu":  # one thread: stable numbers on a small shared CI box (same for every method)
        torch.set_num_threads(args.threads)
    rows, setting_errors = [], {}
    t0 = time.perf_counter()
    for i, name in enumerate(names):
        try:  # a setting that crashes (out of memory, say) is FAILED; the settings after it still run
            rows.append(run_setting(name, device, spec, args.emulate_graphs))
            sync(device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        except Exception as err:  # noqa: BLE001 - printed, in the JSON, and the exit status is 1
            setting_errors[name] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
            print(f"{name} failed: {setting_errors[name]}", file=sys.stderr)
        if i + 1 < len(names):  # what a run cut short by its time cap leaves for the summary
            payload, _ = run_payload(rows, setting_errors, names[i + 1:])
            write_json("bench_decode", payload, args.json)
    if rows:
        print_table(table_rows(rows), title=f"decode ({rows[0]['device']}, {rows[0]['dtype']})")
    print(f"total {time.perf_counter() - t0:.1f}s")
    payload, checks = run_payload(rows, setting_errors, [])
    write_json("bench_decode", payload, args.json)
    return checks.report()


def run_payload(rows: list, setting_errors: dict, left: list) -> tuple:
    """(the JSON of the run so far, its checks): crashed settings are FAILED; ``left`` names the settings not
    run yet (the JSON is then marked partial)."""
    checks = check_rows(rows)
    for name, err in setting_errors.items():
        checks.error(name, "", err)
    partial = {"partial": True, "settings_left": left} if left else {}
    return {"bench": "decode", "rows": rows, **partial, **checks.payload()}, checks


def table_rows(rows: list) -> list:
    """The printed table: the baselines, ours, each fast path that ran, its ratios and SID agreement."""
    cols = ["setting", "users", "beams", "items", "hf_constrained_users_per_s", "hf_unconstrained_users_per_s",
            "floor_users_per_s", "floor_search_steps_users_per_s", "ours_users_per_s", "ours_sid_users_per_s",
            "ours_over_hf_constrained", "ours_over_floor", "ours_over_floor_search_steps", "same_ranking_as_hf",
            "same_set_as_hf", "invalid_rate"]
    at = cols.index("ours_users_per_s") + 1
    ran = [m for m in VARIANTS if any(f"{m}_users_per_s" in r for r in rows)]
    cols[at:at] = [f"{m}_users_per_s" for m in ran]
    if "ours_graphs" in ran:
        cols += ["ours_graphs_over_hf_constrained", "ours_graphs_over_floor", "ours_graphs_over_floor_search_steps",
                 "graphs_same_ranking_as_ours", "graphs_same_set_as_ours"]
    for m in ran[1:] if "ours_graphs" in ran else ran:
        key = VARIANTS[m][0]
        cols += [f"{m}_over_hf_constrained"] + ([f"{m}_over_ours_graphs"] if "graphs" in m else []) + [
            f"{key}_same_ranking_as_ours", f"{key}_same_set_as_ours"]
    cols += ["roofline_ms"] + [f"pct_roofline_{m}" for m in ROOFLINE_METHODS if m == "ours" or m in ran]
    return [{c: r.get(c, "-") for c in cols} for r in rows]


SUMMARY = (  # (column, key in a row) of the one-table summary
    ("setting", "setting"), ("dtype", "dtype"), ("HF constrained", "hf_constrained_users_per_s"),
    ("floor L-1", "floor_search_steps_users_per_s"), ("ours", "ours_users_per_s"),
    ("ours graphs", "ours_graphs_users_per_s"), ("shared", "ours_shared_users_per_s"),
    ("shared graphs", "ours_shared_graphs_users_per_s"), ("search graph", "ours_search_graphs_users_per_s"),
    ("shared search graph", "ours_shared_search_graphs_users_per_s"),
    ("graphs/HF", "ours_graphs_over_hf_constrained"),
    ("shared search graph/HF", "ours_shared_search_graphs_over_hf_constrained"),
    ("shared graphs/graphs", "ours_shared_graphs_over_ours_graphs"),
    ("search graph/graphs", "ours_search_graphs_over_ours_graphs"),
    ("shared search graph/graphs", "ours_shared_search_graphs_over_ours_graphs"),
    ("same set as HF", "same_set_as_hf"), ("shared same set", "shared_same_set_as_ours"),
    ("shared graphs same set", "shared_graphs_same_set_as_ours"),
    ("search graph same set", "search_graphs_same_set_as_ours"),
    ("shared search graph same set", "shared_search_graphs_same_set_as_ours"),
    ("roofline ms", "roofline_ms"), ("% roofline ours", "pct_roofline_ours"),
    ("% roofline graphs", "pct_roofline_ours_graphs"), ("% roofline shared", "pct_roofline_ours_shared"),
    ("% roofline shared graphs", "pct_roofline_ours_shared_graphs"),
    ("% roofline search graph", "pct_roofline_ours_search_graphs"),
    ("% roofline shared search graph", "pct_roofline_ours_shared_search_graphs"),
)


# issue 14's targets: setting -> (users/s over today's graph path, % of the compute roofline or None); every fast
# path's bf16 SID sets >= 99 % the eager search's
TARGETS = {"gpu_8x50_3.7k": (2.0, None), "gpu_64x16_3.7k": (3.0, 40.0), "gpu_256x20_200k": (3.0, None)}
FAST_PATHS = ("ours_shared_graphs", "ours_search_graphs", "ours_shared_search_graphs")  # each over "ours_graphs"


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def target_rows(rows) -> list:
    """Per setting with a target: the fast path with the most users/s over the graph path, that ratio, its % of
    roofline and SID agreement, and whether the targets are met ("-" where the run has no such number)."""
    out = []
    for r in rows:
        if r["setting"] not in TARGETS:
            continue
        speed_target, roof_target = TARGETS[r["setting"]]
        ratios = {m: _number(r.get(f"{m}_over_ours_graphs")) for m in FAST_PATHS}
        ratios = {m: v for m, v in ratios.items() if v is not None}
        row = {"setting": r["setting"], "best fast path": "-", "over graphs": "-", "target": speed_target,
               "% roofline": "-", "roofline target": "-" if roof_target is None else roof_target,
               "same set as eager": "-", "met": "no numbers"}
        if ratios:
            best = max(ratios, key=ratios.get)
            same = _number(r.get(f"{VARIANTS[best][0]}_same_set_as_ours"))
            pct = _number(r.get(f"pct_roofline_{best}"))
            met = ratios[best] >= speed_target and same is not None and same >= 0.99
            if roof_target is not None:
                met = met and pct is not None and pct >= roof_target
            row.update({"best fast path": best, "over graphs": ratios[best], "met": "yes" if met else "no"})
            row.update({k: v for k, v in (("% roofline", pct), ("same set as eager", same)) if v is not None})
        out.append(row)
    return out


def default_candidates(rows) -> list:
    """Per fast path: faster than the graph path and >= 99 % the eager search's SID sets in every GPU setting of the
    run (a candidate for the default), or not."""
    gpu = [r for r in rows if r["setting"] in TARGETS]
    out = []
    for m in FAST_PATHS:
        ratios = [_number(r.get(f"{m}_over_ours_graphs")) for r in gpu]
        sames = [_number(r.get(f"{VARIANTS[m][0]}_same_set_as_ours")) for r in gpu]
        if not gpu or None in ratios or None in sames:
            out.append({"fast path": m, "min over graphs": "-", "min same set": "-", "default candidate": "no numbers"})
            continue
        ok = min(ratios) > 1.0 and min(sames) >= 0.99
        out.append({"fast path": m, "min over graphs": min(ratios), "min same set": min(sames),
                    "default candidate": "yes" if ok else "no"})
    return out


def print_summary(path: str) -> int:
    """One table (users/s, ratios, SID agreement, % of roofline) of a finished run, then issue 14's targets and the
    fast paths that could become defaults (GPU settings); 1 when its checks failed."""
    import json

    payload = json.loads(Path(path).read_text())
    rows = payload["rows"]
    print_table([{col: r.get(key, "-") for col, key in SUMMARY} for r in rows],
                title=f"decode summary (users/s; {rows[0]['device'] if rows else '-'})")
    if any(r["setting"] in TARGETS for r in rows):
        print_table(target_rows(rows), title="issue 14 targets (best fast path over today's graph path)")
        print_table(default_candidates(rows), title="default candidates (every GPU setting of this run)")
    for line in payload.get("failed", []):
        print(line)
    if payload.get("partial"):  # the bench was stopped (its time cap) before these settings ran
        print(f"PARTIAL run: not run: {', '.join(payload['settings_left'])}")
    return 1 if payload.get("failed") or payload.get("partial") else 0


def check_rows(rows) -> Checks:
    """The gates of the module doc, per setting; crashed variants are FAILED too."""
    checks = Checks()
    for r in rows:
        setting = r["setting"]
        for method, err in r.get("errors", {}).items():
            checks.error(setting, method, err)
        checks.check(setting, "invalid_rate", r["invalid_rate"], "==", 0.0)
        if r["dtype"] == "float32":
            checks.check(setting, "same_ranking_as_hf", r["same_ranking_as_hf"], "==", 1.0)
        else:  # bf16: HF prefills users x B rows, we prefill users rows; near-ties round differently
            checks.check(setting, "same_set_as_hf", r["same_set_as_hf"], ">=", 0.95)
        if "graphs_same_ranking_as_ours" in r:  # the graph and eager searches: the same kernels on the same shapes
            if r["dtype"] == "float32":
                checks.check(setting, "graphs_same_ranking_as_ours", r["graphs_same_ranking_as_ours"], "==", 1.0)
            else:  # bf16: a near-tie may still swap two ranks (the H100 run gave 100 % same ranking)
                checks.check(setting, "graphs_same_set_as_ours", r["graphs_same_set_as_ours"], ">=", 0.99)
        for key in COMPARED:  # same SIDs as the eager search (shared prefix: another attention kernel)
            if f"{key}_same_ranking_as_ours" not in r:
                continue
            checks.check(setting, f"{key}_invalid_rate", r[f"{key}_invalid_rate"], "==", 0.0)
            if r["dtype"] == "float32":
                checks.check(setting, f"{key}_same_ranking_as_ours", r[f"{key}_same_ranking_as_ours"], "==", 1.0)
            else:  # bf16: near-ties may round differently; issue 14's bar for every fast path (not yet run on a GPU)
                checks.check(setting, f"{key}_same_set_as_ours", r[f"{key}_same_set_as_ours"], ">=", 0.99)
    return checks


if __name__ == "__main__":
    sys.exit(main())
