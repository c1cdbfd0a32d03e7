"""The CPU micro-benchmarks (bench_trie, bench_rq, bench_beam at small sizes) under pytest-benchmark.

    make bench-pytest                                   # runs them, saves the run in .benchmarks/
    make bench-pytest BENCH_ARGS=--benchmark-compare    # ... and compares it with the last saved run
    make bench-pytest BENCH_ARGS="--benchmark-compare --benchmark-compare-fail=median:20%"  # fails on a regression

Not part of ``make test`` (pytest's testpaths is tests/). Each test times ours through the ``benchmark``
fixture and its baseline in the same run (the bench's own timer), keeps the ratio baseline / ours in the
saved run's ``extra_info`` (with the bench's row), and fails when ours computes something different from
its baseline: the bench's own correctness gates (``common.Checks``).
"""
from __future__ import annotations

import time

import pytest
import torch

from genrec_fast import SIDTrie

import bench_beam
import bench_rq
import bench_trie
from common import Checks

ROUNDS = 5


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as the benches' CPU settings are measured."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def timer(benchmark, rounds: int = ROUNDS):
    """``time_ours(fn) -> seconds`` of the benches: ``fn`` timed by the benchmark fixture (median of ``rounds``
    after one warm-up); with ``--benchmark-disable`` the fixture runs ``fn`` once untimed, and one timed
    call gives the seconds."""
    def time_ours(fn) -> float:
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
        if benchmark.stats is None:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        return benchmark.stats.stats.median
    return time_ours


def _record(benchmark, row: dict, speedups, checks: Checks) -> None:
    """The row in the saved run; the gates must hold."""
    benchmark.extra_info.update({k: v for k, v in row.items() if isinstance(v, (int, float, str))})
    for name in speedups:
        assert row[name] > 0, (name, row[name])
    assert checks.checks, "no gate was checked"
    assert not checks.failed(), "\n".join(checks.failed())


@pytest.mark.benchmark(group="trie")
def test_trie_build_vs_dict_trie(benchmark):
    codes = bench_trie.random_unique_sids(20_000)
    t_ours = timer(benchmark)(lambda: SIDTrie(codes, 256))
    checks = Checks()
    row = bench_trie.compare_with_dict(codes, SIDTrie(codes, 256), t_ours, queries=3000, repeat=1, checks=checks)
    _record(benchmark, {"N": len(codes), "ours build s": t_ours, **row}, ["build speedup", "allowed speedup"], checks)


@pytest.mark.benchmark(group="rq")
def test_residual_quantize_vs_cdist(benchmark):
    row = bench_rq.run_setting("cpu_100k_fp32", torch.device("cpu"), rows=20_000, time_ours=timer(benchmark))
    _record(benchmark, row, ["speedup"], bench_rq.check_rows([row]))


@pytest.mark.benchmark(group="beam")
def test_beam_level_step_vs_hf(benchmark):
    step, _ = bench_beam.run_setting("cpu_32x20_3k", torch.device("cpu"), repeat=3, kernels=False,
                                     time_ours=timer(benchmark))
    _record(benchmark, step, ["ours_over_hf_processor", "ours_over_hf_tensor_ops"], bench_beam.check_rows([step], []))
