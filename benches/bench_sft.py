"""SFT step throughput: tokens/s of our step vs a padded plain-cross-entropy HF step, same model, same run.

  baseline: one HF Trainer-style step: the batch right-padded to its longest row, an attention
            mask, ``model(input_ids, attention_mask, labels)`` (full-vocabulary logits at every
            position, plain cross-entropy with -100 on prompt and padding), backward, grad clip,
            AdamW step.
  ours:     genrec_fast.train.sft: the same examples packed into rows (no padding, position ids
            restart per example), logits only where a response token is predicted, fp32
            cross-entropy on those, then the same backward / clip / AdamW step.
Both count the same real (non-pad) tokens; rounds alternate baseline and ours. The ratio is of
wall time on GPU and of process CPU time on CPU (robust to other load on a shared machine; both
are printed).

CPU setting: the tiny preset (hidden 128, 4 layers, ~3.8k vocab), 16 examples x <= 128 tokens.
GPU setting: Qwen2.5-0.5B shapes (hidden 896, 24 layers, vocab 151936 + 768 SID tokens), random
init, fp32 master weights + bf16 autocast, 16 examples x <= 256 tokens.
Examples mimic the SFT mix: prompt lengths uniform in [len/4, len - response], responses half
SIDs (3 tokens + eos), half titles (8..32 tokens).

  python benches/bench_sft.py [--device cpu|cuda] [--json PATH] [--rounds N]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_parser, print_table, sync, write_json  # noqa: E402

from genrec_fast.model import TINY_CONFIG  # noqa: E402
from genrec_fast.train.sft import collate, epoch_batches, response_loss  # noqa: E402

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


def main() -> int:
    p = bench_parser(__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    device = torch.device(args.device)
    s = SETTINGS["cuda" if device.type == "cuda" else "cpu"]
    rounds = args.rounds or s["rounds"]
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    vocab = s["base_vocab"] + SID_TOKENS
    vocab += (-vocab) % 64  # embeddings resized to a multiple of 64, as load_model_and_tokenizer does
    cfg = transformers.Qwen2Config(vocab_size=vocab, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
                                   bos_token_id=None, use_cache=False, **s["model"])
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(loss_fn, batch):
        with autocast:
            loss = loss_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def baseline(batch):
        return model(**batch, use_cache=False).loss

    def ours(batch):
        return response_loss(model, batch)

    n_steps = s["steps"]
    data = [make_examples(rng, s["batch"], s["max_len"], vocab, s["base_vocab"]) for _ in range(n_steps)]
    tokens = [sum(len(ids) for ids, _ in ex) for ex in data]
    base_batches = [{k: v.to(device) for k, v in padded_batch(ex, 0).items()} for ex in data]
    ours_batches = []
    for ex in data:
        lengths = [len(ids) for ids, _ in ex]
        pack = 2 * s["max_len"]
        rows = [row for b in epoch_batches(lengths, 0, 0, batch_tokens=pack * len(ex), pack_length=pack,
                                           packing=True) for row in b]
        b = collate(ex, rows, 0, packed=True)
        ours_batches.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()})
    # same loss on the same examples (checked in fp32 on CPU; here a sanity check before timing)
    with torch.no_grad(), autocast:
        l_base = float(baseline(base_batches[0]))
        l_ours = float(ours(ours_batches[0]))

    times = {"baseline": 0.0, "ours": 0.0}
    cpu_times = {"baseline": 0.0, "ours": 0.0}
    peak = {"baseline": 0, "ours": 0}
    for r in range(rounds + 1):  # round 0 is warm-up
        for name, fn, batches in (("baseline", baseline, base_batches), ("ours", ours, ours_batches)):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for b in batches:
                step(fn, b)
            sync(device)
            if r > 0:
                times[name] += time.perf_counter() - t0
                cpu_times[name] += time.process_time() - c0
                if device.type == "cuda":
                    peak[name] = max(peak[name], torch.cuda.max_memory_allocated())
    total_tokens = sum(tokens) * rounds
    tps = {k: total_tokens / v for k, v in times.items()}
    tpc = {k: total_tokens / v for k, v in cpu_times.items()}
    padded = sum(b["input_ids"].numel() for b in base_batches)
    rows = [
        {"step": "HF padded, full-vocab CE", "tokens/s": tps["baseline"], "tokens/CPU-s": tpc["baseline"], "ms/step": 1e3 * times["baseline"] / (rounds * n_steps),
         "computed positions": padded / n_steps, "peak GiB": peak["baseline"] / 2**30},
        {"step": "ours packed, response-only CE", "tokens/s": tps["ours"], "tokens/CPU-s": tpc["ours"], "ms/step": 1e3 * times["ours"] / (rounds * n_steps),
         "computed positions": sum(b["input_ids"].numel() for b in ours_batches) / n_steps, "peak GiB": peak["ours"] / 2**30},
    ]
    # on CPU the headline ratio uses process CPU time, which other load on the machine does not inflate
    wall_ratio, cpu_ratio = tps["ours"] / tps["baseline"], tpc["ours"] / tpc["baseline"]
    ratio = wall_ratio if device.type == "cuda" else cpu_ratio
    print_table(rows, f"SFT step, {device.type}: {s['batch']} examples x <= {s['max_len']} tokens, "
                      f"{sum(tokens) / n_steps:.0f} real tokens/step, hidden {cfg.hidden_size}, vocab {vocab}")
    print(f"\nratio ours/baseline: {ratio:.2f}x ({'wall' if device.type == 'cuda' else 'CPU'} time; "
          f"wall {wall_ratio:.2f}x, CPU {cpu_ratio:.2f}x)   (loss on the first batch: baseline {l_base:.4f}, ours {l_ours:.4f})")
    write_json("bench_sft", {
        "device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "setting": {**s, "vocab": vocab, "rounds": rounds}, "real_tokens_per_step": sum(tokens) / n_steps,
        "baseline_tokens_per_s": tps["baseline"], "ours_tokens_per_s": tps["ours"], "ratio": ratio, "wall_ratio": wall_ratio, "cpu_time_ratio": cpu_ratio,
        "baseline_tokens_per_cpu_s": tpc["baseline"], "ours_tokens_per_cpu_s": tpc["ours"],
        "rows": rows, "loss_first_batch": {"baseline": l_base, "ours": l_ours},
    }, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
