"""Residual quantization: fused ``residual_quantize`` vs torch ``cdist`` + ``argmin`` per level,
measured in the same run, with the ratio cdist_time / ours_time, the share of rows given the
same codes and both mean squared reconstruction errors.

GPU settings: 1M x 32 over 3 x 256 codes, fp32 and bf16 (the Triton kernel).
CPU setting: 100k x 32 over 3 x 256, fp32 (the op's torch path, as "auto" picks on CPU).

Checks (a missed one prints a FAILED line, is in the JSON's "failed" and makes the exit status 1):
fp32: same_codes >= 0.99 and mse_ours <= mse_cdist * (1 + 1e-3); bf16: mse_ours <= mse_cdist * 1.05
(no gate on bf16 codes: distances of bf16 rows round differently in the kernel and in cdist (or
the fp32 baseline), so near-ties legitimately pick other codes; the error says whether they are as good).

  python benches/bench_rq.py [--device cpu|cuda] [--json PATH] [--rows N]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from genrec_fast.ops.rq import residual_quantize  # noqa: E402

from common import Checks, bench_parser, print_table, timeit, write_json  # noqa: E402

# name -> (device type, N, D, L, K, dtype)
SETTINGS = {
    "cpu_100k_fp32": ("cpu", 100_000, 32, 3, 256, torch.float32),
    "gpu_1m_fp32": ("cuda", 1_000_000, 32, 3, 256, torch.float32),
    "gpu_1m_bf16": ("cuda", 1_000_000, 32, 3, 256, torch.bfloat16),
}


def cdist_rq(x: torch.Tensor, codebooks: torch.Tensor):
    """The baseline: per level, full [N, K] distances with cdist, argmin, gather, subtract."""
    r = x
    xhat = torch.zeros_like(x)
    codes = []
    for lvl in range(codebooks.shape[0]):
        idx = torch.cdist(r, codebooks[lvl]).argmin(dim=1)
        q = codebooks[lvl].index_select(0, idx)
        r = r - q
        xhat = xhat + q
        codes.append(idx)
    return torch.stack(codes, 1), xhat


def make_data(n, d, levels, k, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    scales = torch.tensor([0.5 ** lvl for lvl in range(levels)]).view(-1, 1, 1)
    codebooks = torch.randn(levels, k, d, generator=g) * scales
    # rows near a random path through the codebooks plus noise: clustered, like real latents
    idx = torch.randint(k, (n, levels), generator=g)
    x = sum(codebooks[lvl][idx[:, lvl]] for lvl in range(levels)) + 0.1 * torch.randn(n, d, generator=g)
    return x.to(device, dtype), codebooks.to(device, dtype)


def run_setting(name: str, device: torch.device, rows: int = None, time_ours=None) -> dict:
    """One setting's row: both timings (``time_ours(fn) -> seconds`` times ours when given, e.g. through
    pytest-benchmark; else :func:`timeit` as the baseline is), the speedup and the gates' quantities."""
    _, n, d, levels, k, dtype = SETTINGS[name]
    n = rows or n
    x, cb = make_data(n, d, levels, k, dtype, device)
    cdist_dtype = dtype
    try:
        cdist_rq(x[:1024], cb)
    except RuntimeError:  # a torch build without cdist for this dtype: time the baseline in fp32
        cdist_dtype = torch.float32
    xb, cbb = x.to(cdist_dtype), cb.to(cdist_dtype)
    repeat = 20 if device.type == "cuda" else 3
    time_ours = time_ours or (lambda fn: timeit(fn, device, repeat=repeat, warmup=3))
    ours_s = time_ours(lambda: residual_quantize(x, cb))
    base_s = timeit(lambda: cdist_rq(xb, cbb), device, repeat=repeat, warmup=2)
    codes, xhat = residual_quantize(x, cb)
    bcodes, bxhat = cdist_rq(xb, cbb)
    return {
        "setting": name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "baseline_dtype": str(cdist_dtype).replace("torch.", ""),
        "N": n, "D": d, "L": levels, "K": k,
        "ours_ms": ours_s * 1e3,
        "cdist_ms": base_s * 1e3,
        "speedup": base_s / ours_s,
        "same_codes": float((codes.long() == bcodes).all(1).float().mean()),
        "mse_ours": float((x.float() - xhat.float()).pow(2).sum(1).mean()),
        "mse_cdist": float((x.float() - bxhat.float()).pow(2).sum(1).mean()),
    }


def check_rows(rows) -> Checks:
    """The gates of the module doc."""
    checks = Checks()
    for r in rows:
        if r["dtype"] == "float32":
            checks.check(r["setting"], "same_codes", r["same_codes"], ">=", 0.99)
            checks.check(r["setting"], "mse_ours", r["mse_ours"], "<=", r["mse_cdist"] * (1 + 1e-3))
        else:
            checks.check(r["setting"], "mse_ours", r["mse_ours"], "<=", r["mse_cdist"] * 1.05)
    return checks


def main(argv=None) -> int:
    p = bench_parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=None, help="N rows instead of each setting's (a quick check)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    names = [n for n, s in SETTINGS.items() if s[0] == device.type]
    t0 = time.perf_counter()
    rows = [run_setting(name, device, args.rows) for name in names]
    print_table(rows, title=f"residual quantization ({rows[0]['device']})")
    checks = check_rows(rows)
    print(f"total {time.perf_counter() - t0:.1f}s")
    write_json("bench_rq", {"bench": "rq", "rows": rows, **checks.payload()}, args.json)
    return checks.report()


if __name__ == "__main__":
    sys.exit(main())
