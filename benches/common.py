"""Small helpers shared by the benchmarks: argument parsing, timing, tables, JSON output."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch


def bench_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="write the results here (also $OUT/<bench>.json when OUT is set)")
    return p


def pick_settings(settings: Dict[str, tuple], names: Optional[str], device: torch.device, bench: str) -> List[str]:
    """Settings named in the comma list ``names`` (default: every one of ``device``'s type); the first
    field of each setting is its device type."""
    picked = names.split(",") if names else [n for n, s in settings.items() if s[0] == device.type]
    unknown = [n for n in picked if n not in settings or settings[n][0] != device.type]
    if unknown:
        raise SystemExit(f"{bench}: setting(s) {unknown} are not {device.type} settings of {list(settings)}")
    return picked


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], device="cpu", repeat: int = 5, warmup: int = 1, min_time: float = 0.0) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: List[float] = []
    t_end = time.perf_counter() + min_time
    while len(times) < repeat or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def print_table(rows: List[Dict[str, object]], title: Optional[str] = None) -> None:
    if title:
        print(f"\n## {title}")
    if not rows:
        return
    cols = list(rows[0].keys())
    for r in rows[1:]:
        cols += [c for c in r if c not in cols]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")


def write_json(name: str, payload: Dict[str, object], path: Optional[str]) -> None:
    targets = [Path(path)] if path else []
    if os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"]) / f"{name}.json")
    for t in targets:
        t.parent.mkdir(parents=True, exist_ok=True)
        tmp = t.with_suffix(t.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2, default=str))
        os.replace(tmp, t)
