"""Small helpers shared by the benchmarks: argument parsing, timing, tables, JSON output."""
from __future__ import annotations

import argparse
import json
import math
import operator
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

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


_OPS = {"==": operator.eq, ">=": operator.ge, "<=": operator.le}


class Checks:
    """A bench's correctness gates (ours computes what its baseline computes) and its crashed variants.

    ``check(setting, metric, value, op, threshold)`` records one gate (NaN or None fails any);
    ``error(setting, what, message)`` a variant that crashed. ``report()`` prints one line starting
    with ``FAILED`` per missed gate / crash and returns the exit status (1 when any);
    ``payload()`` is what goes in the bench's JSON: every check with its outcome and the FAILED lines.
    """

    def __init__(self) -> None:
        self.checks: List[Dict[str, object]] = []
        self.errors: List[str] = []

    def check(self, setting: str, metric: str, value: Optional[float], op: str, threshold: float) -> bool:
        ok = value is not None and not (isinstance(value, float) and math.isnan(value)) and bool(
            _OPS[op](value, threshold))
        self.checks.append(dict(setting=setting, metric=metric, value=value, op=op, threshold=threshold, ok=ok))
        return ok

    def error(self, setting: str, what: str, message: str) -> None:
        self.errors.append(f"FAILED {setting}{f' {what}' if what else ''}: {message}")

    def failed(self) -> List[str]:
        def fmt(v: Union[float, None]) -> str:
            return f"{v:.6g}" if isinstance(v, float) else str(v)
        return self.errors + [f"FAILED {c['setting']} {c['metric']} = {fmt(c['value'])} (threshold: {c['op']} "
                              f"{fmt(c['threshold'])})" for c in self.checks if not c["ok"]]

    def payload(self) -> Dict[str, object]:
        return {"checks": self.checks, "failed": self.failed()}

    def report(self) -> int:
        lines = self.failed()
        for line in lines:
            print(line)
        if self.checks and not lines:
            print(f"checks: {len(self.checks)} passed")
        return 1 if lines else 0
