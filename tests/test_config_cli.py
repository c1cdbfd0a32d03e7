"""The command lines generated from the config dataclasses (genrec_fast.config_cli): every field has its flag,
every option's help states its default, a YAML file setting every option gives what the same flags give;
the experiment tracker (--report-to) logs what train_log.jsonl holds."""
import argparse
import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import pytest
import torch
import yaml

from genrec_fast import cli
from genrec_fast.config_cli import add_dataclass_arguments, apply_config, config_from_args, json_object, option

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_sft import SMALL, _data  # noqa: E402


def _dataclass_commands():
    from genrec_fast.demo import DemoConfig
    from genrec_fast.eval.cli import EvalConfig
    from genrec_fast.recommend import RecommendConfig
    from genrec_fast.sid.cli import SidsConfig
    from genrec_fast.train.grpo import GRPOConfig
    from genrec_fast.train.sdpo import SDPOConfig
    from genrec_fast.train.sft import SFTConfig

    return {"sft": SFTConfig, "sdpo": SDPOConfig, "rl": GRPOConfig, "demo": DemoConfig, "eval": EvalConfig,
            "sids": SidsConfig, "recommend": RecommendConfig}

DATACLASS_COMMANDS = ["sft", "sdpo", "rl", "demo", "eval", "sids", "recommend"]


# ---- every field has its flag; every option's help states its default ---------------------------------------

@pytest.mark.parametrize("command", DATACLASS_COMMANDS)
def test_every_config_field_has_its_flag(command):
    cls = _dataclass_commands()[command]
    parser = cli.build_parser(command)
    flags = {a.dest: a.option_strings for a in parser._actions if a.dest not in ("help", "config")}
    names = [f.name for f in fields(cls)]
    assert sorted(flags) == sorted(names), command  # no field without a flag, no flag without a field
    for name in names:
        assert flags[name][0] == "--" + name.replace("_", "-"), (command, name, flags[name])


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_option_of_every_command_states_its_default(command):
    parser = cli.build_parser(command)
    fmt = parser._get_formatter()
    missing = [a.option_strings[0] for a in parser._actions
               if a.option_strings and a.dest != "help" and not a.required
               and "(default: " not in fmt._expand_help(a)]
    assert not missing, f"{command}: options whose --help states no default: {missing}"


def test_help_shows_defaults_as_they_are_typed(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps at the terminal's width, and may break a flag at a hyphen
    text = " ".join(cli.build_parser("sft").format_help().split())
    assert "--tasks TASKS [TASKS ...] SFT tasks to enable (genrec_fast.prompts) (default: sid_seq" in text
    assert "(default: --packing)" in text and "(default: --no-compile)" in text
    assert "--model-overrides JSON" in text and "--report-to {none,tensorboard,wandb}" in text
    text = " ".join(cli.build_parser("rl").format_help().split())
    assert "weight of the k3 KL to the reference (default: 0.04)" in text
    assert "none: all (default: none)" in text  # --max-prompt-length


# ---- a YAML file setting every option == the same flags -------------------------------------------------------

def _flag_args(action: argparse.Action, value) -> List[str]:
    """The command-line words that give ``action`` the value ``value``."""
    if isinstance(action, argparse.BooleanOptionalAction):
        return [action.option_strings[0] if value else action.option_strings[-1]]
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        assert value != action.default
        return [action.option_strings[0]]
    flag = action.option_strings[0]
    if value is None:
        return [flag, "none"]
    if isinstance(value, (list, tuple)):
        return [flag, *map(str, value)]
    if isinstance(value, dict):
        return [flag, json.dumps(value)]
    return [flag, str(value)]


def _other_value(action: argparse.Action):
    """A value of the option other than its default, as the flag gives it."""
    d = action.default
    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return not d
    if action.choices is not None:
        return next(c for c in action.choices if c != d)
    conv = action.type
    name = getattr(conv, "__name__", "str")
    if conv is json_object:
        one = {"hidden_size": 8}
    elif name == "int":
        one = 3 if d != 3 else 4
    elif name == "float":
        one = 0.25
    else:
        one = "s1"
    return [one, one] if action.nargs == "+" else one


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_a_yaml_file_of_every_option_parses_as_the_flags_do(command, tmp_path):
    parser = cli.build_parser(command)
    actions = [a for a in parser._actions if a.dest not in ("help", "config")]
    values = {a.dest: _other_value(a) for a in actions}
    path = tmp_path / f"{command}.yaml"
    path.write_text(yaml.safe_dump(values))
    from_file = vars(apply_config(cli.build_parser(command), ["--config", str(path)]))
    argv = [w for a in actions for w in _flag_args(a, values[a.dest])]
    from_flags = vars(apply_config(cli.build_parser(command), argv))
    from_file.pop("config"), from_flags.pop("config")
    assert from_file == from_flags == values
    assert all(values[a.dest] != a.default for a in actions)  # each value is one the option must be given


_STAGE_SAMPLE = dict(seed=3, output_dir="o", out="o", max_steps=7, steps=7, lr=0.002, weight_decay=0.01,
                     mixed_precision="bf16", bf16=True, lora_r=8, lora=True, lora_alpha=8, log_every=3, save_every=5,
                     keep_checkpoints=4, resume=False, progress=False, report_to="tensorboard")
_POST_SAMPLE = dict(_STAGE_SAMPLE, model="m", data="d", batch_size=4, warmup_steps=2, lr_scheduler="cosine",
                    max_grad_norm=0.5, beta=0.3,
                    max_prompt_length=64, train_samples=10, train_on_valid=True, eval_splits=("test",),
                    eval_samples=None, eval_beams=12, eval_batch_size=4, eval_before=False, save=False,
                    cuda_graphs=True, graph_scope="search", shared_prefix=True, lse_backend="triton",
                    prompt_split="train")  # 'valid' excludes train_on_valid=True (its own test)
SAMPLES = {
    "sft": dict(_STAGE_SAMPLE, data="d", model="m", tasks=("sid_seq", "title2sid"), prompt_style="compact",
                sequence_loss=True, whole_sequences=True, sequence_window=6, history_suffixes=(1, 2), epochs=2.5,
                warmup_ratio=0.1,
                batch_tokens=1024, pack_length=256, grad_accum=2, max_length=128, packing=False, compile=False,
                cuda_graphs=True, graph_scope="search", shared_prefix=True, lse_backend="auto",
                eval_every=4, eval_epochs=0.5, eval_samples=16, eval_beams=12, eval_batch_size=4, patience=2,
                train_on_valid=True, model_overrides={"hidden_size": 32}, tokenizer_vocab_size=500, test=True,
                test_beams=20, test_batch_size=8, test_hybrid_weight=2.0, dropout=0.3, key_dropout=0.25),
    "sdpo": dict(_POST_SAMPLE, num_negatives=2, negatives="mined", sft_weight=0.5),
    "rl": dict(_POST_SAMPLE, group_size=4, reward="semantic", item_embeddings="e.npy", num_updates=2, clip_eps=0.1,
               inject_target=True, loss_level="sequence", sft_weight=0.5, transition_weight=2.0),
    "demo": dict(output_dir="o", out="o", ml1m_path="ml", max_users=10, max_interactions_per_user=5, max_history=3,
                 seed=1,
                 sid_levels=2, sid_codebook_size=8, kmeans_iters=5, sid_embedding="text", cf_weight=0.3, cf_dim=8,
                 encoder="enc", embed_cache_dir="cache", tasks=("sid_seq", "title2sid"), prompt_style="minionerec",
                 sequence_loss=False, whole_sequences=False, sequence_window=4, epochs=2.0, lr=0.01, batch_tokens=512,
                 pack_length=256, tokenizer_vocab_size=300, model_overrides={"hidden_size": 16}, dropout=0.3,
                 attention_dropout=0.2, key_dropout=0.25, sft_seed=2, train_on_valid=False, intermediate_size=96,
                 valid_samples=7, valid_beams=10, valid_every_epochs=1.0, eval_samples=9, num_beams=12, batch_size=4,
                 hybrid_weight=1.5, progress=False, sid_sets=3, parallel_sft=False),
    "eval": dict(model="m", data="d", samples="s.csv", split="valid", num_beams=20, batch_size=4, max_samples=9,
                 seed=2, ks=(1, 5), score="sid", backend="torch", dtype="float32", cuda_graphs=True,
                 graph_scope="search", shared_prefix=True, lse_backend="triton", sasrec=False, num_resamples=100,
                 max_prompt_length=64, prompt_style="compact", hybrid_weight=2.0,
                 hybrid_grid=(1.0, 2.5), levels=True, ensemble_models=("m1", "m2"), ensemble_data=("d1", "d2"),
                 out="r.json"),
    "recommend": dict(model="m", history=("3", "4"), k=5, ensemble_models=("m1",), num_beams=8,
                      prompt_style="compact", max_prompt_length=64, score="sid", backend="torch", device="cpu",
                      dtype="float32", cuda_graphs=True, graph_scope="search", shared_prefix=True, lse_backend="auto"),
    "sids": dict(items="i.json", data="d", out="o", log="l.csv", meta="m.csv", sep=";", user_col="u", item_col="i",
                 time_col="t", title_col="name", split="temporal", max_history=4, max_users=10,
                 max_interactions_per_user=6, method="rqvae", embedding="text+cf", cf_fit="train+valid",
                 cf_weight=0.3, cf_dim=8, levels=2, codebook=16, seed=1, balanced=False, kmeans_iters=5, epochs=3,
                 encoder="enc", embeddings="e.npy", cache_dir="c", device="cpu", progress=False),
}


def _argv(values: dict) -> List[str]:
    out = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + name.replace("_", "-"))
        elif value is None:
            out += [flag, "none"]
        elif isinstance(value, tuple):
            out += [flag, *map(str, value)]
        elif isinstance(value, dict):
            out += [flag, json.dumps(value)]
        else:
            out += [flag, str(value)]
    return out


@pytest.mark.parametrize("command", DATACLASS_COMMANDS)
def test_a_yaml_file_of_every_field_gives_the_config_the_flags_give(command, tmp_path):
    cls, sample = _dataclass_commands()[command], SAMPLES[command]
    assert sorted(sample) == sorted(f.name for f in fields(cls)), "give every field a sample value"
    want = cls(**sample)
    given = {"model": "m0", "data": "d0", "out": "o0"} if command in ("sdpo", "rl") else {}  # the required ones
    given = {"model": "m0", "data": "d0"} if command == "eval" else {"out": "o0"} if command == "sids" else given
    given = {"model": "m0", "history": ("1",)} if command == "recommend" else given
    default = config_from_args(cls, apply_config(cli.build_parser(command), _argv(given)))
    same = [k for k in sample if sample[k] == getattr(default, k)]
    left = {"sft": ["compile"], "sdpo": ["prompt_split"], "rl": ["prompt_split"]}.get(command, [])
    assert same == left, f"sample values equal to the default: {same}"
    path = tmp_path / f"{command}.yaml"
    path.write_text(yaml.safe_dump({k: list(v) if isinstance(v, tuple) else v for k, v in sample.items()}))
    from_file = config_from_args(cls, apply_config(cli.build_parser(command), ["--config", str(path)]))
    from_flags = config_from_args(cls, apply_config(cli.build_parser(command), _argv(sample)))
    assert from_file == from_flags == want


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("accelerate")),
                         ids=lambda p: p.name)
def test_every_shipped_config_builds_its_stage_config(path):
    command = path.stem.split("_")[0]
    required = {"eval": ["--model", "m"], "sdpo": ["--model", "m", "--out", "o"], "rl": ["--model", "m", "--out", "o"]}
    cls = _dataclass_commands()[command]
    cfg = config_from_args(cls, apply_config(cli.build_parser(command), ["--config", str(path),
                                                                          *required.get(command, [])]))
    for key, value in yaml.safe_load(path.read_text()).items():
        got = getattr(cfg, key)
        assert (list(got) if isinstance(got, tuple) else got) == value or key in ("out", "steps", "bf16", "lora"), key


def test_field_types_map_to_options_and_others_are_refused(tmp_path):
    @dataclass
    class C:
        n: Optional[float] = option(1.5, "n")
        xs: List[int] = option(help="xs", factory=lambda: [1, 2])
        d: Dict[str, int] = option(help="d", factory=dict)
        t: Tuple[str, ...] = option(("a",), "t")
        flag: bool = option(False, "flag")
        pick: str = option("a", "pick", choices=("a", "b"))

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, C)
    c = config_from_args(C, parser.parse_args(["--n", "none", "--xs", "3", "--d", '{"k": 2}', "--t", "x", "y",
                                               "--flag", "--pick", "b"]))
    assert c == C(n=None, xs=[3], d={"k": 2}, t=("x", "y"), flag=True, pick="b")
    assert config_from_args(C, parser.parse_args([])) == C()
    for argv in (["--d", "[1]"], ["--xs", "1.5"], ["--pick", "c"], ["--n", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)

    @dataclass
    class Bad:
        s: Set[int] = option(help="s", factory=set)

    with pytest.raises(TypeError, match=r"Bad\.s: no command-line form for"):
        add_dataclass_arguments(argparse.ArgumentParser(), Bad)


@pytest.mark.parametrize("text, message", [
    ("mixed_precision: no\n", "key 'mixed_precision': expected a value, got False (YAML reads an unquoted yes / no"),
    ("lora_r: 2.5\n", "key 'lora_r': invalid int value 2.5"),
    ("resume: 'no'\n", "key 'resume': expected true or false, got 'no'"),
    ("tasks: [{a: 1}]\n", "key 'tasks': expected a single value, got {'a': 1}"),
    ("model_overrides: '{\"a\":'\n", "key 'model_overrides': invalid JSON value"),
    ("model_overrides: [1]\n", "key 'model_overrides': expected one value, got a list"),
    ("report_to: mlflow\n", "key 'report_to': 'mlflow' is not one of none, tensorboard, wandb"),
    ("lora_rank: 2\n", "has unknown option(s): lora_rank"),
])
def test_stage_config_files_are_checked_like_flags(tmp_path, capsys, text, message):
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(text)
    capsys.readouterr()
    assert cli.entry(["sft", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"genrec-fast: error: config {cfg}") and err.count("\n") == 1 and message in err, err


def test_the_old_option_names_still_work_on_the_command_line():
    from genrec_fast.train.sft import SFTConfig

    args = apply_config(cli.build_parser("sft"), ["--out", "o", "--steps", "5", "--bf16", "--lora"])
    cfg = config_from_args(SFTConfig, args)
    assert (cfg.output_dir, cfg.max_steps, cfg.mixed_precision, cfg.lora_r) == ("o", 5, "bf16", 16)
    from genrec_fast.demo import DemoConfig

    assert config_from_args(DemoConfig, apply_config(cli.build_parser("demo"), ["--out", "o"])).output_dir == "o"
    with pytest.raises(ValueError, match="DemoConfig: out='o' and output_dir='p' disagree"):
        config_from_args(DemoConfig, apply_config(cli.build_parser("demo"), ["--out", "o", "--output-dir", "p"]))


@pytest.mark.parametrize("command, file_text, argv, field, expected", [
    ("rl", "output_dir: from_file\n", ["--out", "flag"], "output_dir", "flag"),
    ("rl", "out: from_file\n", ["--output-dir", "flag"], "output_dir", "flag"),
    ("sft", "max_steps: 5\n", ["--steps", "7"], "max_steps", 7),
    ("sft", "steps: 5\n", ["--max-steps", "7"], "max_steps", 7),
    ("sft", "mixed_precision: bf16\n", ["--no-bf16"], "mixed_precision", "no"),
    ("demo", "output_dir: from_file\n", ["--out", "flag"], "output_dir", "flag"),
])
def test_a_flag_overrides_the_config_files_other_name_of_it(tmp_path, command, file_text, argv, field, expected):
    """A flag wins over a config file's value however either names the option (output_dir / out, ...)."""
    from genrec_fast.demo import DemoConfig
    from genrec_fast.train import GRPOConfig
    from genrec_fast.train.sft import SFTConfig

    cls = {"rl": GRPOConfig, "sft": SFTConfig, "demo": DemoConfig}[command]
    path = tmp_path / "c.yaml"
    path.write_text(file_text)
    extra = ["--model", "m", "--data", "d"] if command == "rl" else []
    args = apply_config(cli.build_parser(command), ["--config", str(path), *extra, *argv])
    assert getattr(config_from_args(cls, args), field) == expected


def test_both_names_of_an_option_on_the_command_line_must_agree(tmp_path):
    from genrec_fast.train import GRPOConfig

    path = tmp_path / "c.yaml"
    path.write_text("output_dir: from_file\n")
    argv = ["--config", str(path), "--model", "m", "--data", "d", "--out", "a", "--output-dir", "b"]
    with pytest.raises(ValueError, match="out='a' and output_dir='b' disagree"):
        config_from_args(GRPOConfig, apply_config(cli.build_parser("rl"), argv))


# ---- --report-to ----------------------------------------------------------------------------------------------

def test_report_to_wandb_without_the_package_is_refused(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    capsys.readouterr()
    assert cli.entry(["sft", "--output-dir", str(tmp_path / "o"), "--report-to", "wandb"]) == 2
    err = capsys.readouterr().err
    assert "report_to='wandb' needs the wandb package, which is not installed (pip install wandb" in err, err
    assert not (tmp_path / "o").exists()  # refused before anything ran


def _scalars(folder: Path) -> Dict[str, List[Tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _jsonl(path: Path) -> Dict[str, List[Tuple[int, float]]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {k: [(r["step"], float(r[k])) for r in rows] for k in rows[0] if k != "step"}


def _assert_same(events, log):
    assert sorted(events) == sorted(log)
    for tag, rows in log.items():
        assert [s for s, _ in events[tag]] == [s for s, _ in rows], tag
        assert [v for _, v in events[tag]] == pytest.approx([v for _, v in rows], rel=1e-6), tag


def test_report_to_tensorboard_logs_what_the_jsonl_log_holds(tmp_path, capsys):
    from genrec_fast.data import save_minionerec

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data_dir = save_minionerec(_data(), tmp_path / "data")
        out = tmp_path / "run"
        argv = ["sft", "--data", str(data_dir), "--output-dir", str(out), "--tasks", "sid_seq", "--lr", "3e-3",
                "--batch-tokens", "256", "--pack-length", "128", "--max-length", "128", "--eval-every", "-1",
                "--model-overrides", json.dumps(SMALL), "--tokenizer-vocab-size", "300", "--log-every", "1",
                "--no-progress", "--max-steps", "4", "--save-every", "2", "--report-to", "tensorboard"]
        assert cli.main(argv) == 0
        log = _jsonl(out / "train_log.jsonl")
        assert set(log) == {"epoch", "loss", "lr", "tokens_per_s"} and len(log["loss"]) == 4
        _assert_same(_scalars(out / "tensorboard"), log)
        # a resumed run: what was logged after its checkpoint (step 2) is dropped from both, then logged anew
        first = log["tokens_per_s"]
        import shutil

        shutil.rmtree(out / "checkpoints" / "step-0000004")
        (out / "sft_result.json").unlink()
        assert cli.main(argv) == 0
        log = _jsonl(out / "train_log.jsonl")
        assert [s for s, _ in log["loss"]] == [1, 2, 3, 4] and log["tokens_per_s"][2:] != first[2:]
        _assert_same(_scalars(out / "tensorboard"), log)
    finally:
        torch.set_num_threads(before)


def test_report_to_tensorboard_in_post_training(tmp_path):
    from genrec_fast.train import GRPOConfig, train_grpo

    from test_sdpo_grpo import COMMON, make_tiny_run

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data_dir, model_dir = make_tiny_run(tmp_path / "tiny")
        out = tmp_path / "rl"
        train_grpo(GRPOConfig(model=str(model_dir), data=str(data_dir), out=str(out), steps=3, group_size=4,
                              report_to="tensorboard", **{**COMMON, "log_every": 1, "eval_before": False,
                                                          "eval_splits": ()}))
    finally:
        torch.set_num_threads(before)
    log = _jsonl(out / "train_log.jsonl")
    assert len(log["loss"]) == 3 and "lr" in log
    _assert_same(_scalars(out / "tensorboard"), log)
