"""What every training stage (SFT, S-DPO, GRPO) shares around its loop.

* :func:`run_lock`: one run at a time per output directory (``OUT/.lock`` held with ``fcntl.flock``;
  the kernel drops the lock when its process ends, however it ends, so the file a killed run leaves
  behind locks nothing).
* :func:`start_fresh`: a run that resumes nothing removes what an earlier run left in its output
  directory (its result marker first), so an old model never sits beside a new config.
* Checkpoints ``OUT/checkpoints/step-NNNNNNN/state.pt``, each written as a whole (``io.atomic_dir``);
  :func:`load_checkpoint` resumes the newest one that reads back, warning about each unreadable one.
* RNG states (python / numpy / torch / CUDA), the finite-loss check, the JSONL metrics log.
* :func:`load_model_dir` / :func:`save_model_dir`: the model directory a stage starts from (an unreadable
  weights file is an error naming it) and the one it writes (a LoRA model merged into a copy first, the
  SID index and prompt style bundled in: ``genrec_fast.bundle``).
* :class:`StageConfig` / :class:`StageTrainer`: the options and the trainer part every stage shares.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import fcntl
import importlib.util
import json
import logging
import math
import os
import pickle
import random
import shutil
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from accelerate.utils import gather_object
from safetensors import SafetensorError
from tqdm.auto import tqdm

from genrec_fast.bundle import write_bundle
from genrec_fast.io import atomic_dir, atomic_write_text, recover_dir
from genrec_fast.model import load_model_and_tokenizer
from genrec_fast.prompts import model_prompt_style

logger = logging.getLogger("genrec_fast.train")

LOCK_NAME = ".lock"


def cli_logging() -> None:
    """Show the stages' messages (logger ``genrec_fast.train``, INFO and up) on stdout, for a command-line
    run; an application that configured logging itself keeps its set-up."""
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


class OutputDirLocked(OSError):
    """Another live run holds the output directory's lock."""


class NonFiniteLossError(FloatingPointError, ValueError):
    """A training loss came out NaN or infinite (a ValueError too, so the CLI reports it as bad input)."""


def check_finite(name: str, value: Union[torch.Tensor, float], where: str = "") -> None:
    """Raise :class:`NonFiniteLossError` naming ``name`` (and ``where``) when ``value`` is not finite."""
    t = torch.as_tensor(value)
    if not bool(torch.isfinite(t).all()):
        at = f" {where}" if where else ""
        raise NonFiniteLossError(f"{name} is not finite{at}: {t.detach().flatten()[:8].tolist()}; the run stops "
                                 "before saving anything from it (lower the learning rate, or check the data)")


def check_lr(owner: str, lr: float) -> None:
    """A learning rate must be a finite number >= 0."""
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"{owner}: lr must be a finite number >= 0, got {lr!r}")


# ---- the output directory ------------------------------------------------------------------------

def is_main_process() -> bool:
    """Rank 0 (or no launcher), read from the environment ``accelerate launch`` / torchrun set: known before
    any process group exists, so the lock is taken before anything else happens."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def run_lock(out: Union[str, Path], enabled: bool = True) -> Iterator[None]:
    """Hold ``out/.lock`` for the duration (``enabled=False``: a no-op, for non-main processes).

    A second run on the same directory gets :class:`OutputDirLocked` naming the directory and the
    holder's pid before it has changed anything there."""
    if not enabled:
        yield
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        holder = path.read_text().strip() or "unknown"
        raise OutputDirLocked(f"{out}: another run (pid {holder}) is using this output directory (it holds "
                              f"{path}); wait for it to finish, or give another output directory") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def start_fresh(out: Path, outputs: Sequence[str]) -> None:
    """Remove ``outputs`` (names in ``out``, files or folders, the first one the run's result marker) and
    the checkpoints and metrics log of an earlier run: the start of a run that resumes nothing."""
    for name in (*outputs, "checkpoints", "train_log.jsonl", TRACKER_DIR):
        path = out / name
        recover_dir(path)  # a swap's leftovers go too (a half-swapped model folder is put back, then removed)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


# ---- checkpoints ---------------------------------------------------------------------------------

def checkpoints(out: Path) -> List[Path]:
    """The checkpoint folders in ``out/checkpoints``, oldest first."""
    d = Path(out) / "checkpoints"
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if p.name.startswith("step-") and p.name[5:].isdigit()
                   and (p / "state.pt").is_file()), key=lambda p: int(p.name[5:]))


def save_checkpoint(out: Path, step: int, blob: Dict[str, Any], keep: int) -> Path:
    """Write ``blob`` as ``out/checkpoints/step-<step>/state.pt`` (atomically) and keep the newest ``keep``."""
    path = atomic_dir(Path(out) / "checkpoints" / f"step-{step:07d}", lambda d: torch.save(blob, d / "state.pt"))
    for old in checkpoints(out)[:-max(1, keep)]:
        shutil.rmtree(old)
    for left in path.parent.glob("step-*"):  # what a kill during such a removal leaves
        if not (left / "state.pt").exists():
            shutil.rmtree(left, ignore_errors=True)
    return path


_UNREADABLE = (EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError, KeyError)


def load_checkpoint(out: Path) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """(folder, blob) of the newest checkpoint that reads back, None when there is none. An unreadable one
    (a truncated file) is named in a warning and the one before it tried; none readable is an error."""
    found = checkpoints(out)
    for ckpt in reversed(found):
        try:
            return ckpt, torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
        except _UNREADABLE as e:
            logger.warning("%s cannot be read (%s: %s); resuming from the checkpoint before it instead",
                           ckpt / "state.pt", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    if found:
        raise ValueError(f"{Path(out) / 'checkpoints'}: none of the {len(found)} checkpoint(s) can be read; "
                         "start afresh with --no-resume (or remove the folder)")
    return None


def check_run_key(stage: str, ckpt: Path, saved: Optional[dict], now: dict) -> None:
    """A checkpoint made with other training settings must not be resumed (it would mix two runs)."""
    if saved is None or saved == now:
        return
    diff = "; ".join(f"{k} {saved.get(k)!r} then, {now.get(k)!r} now"
                     for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k))
    raise ValueError(f"{stage}: {ckpt} was made with other settings ({diff}): resuming would mix two runs; use "
                     "--no-resume (a fresh start) or another output directory")


def resume_or_start(acc, stage: str, out: Path, resume: bool, run_key: dict,
                    outputs: Sequence[str]) -> Optional[Dict[str, Any]]:
    """The checkpoint blob a run continues from (``resume`` and one readable, made with the same
    ``run_key``), else None after the main process has cleared ``out`` for a fresh start
    (:func:`start_fresh` of ``outputs``). Every process reads the checkpoint; run under the lock."""
    found = load_checkpoint(out) if resume else None
    if found is not None:
        check_run_key(stage, found[0], found[1].get("run_key"), run_key)
        logger.info("%s: resuming from %s (step %d)", stage, found[0], found[1]["trainer"]["step"])
    acc.wait_for_everyone()
    if acc.is_main_process:
        if found is None:
            start_fresh(out, outputs)
        else:
            for name in outputs:  # a model folder's interrupted swap is undone
                recover_dir(out / name)
            cut_log(out / "train_log.jsonl", found[1]["trainer"]["step"])  # what came after the checkpoint goes
    acc.wait_for_everyone()
    return None if found is None else found[1]


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- the metrics log -----------------------------------------------------------------------------

def append_log(path: Path, record: Dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def cut_log(path: Path, step: int) -> None:
    """Drop the records of ``path`` (JSONL with a "step" key) logged after ``step`` (a resumed run logs them again)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


# ---- experiment trackers (the metrics log's records, also sent through accelerate's trackers) ---------

REPORT_TO = ("none", "tensorboard", "wandb")
TRACKER_DIR = "tensorboard"  # OUT/tensorboard: the TensorBoard event files of --report-to tensorboard


def check_report_to(owner: str, report_to: str) -> None:
    """``report_to`` is one of :data:`REPORT_TO` and the package it needs is installed."""
    if report_to not in REPORT_TO:
        raise ValueError(f"{owner}: report_to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
    if report_to != "none" and importlib.util.find_spec(report_to) is None:
        raise ValueError(f"{owner}: report_to={report_to!r} needs the {report_to} package, which is not installed "
                         f"(pip install {report_to}; or --report-to none)")


def tracker_kwargs(report_to: str, out: Union[str, Path]) -> Dict[str, Any]:
    """The ``Accelerator(...)`` keywords of ``report_to`` (none: no tracker)."""
    return {} if report_to == "none" else {"log_with": report_to, "project_dir": str(out)}


def _hparams(config: Dict[str, Any]) -> Dict[str, Any]:
    """A config as trackers take it: scalars kept, anything else as JSON text."""
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in config.items()}


# ---- model directories ---------------------------------------------------------------------------

def load_model_dir(name: str, *args, **kwargs):
    """``genrec_fast.model.load_model_and_tokenizer(name, ...)``; an unreadable weights file in the model
    directory ``name`` (a truncated copy) is a ValueError naming the file instead of a raw SafetensorError."""
    try:
        return load_model_and_tokenizer(name, *args, **kwargs)
    except (SafetensorError, EOFError, pickle.UnpicklingError) as e:
        folder = Path(name)
        files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) if folder.is_dir() else []
        where = ", ".join(map(str, files)) or str(name)
        raise ValueError(f"{where}: the model weights cannot be read ({type(e).__name__}: {e}); the file is "
                         "damaged or was cut short (copy or save the model again)") from e


def save_model_dir(model, tokenizer, target: Path, catalog, state_dict: Optional[dict] = None) -> Path:
    """Write ``model`` (a PEFT/LoRA model merged into a copy first), ``tokenizer`` and the bundle of
    ``catalog`` (its SID index, the model's prompt style: ``genrec_fast.bundle.write_bundle``) to ``target``
    as a whole (``io.atomic_dir``): the one way every stage saves the model it hands on. ``state_dict``: the
    weights to write (e.g. gathered under ZeRO-3); ignored for a LoRA model, whose merged copy is written."""
    style = model_prompt_style(model)
    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()  # adapter folded in: a plain checkpoint
        state_dict = None

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_bundle(tmp, catalog, style)

    return atomic_dir(target, write)


# ---- what every stage shares ---------------------------------------------------------------------

def opt(default=None, help: str = "", factory=None, **metadata):
    """A config field with its help text in ``metadata["help"]`` (the command lines' ``--help``) and any other
    ``metadata`` key ``genrec_fast.config_cli`` reads (``choices``, ``type``); ``factory``: a default_factory
    instead of ``default``."""
    meta = {"help": help, **metadata}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


PRECISIONS = ("auto", "bf16", "fp16", "no")
LORA_DEFAULT_RANK = 16  # the rank `lora=True` alone asks for
# another name -> the field it sets (the names the stages used before they shared this config)
ALIASES = {"out": "output_dir", "steps": "max_steps", "bf16": "mixed_precision", "lora": "lora_r"}


@dataclass
class StageConfig:
    """Options every training stage takes (SFTConfig, and PostTrainConfig for S-DPO / GRPO, extend it).

    ``out``, ``steps``, ``bf16`` and ``lora`` are other names (see ``ALIASES``) of ``output_dir``,
    ``max_steps``, ``mixed_precision`` and ``lora_r``; after construction each holds what its field holds
    (``bf16``: None, ``lora``: ``lora_r > 0``)."""

    seed: int = opt(0, "random seed (model init, data order, negatives)")
    output_dir: str = opt("", "output directory")
    out: Optional[str] = opt(None, "another name for output_dir (default: unset)", other_name_of="output_dir")
    max_steps: Optional[int] = opt(None, "optimizer steps")
    steps: Optional[int] = opt(None, "another name for max_steps (default: unset)", other_name_of="max_steps")
    lr: float = opt(1e-3, "peak learning rate (finite, >= 0)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    mixed_precision: str = opt("auto", "'auto' (bf16 autocast on CUDA, else none), 'bf16', 'fp16' or 'no'")
    bf16: Optional[bool] = opt(None, "another name for mixed_precision: --bf16 = bf16, --no-bf16 = no "
                                     "(default: unset)", other_name_of="mixed_precision")
    lora_r: int = opt(0, "> 0: train a LoRA adapter of this rank (merged into the saved model); 0: full training")
    lora: bool = opt(False, f"a LoRA adapter of rank {LORA_DEFAULT_RANK} unless lora_r gives one")
    lora_alpha: int = opt(16, "LoRA alpha")
    log_every: int = opt(10, "optimizer steps between lines of train_log.jsonl")
    save_every: int = opt(0, "optimizer steps between checkpoints (OUT/checkpoints)")
    keep_checkpoints: int = opt(2, "newest checkpoints kept")
    resume: bool = opt(True, "continue from the newest readable checkpoint in the output directory; "
                              "--no-resume: a fresh start (an earlier run's outputs there are removed)")
    progress: bool = opt(True, "tqdm progress bar")
    report_to: str = opt("none", "experiment tracker the train_log.jsonl records also go to: 'none', "
                                 f"'tensorboard' (event files in OUT/{TRACKER_DIR}) or 'wandb'", choices=REPORT_TO)

    def __post_init__(self):
        name = type(self).__name__
        self._fold_aliases()
        check_report_to(name, self.report_to)
        check_lr(name, self.lr)
        for key in ("log_every", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ValueError(f"{name}: {key} must be >= 1, got {getattr(self, key)}")
        for key in ("save_every", "lora_r"):
            if getattr(self, key) < 0:
                raise ValueError(f"{name}: {key} must be >= 0, got {getattr(self, key)}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"{name}: mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")

    def _fold_aliases(self) -> None:
        """Each other name given sets its field (an error when both are given and disagree); then the other
        names mirror their fields."""
        name, defaults = type(self).__name__, {f.name: f.default for f in dataclasses.fields(self)}
        given = {"out": self.out or None, "steps": self.steps,
                 "bf16": None if self.bf16 is None else ("bf16" if self.bf16 else "no"),
                 "lora": LORA_DEFAULT_RANK if self.lora and not self.lora_r else None}
        for alias, value in given.items():
            target = ALIASES[alias]
            current = getattr(self, target)
            if value is None or value == current:
                continue
            if current not in (defaults[target], None, ""):
                raise ValueError(f"{name}: {alias}={getattr(self, alias)!r} and {target}={current!r} disagree; give "
                                 f"one of them ({alias} is another name for {target})")
            setattr(self, target, value)
        self.out, self.steps, self.bf16, self.lora = self.output_dir, self.max_steps, None, self.lora_r > 0


class StageTrainer:
    """The part of a stage's trainer around its loop: the resume-or-fresh-start of the output directory,
    checkpoints with every process's RNG states, the JSONL metrics log, the progress bar, messages
    (python ``logging``, main process) and the model directory it hands on. A stage sets ``stage`` (its
    name in messages) and ``outputs`` (what it writes in the output directory, result marker first), and
    runs under :func:`run_lock` of that directory."""

    stage = ""
    outputs: Tuple[str, ...] = ()

    def __init__(self, cfg: StageConfig, out: Path, accelerator):
        self.cfg, self.out, self.acc = cfg, Path(out), accelerator

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    def info(self, msg: str, *args) -> None:
        if self.is_main:
            logger.info(msg, *args)

    def rng_states(self) -> Dict[str, Any]:
        """This process's RNG states for a checkpoint (a stage adds its own generators)."""
        return rng_state()

    def set_rng_states(self, state: Dict[str, Any]) -> None:
        set_rng_state(state)

    def resume_or_start(self, run_key: dict) -> Optional[Dict[str, Any]]:
        """The checkpoint blob to continue from (this process's RNG states already restored) or None (the
        output directory cleared of an earlier run's outputs)."""
        blob = resume_or_start(self.acc, self.stage, self.out, self.cfg.resume, run_key, self.outputs)
        self._start_trackers(0 if blob is None else blob["trainer"]["step"])
        if blob is not None:
            rng = blob["rng"]
            self.set_rng_states(rng[self.acc.process_index] if isinstance(rng, list) else rng)
        return blob

    def save_checkpoint(self, step: int, blob: Dict[str, Any]) -> None:
        """Checkpoint ``blob`` plus every process's RNG states (every process calls this)."""
        rngs = [self.rng_states()]
        if self.acc.num_processes > 1:
            rngs = gather_object(rngs)
        if self.is_main:
            save_checkpoint(self.out, step, {**blob, "rng": rngs}, self.cfg.keep_checkpoints)

    def _start_trackers(self, step: int) -> None:
        """Start the ``report_to`` tracker (after the output directory was cleared or resumed): a resumed
        run's TensorBoard events drop what an earlier run logged after ``step`` (``purge_step``), as the
        metrics log does."""
        if self.cfg.report_to == "none":
            return
        if self.cfg.report_to == "tensorboard":
            name, kwargs = TRACKER_DIR, {"tensorboard": {"purge_step": step + 1} if step else {}}
        else:
            name, kwargs = "genrec-fast", {"wandb": {"name": f"{self.stage} {self.out}", "dir": str(self.out)}}
        self.acc.init_trackers(name, config=_hparams(dataclasses.asdict(self.cfg)), init_kwargs=kwargs)

    def finish_trackers(self) -> None:
        """Close the tracker (its last events written); the process group stays (unlike ``end_training``)."""
        if self.is_main:
            for tracker in self.acc.trackers:
                tracker.finish()
        self.acc.trackers = []

    def log_metrics(self, record: Dict[str, Any]) -> None:
        """``record`` (with its "step") appended to OUT/train_log.jsonl and sent to the tracker, if any."""
        if self.is_main:
            append_log(self.out / "train_log.jsonl", record)
            if self.acc.trackers:
                self.acc.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def progress_bar(self, total: int, initial: int = 0):
        return tqdm(total=total, initial=initial, desc=self.stage, unit="step",
                    disable=not (self.cfg.progress and self.is_main))

    def save_model(self, model, tokenizer, catalog, state_dict: Optional[dict] = None) -> Path:
        target = self.out / "model"
        if self.is_main:
            save_model_dir(model, tokenizer, target, catalog, state_dict=state_dict)
        return target
