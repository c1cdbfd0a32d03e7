"""SFT step throughput: tokens/s of our step vs a padded plain-cross-entropy HF step, same model, same run.

  baseline: one HF Trainer-style step: the batch right-padded to its longest row, an attention
            mask, ``model(input_ids, attention_mask, labels)`` (full-vocabulary logits at every
            position, plain cross-entropy with -100 on prompt and padding), backward, grad clip,
            AdamW step.
  ours:     genrec_fast.train.sft (``ResponseLoss``): the same examples packed into [rows, 2 x max_len]
            rows (position ids restart per example), the base transformer's hidden states gathered
            where a response token is predicted, the LM head and an fp32 cross-entropy on those
            rows only, then the same backward / clip / AdamW step.
  ours + torch.compile: the same with ``ResponseLoss(compile=True)`` (``genrec-fast sft --compile``):
            the base forward/backward compiled by inductor, every batch padded to one
            [rows, 2 x max_len] shape so nothing recompiles; on CUDA also mode="reduce-overhead"
            (CUDA graphs). The first forward + backward (the compile) is timed apart and printed.
Every variant uses the library's optimizer (``train.sft.adamw``: fused AdamW where torch has the
kernel, CPU included). All count the same real (non-pad) tokens; each round runs every variant in
turn, round 0 is warm-up. The ratio is of wall time on GPU and of process CPU time on CPU (less
sensitive to other load on a shared machine; both are printed). On CPU torch runs 1 thread by
default: with 2+ OpenMP threads on a shared machine a thread spins while its sibling waits for a
core, which inflates CPU time as well (seen: 10x slower steps, ratios anywhere in 0.9-1.7x);
``--threads N`` overrides.

CPU setting: the tiny preset (hidden 128, 4 layers, ~3.8k vocab), 16 examples x <= 128 tokens.
GPU setting: Qwen2.5-0.5B shapes (hidden 896, 24 layers, vocab 151936 + 768 SID tokens), random
init, fp32 master weights + bf16 autocast, 16 examples x <= 256 tokens.
Examples mimic the SFT mix: prompt lengths uniform in [len/4, len - response], responses half
SIDs (3 tokens + eos), half titles (8..32 tokens).

Check (a missed one prints a FAILED line, is in the JSON's "failed" and makes the exit status 1): the
loss on the first batch of ours and of each compiled variant against the baseline's, relative difference
<= 1e-4 in fp32, <= 5e-3 under bf16 autocast (different summation orders of bf16 products; 4e-4 seen on
an H100). A compiled variant that crashes is FAILED as well.

  python benches/bench_sft.py [--device cpu|cuda] [--json PATH] [--rounds N] [--threads N]
                              [--compile-modes [default] [reduce-overhead]] [--bf16]
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from genrec_fast.model import TINY_CONFIG  # noqa: E402
from genrec_fast.train.sft import ResponseLoss, adamw, collate, epoch_batches  # noqa: E402

from common import Checks, bench_parser, print_table, sync, write_json  # noqa: E402

SID_TOKENS = 3 * 256
SETTINGS = {
    "cpu": dict(model=dict(TINY_CONFIG), base_vocab=3000, batch=16, max_len=128, rounds=3, steps=2),
    "cuda": dict(model=dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                            intermediate_size=4864, max_position_embeddings=2048),
                 base_vocab=151936, batch=16, max_len=256, rounds=5, steps=4),
}


def make_examples(rng: np.random.Generator, n: int, max_len: int, vocab: int, sid_start: int):
    """(ids, n_prompt) pairs like the SFT mix; eos = token 1."""
    out = []
    for i in range(n):
        if i % 2 == 0:
            resp = (rng.integers(sid_start, sid_start + SID_TOKENS, size=3).tolist()) + [1]
        else:
            resp = rng.integers(3, sid_start, size=int(rng.integers(8, 33))).tolist() + [1]
        n_prompt = int(rng.integers(max_len // 4, max_len - len(resp) + 1))
        out.append((rng.integers(3, sid_start, size=n_prompt).tolist() + resp, n_prompt))
    return out


def padded_batch(examples, pad_id: int):
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for r, (seq, n_prompt) in enumerate(examples):
        ids[r, :len(seq)] = torch.tensor(seq)
        mask[r, :len(seq)] = 1
        labels[r, n_prompt:len(seq)] = torch.tensor(seq[n_prompt:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def parse_args(argv):
    p = bench_parser(__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast around the forward (default: on CUDA only; on CPU it runs the GPU setting's "
                        "code path)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default on CPU: 1, see the module doc; on CUDA: torch's)")
    p.add_argument("--compile-modes", nargs="*", default=None, choices=("default", "reduce-overhead"),
                   help="torch.compile variants of ours to time (default: 'default' on CPU, both on CUDA; none: "
                        "eager only)")
    return p.parse_args(argv)


def build_model(s: dict, device: torch.device):
    """A randomly initialised Qwen2 of the setting's shape in train mode, and its (padded) vocabulary size."""
    vocab = s["base_vocab"] + SID_TOKENS
    vocab += (-vocab) % 64  # embeddings resized to a multiple of 64, as load_model_and_tokenizer does
    cfg = transformers.Qwen2Config(vocab_size=vocab, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
                                   bos_token_id=None, use_cache=False, **s["model"])
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM(cfg)
    model.train()
    return model, vocab


def build_batches(s: dict, vocab: int, device: torch.device, rng: np.random.Generator) -> dict:
    """The same examples as the baseline's padded batches, our packed batches and, for the compiled variants,
    packed batches padded to one [rows, pack] shape (SFTConfig.compile pads to batch_tokens // pack_length)."""
    data = [make_examples(rng, s["batch"], s["max_len"], vocab, s["base_vocab"]) for _ in range(s["steps"])]
    pack = 2 * s["max_len"]
    packed_rows = []
    for ex in data:
        lengths = [len(ids) for ids, _ in ex]
        packed_rows.append([row for b in epoch_batches(lengths, 0, 0, batch_tokens=pack * len(ex), pack_length=pack,
                                                       packing=True) for row in b])
    fixed = (max(len(r) for r in packed_rows), pack)

    def to_device(b):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}

    return {"tokens": [sum(len(ids) for ids, _ in ex) for ex in data], "compile_shape": fixed,
            "padded": [to_device(padded_batch(ex, 0)) for ex in data],
            "packed": [to_device(collate(ex, rows, 0, packed=True)) for ex, rows in zip(data, packed_rows)],
            "fixed": [to_device(collate(ex, rows, 0, packed=True, pad_to=fixed))
                      for ex, rows in zip(data, packed_rows)]}


class StepBench:
    """Times full training steps (forward, backward, clip, AdamW) of each variant (name, loss_fn, batches)
    on one model; a compiled variant that fails is reported in ``errors`` and dropped, the others stand."""

    def __init__(self, model, device: torch.device, bf16: bool, variants: list):
        self.model, self.device, self.variants, self.bf16 = model, device, variants, bf16
        self.opt = adamw(model.parameters(), lr=1e-5, betas=(0.9, 0.95))  # the library's (fused where torch has it)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
        self.errors, self.compile_s, self.first_loss = {}, {}, {}
        self.times, self.cpu_times, self.peak = {}, {}, {}

    def step(self, loss_fn, batch):
        with self.autocast:
            loss = loss_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def first_losses(self, n: int):
        """Loss on the first batch of the first ``n`` variants, without an update."""
        with torch.no_grad(), self.autocast:
            self.first_loss.update({name: float(fn(batches[0])) for name, fn, batches in self.variants[:n]})

    def drop(self, variant, err):
        traceback.print_exc()
        self.errors[variant[0]] = f"{type(err).__name__}: {err}"
        print(f"{variant[0]} failed: {self.errors[variant[0]]}", file=sys.stderr)
        self.variants.remove(variant)
        self.opt.zero_grad(set_to_none=True)

    def compile(self, variants: list):
        """The first forward + backward of each (compiled) variant, timed apart (no update: same weights);
        its loss on the first batch goes beside the eager ones."""
        for variant in variants:
            name, fn, batches = variant
            sync(self.device)
            t0 = time.perf_counter()
            try:
                with self.autocast:
                    loss = fn(batches[0])
                loss.backward()
            except Exception as err:  # noqa: BLE001 - printed, in the JSON, and the exit status is 1
                self.drop(variant, err)
                continue
            self.opt.zero_grad(set_to_none=True)
            self.first_loss[name] = float(loss.detach())
            sync(self.device)
            self.compile_s[name] = time.perf_counter() - t0

    def warm_up(self):
        """Round 0 (CUDA graphs are recorded here): every variant steps through its batches once; a compiled one
        (those ``compile`` ran) that fails is dropped, an eager one stops the bench."""
        for variant in list(self.variants):
            name, fn, batches = variant
            try:
                for b in batches:
                    self.step(fn, b)
                sync(self.device)
            except Exception as err:  # noqa: BLE001 - printed, in the JSON, and the exit status is 1
                if name not in self.compile_s:
                    raise
                self.drop(variant, err)

    def time(self, rounds: int):
        """Wall seconds, process CPU seconds and peak CUDA bytes per variant over ``rounds`` interleaved rounds."""
        names = [v[0] for v in self.variants]
        times, cpu_times, peak = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0), dict.fromkeys(names, 0)
        self.times, self.cpu_times, self.peak = times, cpu_times, peak
        for _ in range(rounds):
            for name, fn, batches in self.variants:
                if self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                sync(self.device)
                t0, c0 = time.perf_counter(), time.process_time()
                for b in batches:
                    self.step(fn, b)
                sync(self.device)
                times[name] += time.perf_counter() - t0
                cpu_times[name] += time.process_time() - c0
                if self.device.type == "cuda":
                    peak[name] = max(peak[name], torch.cuda.max_memory_allocated())


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    s = SETTINGS["cuda" if device.type == "cuda" else "cpu"]
    rounds = args.rounds or s["rounds"]
    modes = args.compile_modes if args.compile_modes is not None else (
        ["default", "reduce-overhead"] if device.type == "cuda" else ["default"])
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model, vocab = build_model(s, device)
    bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    batches = build_batches(s, vocab, device, rng)
    variants = [("HF padded, full-vocab CE", lambda batch: model(**batch, use_cache=False).loss, batches["padded"]),
                ("ours packed, response-only CE", ResponseLoss(model), batches["packed"])]
    variants += [(f"ours + torch.compile{'' if m == 'default' else f' ({m})'}",
                  ResponseLoss(model, compile=True, compile_mode=None if m == "default" else m), batches["fixed"])
                 for m in modes]
    bench = StepBench(model, device, bf16, variants)
    # same loss on the same examples (checked in fp32 on CPU by the tests; here a sanity check before timing)
    bench.first_losses(2)
    bench.compile(variants[2:])
    bench.warm_up()
    bench.time(rounds)
    return report(bench, s, vocab, rounds, batches, args.json)


def report(bench: StepBench, s: dict, vocab: int, rounds: int, batches: dict, json_path) -> int:
    """Prints the table and the ratios, checks the first-batch losses and writes the JSON; the exit status."""
    device, cfg, bf16, first_loss = bench.device, bench.model.config, bench.bf16, bench.first_loss
    times, cpu_times, peak = bench.times, bench.cpu_times, bench.peak
    n_steps, tokens = s["steps"], batches["tokens"]
    names = [v[0] for v in bench.variants]
    total_tokens = sum(tokens) * rounds
    tps = {k: total_tokens / v for k, v in times.items()}
    tpc = {k: total_tokens / v for k, v in cpu_times.items()}
    base = names[0]
    by = tps if device.type == "cuda" else tpc  # on CPU process CPU time, which other load does not inflate
    rows = [{"step": name, "tokens/s": tps[name], "tokens/CPU-s": tpc[name],
             "ms/step": 1e3 * times[name] / (rounds * n_steps),
             "computed positions": sum(b["input_ids"].numel() for b in batches_) / n_steps,
             "peak GiB": peak[name] / 2**30, "ratio": by[name] / by[base]}
            for name, _, batches_ in bench.variants]
    wall = {n: tps[n] / tps[base] for n in names[1:]}
    cpu = {n: tpc[n] / tpc[base] for n in names[1:]}
    print_table(rows, f"SFT step, {device.type}: {s['batch']} examples x <= {s['max_len']} tokens, "
                      f"{sum(tokens) / n_steps:.0f} real tokens/step, hidden {cfg.hidden_size}, "
                      f"{cfg.num_hidden_layers} layers, vocab {vocab}, transformers {transformers.__version__}, "
                      f"{torch.get_num_threads()} CPU threads{', bf16 autocast' if bf16 else ''}")
    print(f"\nratio = tokens per {'wall' if device.type == 'cuda' else 'process-CPU'} second over the baseline's")
    for n in names[1:]:
        print(f"  {n}: wall {wall[n]:.2f}x, CPU {cpu[n]:.2f}x")
    for n, t in bench.compile_s.items():
        print(f"  {n}: compile (first step, forward + backward) {t:.1f} s, not in the timings")
    print("  loss on the first batch: " + ", ".join(f"{n} {v:.4f}" for n, v in first_loss.items()))
    checks = Checks()
    for name, err in bench.errors.items():
        checks.error(name, "", err)
    ref = first_loss[base]
    loss_rel_diff = {n: abs(v - ref) / abs(ref) for n, v in first_loss.items() if n != base}
    for n, v in loss_rel_diff.items():
        checks.check(f"{device.type} {n}", "loss_rel_diff_vs_baseline", v, "<=", 5e-3 if bf16 else 1e-4)
    print("  its relative difference to the baseline's: " + ", ".join(f"{n} {v:.2e}" for n, v in loss_rel_diff.items()))
    write_json("bench_sft", {
        "device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "transformers": transformers.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "bf16": bf16,
        "setting": {**s, "vocab": vocab, "rounds": rounds, "compile_shape": batches["compile_shape"]},
        "real_tokens_per_step": sum(tokens) / n_steps, "ratio_by": "wall" if device.type == "cuda" else "cpu_time",
        "wall_ratio": wall, "cpu_time_ratio": cpu, "compile_seconds": bench.compile_s, "rows": rows,
        "loss_first_batch": first_loss, "loss_rel_diff_vs_baseline": loss_rel_diff,
        **({"errors": bench.errors} if bench.errors else {}), **checks.payload(),
    }, json_path)
    return checks.report()


if __name__ == "__main__":
    sys.exit(main())
