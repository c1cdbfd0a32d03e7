"""The ``genrec-fast`` command line.

Each stage lives in its own module, which exposes ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them together (modules are imported
lazily so ``genrec-fast --help`` stays fast). Every subcommand accepts
``--config FILE`` (JSON or YAML): its keys are the subcommand's option names
(dashes or underscores), and flags given on the command line override them.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

# subcommand -> (module, one-line help)
COMMANDS: Dict[str, tuple] = {
    "sids": ("genrec_fast.sid.cli", "build collision-free Semantic IDs for a catalogue"),
    "sft": ("genrec_fast.train.sft", "multi-task supervised fine-tuning"),
    "eval": ("genrec_fast.eval.cli", "full-catalogue evaluation by constrained beam search"),
    "demo": ("genrec_fast.demo", "MovieLens-1M end to end: SIDs -> SFT -> eval"),
    "sdpo": ("genrec_fast.train.sdpo", "softmax-DPO preference training"),
    "rl": ("genrec_fast.train.grpo", "GRPO (ReRe) reinforcement learning on beam rollouts"),
}


def load_config(path: str) -> Dict[str, Any]:
    """Read a JSON or YAML config file into a flat dict of option values."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"genrec-fast: config file not found: {path}")
    text = p.read_text()
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - report any parse error with the file name
        raise SystemExit(f"genrec-fast: cannot parse config {path}: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SystemExit(f"genrec-fast: config {path} must hold a mapping of option -> value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _apply_config(parser: argparse.ArgumentParser, argv: List[str]) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        cfg = load_config(known.config)
        valid = {a.dest for a in parser._actions}
        unknown = sorted(set(cfg) - valid)
        if unknown:
            raise SystemExit(f"genrec-fast: config {known.config} has unknown option(s): {', '.join(unknown)}")
        parser.set_defaults(**cfg)
        # options given in the config are no longer required on the command line
        for a in parser._actions:
            if a.dest in cfg:
                a.required = False
    return parser.parse_args(argv)


def build_parser(command: str) -> argparse.ArgumentParser:
    module_name, help_text = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"genrec-fast {command}", description=help_text)
    parser.add_argument("--config", help="JSON/YAML file of option values; flags override it")
    module.add_arguments(parser)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: genrec-fast COMMAND [--config FILE] [options]", "", "commands:"]
        lines += [f"  {name:<6} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\ngenrec-fast: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    command, rest = argv[0], argv[1:]
    parser = build_parser(command)
    args = _apply_config(parser, rest)
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return int(module.run(args) or 0)
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Under ``accelerate launch`` the stages join a process group; leave it explicitly before exit. Left to
    interpreter shutdown, gloo's threads can outlive it and abort the process ("terminate called without an
    active exception", SIGABRT) after the work is done: 1 run in ~6 of the 2-process eval test."""
    import torch.distributed as dist

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
