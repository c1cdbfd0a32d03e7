"""`genrec-fast eval` and `genrec-fast demo` through the CLI entry point, and the shipped configs."""
import csv
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import genrec_fast.eval.cli as eval_cli
import genrec_fast.eval.evaluate as evaluate_mod
import genrec_fast.model as model_mod
from genrec_fast import cli
from genrec_fast.bundle import write_bundle
from genrec_fast.config_cli import apply_config
from genrec_fast.data import load_minionerec, save_minionerec
from genrec_fast.eval.metrics import ks_for_beams

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
    assert "model - best baseline" in printed
    assert set(res["intervals"]) == {"model", "popularity", "transition", "sasrec"}


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

    # every shipped option file is read by the parser of the command its name starts with (accelerate_* are not ours)
    post = ["--model", "m", "--data", "d"]
    required = {"eval": ["--model", "m"], "rl": post, "sdpo": post}
    paths = [p for p in sorted((ROOT / "configs").glob("*.yaml")) if not p.name.startswith("accelerate_")]
    assert {p.stem.split("_")[0] for p in paths} == {"demo", "eval", "sft", "rl", "sdpo"}
    for path in paths:
        name = path.stem.split("_")[0]
        args = apply_config(cli.build_parser(name), ["--config", str(path), *required.get(name, [])])
        assert args.config == str(path)
    args = apply_config(cli.build_parser("demo"), ["--config", str(ROOT / "configs" / "demo.yaml")])
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


# ---- the model bundle ties a model to its SID index; options are checked before anything runs -------------

FAST_EVAL = ["--num-beams", "4", "--ks", "1", "4", "--batch-size", "6", "--no-sasrec", "--num-resamples", "10"]


def _bundled_copy(model_dir, data_dir, dest):
    """A copy of the tiny model with the bundle of the data it belongs to."""
    shutil.copytree(model_dir, dest)
    write_bundle(dest, load_minionerec(data_dir).catalog, "minionerec")
    return dest


def _resid(data_dir, dest, seed=1):
    """The same dataset with its SIDs rebuilt another way: the same shape (3 x 4), items given other SIDs."""
    data = load_minionerec(data_dir)
    perm = np.random.default_rng(seed).permutation(len(data.catalog))
    data.catalog.set_codes(data.catalog.codes[perm], data.catalog.codebook_sizes)
    return save_minionerec(data, dest)


def _no_evaluation(monkeypatch):
    """Loading the model or evaluating fails the test: what is checked must be checked before."""
    def must_not_run(*a, **k):
        raise AssertionError("the model was loaded / evaluated before the options were checked")

    for mod, name in ((model_mod, "load_model_and_tokenizer"), (eval_cli, "load_model_and_tokenizer"),
                      (evaluate_mod, "evaluate_split"), (eval_cli, "evaluate_split")):
        monkeypatch.setattr(mod, name, must_not_run, raising=False)


def test_eval_refuses_a_model_trained_on_other_sids(tiny_run, tmp_path, capsys):
    data_dir, model_dir = tiny_run
    model = _bundled_copy(model_dir, data_dir, tmp_path / "model")
    other = _resid(data_dir, tmp_path / "resid")
    with pytest.raises(ValueError, match=rf"the model {model} was trained on other Semantic IDs than those of "
                                         rf"{other}: SID fingerprint"):
        cli.main(["eval", "--model", str(model), "--data", str(other), *FAST_EVAL])
    capsys.readouterr()
    assert cli.entry(["eval", "--model", str(model), "--data", str(other), *FAST_EVAL]) == 2
    err = capsys.readouterr().err
    assert err.startswith("genrec-fast: error: the model") and str(other) in err and str(model) in err
    # its own data: evaluated as before, no warning
    out = tmp_path / "res.json"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cli.main(["eval", "--model", str(model), "--data", str(data_dir), *FAST_EVAL, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["model"]["num_samples"] == 12
    # a model without a bundle (an older save): a warning, and it is evaluated
    with pytest.warns(UserWarning, match=rf"{model_dir} has no genrec_bundle.json"):
        assert cli.main(["eval", "--model", str(model_dir), "--data", str(other), *FAST_EVAL]) == 0


def test_eval_checks_out_before_evaluating(tiny_run, tmp_path, monkeypatch):
    data_dir, model_dir = tiny_run
    _no_evaluation(monkeypatch)
    base = ["eval", "--model", str(model_dir), "--data", str(data_dir), *FAST_EVAL]
    (tmp_path / "a_folder").mkdir()
    with pytest.raises(ValueError, match=r"--out .*a_folder: is a folder; give a file path"):
        cli.main([*base, "--out", str(tmp_path / "a_folder")])
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match=r"--out .*a_file/deeper/res.json: .*a_file is a file, not a folder"):
        cli.main([*base, "--out", str(tmp_path / "a_file" / "deeper" / "res.json")])


def test_eval_hybrid_options(tiny_run, tmp_path, monkeypatch, capsys):
    data_dir, model_dir = tiny_run
    base = ["eval", "--model", str(model_dir), "--data", str(data_dir), *FAST_EVAL]
    out = tmp_path / "valid.json"
    assert cli.main([*base, "--split", "valid", "--hybrid-grid", "0", "2", "30", "--out", str(out)]) == 0
    h = json.loads(out.read_text())["hybrid"]
    assert set(h["grid"]) == {"0.0", "2.0", "30.0"} and h["grid"][repr(h["weight"])] == max(h["grid"].values())
    assert "hybrid weight chosen on this split by NDCG@4" in capsys.readouterr().out
    out = tmp_path / "test.json"
    assert cli.main([*base, "--hybrid-weight", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["hybrid"]["weight"] == 2.0 and res["hybrid"]["HR@4"] == res["model"]["HR@4"]
    assert "model + transition (w 2)" in capsys.readouterr().out
    _no_evaluation(monkeypatch)
    with pytest.raises(ValueError, match="--hybrid-weight / --hybrid-grid: the hybrid weight is chosen on the valid "
                                         "split, not on 'test'"):
        cli.main([*base, "--hybrid-grid", "1", "2"])
    with pytest.raises(ValueError, match="--hybrid-weight / --hybrid-grid: hybrid weight must be a finite number >= 0, "
                                         "got -1.0"):
        cli.main([*base, "--hybrid-weight", "-1"])
    with pytest.raises(ValueError, match="not both"):
        cli.main([*base, "--split", "valid", "--hybrid-weight", "1", "--hybrid-grid", "1"])


def test_eval_search_options_reach_the_search(tiny_run, tmp_path, monkeypatch):
    """--shared-prefix and --lse-backend triton (the kernels in the interpreter) rank as the default search does;
    --graph-scope search without --cuda-graphs is an error naming both."""
    data_dir, model_dir = tiny_run
    out = tmp_path / "res.json"
    assert cli.main(["eval", "--model", str(model_dir), "--data", str(data_dir), "--num-beams", "10", "--batch-size",
                     "5", "--ks", "1", "5", "10", "--no-sasrec", "--shared-prefix", "--lse-backend", "triton",
                     "--out", str(out)]) == 0
    res = json.loads(out.read_text())["model"]
    want = _direct(model_dir, data_dir, "test", 10, (1, 5, 10))
    for k in ("HR@1", "HR@5", "HR@10", "NDCG@10"):
        assert res[k] == pytest.approx(want[k])
    _no_evaluation(monkeypatch)
    with pytest.raises(ValueError, match="--graph-scope search needs --cuda-graphs"):
        cli.main(["eval", "--model", str(model_dir), "--data", str(data_dir), "--graph-scope", "search"])


def test_eval_num_beams_zero_is_a_num_beams_error(tiny_run, monkeypatch):
    data_dir, model_dir = tiny_run
    _no_evaluation(monkeypatch)
    for beams in ("0", "-3"):
        with pytest.raises(ValueError, match=rf"--num-beams must be >= 1, got {beams}"):
            cli.main(["eval", "--model", str(model_dir), "--data", str(data_dir), "--num-beams", beams])
    with pytest.raises(ValueError, match="evaluate: num_beams must be an integer >= 1, got 0"):
        ks_for_beams(None, 0)
    with pytest.raises(ValueError, match="--batch-size must be >= 1, got 0"):
        cli.main(["eval", "--model", str(model_dir), "--data", str(data_dir), "--batch-size", "0"])


def test_eval_prompt_longer_than_the_model_positions_is_an_error(tiny_run, tmp_path):
    data_dir, model_dir = tiny_run
    short = _bundled_copy(model_dir, data_dir, tmp_path / "short_model")
    cfg = json.loads((short / "config.json").read_text())
    cfg["max_position_embeddings"] = 16  # RoPE would run past it silently
    (short / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"sample \d+ \(user u3_\d+\): its prompt is \d+ tokens, \+ 3 SID tokens > "
                                         r"the model's 16 positions .*max_prompt_length \(at most 13\)"):
        cli.main(["eval", "--model", str(short), "--data", str(data_dir), *FAST_EVAL])
    # left-truncation is there when asked for
    out = tmp_path / "cut.json"
    assert cli.main(["eval", "--model", str(short), "--data", str(data_dir), *FAST_EVAL, "--max-prompt-length", "13",
                     "--out", str(out)]) == 0
    assert json.loads(out.read_text())["model"]["num_samples"] == 12


@pytest.mark.parametrize("command", ["eval", "sids", "recommend"])
def test_every_option_of_the_help_states_its_default(command, capsys):
    parser = cli.build_parser(command)
    fmt = parser._get_formatter()
    missing = [a.option_strings[0] for a in parser._actions
               if a.option_strings and a.dest != "help" and not a.required
               and "default" not in fmt._expand_help(a).lower()]
    assert not missing, f"{command}: options whose --help states no default: {missing}"
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # as one line: argparse wraps the help
    assert "(default: " in text
    if command == "eval":
        packed = "".join(text.split())  # argparse may break a long flag at its hyphen
        assert "(default:50)" in packed and "(default:--sasrec)" in packed and "(default:--no-cuda-graphs)" in packed


def test_top_level_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for name, (_, help_) in cli.COMMANDS.items():
        assert f"  {name} " in text and help_ in text


def test_eval_prompt_style_reaches_the_prompts(tiny_run, monkeypatch, capsys):
    from genrec_fast.prompts import rec_prompt

    data_dir, model_dir = tiny_run
    data = load_minionerec(data_dir)
    module = sys.modules["genrec_fast.eval.beams"]  # predict encodes the prompts there
    encode, seen = module.encode_prompts, []

    def recording(tokenizer, texts, *a, **k):
        seen.extend(texts)
        return encode(tokenizer, texts, *a, **k)

    monkeypatch.setattr(module, "encode_prompts", recording)
    texts = {}
    for style in (None, "minionerec", "compact"):
        seen.clear()
        flag = [] if style is None else ["--prompt-style", style]
        assert cli.main(["eval", "--model", str(model_dir), "--data", str(data_dir), *FAST_EVAL, *flag]) == 0
        texts[style] = sorted(seen)
    for style in ("minionerec", "compact"):
        assert texts[style] == sorted(rec_prompt(s.history, data.catalog, style) for s in data.test)
    assert texts["compact"] != texts["minionerec"]
    assert texts[None] == texts["minionerec"]  # the tiny model's config names no style: the MiniOneRec template
    capsys.readouterr()


def test_eval_bad_prompt_style_is_a_clear_error(tiny_run, tmp_path, monkeypatch, capsys):
    data_dir, model_dir = tiny_run
    _no_evaluation(monkeypatch)
    base = ["eval", "--model", str(model_dir), "--data", str(data_dir), *FAST_EVAL]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*base, "--prompt-style", "chat"])
    assert exit_info.value.code == 2
    assert "argument --prompt-style: invalid choice: 'chat'" in capsys.readouterr().err
    config = tmp_path / "eval.yaml"
    config.write_text("prompt_style: chat\n")
    with pytest.raises(ValueError, match=rf"{config}.*prompt_style.*'chat' is not one of minionerec, compact, short"):
        cli.main([*base, "--config", str(config)])
    with pytest.raises(ValueError, match="unknown prompt style 'chat'; known: \\['minionerec', 'compact', 'short'\\]"):
        sys.modules["genrec_fast.eval.evaluate"].evaluate_split(None, None, None, load_minionerec(data_dir), "test",
                                                                num_beams=4, prompt_style="chat")


def test_eval_ensemble_members_from_the_command_line(tiny_run, tmp_path):
    from genrec_fast.eval.ensemble import Member, ensemble_predict
    from genrec_fast.eval.metrics import target_ranks
    from genrec_fast.model import load_model_and_tokenizer

    data_dir, model_dir = tiny_run
    other = _resid(data_dir, tmp_path / "resid")
    member = tmp_path / "member"
    shutil.copytree(model_dir, member)
    write_bundle(member, load_minionerec(other).catalog, "minionerec")
    out = tmp_path / "res.json"
    base = ["eval", "--model", str(model_dir), "--data", str(data_dir), *FAST_EVAL]
    assert cli.main([*base, "--ensemble-models", str(member), "--ensemble-data", str(other), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    data = load_minionerec(data_dir)
    model, tok, vocab = load_model_and_tokenizer(str(model_dir), data.catalog.codebook_sizes)
    cats = (data.catalog, load_minionerec(other).catalog)
    want = ensemble_predict([Member(model, tok, vocab, c) for c in cats], data.test, num_beams=4, top_n=4)
    assert res["ensemble"]["members"] == 2
    assert res["per_sample"]["ranks"]["ensemble"] == target_ranks([r["ranked"] for r in want],
                                                                  [s.target for s in data.test]).tolist()
    # the member's SIDs are checked against its own model, before anything is decoded
    with pytest.raises(ValueError, match=rf"the model {member} was trained on other Semantic IDs than those of "
                                         rf"{data_dir}"):
        cli.main([*base, "--ensemble-models", str(member), "--ensemble-data", str(data_dir)])


def test_eval_ensemble_options_are_checked_first(tiny_run, tmp_path, monkeypatch):
    data_dir, model_dir = tiny_run
    base = ["eval", "--model", str(model_dir), "--data", str(data_dir), *FAST_EVAL]
    renamed = load_minionerec(data_dir)  # one item under another id: another catalogue of as many items
    renamed.catalog.item_ids[0] = "not-" + str(renamed.catalog.item_ids[0])
    _no_evaluation(monkeypatch)
    with pytest.raises(ValueError, match=r"--ensemble-models names 1 model\(s\) and --ensemble-data 2 dataset"):
        cli.main([*base, "--ensemble-models", str(model_dir), "--ensemble-data", str(data_dir), str(data_dir)])
    with pytest.raises(ValueError, match=r"--ensemble-data .*: its catalogue lists other items"):
        eval_cli.load_member(str(model_dir), str(save_minionerec(renamed, tmp_path / "renamed")),
                             load_minionerec(data_dir).catalog, torch.float32, "cpu", None)
