"""`genrec-fast eval` and `genrec-fast demo` through the CLI entry point, and the shipped configs."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from genrec_fast import cli
from test_sdpo_grpo import make_tiny_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield make_tiny_run(tmp_path_factory.mktemp("cli"))
    torch.set_num_threads(before)


def _direct(model_dir, data_dir, split, num_beams, ks, samples=None):
    from genrec_fast.data import load_minionerec
    from genrec_fast.eval import catalog_trie, evaluate
    from genrec_fast.model import load_model_and_tokenizer

    data = load_minionerec(data_dir)
    model, tok, vocab = load_model_and_tokenizer(str(model_dir))
    return evaluate(model, tok, vocab, catalog_trie(data.catalog), samples or getattr(data, split), data.catalog,
                    num_beams=num_beams, batch_size=5, ks=ks)


def test_eval_cli_config_and_flags(tiny_run, tmp_path, capsys):
    data_dir, model_dir = tiny_run
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(yaml.safe_dump({"data": str(data_dir), "split": "test", "num_beams": 8, "batch_size": 5,
                                   "ks": [1, 5, 10], "num_beams_unused": 1}))
    with pytest.raises(ValueError, match=r"eval\.yaml has unknown option\(s\): num_beams_unused"):
        cli.main(["eval", "--config", str(cfg), "--model", str(model_dir)])
    cfg.write_text(yaml.safe_dump({"data": str(data_dir), "split": "test", "num_beams": 12, "batch_size": 5,
                                   "ks": [1, 5, 10]}))
    out = tmp_path / "res.json"
    assert cli.main(["eval", "--config", str(cfg), "--model", str(model_dir), "--num-beams", "10",
                     "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["split"] == "test" and res["num_samples"] == 12
    assert res["model"]["num_beams"] == 10  # the flag overrides the config
    assert res["model"]["invalid_rate"] == 0.0
    want = _direct(model_dir, data_dir, "test", 10, (1, 5, 10))
    for k in ("HR@1", "HR@5", "HR@10", "NDCG@10"):
        assert res["model"][k] == pytest.approx(want[k])
    assert set(res["baselines"]) == {"popularity", "transition", "sasrec"}
    printed = capsys.readouterr().out
    assert "transition baseline" in printed and "sasrec baseline" in printed and "NDCG@10" in printed
    assert "model - best baseline" in printed and set(res["intervals"]) == {"model", "popularity", "transition", "sasrec"}


def test_eval_cli_samples_file_and_errors(tiny_run, tmp_path, capsys, monkeypatch):
    from genrec_fast.data import load_minionerec

    data_dir, model_dir = tiny_run
    out = tmp_path / "valid_as_samples.json"
    assert cli.main(["eval", "--model", str(model_dir), "--data", str(data_dir), "--samples",
                     str(data_dir / "valid.csv"), "--max-samples", "7", "--num-beams", "4", "--ks", "1", "4",
                     "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["num_samples"] == 7 and res["model"]["num_samples"] == 7
    assert res["baselines"]["popularity"]["num_samples"] == 7
    bad = tmp_path / "bad.csv"
    with open(data_dir / "valid.csv", newline="") as f:
        rows = list(csv.reader(f))
    rows[3][rows[0].index("history_item_id")] = "[1, 2"  # line 4: not a list literal
    with open(bad, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    with pytest.raises(ValueError, match=r"bad\.csv:4"):
        cli.main(["eval", "--model", str(model_dir), "--data", str(data_dir), "--samples", str(bad)])
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        cli.main(["eval", "--model", str(model_dir), "--data", str(tmp_path / "no_such_dir")])
    assert len(load_minionerec(data_dir).test) == 12
    # the console script says the same in one line on stderr, exit status 2 (traceback on request)
    argv = ["eval", "--model", str(model_dir), "--data", str(data_dir), "--samples", str(bad)]
    capsys.readouterr()
    assert cli.entry(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("genrec-fast: error: ") and "bad.csv:4" in err[0], err
    # a model that is neither a directory nor reachable on the hub (offline): HF's OSError, one message
    assert cli.entry(["eval", "--model", str(tmp_path / "no_model"), "--data", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("genrec-fast: error: ") and "no_model" in err and "Traceback" not in err, err
    monkeypatch.setenv("GENRECFAST_TRACEBACK", "1")
    with pytest.raises(ValueError, match=r"bad\.csv:4"):
        cli.entry(argv)


def test_shipped_configs_parse_and_demo_config_matches_defaults():
    from dataclasses import asdict

    from genrec_fast.demo import DemoConfig

    for name, extra in (("eval", ["--model", "m"]), ("demo", [])):
        for path in sorted((ROOT / "configs").glob(f"{name}*.yaml")):
            args = cli._apply_config(cli.build_parser(name), ["--config", str(path), *extra])
            assert args.config == str(path)
    args = cli._apply_config(cli.build_parser("demo"), ["--config", str(ROOT / "configs" / "demo.yaml")])
    defaults = asdict(DemoConfig())
    for key, value in yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text()).items():
        got = getattr(args, key)
        assert (list(got) if isinstance(got, tuple) else got) == (list(value) if isinstance(value, tuple) else value)
        want = defaults[key]
        assert (list(want) if isinstance(want, tuple) else want) == value, key


@pytest.mark.slow
def test_eval_two_processes_equals_one(tiny_run, tmp_path):
    """`accelerate launch` with 2 CPU processes: prompts sharded, results gathered, same metrics."""
    data_dir, model_dir = tiny_run
    out = tmp_path / "two.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               ACCELERATE_USE_CPU="true", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--num_cpu_threads_per_process", "1", "-m", "genrec_fast.cli", "eval", "--model", str(model_dir),
           "--data", str(data_dir), "--num-beams", "10", "--batch-size", "5", "--ks", "1", "5", "10",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads(out.read_text())
    want = _direct(model_dir, data_dir, "test", 10, (1, 5, 10))
    assert res["model"]["num_samples"] == 12
    for k in ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10", "invalid_rate"):
        assert res["model"][k] == pytest.approx(want[k])
    assert proc.stdout.count("test (12 samples)") == 1  # only the main process prints and writes
