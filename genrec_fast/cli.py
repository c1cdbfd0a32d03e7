"""The ``genrec-fast`` command line.

Each stage lives in its own module, which exposes ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them together (a subcommand's module is imported only when
that subcommand runs). A stage whose options are a config dataclass (every one: sids, sft, eval,
demo, sdpo, rl, recommend) gets them from ``genrec_fast.config_cli.add_dataclass_arguments``: one
``--field-name`` per field.
Every subcommand accepts ``--config FILE`` (JSON or YAML, ``config_cli.apply_config``): its keys are the
subcommand's option names (dashes or underscores; a ``--no-x`` switch is its dest ``x``), and flags given on
the command line override them. Config values go through the flags' checks (type, choices; switches take
true/false), and a bad one is an error naming the file and key.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Dict, List, Optional

import torch.distributed as dist

from genrec_fast import __version__
from genrec_fast.config_cli import DefaultsHelpFormatter, apply_config, load_config

__all__ = ["COMMANDS", "DefaultsHelpFormatter", "build_parser", "entry", "load_config", "main", "version_line"]

# subcommand -> (module, one-line help)
COMMANDS: Dict[str, tuple] = {
    "sids": ("genrec_fast.sid.cli", "build collision-free Semantic IDs for a catalogue"),
    "sft": ("genrec_fast.train.sft", "multi-task supervised fine-tuning"),
    "eval": ("genrec_fast.eval.cli", "full-catalogue evaluation by constrained beam search"),
    "recommend": ("genrec_fast.recommend", "top-k items for one history from a saved model (no data folder)"),
    "demo": ("genrec_fast.demo", "MovieLens-1M end to end: SIDs -> SFT -> eval"),
    "sdpo": ("genrec_fast.train.sdpo", "softmax-DPO preference training"),
    "rl": ("genrec_fast.train.grpo", "GRPO (ReRe) reinforcement learning on beam rollouts"),
}


def build_parser(command: str) -> argparse.ArgumentParser:
    module_name, help_text = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"genrec-fast {command}", description=help_text, allow_abbrev=False,
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--config", help="JSON/YAML file of option values; flags override it (default: none)")
    module.add_arguments(parser)
    return parser


def version_line() -> str:
    """``genrec-fast X (torch A, transformers B, ...)``: the package's version and its main dependencies'
    installed versions, read from their metadata (nothing is imported)."""
    deps = []
    for name in ("torch", "transformers", "triton", "accelerate", "peft"):
        try:
            deps.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            deps.append(f"{name} not installed")
    return f"genrec-fast {__version__} ({', '.join(deps)}; Python {sys.version.split()[0]})"


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--version"], ["-V"]):
        print(version_line())
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: genrec-fast [--version] COMMAND [--config FILE] [options]", "", "commands:"]
        lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"genrec-fast: error: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    command, rest = argv[0], argv[1:]
    parser = build_parser(command)
    args = apply_config(parser, rest)
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return int(module.run(args) or 0)
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Under ``accelerate launch`` the stages join a process group, left here before exit: left to interpreter
    shutdown, gloo's threads can outlive the interpreter and abort the process after the work is done (SIGABRT,
    "terminate called without an active exception"; in about 1 run of 6 of tests/test_distributed.py's
    2-process eval)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def entry(argv: Optional[List[str]] = None) -> int:
    """The ``genrec-fast`` console script: :func:`main`, with bad input (a ``ValueError``, or an
    ``OSError`` such as a missing file or a model that is neither a local directory nor on the hub,
    which name what and where) reported on stderr as ``genrec-fast: error: ...`` with exit status 2
    instead of a traceback. ``GENRECFAST_TRACEBACK=1`` shows the traceback."""
    try:
        return main(argv)
    except (ValueError, OSError) as err:
        if os.environ.get("GENRECFAST_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"genrec-fast: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(entry())
