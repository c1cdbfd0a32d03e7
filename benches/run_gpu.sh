#!/usr/bin/env bash
# The GPU checks of the constrained decoder in one device call (meant for a lent H100/H200), under ~8 minutes
# on one H100: install the package (C++ trie built for this Python), the tests that exercise the Triton kernels
# and the decode paths on the GPU (the beam ops, the fused LM-head log-sum-exp, the shared-prefix attention, the
# eager / graph / whole-search-graph / shared-prefix searches: tests that run in the Triton interpreter on CPU; the
# post-training log-probs with each prompt once per group, in bf16 autocast),
# then benches/bench_beam.py (one level op by op; each kernel, the fused log-sum-exp included, against its torch
# reference), benches/bench_decode.py at 8 x 50, 64 x 16 (3.7k items) and 256 x 20 (200k items), benches/bench_rl.py
# (one GRPO step: rollouts, the grouped update against the repeated-prompt one), and at the end ONE summary table (the
# decode columns, % of roofline, issue 14's targets, each step's verdict). JSON and logs under $OUT (default runs/gpu).
# Usage: bash benches/run_gpu.sh            (PYTHON=python3 by default)
#   DRY_RUN=1 prints the steps and their commands without running anything (any machine; a test runs it).
#   TESTS="tests/test_rq.py ..." (or "-" for none) BENCHES="decode tests beam" pick and order the steps
#   ("tests" is the pytest step; default: tests beam decode rl; BENCHES=all: tests rq beam decode sft rl, which takes
#   longer than one 10-minute device call with sft); ARGS_<bench>="..." adds arguments to one bench (e.g.
#   ARGS_sft="--compile-modes reduce-overhead"); TIMEOUT_<bench> (else BENCH_TIMEOUT, 300 s; decode: 240 s, beam: 60 s,
#   rl: 40 s) and TEST_TIMEOUT (230 s) cap each step (worst case of the default run: 15 + 230 + 60 + 240 + 40 s, under
#   one 10-minute device call); TEST_WORKERS (4) pytest-xdist processes.
# Step times on a fresh H100 (measured 2026-11-26): install 15 s, bench_beam 13 s, bench_rl 11-16 s, bench_sft
# 130 s with both compile modes (each a ~50 s compile of 24 layers), bench_decode 47-52 s without its
# shared-prefix columns (eager and graphs: two more searches per setting and one Triton compile per attention
# shape, not timed). The pytest step runs in TEST_WORKERS processes, with the RQ kernel's fixed config
# (GENREC_FAST_AUTOTUNE=0 in tests/conftest.py) and ~21 beam-kernel variants for the test shapes; one process
# with the autotuned RQ kernel and per-size beam kernels (~31 variants) took over 150 s for 83 of its 89 tests.
# tests/test_cascade_attention.py, tests/test_decode_shared_prefix.py and tests/test_decode_search_graph.py
# (graph_scope="search": the whole search as one graph) have not run on a GPU; nor have bench_decode's shared-prefix
# and search-graph columns (four more searches per setting, three of them captured).
# The whole test suite and the CPU runs of bench_decode (--emulate-graphs), bench_rl and bench_beam also pass on CPU
# with the image's Python 3.12, torch 2.11, triton 3.6, transformers 5.17 and accelerate 1.15, installed as this
# script installs, and, as on the image, without Hugging Face's `kernels` (checked 2026-12-07; triton 3.6's
# interpreter needs numpy < 2.4, the image's 2.5 only compiles), and every Triton kernel of the decode compiles for
# sm_90 there (tests/sm90_aot.py).
# benches/profile_decode.py --device cuda [--trace] splits one graph search into its parts.
# Each bench also checks that ours computes what its baseline computes (same beams / SIDs / codes / loss
# within its thresholds) and exits 1 with "FAILED <setting> <metric> = <value> (threshold: ...)" lines
# when not. After a step that failed this prints "FAILED <step> (rc N)", or "TIMEOUT <step> (after N s)"
# when its time cap cut it (timeout's rc 124), and the exit status is 1. A bench_decode cut by its cap still leaves
# the settings it finished in its JSON (marked partial), and the summary shows them and says PARTIAL.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET
export OUT=${OUT:-runs/gpu}
DRY=${DRY_RUN:-0}
TESTS=${TESTS:-tests/test_trie.py tests/test_beam_ops.py tests/test_sdpo_logprobs.py tests/test_cascade_attention.py tests/test_decode.py tests/test_decode_graphs.py tests/test_decode_shared_prefix.py tests/test_decode_search_graph.py tests/test_lse.py tests/test_rq.py}
steps=${BENCHES:-tests beam decode rl}  # rl last: the step a tight call loses first
[ "$steps" = all ] && steps="tests rq beam decode sft rl"
status=0

if [ "$DRY" = 1 ]; then
  # what would run, step by step (no install, nothing written, no GPU needed)
  echo "DRY RUN: steps: install $steps summary"
  for b in $steps; do
    if [ "$b" = tests ]; then
      echo "tests: timeout ${TEST_TIMEOUT:-230} $PY -m pytest -q -p no:cacheprovider --maxfail=5 --durations=12 $TESTS"
    elif [ -f "benches/bench_$b.py" ]; then
      limit_var="TIMEOUT_$b"; default=300; [ "$b" = decode ] && default=240; [ "$b" = beam ] && default=60
      [ "$b" = rl ] && default=40
      echo "bench_$b: timeout ${!limit_var:-${BENCH_TIMEOUT:-$default}} $PY benches/bench_$b.py --device cuda --json $OUT/bench_$b.json"
    else
      echo "FAILED bench_$b (no such bench)"; status=1
    fi
  done
  echo "summary: $PY benches/bench_decode.py --summary $OUT/bench_decode.json"
  exit $status
fi

mkdir -p "$OUT"
rm -f "$OUT/bench_decode.json"  # the summary reads this run's only
LOG="$OUT/run_gpu.log"
: > "$LOG"
t0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - t0 ))s] $*" | tee -a "$LOG"; }
# verdict STEP RC LIMIT: a line in the log and on stdout for a step that failed or ran out of time
verdict() {
  if [ "$2" = 124 ]; then
    echo "TIMEOUT $1 (after $3 s)" | tee -a "$LOG"; status=1
  elif [ "$2" != 0 ]; then
    echo "FAILED $1 (rc $2)" | tee -a "$LOG"; status=1
  fi
}

stamp "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$LOG"

stamp "install (editable, C++ trie for this interpreter)"
$PY -m pip install -q --no-build-isolation --no-deps -e . >>"$LOG" 2>&1
rc=$?
if [ "$rc" != 0 ]; then
  echo "install failed"; tail -30 "$LOG"; verdict install "$rc" -; exit 1
fi

verdicts=""
for b in $steps; do
  if [ "$b" = tests ]; then
    [ "$TESTS" = "-" ] && continue
    # Triton compiles for every new shape take most of this step: spread the tests over TEST_WORKERS
    # processes (pytest-xdist, when installed; 0 = one process); the slowest are listed for next time
    workers=${TEST_WORKERS:-4} xdist=""
    if [ "$workers" != 0 ] && $PY -c "import xdist" 2>/dev/null; then xdist="-n $workers"; fi
    stamp "GPU tests (kernels compiled for the device, not the interpreter) ${xdist:-in one process}"
    limit=${TEST_TIMEOUT:-230}
    # shellcheck disable=SC2086
    timeout "$limit" $PY -m pytest -q -p no:cacheprovider --maxfail=5 --durations=12 $xdist $TESTS 2>&1 \
      | tee -a "$LOG" | tail -30
    rc=${PIPESTATUS[0]}
    verdict tests "$rc" "$limit"
    verdicts="$verdicts tests=rc$rc"
    continue
  fi
  [ -f "benches/bench_$b.py" ] || { echo "no benches/bench_$b.py"; echo "FAILED bench_$b (no such bench)" | tee -a "$LOG"; status=1; continue; }
  stamp "bench_$b"
  args_var="ARGS_$b" timeout_var="TIMEOUT_$b"
  [ "$b" = sft ] && [ -z "${ARGS_sft+x}" ] && ARGS_sft="--compile-modes default"
  default=300; [ "$b" = decode ] && default=240  # bench_decode: 47-52 s before the shared-prefix columns
  [ "$b" = beam ] && default=60  # bench_beam: 13 s before its lm_head_lse row
  [ "$b" = rl ] && default=40  # bench_rl: 11-16 s before the grouped update and the shared-prefix rollouts
  limit=${!timeout_var:-${BENCH_TIMEOUT:-$default}}
  # shellcheck disable=SC2086  # ARGS_<bench> is a list of arguments
  timeout "$limit" $PY "benches/bench_$b.py" --device cuda --json "$OUT/bench_$b.json" ${!args_var:-} 2>&1 \
    | tee -a "$LOG" | grep -v '^\s*$' | tail -40
  rc=${PIPESTATUS[0]}
  verdict "bench_$b" "$rc" "$limit"
  verdicts="$verdicts bench_$b=rc$rc"
done
stamp "summary"
if [ -f "$OUT/bench_decode.json" ]; then
  $PY benches/bench_decode.py --summary "$OUT/bench_decode.json" 2>&1 | tee -a "$LOG"
fi
echo "steps (rc 0 = passed, 124 = timed out):$verdicts" | tee -a "$LOG"
grep -E '^(FAILED|TIMEOUT)' "$LOG" | sort -u
stamp "done (status $status)"
exit $status
