"""Distributed post-training: both trainers under `accelerate launch` with 2 CPU processes (gloo, DDP),
and the DeepSpeed ZeRO-2/3 files (DeepSpeed itself is an optional extra, not installed here)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_sdpo_grpo import make_tiny_run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def test_deepspeed_files_parse_with_expected_stage():
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    for stage in (2, 3):
        path = CONFIGS / f"deepspeed_zero{stage}.json"
        raw = json.loads(path.read_text())
        cfg = HfDeepSpeedConfig(str(path))
        assert cfg.get_value("zero_optimization.stage") == stage
        assert cfg.is_zero3() == (stage == 3) and cfg.is_zero2() == (stage == 2)
        # the values accelerate fills from the Accelerator (batch size, accumulation, clipping, precision)
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
            assert raw[key] == "auto", (path.name, key)
        assert raw["bf16"]["enabled"] == "auto"
        acc = yaml.safe_load((CONFIGS / f"accelerate_zero{stage}.yaml").read_text())
        assert acc["distributed_type"] == "DEEPSPEED"
        assert acc["deepspeed_config"]["deepspeed_config_file"] == f"configs/deepspeed_zero{stage}.json"
    assert yaml.safe_load((CONFIGS / "accelerate_ddp.yaml").read_text())["distributed_type"] == "MULTI_GPU"


def _launch(args, cwd):
    # torchrun-style launch (accelerate's multi-process launcher) of 2 CPU processes: gloo backend.
    # (`--cpu` alone would start ONE process unless MPI is set up.)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               ACCELERATE_USE_CPU="true", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--num_cpu_threads_per_process", "1", "-m", "genrec_fast.cli", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.mark.slow
def test_two_process_sdpo_and_rl(tmp_path):
    data_dir, model_dir = make_tiny_run(tmp_path)
    common = ["--model", str(model_dir), "--data", str(data_dir), "--steps", "3", "--batch-size", "2",
              "--eval-samples", "6", "--eval-beams", "10", "--log-every", "1", "--no-eval-before", "--lr", "1e-3",
              "--warmup-steps", "3"]
    for stage, extra in (("sdpo", ["--num-negatives", "2"]), ("rl", ["--group-size", "4", "--inject-target"])):
        out = tmp_path / stage
        stdout = _launch([stage, *common, "--out", str(out), *extra], ROOT)
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["num_processes"] == 2
        assert [row["step"] for row in metrics["log"]] == [1, 2, 3]
        # warm-up counts optimizer steps, not steps x processes: lr after step s is min(1, s / 3) of the peak
        # (transformers' constant_with_warmup; counted per process it would reach the peak at step 2)
        assert [row["lr"] for row in metrics["log"]] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])
        assert all(row["grad_norm"] > 0 for row in metrics["log"])
        assert metrics["after"]["test"]["num_samples"] == 6  # evaluation sharded over both, gathered
        assert (out / "model" / "model.safetensors").is_file()
        assert stdout.count("step 3/3") == 1  # only the main process logs
