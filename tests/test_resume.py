"""A run killed with SIGKILL (after a checkpoint, or in the middle of writing one) and started again with the
same command ends with the same weights (every tensor equal) and the same metrics as a run never stopped:
SFT, S-DPO and GRPO, each through the command line in its own process."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from genrec_fast.data import save_minionerec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_sdpo_grpo import make_tiny_run  # noqa: E402
from test_sft import SMALL, _data  # noqa: E402

ENTRY = "import sys\nfrom genrec_fast.cli import entry\nsys.exit(entry(sys.argv[1:]))\n"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _cmd(argv):
    return [sys.executable, "-c", ENTRY, *argv]


def _run(argv) -> subprocess.CompletedProcess:
    res = subprocess.run(_cmd(argv), env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _run_and_kill(argv, out: Path, after_step: int, delay: float) -> None:
    """Start the command, wait until checkpoint ``after_step`` exists, wait ``delay`` s more, SIGKILL it."""
    proc = subprocess.Popen(_cmd(argv), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    target = out / "checkpoints" / f"step-{after_step:07d}"
    deadline = time.monotonic() + 240
    while not target.exists():
        assert proc.poll() is None, f"the run ended before checkpoint {after_step}: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it was killed: nothing was resumed"


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert wa[k].equal(wb[k]), k


def _kill_and_resume(argv_of, out_of, result_name, steps, save_every, seed_note):
    """Run once uninterrupted (out 'a'), once killed at a random point after a random checkpoint and started
    again (out 'b'); returns (uninterrupted dir, resumed dir, resumed run's stderr)."""
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    # a checkpoint between two log lines (log_every 3): the resumed run must finish the open log window
    after = rng.choice([k for k in range(save_every, steps - 2 * save_every + 1, save_every) if k % 3])
    delay = rng.uniform(0.0, 0.05)
    note = f"{seed_note}: kill after checkpoint {after} + {delay:.3f} s (seed {seed})"
    _run(argv_of("a"))
    _run_and_kill(argv_of("b"), out_of("b"), after, delay)
    assert not (out_of("b") / result_name).exists(), note
    resumed = _run(argv_of("b"))
    assert "resum" in resumed.stdout + resumed.stderr, (note, resumed.stderr[-2000:])
    return out_of("a"), out_of("b"), note


def test_sft_killed_and_restarted_ends_like_an_uninterrupted_run(tmp_path):
    save_minionerec(_data(), tmp_path / "data")
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"data: {tmp_path / 'data'}\nmax_steps: 36\neval_every: 9\nsave_every: 4\nlog_every: 3\n"
                   f"patience: 10\ntasks: [sid_seq, title2sid]\nbatch_tokens: 256\npack_length: 128\n"
                   f"max_length: 128\neval_samples: 8\neval_beams: 10\neval_batch_size: 8\nlr: 0.003\n"
                   f"tokenizer_vocab_size: 300\nmodel_overrides: {json.dumps(SMALL)}\n")

    def argv(name):
        return ["sft", "--config", str(cfg), "--no-progress", "--output-dir", str(tmp_path / name)]

    a, b, note = _kill_and_resume(argv, lambda n: tmp_path / n, "sft_result.json", 36, 4, "sft")
    _same_weights(a / "model", b / "model")
    ra, rb = (json.loads((d / "sft_result.json").read_text()) for d in (a, b))
    for r in (ra, rb):
        r.pop("train_seconds")
    assert ra == rb, note
    la, lb = ([{k: v for k, v in json.loads(ln).items() if k != "tokens_per_s"}
               for ln in (d / "train_log.jsonl").read_text().splitlines()] for d in (a, b))
    assert la == lb and [r["step"] for r in la] == list(range(3, 37, 3)), note


COMMON = ["--batch-size", "4", "--train-samples", "16", "--eval-samples", "8", "--eval-beams", "10",
          "--eval-batch-size", "8", "--log-every", "3", "--mixed-precision", "no", "--lr", "0.003"]


def _untimed(obj):
    """``obj`` without its timings (keys ending in "seconds") and paths."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items()
                if not k.endswith("seconds") and k not in ("model_dir", "out", "output_dir")}
    return obj


def _post_metrics(d: Path) -> dict:
    return _untimed(json.loads((d / "metrics.json").read_text()))


@pytest.mark.parametrize("stage, extra", [
    # lr schedules that change the lr at every step, so a resume that failed to restore the scheduler would differ
    ("sdpo", ["--num-negatives", "3", "--beta", "1.0", "--warmup-steps", "6"]),
    ("rl", ["--group-size", "4", "--beta", "0.04", "--lr-scheduler", "cosine", "--warmup-steps", "2"]),
])
def test_post_training_killed_and_restarted_ends_like_an_uninterrupted_run(tmp_path, stage, extra):
    data_dir, model_dir = make_tiny_run(tmp_path)
    steps, save_every = 20, 4

    def argv(name):
        return [stage, "--model", str(model_dir), "--data", str(data_dir), "--out", str(tmp_path / name),
                "--steps", str(steps), "--save-every", str(save_every), "--keep-checkpoints", "2", *COMMON, *extra]

    a, b, note = _kill_and_resume(argv, lambda n: tmp_path / n, "metrics.json", steps, save_every, stage)
    _same_weights(a / "model", b / "model")
    ma, mb = _post_metrics(a), _post_metrics(b)
    assert [r["step"] for r in ma["log"]] == [3, 6, 9, 12, 15, 18, 20]
    assert ma == mb, note
    la, lb = ((d / "train_log.jsonl").read_text() for d in (a, b))
    assert la == lb and len(la.splitlines()) == 7, note
    assert len(list((b / "checkpoints").glob("step-*"))) == 2
