"""Training stages refuse what would silently go wrong: a non-finite loss or bad step/lr settings, two runs
in one output directory, an unreadable checkpoint or model file, an old model beside a new run's config."""
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genrec_fast.data import save_minionerec
from genrec_fast.train.sft import train_sft

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_sft import SMALL, _cfg, _data, _tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != ".lock"}


# ---- a. a non-finite loss / learning rate ----------------------------------------------------------

def test_sft_stops_on_a_non_finite_loss_and_saves_nothing(tmp_path):
    from genrec_fast.train.runtime import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match=r"sft: the training loss is not finite at optimizer step \d+ "
                                                 r"\(lr 1000000.0\)"):
        train_sft(_cfg(tmp_path, lr=1e6, max_steps=30, eval_every=-1, save_every=1000, log_every=1000,
                       warmup_ratio=0.0), data=_data())
    out = tmp_path / "run"
    assert not (out / "model").exists() and not (out / "sft_result.json").exists()
    assert not list(out.rglob("state.pt"))


def test_sft_cli_with_a_non_finite_loss_exits_with_an_error(tmp_path, capsys):
    from genrec_fast.cli import entry

    save_minionerec(_data(), tmp_path / "data")
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"data: {tmp_path / 'data'}\noutput_dir: {tmp_path / 'cli'}\nmax_steps: 30\neval_every: -1\n"
                   f"tasks: [sid_seq]\nbatch_tokens: 256\npack_length: 128\nmax_length: 128\nwarmup_ratio: 0.0\n"
                   f"tokenizer_vocab_size: 300\nmodel_overrides: {json.dumps(SMALL)}\n")
    assert entry(["sft", "--config", str(cfg), "--no-progress", "--lr", "1e6"]) == 2
    assert "the training loss is not finite" in capsys.readouterr().err
    assert not (tmp_path / "cli" / "model").exists()


@pytest.mark.parametrize("lr", [float("inf"), float("nan"), -1e-3])
def test_a_learning_rate_must_be_finite_and_non_negative(tmp_path, lr):
    from genrec_fast.train import GRPOConfig, SDPOConfig

    with pytest.raises(ValueError, match=r"SFTConfig: lr must be a finite number >= 0, got"):
        _cfg(tmp_path, lr=lr)
    for cls in (SDPOConfig, GRPOConfig):
        with pytest.raises(ValueError, match=rf"{cls.__name__}: lr must be a finite number >= 0"):
            cls(model="m", data="d", out="o", lr=lr)


def test_yaml_infinite_lr_is_refused_before_training(tmp_path):
    from genrec_fast.cli import main

    save_minionerec(_data(), tmp_path / "data")
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"data: {tmp_path / 'data'}\noutput_dir: {tmp_path / 'cli'}\nlr: .inf\n")
    with pytest.raises(ValueError, match="lr must be a finite number >= 0, got inf"):
        main(["sft", "--config", str(cfg)])
    assert not (tmp_path / "cli").exists()


# ---- d. step counts and warm-up -------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    ({"max_steps": 0}, "max_steps must be >= 1"),
    ({"max_steps": -5}, "max_steps must be >= 1"),
    ({"epochs": 0}, "epochs must be a finite number > 0"),
    ({"epochs": -1.0}, "epochs must be a finite number > 0"),
    ({"warmup_ratio": -0.5}, r"warmup_ratio must be in \[0, 1\)"),
    ({"warmup_ratio": 1.0}, r"warmup_ratio must be in \[0, 1\)"),
    ({"grad_accum": 0}, "grad_accum must be >= 1"),
])
def test_sft_step_settings_are_checked(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(tmp_path, **kw)


def test_sft_cli_max_steps_zero_is_refused(tmp_path):
    from genrec_fast.cli import main

    save_minionerec(_data(), tmp_path / "data")
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        main(["sft", "--data", str(tmp_path / "data"), "--output-dir", str(tmp_path / "cli"), "--max-steps", "0"])
    assert not (tmp_path / "cli" / "model").exists()


def test_post_training_warmup_must_not_be_negative():
    from genrec_fast.train import SDPOConfig

    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        SDPOConfig(model="m", data="d", out="o", warmup_steps=-1)


# ---- b. one run per output directory --------------------------------------------------------------

def _hold_lock(path: Path) -> subprocess.Popen:
    """A separate process that holds path's run lock until it is killed."""
    code = ("import sys, time\nfrom genrec_fast.train.runtime import run_lock\n"
            "with run_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_sft_run_on_the_same_output_dir_is_refused_and_changes_nothing(tmp_path):
    from genrec_fast.train.runtime import OutputDirLocked

    data = _data()
    cfg = _cfg(tmp_path, max_steps=2, eval_every=-1, save_every=1)
    train_sft(cfg, data=data)
    out = Path(cfg.output_dir)
    before = _snapshot(out)
    holder = _hold_lock(out)
    try:
        for again in (cfg, _cfg(tmp_path, max_steps=3, eval_every=-1, resume=False, lr=0.5)):
            with pytest.raises(OutputDirLocked, match=rf"{out}: another run \(pid {holder.pid}\) is using this "
                                                      "output directory"):
                train_sft(again, data=data)
            assert _snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()
    # the holder died: its lock file stays behind but locks nothing
    assert (out / ".lock").read_text().strip() == str(holder.pid)
    res = train_sft(_cfg(tmp_path, max_steps=3, eval_every=-1, resume=False), data=data)
    assert json.loads((res.output_dir / "sft_result.json").read_text())["step"] == 3


def test_the_lock_is_released_when_a_run_fails(tmp_path):
    from genrec_fast.train.runtime import run_lock

    with pytest.raises(RuntimeError, match="boom"):
        with run_lock(tmp_path):
            raise RuntimeError("boom")
    with run_lock(tmp_path):
        pass


def test_a_second_post_training_run_on_the_same_out_dir_is_refused(tmp_path):
    from genrec_fast.train import GRPOConfig, SDPOConfig, train_grpo, train_sdpo
    from genrec_fast.train.runtime import OutputDirLocked

    from test_sdpo_grpo import COMMON, make_tiny_run

    data_dir, model_dir = make_tiny_run(tmp_path)
    out = tmp_path / "post"
    (out / "model").mkdir(parents=True)
    (out / "metrics.json").write_text("{}")
    holder = _hold_lock(out)
    try:
        for cls, fn in ((SDPOConfig, train_sdpo), (GRPOConfig, train_grpo)):
            with pytest.raises(OutputDirLocked, match=rf"another run \(pid {holder.pid}\)"):
                fn(cls(model=str(model_dir), data=str(data_dir), out=str(out), steps=1, **COMMON))
            assert (out / "model").is_dir() and (out / "metrics.json").read_text() == "{}"
    finally:
        holder.kill()
        holder.wait()


# ---- c. unreadable checkpoints and model files ----------------------------------------------------

def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
    data = _data()
    cfg = _cfg(tmp_path, max_steps=6, eval_every=-1, save_every=3, keep_checkpoints=3)
    train_sft(cfg, data=data)
    ckpt = Path(cfg.output_dir) / "checkpoints"
    final = torch.load(ckpt / "step-0000006" / "state.pt", weights_only=False)
    for cut in (0, 1000):  # empty (EOFError) and cut short (not a zip archive)
        state = ckpt / "step-0000006" / "state.pt"
        state.write_bytes(state.read_bytes()[:cut] if cut else b"")
        with caplog.at_level(logging.WARNING, logger="genrec_fast.train"):
            train_sft(cfg, data=data)
        assert f"{state} cannot be read" in caplog.text
        caplog.clear()
        again = torch.load(state, weights_only=False)  # rewritten by the run resumed from step 3
        for k, v in final["model"].items():
            assert torch.equal(v, again["model"][k]), k
    for p in ckpt.glob("step-*/state.pt"):
        p.write_bytes(b"")
    with pytest.raises(ValueError, match=r"none of the 2 checkpoint\(s\) can be read.*--no-resume"):
        train_sft(cfg, data=data)


def _truncated_model_dir(root: Path, model, tok) -> Path:
    model.save_pretrained(root)
    tok.save_pretrained(root)
    weights = root / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    return weights


def test_a_truncated_model_file_is_an_error_naming_it(tmp_path):
    data = _data()
    model, tok, _ = _tiny(data)
    weights = _truncated_model_dir(tmp_path / "base", model, tok)
    with pytest.raises(ValueError, match=rf"{weights}: the model weights cannot be read .*damaged or was cut short"):
        train_sft(_cfg(tmp_path, model=str(tmp_path / "base"), max_steps=1, eval_every=-1), data=data)


def test_a_truncated_sft_model_given_to_post_training_is_an_error_naming_it(tmp_path):
    from genrec_fast.model import load_model_and_tokenizer
    from genrec_fast.train import GRPOConfig, SDPOConfig, train_grpo, train_sdpo

    from test_sdpo_grpo import COMMON, make_tiny_run

    data_dir, model_dir = make_tiny_run(tmp_path)
    model, tok, _ = load_model_and_tokenizer(str(model_dir), (4, 4, 4))
    weights = _truncated_model_dir(tmp_path / "cut", model, tok)
    for cls, fn in ((SDPOConfig, train_sdpo), (GRPOConfig, train_grpo)):
        with pytest.raises(ValueError, match=rf"{weights}: the model weights cannot be read"):
            fn(cls(model=str(tmp_path / "cut"), data=str(data_dir), out=str(tmp_path / "o"), steps=1, **COMMON))


# ---- e. a fresh start never leaves an earlier run's model beside its config ----------------------

def test_a_no_resume_run_killed_before_its_first_save_leaves_no_old_model(tmp_path, monkeypatch):
    from genrec_fast.train import sft

    data = _data()
    train_sft(_cfg(tmp_path, max_steps=2, eval_every=-1), data=data)
    out = tmp_path / "run"
    assert (out / "model").is_dir() and (out / "sft_result.json").is_file()

    def crash(self, batch):
        raise KeyboardInterrupt  # what a kill during the first step leaves behind

    monkeypatch.setattr(sft.ResponseLoss, "forward", crash)
    with pytest.raises(KeyboardInterrupt):
        train_sft(_cfg(tmp_path, max_steps=2, eval_every=-1, resume=False, lr=0.5), data=data)
    assert json.loads((out / "sft_config.json").read_text())["lr"] == 0.5
    left = sorted(p.name for p in out.iterdir())
    assert left == [".lock", "sft_config.json"], left


def test_a_non_finite_post_training_loss_is_an_error_the_command_line_reports():
    from genrec_fast.train.post_training import check_finite

    check_finite("S-DPO loss", torch.tensor(1.5))
    with pytest.raises(ValueError, match=r"S-DPO loss is not finite: \[nan\]"):
        check_finite("S-DPO loss", torch.tensor(float("nan")))  # the CLI reports ValueErrors without a traceback
