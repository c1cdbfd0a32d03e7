"""The stages' shared architecture: one config base and trainer base, help texts on every config field,
short functions, the curves plot, self-contained model directories."""
import argparse
import ast
import json
import struct
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from genrec_fast.train.runtime import StageConfig, StageTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_sft import _cfg, _data  # noqa: E402

TRAIN = Path(__file__).resolve().parents[1] / "genrec_fast" / "train"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _stage_classes():
    from genrec_fast.train.grpo import GRPOConfig, GRPOTrainer
    from genrec_fast.train.post_training import PostTrainConfig, PostTrainer
    from genrec_fast.train.sdpo import SDPOConfig, SDPOTrainer
    from genrec_fast.train.sft import SFTConfig, SFTTrainer

    return [(SFTConfig, SFTTrainer), (SDPOConfig, SDPOTrainer), (GRPOConfig, GRPOTrainer),
            (PostTrainConfig, PostTrainer)]


def test_every_stage_extends_the_shared_config_and_trainer():
    for cfg_cls, trainer_cls in _stage_classes():
        assert issubclass(cfg_cls, StageConfig) and issubclass(trainer_cls, StageTrainer)
        names = {f.name for f in fields(cfg_cls)}
        assert {"seed", "lr", "weight_decay", "log_every", "save_every", "keep_checkpoints", "resume",
                "progress"} <= names


def test_every_config_field_has_help_and_the_command_lines_show_it():
    from genrec_fast.train import grpo, sdpo, sft

    for cfg_cls, _ in _stage_classes():
        missing = [f.name for f in fields(cfg_cls) if not f.metadata.get("help")]
        assert not missing, (cfg_cls.__name__, missing)
    sdpo_beta = {f.name: f for f in fields(sdpo.SDPOConfig)}["beta"].metadata["help"]
    grpo_beta = {f.name: f for f in fields(grpo.GRPOConfig)}["beta"].metadata["help"]
    assert "temperature" in sdpo_beta and "KL" in grpo_beta
    for module in (sft, sdpo, grpo):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        text = parser.format_help().replace("\n", " ")
        assert "(default: " in text and "newest readable checkpoint" in " ".join(text.split())
    parser = argparse.ArgumentParser()
    grpo.add_arguments(parser)
    assert "weight of the k3 KL to the reference (default: 0.04)" in " ".join(parser.format_help().split())


def test_no_function_in_the_trainers_is_longer_than_80_lines():
    long = []
    for path in sorted(TRAIN.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append((path.name, node.name, node.end_lineno - node.lineno + 1))
    assert not long, long


def _png_size(path: Path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_the_curves_plot_draws_only_panels_that_have_data(tmp_path):
    from genrec_fast.train.sft import plot_curves

    loss = [(1, 2.0), (2, 1.5)]
    valid = [(2, {"NDCG@10": 0.1, "HR@10": 0.2})]
    one = _png_size(plot_curves({"loss": loss, "valid": []}, tmp_path / "a.png"))
    two = _png_size(plot_curves({"loss": loss, "valid": valid}, tmp_path / "b.png"))
    none = _png_size(plot_curves({"loss": [], "valid": []}, tmp_path / "c.png"))
    assert one == (500, 400) and two == (1000, 400) and none == (500, 400)
    assert _png_size(plot_curves({"loss": [], "valid": valid}, tmp_path / "d.png")) == (500, 400)


def test_model_dirs_of_every_stage_carry_the_bundle(tmp_path):
    from genrec_fast.bundle import BUNDLE_FILE, catalog_fingerprint
    from genrec_fast.data import load_minionerec
    from genrec_fast.train import SDPOConfig, train_sdpo
    from genrec_fast.train.sft import train_sft

    from test_sdpo_grpo import COMMON, make_tiny_run

    data = _data()
    res = train_sft(_cfg(tmp_path, max_steps=1, eval_every=-1, lora=True, lora_r=4, prompt_style="compact"),
                    data=data)
    meta = json.loads((res.model_dir / BUNDLE_FILE).read_text())
    assert meta["prompt_style"] == "compact" and meta["sid_fingerprint"] == catalog_fingerprint(data.catalog)
    assert (res.model_dir / "sid_index").is_dir() and not (res.model_dir / "adapter_config.json").exists()

    data_dir, model_dir = make_tiny_run(tmp_path / "pt")
    out = tmp_path / "sdpo"
    train_sdpo(SDPOConfig(model=str(model_dir), data=str(data_dir), out=str(out), steps=1,
                          **{**COMMON, "eval_before": False, "eval_splits": ()}))
    meta = json.loads((out / "model" / BUNDLE_FILE).read_text())
    assert meta["prompt_style"] == "minionerec"
    assert meta["sid_fingerprint"] == catalog_fingerprint(load_minionerec(data_dir).catalog)


def test_the_stages_share_option_names_and_take_the_old_ones_as_other_names():
    from genrec_fast.train import GRPOConfig, SDPOConfig
    from genrec_fast.train.sft import SFTConfig

    c = SFTConfig(out="x", steps=5, bf16=False, lora=True)
    assert (c.output_dir, c.max_steps, c.mixed_precision, c.lora_r) == ("x", 5, "no", 16)
    assert (c.out, c.steps, c.bf16, c.lora) == ("x", 5, None, True)  # the other names mirror their fields
    assert SFTConfig(lora=True, lora_r=4).lora_r == 4 and SFTConfig(lora_r=4).lora
    assert SFTConfig(bf16=True).mixed_precision == "bf16" and SFTConfig().mixed_precision == "auto"
    assert SFTConfig(**{k: v for k, v in vars(c).items()}) == c  # a mirrored config rebuilds as it is
    with pytest.raises(ValueError, match=r"SFTConfig: out='x' and output_dir='y' disagree"):
        SFTConfig(out="x", output_dir="y")
    with pytest.raises(ValueError, match=r"bf16=True and mixed_precision='no' disagree"):
        SFTConfig(bf16=True, mixed_precision="no")
    with pytest.raises(ValueError, match="SFTConfig: mixed_precision must be 'auto'"):
        SFTConfig(mixed_precision="fp16")
    for cls in (SDPOConfig, GRPOConfig):
        a = cls(model="m", data="d", out="o", steps=3, mixed_precision="no")
        b = cls(model="m", data="d", output_dir="o", max_steps=3, bf16=False)
        assert a == b and (a.output_dir, a.max_steps, a.out, a.steps) == ("o", 3, "o", 3)
        with pytest.raises(ValueError, match=r"'output_dir' \(--output-dir, or --out\) is required"):
            cls(model="m", data="d")


def test_command_lines_take_both_names(tmp_path):
    from genrec_fast.cli import build_parser
    from genrec_fast.config_cli import apply_config
    from genrec_fast.train.grpo import GRPOConfig
    from genrec_fast.train.post_training import config_from_args
    from genrec_fast.train.sft import SFTConfig

    for argv in (["--out", "o", "--steps", "7"], ["--output-dir", "o", "--max-steps", "7"]):
        args = apply_config(build_parser("rl"), ["--model", "m", "--data", "d", "--no-bf16", *argv])
        cfg = config_from_args(GRPOConfig, args)
        assert (cfg.output_dir, cfg.max_steps, cfg.mixed_precision) == ("o", 7, "no")
    parser = build_parser("sft")
    for argv in (["--out", "o", "--steps", "7", "--lora"], ["--output-dir", "o", "--max-steps", "7", "--lora-r", "16"]):
        args = vars(apply_config(parser, argv))
        cfg = SFTConfig(**{k: v for k, v in args.items() if k in {f.name for f in fields(SFTConfig)}})
        assert (cfg.output_dir, cfg.max_steps, cfg.lora_r) == ("o", 7, 16)
