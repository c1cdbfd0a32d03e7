"""One constrained beam-search level, op by op, against HF's way of doing the same step.

Table 1, "one level step" (from the last hidden states h [P*B, H] and the LM head W [V, H] to the
B best (parent beam, token) per prompt), in the same run:
  (a) HF with its real ``PrefixConstrainedLogitsProcessor`` (a Python dict prefix -> allowed tokens
      callback per beam row, as MiniOneRec/ReRe run it): full logits h @ W.T, fp32 log-softmax over
      all V, the processor's -inf mask, + beam scores, top-2B of B x V per prompt, then top-B,
  (b) the same tensor ops with the mask given (the callback's cost taken out: HF's floor),
  (c) ours, score="full_vocab": logits of the level's K SID rows only, chunked log-sum-exp over V
      (``decode.search.full_vocab_lse``), the device trie step, ``ops.beam.trie_log_softmax`` and
      ``ops.beam.grouped_topk`` (backend "auto": Triton on CUDA, the torch references on CPU),
  (d) ours, score="sid" (no log-sum-exp over V),
with the ratios (c)/(a), (c)/(b), (d)/(a) and whether (c) picks the same beams as (a).

Table 2, "kernels": each Triton kernel against its torch reference on the same inputs
(``backend="triton"`` vs ``"torch"``), with max |difference| and equality of the picks; for ``lm_head_lse``
(the full-vocabulary log-sum-exp fused with the head's matmul, over the level's P*B rows) both against the
log-sum-exp of fp32 logits (``max_abs_diff``: the kernel's, ``torch_max_abs_diff``: the reference's). On CPU the
Triton kernels only run in the interpreter, which is not a timing: those rows are left out.

Checks (a missed one prints a FAILED line, is in the JSON's "failed" and makes the exit status 1):
max_score_diff <= 1e-4 (our B best scores against HF's, best first); fp32: same_beams_as_hf == 1;
bf16: same_beams_up_to_ties == 1 (the B picks are distinct and HF's own scores of them are HF's B best
scores within 1e-4: bf16 logits of a 256-code slice often repeat a value, and HF's topk and ours break
exact ties in different orders, see docs/decode.md); each kernel row's ``same`` == 1.

CPU setting: 32 prompts x 20 beams, V = 2768, H = 64, 3k items (fp32, 1 thread). GPU settings
(bf16): Qwen2.5-0.5B head shapes (V = 152704, H = 896): 8 x 50 and 64 x 16 over 3.7k items,
256 x 20 over 200k items. SIDs: 3 levels of 256 codes; the step is level 1 (beams on real
depth-1 trie nodes of random items).

  python benches/bench_beam.py [--device cpu|cuda] [--json PATH] [--settings NAME,...]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from genrec_fast import SIDTrie  # noqa: E402
from genrec_fast.decode import SIDVocab  # noqa: E402
from genrec_fast.decode.search import full_vocab_lse, trie_device_arrays  # noqa: E402
from genrec_fast.ops.beam import grouped_topk, trie_log_softmax  # noqa: E402
from genrec_fast.ops.lse import lm_head_lse  # noqa: E402

from bench_decode import SIZES, prefix_dict, random_catalogue  # noqa: E402
from common import Checks, bench_parser, pick_settings, print_table, sync, timeit, write_json  # noqa: E402

# name -> (device type, prompts, beams, items, base vocab, hidden)
SETTINGS = {
    "cpu_32x20_3k": ("cpu", 32, 20, 3000, 2000, 64),
    "gpu_8x50_3.7k": ("cuda", 8, 50, 3700, 151936, 896),
    "gpu_64x16_3.7k": ("cuda", 64, 16, 3700, 151936, 896),
    "gpu_256x20_200k": ("cuda", 256, 20, 200_000, 151936, 896),
}
LEVEL = 1
PROMPT = 16  # prompt tokens before the SID prefix in HF's input_ids (the callback slices them off)
TIE_TOL = 1e-4  # scores closer than this are ties (fp32 scores of bf16 logits; HF vs ours differ by ~2e-6)


def make_inputs(name: str, device: torch.device, seed: int = 0) -> dict:
    _, P, B, items, base_vocab, hidden = SETTINGS[name]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vocab = SIDVocab(base_vocab, SIZES)
    V = base_vocab + sum(SIZES)
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(V, hidden, generator=gen) * (4.0 / hidden ** 0.5)).to(device=device, dtype=dtype)
    h = torch.randn(P * B, hidden, generator=gen).to(device=device, dtype=dtype)
    codes = random_catalogue(items, seed=seed + 1)
    trie = SIDTrie(codes, SIZES)
    da = trie_device_arrays(trie, device)
    # each beam sits on the depth-1 node of a random item (the B beams of a prompt are distinct when possible)
    rng = np.random.default_rng(seed + 2)
    prefix0 = np.unique(codes[:, 0])
    picks = np.stack([rng.choice(prefix0, B, replace=len(prefix0) < B) for _ in range(P)]).reshape(-1)
    _, child0 = da.step(0, torch.zeros(1, dtype=torch.long, device=device))
    nodes = child0[0, torch.as_tensor(picks, device=device)].long()
    parent_scores = -torch.rand(P * B, generator=gen).to(device) * 5  # running beam scores, best first not needed
    # HF's view of the same beams: prompt tokens + the SID token of level 0
    sid_tok = vocab.token_ids(torch.as_tensor(picks)[:, None]).reshape(-1, 1)
    hf_ids = torch.cat([torch.randint(3, base_vocab, (P * B, PROMPT), generator=gen), sid_tok], 1).to(device)
    allowed = prefix_dict(codes, vocab)
    fallback = [1]

    def fn(batch_id, sent):
        return allowed.get(tuple(sent[PROMPT:].tolist()), fallback)

    processor = PrefixConstrainedLogitsProcessor(fn, B)
    mask_add = processor(hf_ids, torch.zeros(P * B, V, device=device))  # 0 / -inf, the processor's own mask
    return dict(P=P, B=B, V=V, K=SIZES[LEVEL], vocab=vocab, weight=weight, h=h, da=da, nodes=nodes,
                parent_scores=parent_scores, hf_ids=hf_ids, processor=processor, mask_add=mask_add, dtype=dtype)


def hf_candidates(x: dict, with_processor: bool) -> torch.Tensor:
    """HF's candidate scores [P, B * V]: log-softmax over V, the processor's mask, + beam scores."""
    P, B, V = x["P"], x["B"], x["V"]
    logits = F.linear(x["h"], x["weight"])
    logp = torch.log_softmax(logits.float(), dim=-1)
    logp = x["processor"](x["hf_ids"], logp) if with_processor else logp + x["mask_add"]
    return (logp + x["parent_scores"][:, None]).view(P, B * V)


def hf_step(x: dict, with_processor: bool):
    """HF's beam step (transformers' _beam_search): log-softmax over V, mask, + beam scores, top-2B, then top-B."""
    B, V = x["B"], x["V"]
    logp = hf_candidates(x, with_processor)
    top2, idx2 = torch.topk(logp, 2 * B, dim=1)
    top, pick = torch.topk(top2, B, dim=1)  # (no eos among SID tokens: the B best running beams)
    idx = idx2.gather(1, pick)
    return idx // V, idx % V, top


def ours_step(x: dict, score: str, backend: str = "auto"):
    P, B, K = x["P"], x["B"], x["K"]
    lo, hi = x["vocab"].level_range(LEVEL)
    logits = F.linear(x["h"], x["weight"][lo:hi])
    lse = full_vocab_lse(x["h"], x["weight"]) if score == "full_vocab" else None
    allowed, child = x["da"].step(LEVEL, x["nodes"], check=False)
    cand = trie_log_softmax(logits, allowed, x["parent_scores"], lse, backend=backend)
    parent, code, top, node = grouped_topk(cand.view(P, B, K), child.view(P, B, K), B, backend=backend)
    return parent, code + lo, top


def lse_row(name: str, x: dict, repeat: int) -> dict:
    """The fused LM-head log-sum-exp (``ops.lse``, Triton) against the chunked torch reference, both measured
    against the log-sum-exp of fp32 logits of the same inputs (the kernel keeps fp32 logits; the reference rounds
    them to the model dtype, so in bf16 only the kernel is held to the tie tolerance)."""
    h, w = x["h"], x["weight"]
    device = h.device
    reps = repeat * 4 if device.type == "cuda" else 1  # the interpreter: seconds a call, and not a timing
    ref_t = timeit(lambda: lm_head_lse(h, w, backend="torch"), device, repeat=reps)
    tri_t = timeit(lambda: lm_head_lse(h, w, backend="triton"), device, repeat=reps, warmup=int(reps > 1))
    w32 = w.float()
    fp32 = torch.cat([torch.logsumexp(F.linear(h[i:i + 256].float(), w32), dim=1)
                      for i in range(0, h.shape[0], 256)])  # IEEE fp32 logits, 256 rows at a time
    ref, tri = lm_head_lse(h, w, backend="torch"), lm_head_lse(h, w, backend="triton")
    diff = float((tri - fp32).abs().max())
    return dict(setting=name, op="lm_head_lse", shape=f"[{h.shape[0]}, {h.shape[1]}] x [{w.shape[0]}]",
                torch_ms=ref_t * 1e3, triton_ms=tri_t * 1e3, speedup=ref_t / tri_t, max_abs_diff=diff,
                torch_max_abs_diff=float((ref - fp32).abs().max()), same=float(diff <= TIE_TOL))


def run_setting(name: str, device: torch.device, repeat: int, kernels: bool, time_ours=None) -> tuple:
    """(step row, kernel rows) of one setting; ``time_ours(fn) -> seconds`` times ours (score="full_vocab") when
    given, e.g. through pytest-benchmark; else :func:`timeit` as the other variants are."""
    x = make_inputs(name, device)
    t = {}
    t["hf_processor"] = timeit(lambda: hf_step(x, True), device, repeat=max(2, repeat // 4))
    t["hf_tensor_ops"] = timeit(lambda: hf_step(x, False), device, repeat=repeat)
    time_ours = time_ours or (lambda fn: timeit(fn, device, repeat=repeat))
    t["ours_full_vocab"] = time_ours(lambda: ours_step(x, "full_vocab"))
    t["ours_sid"] = timeit(lambda: ours_step(x, "sid"), device, repeat=repeat)
    hp, ht, hs = hf_step(x, True)
    op, ot, os_ = ours_step(x, "full_vocab")
    same = float(((hp == op) & (ht == ot)).all(1).float().mean())
    # up to ties: HF's own score of each of our picks, best first, is HF's B best scores (within TIE_TOL)
    flat = op * x["V"] + ot
    ours_by_hf = hf_candidates(x, False).gather(1, flat).sort(dim=1, descending=True).values
    distinct = torch.tensor([len(set(f.tolist())) == x["B"] for f in flat.cpu()], device=flat.device)
    tie_ok = distinct & torch.isfinite(ours_by_hf).all(1) & ((ours_by_hf - hs).abs() <= TIE_TOL).all(1)
    rows_per_s = lambda s: x["P"] * x["B"] / s  # noqa: E731
    step_row = dict(
        setting=name, prompts=x["P"], beams=x["B"], vocab=x["V"],
        hf_processor_ms=t["hf_processor"] * 1e3, hf_tensor_ops_ms=t["hf_tensor_ops"] * 1e3,
        ours_full_vocab_ms=t["ours_full_vocab"] * 1e3, ours_sid_ms=t["ours_sid"] * 1e3,
        ours_over_hf_processor=t["hf_processor"] / t["ours_full_vocab"],
        ours_over_hf_tensor_ops=t["hf_tensor_ops"] / t["ours_full_vocab"],
        ours_sid_over_hf_processor=t["hf_processor"] / t["ours_sid"],
        hf_processor_us_per_row=t["hf_processor"] * 1e6 / (x["P"] * x["B"]),
        ours_rows_per_s=rows_per_s(t["ours_full_vocab"]),
        same_beams_as_hf=same, same_beams_up_to_ties=float(tie_ok.float().mean()),
        max_score_diff=float((hs - os_).abs().max()),
    )
    kernel_rows = []
    if kernels:
        P, B, K = x["P"], x["B"], x["K"]
        lo, hi = x["vocab"].level_range(LEVEL)
        logits = F.linear(x["h"], x["weight"][lo:hi])
        lse = full_vocab_lse(x["h"], x["weight"])
        allowed, child = x["da"].step(LEVEL, x["nodes"], check=False)
        args = (logits, allowed, x["parent_scores"], lse)
        ref_t = timeit(lambda: trie_log_softmax(*args, backend="torch"), device, repeat=repeat * 4)
        tri_t = timeit(lambda: trie_log_softmax(*args, backend="triton"), device, repeat=repeat * 4)
        ref, tri = trie_log_softmax(*args, backend="torch"), trie_log_softmax(*args, backend="triton")
        fin = torch.isfinite(ref)
        kernel_rows.append(dict(setting=name, op="trie_log_softmax", shape=f"[{P * B}, {K}]",
                                torch_ms=ref_t * 1e3, triton_ms=tri_t * 1e3, speedup=ref_t / tri_t,
                                max_abs_diff=float((ref[fin] - tri[fin]).abs().max()) if fin.any() else 0.0,
                                same=float(bool(torch.equal(fin, torch.isfinite(tri))))))
        cand, ch = ref.view(P, B, K), child.view(P, B, K)
        ref_t = timeit(lambda: grouped_topk(cand, ch, B, backend="torch"), device, repeat=repeat * 4)
        tri_t = timeit(lambda: grouped_topk(cand, ch, B, backend="triton"), device, repeat=repeat * 4)
        a, b = grouped_topk(cand, ch, B, backend="torch"), grouped_topk(cand, ch, B, backend="triton")
        kernel_rows.append(dict(setting=name, op="grouped_topk", shape=f"[{P}, {B}, {K}] -> {B}",
                                torch_ms=ref_t * 1e3, triton_ms=tri_t * 1e3, speedup=ref_t / tri_t,
                                max_abs_diff=float((a[2] - b[2]).abs().nan_to_num(0.0).max()),
                                same=float(all(torch.equal(u, v) for u, v in zip(a[0:2] + a[3:4], b[0:2] + b[3:4])))))
        kernel_rows.append(lse_row(name, x, repeat))
    step_row.update(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    dtype=str(x["dtype"]).split(".")[-1])
    return step_row, kernel_rows


def main(argv=None) -> int:
    p = bench_parser(__doc__.splitlines()[0])
    p.add_argument("--settings", default=None,
                   help=f"comma list out of {', '.join(SETTINGS)} (default: all for the device)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU settings only)")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=None,
                   help="time each Triton kernel against its torch reference (default: on CUDA; on CPU it needs "
                        "TRITON_INTERPRET=1 and is a correctness check, not a timing)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    kernels = device.type == "cuda" if args.kernels is None else args.kernels
    names = pick_settings(SETTINGS, args.settings, device, "bench_beam")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    steps, kernel_rows = [], []
    for name in names:
        s, k = run_setting(name, device, args.repeat, kernels)
        steps.append(s)
        kernel_rows += k
        sync(device)
    print_table([{k: v for k, v in r.items() if k not in ("device", "dtype")} for r in steps],
                title=f"one constrained level step ({steps[0]['device']}, {steps[0]['dtype']})")
    if kernel_rows:
        print_table(kernel_rows, title="Triton kernels vs their torch references"
                    + ("" if device.type == "cuda" else " (Triton interpreter: not a timing)"))
    else:
        print("\n(Triton kernel timings: GPU only; on CPU the kernels run in the interpreter, which is not a timing)")
    checks = check_rows(steps, kernel_rows)
    print(f"total {time.perf_counter() - t0:.1f}s")
    write_json("bench_beam", {"bench": "beam", "steps": steps, "kernels": kernel_rows, **checks.payload()}, args.json)
    return checks.report()


def check_rows(steps, kernel_rows) -> Checks:
    """The gates of the module doc."""
    checks = Checks()
    for r in steps:
        checks.check(r["setting"], "max_score_diff", r["max_score_diff"], "<=", TIE_TOL)
        if r["dtype"] == "float32":
            checks.check(r["setting"], "same_beams_as_hf", r["same_beams_as_hf"], "==", 1.0)
        else:
            checks.check(r["setting"], "same_beams_up_to_ties", r["same_beams_up_to_ties"], "==", 1.0)
    for k in kernel_rows:
        checks.check(f"{k['setting']} {k['op']}", "same", k["same"], "==", 1.0)
        checks.check(f"{k['setting']} {k['op']}", "max_abs_diff", k["max_abs_diff"], "<=", TIE_TOL)
    return checks


if __name__ == "__main__":
    sys.exit(main())
