#!/usr/bin/env bash
# Every GPU check in one device call (meant for a lent H100/H200; timings below):
#   install the package (C++ trie built for this Python), the tests that exercise the Triton kernels
#   on the GPU, then each GPU bench. Tables go to stdout; JSON and logs under $OUT (default runs/gpu).
# Usage: bash benches/run_gpu.sh            (PYTHON=python3 by default)
#   TESTS="tests/test_rq.py ..." (or "-" for none) BENCHES="decode tests beam" pick and order the steps
#   ("tests" is the pytest step; default: tests rq beam decode sft rl); ARGS_<bench>="..." adds
#   arguments to one bench (e.g. ARGS_sft="--compile-modes reduce-overhead"); TIMEOUT_<bench> (else
#   BENCH_TIMEOUT, 300 s) and TEST_TIMEOUT (240 s) cap each step; TEST_WORKERS (4) pytest-xdist processes.
# A device call is capped at 10 minutes; the issue asks for everything in one call under 5. Seen on a fresh
# H100 (2026-11-26, before the changes below): install 15 s, bench_decode 47-52 s, the pytest step over 150 s
# in one process (cut there at test 83 of 89), bench_beam 13 s, bench_rl 11-16 s, bench_sft 130 s with
# both compile modes (each a ~50 s compile of 24 layers). Since then: the tests run in 4 processes, take
# the RQ kernel's fixed config (GENREC_FAST_AUTOTUNE=0 in tests/conftest.py: one compile per test shape and
# dtype, ~14, plus one per autotune config in their own test, instead of 8 per shape and a timing round),
# and the beam kernels compile ~21 variants instead of ~31 for the test shapes (launch keys counted under
# the interpreter); bench_sft here
# runs eager and compiled (what `genrec-fast sft --compile` runs) unless ARGS_sft says otherwise, e.g.
#   ARGS_sft="--compile-modes default reduce-overhead" BENCHES=sft bash benches/run_gpu.sh
# benches/profile_decode.py --device cuda [--trace] splits one graph search into its parts.
# Each bench also checks that ours computes what its baseline computes (same beams / SIDs / codes / loss
# within its thresholds) and exits 1 with "FAILED <setting> <metric> = <value> (threshold: ...)" lines
# when not. After a step that failed this prints "FAILED <step> (rc N)", or "TIMEOUT <step> (after N s)"
# when its time cap cut it (timeout's rc 124), and the exit status is 1.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET
export OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
LOG="$OUT/run_gpu.log"
: > "$LOG"
t0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - t0 ))s] $*" | tee -a "$LOG"; }
status=0
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

TESTS=${TESTS:-tests/test_trie.py tests/test_beam_ops.py tests/test_decode.py tests/test_decode_graphs.py tests/test_rq.py}
for b in ${BENCHES:-tests rq beam decode sft rl}; do
  if [ "$b" = tests ]; then
    [ "$TESTS" = "-" ] && continue
    # Triton compiles for every new shape take most of this step: spread the tests over TEST_WORKERS
    # processes (pytest-xdist, when installed; 0 = one process); the slowest are listed for next time
    workers=${TEST_WORKERS:-4} xdist=""
    if [ "$workers" != 0 ] && $PY -c "import xdist" 2>/dev/null; then xdist="-n $workers"; fi
    stamp "GPU tests (kernels compiled for the device, not the interpreter) ${xdist:-in one process}"
    limit=${TEST_TIMEOUT:-240}
    # shellcheck disable=SC2086
    timeout "$limit" $PY -m pytest -q -p no:cacheprovider --maxfail=5 --durations=12 $xdist $TESTS 2>&1 \
      | tee -a "$LOG" | tail -30
    verdict tests "${PIPESTATUS[0]}" "$limit"
    continue
  fi
  [ -f "benches/bench_$b.py" ] || { echo "no benches/bench_$b.py"; echo "FAILED bench_$b (no such bench)" | tee -a "$LOG"; status=1; continue; }
  stamp "bench_$b"
  args_var="ARGS_$b" timeout_var="TIMEOUT_$b"
  [ "$b" = sft ] && [ -z "${ARGS_sft+x}" ] && ARGS_sft="--compile-modes default"
  limit=${!timeout_var:-${BENCH_TIMEOUT:-300}}
  # shellcheck disable=SC2086  # ARGS_<bench> is a list of arguments
  timeout "$limit" $PY "benches/bench_$b.py" --device cuda --json "$OUT/bench_$b.json" ${!args_var:-} 2>&1 \
    | tee -a "$LOG" | grep -v '^\s*$' | tail -40
  verdict "bench_$b" "${PIPESTATUS[0]}" "$limit"
done
stamp "done (status $status)"
exit $status
