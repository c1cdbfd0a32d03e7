"""The ``genrec-fast`` command line.

Each stage lives in its own module, which exposes ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them together (modules are imported
lazily so ``genrec-fast --help`` stays fast). Every subcommand accepts
``--config FILE`` (JSON or YAML): its keys are the subcommand's option names
(dashes or underscores; a ``--no-x`` switch is its dest ``x``), and flags given on the command line
override them. Config values go through the flags' checks (type, choices; switches take true/false),
and a bad one is an error naming the file and key.
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
    "recommend": ("genrec_fast.recommend", "top-k items for one history from a saved model (no data folder)"),
    "demo": ("genrec_fast.demo", "MovieLens-1M end to end: SIDs -> SFT -> eval"),
    "sdpo": ("genrec_fast.train.sdpo", "softmax-DPO preference training"),
    "rl": ("genrec_fast.train.grpo", "GRPO (ReRe) reinforcement learning on beam rollouts"),
}


def load_config(path: str) -> Dict[str, Any]:
    """Read a JSON or YAML config file into a flat dict of option values (errors: ValueError / OSError
    naming the file, and the line where the parser knows it)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        from genrec_fast.io import unicode_error_message

        raise ValueError(f"config {unicode_error_message(path, e)}") from None
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:  # its message spans lines: one line, with the file and line
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            problem = getattr(e, "problem", None) or str(e)
            raise ValueError(f"config {where}: invalid YAML: {' '.join(str(problem).split())}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config {path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must hold a mapping of option -> value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


_SWITCHES = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)


def _config_value(action: argparse.Action, value: Any, where: str) -> Any:
    """A config value as the flag would give it: through the option's type and choices; switches take
    true / false only. ``where`` names the file and key in errors."""
    if value is None and action.default is None and not action.required:
        return None  # unset, as when the flag is not given
    if isinstance(action, _SWITCHES):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if type(action) is not argparse._StoreAction:
        raise ValueError(f"{where}: this option cannot be set from a config file")
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if many:
        values = value if isinstance(value, list) else [value]
        if action.nargs == "+" and not values:
            raise ValueError(f"{where}: expected at least one value")
        return [_config_scalar(action, v, where) for v in values]
    if isinstance(value, list):
        raise ValueError(f"{where}: expected one value, got a list")
    return _config_scalar(action, value, where)


def _config_scalar(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(value, dict) and action.type is json.loads:
        return value  # a JSON-dict option written as a mapping
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected a value, got {value!r} (YAML reads an unquoted yes / no / on / off "
                         "as true / false: quote it)")
    if not (value is None or isinstance(value, (str, int, float))):
        raise ValueError(f"{where}: expected a single value, got {value!r}")
    conv = action.type or str
    try:  # null: what a flag would spell (an optional-typed option maps it to None)
        out = conv("null" if value is None else str(value))
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        kind = "JSON" if conv is json.loads else getattr(conv, "__name__", "")
        raise ValueError(f"{where}: invalid {kind} value {value!r}") from None
    if value is None and out is not None:
        raise ValueError(f"{where}: null is not a value of this option")
    if action.choices is not None and out not in action.choices:
        raise ValueError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return out


def _apply_config(parser: argparse.ArgumentParser, argv: List[str]) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        cfg = load_config(known.config)
        actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
        unknown = sorted(set(cfg) - set(actions))
        if unknown:
            raise ValueError(f"config {known.config} has unknown option(s): {', '.join(unknown)}")
        parser.set_defaults(**{k: _config_value(actions[k], v, f"config {known.config}: key {k!r}")
                               for k, v in cfg.items()})
        # options given in the config are no longer required on the command line
        for a in parser._actions:
            if a.dest in cfg:
                a.required = False
    return parser.parse_args(argv)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that states every option's default: `` (default: X)`` after its text unless the text already
    speaks of its default; a switch is "off" unless given (``--x/--no-x``: the one in force). An option whose
    default is None says in its own text what None means."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.required or action.default is argparse.SUPPRESS
                or "default" in text.lower()):
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{text} (default: off)".lstrip()
        if isinstance(action, argparse.BooleanOptionalAction):
            on, off = action.option_strings[0], action.option_strings[-1]
            return f"{text} (default: {on if action.default else off})".lstrip()
        if action.default is None:
            return text
        return f"{text} (default: %(default)s)".lstrip()


def build_parser(command: str) -> argparse.ArgumentParser:
    module_name, help_text = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"genrec-fast {command}", description=help_text,
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--config", help="JSON/YAML file of option values; flags override it (default: none)")
    module.add_arguments(parser)
    return parser


def version_line() -> str:
    """``genrec-fast X (torch A, transformers B, ...)``: the package's version and its main dependencies'
    installed versions, read from their metadata (nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    from genrec_fast import __version__

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
