"""Command lines generated from config dataclasses, and config files that set their options.

One helper for every ``genrec-fast`` subcommand whose options are a dataclass (``sids``, ``sft``, ``eval``,
``demo``, ``sdpo``, ``rl``): :func:`add_dataclass_arguments` makes each field ``--field-name``, typed from its
annotation, its help text from ``metadata["help"]`` with its default stated; :func:`config_from_args` builds the
dataclass back from the parsed options. :func:`apply_config` (every subcommand) lets ``--config FILE`` (JSON or YAML)
set any option, the flags given overriding it; a config value goes through the same checks as the flag.

Field annotation -> option:

* ``bool`` / ``Optional[bool]``: a switch ``--x`` / ``--no-x`` (a config file takes true / false only);
* ``int`` / ``float`` / ``str``: one value of that type; ``Optional[...]``: ``none`` or ``null`` give None;
* ``Tuple[X, ...]`` / ``List[X]``: one or more values of X (``--tasks a b``; a config file: a list); in
  ``Optional[...]``, None when not given;
* ``Dict[...]``: a JSON object (``--model-overrides '{"hidden_size": 64}'``; a config file: a mapping).

``metadata`` may also hold ``choices`` (the values allowed), ``type`` (a converter str -> value used instead
of the annotation's, e.g. one that reads ``all`` as None) and ``group`` (the title of the ``--help`` section the
option is listed in). Besides the standard library this module imports only yaml and ``genrec_fast.io``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import yaml

from genrec_fast.io import unicode_error_message

__all__ = ["DefaultsHelpFormatter", "add_dataclass_arguments", "apply_config", "config_from_args", "json_object",
           "load_config", "option"]


def option(default: Any = dataclasses.MISSING, help: str = "", factory: Optional[Callable[[], Any]] = None,
           **metadata: Any):
    """A dataclass field with its help text (and any other ``metadata`` key this module reads: ``choices``,
    ``type``, ``group``); ``factory``: a default_factory instead of ``default``."""
    meta = {"help": help, **metadata}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ---- config files --------------------------------------------------------------------------------

def load_config(path: str) -> Dict[str, Any]:
    """Read a JSON or YAML config file into a flat dict of option values (errors: ValueError / OSError
    naming the file, and the line where the parser knows it)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"config {unicode_error_message(path, e)}") from None
    if p.suffix.lower() in (".yaml", ".yml"):
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


def json_object(text: str) -> dict:
    """A JSON object given as text (the command-line form of a dict option)."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {text!r}")
    return value


json_object.__name__ = "JSON"  # argparse and the config errors name the expected type by it


def config_value(action: argparse.Action, value: Any, where: str) -> Any:
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
    if isinstance(value, dict) and action.type in (json.loads, json_object):
        return value  # a JSON-object option written as a mapping
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


def apply_config(parser: argparse.ArgumentParser, argv: List[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with the values of ``--config FILE`` (when given) as the defaults: an
    unknown key, or a value the flag would refuse, is a ValueError naming the file and key."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        cfg = load_config(known.config)
        actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
        unknown = sorted(set(cfg) - set(actions))
        if unknown:
            raise ValueError(f"config {known.config} has unknown option(s): {', '.join(unknown)}")
        given = _command_line_dests(parser, argv)
        for name, target in getattr(parser, "other_names", {}).items():
            for flag, key in ((name, target), (target, name)):
                if flag in given and key not in given:
                    cfg.pop(key, None)  # the command line's name of the option wins over the file's other name
        parser.set_defaults(**{k: config_value(actions[k], v, f"config {known.config}: key {k!r}")
                               for k, v in cfg.items()})
        # options given in the config are no longer required on the command line
        for a in parser._actions:
            if a.dest in cfg:
                a.required = False
    return parser.parse_args(argv)


def _command_line_dests(parser: argparse.ArgumentParser, argv: List[str]) -> set:
    """The dests of the options ``argv`` gives (``--x``, ``--no-x``, ``--x=V``; abbreviations are off)."""
    return {a.dest for a in parser._actions for s in a.option_strings for t in argv
            if t == s or t.startswith(s + "=")}


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that states every option's default: `` (default: X)`` after its text unless the text already
    speaks of its default; a switch is "off" unless given (``--x/--no-x``: the one in force); an option whose
    default is None: ``(default: none)``."""

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
            return f"{text} (default: none)".lstrip()
        return f"{text} (default: %(default)s)".lstrip()


# ---- dataclass -> options ------------------------------------------------------------------------

def _optional(conv: Callable[[str], Any]) -> Callable[[str], Any]:
    """``conv``, with ``none`` / ``null`` (any case) read as None."""
    def parse(text: str) -> Any:
        if isinstance(text, str) and text.lower() in ("none", "null"):
            return None
        return conv(text)

    parse.__name__ = getattr(conv, "__name__", "value")
    return parse


_UNIONS = (typing.Union, getattr(types, "UnionType", typing.Union))  # Optional[X]; X | None (Python >= 3.10)


def _unwrap_optional(hint: Any):
    """(the type inside ``Optional[...]``, True) or (hint, False)."""
    if typing.get_origin(hint) in _UNIONS:
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) == 1 and len(inner) < len(typing.get_args(hint)):
            return inner[0], True
    return hint, False


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _shown(value: Any) -> str:
    """A default as it is typed on the command line (``%`` escaped for argparse)."""
    if value is None:
        text = "none"
    elif value == "":
        text = "unset"
    elif isinstance(value, (list, tuple)):
        text = " ".join(map(str, value)) if value else "empty"
    elif isinstance(value, dict):
        text = json.dumps(value)
    else:
        text = str(value)
    return text.replace("%", "%%")


def _field_kwargs(cls: type, f: dataclasses.Field, hint: Any, default: Any) -> Dict[str, Any]:
    """The ``add_argument`` keywords of one field (TypeError naming it when its type has no option form)."""
    inner, optional = _unwrap_optional(hint)
    origin = typing.get_origin(inner)
    conv = f.metadata.get("type")
    if inner is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin in (tuple, list) or inner in (tuple, list):
        elems = [a for a in typing.get_args(inner) if a is not Ellipsis]
        elem = elems[0] if elems else str
        if elem not in (int, float, str):
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for {hint!r}")
        return {"nargs": "+", "type": conv or elem}  # Optional[...]: None when not given
    if origin is dict or inner is dict:
        return {"type": conv or json_object, "metavar": "JSON"}
    if conv is None and inner not in (int, float, str):
        raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for {hint!r}")
    conv = conv or inner
    return {"type": _optional(conv) if optional and f.metadata.get("type") is None else conv}


def add_dataclass_arguments(parser: argparse.ArgumentParser, config_cls: type, first: Iterable[str] = (),
                            required: Iterable[str] = ()) -> None:
    """One ``--field-name`` per field of the dataclass ``config_cls`` (dest: the field name), typed from its
    annotation (see the module docstring), its help ``metadata["help"]`` followed by its default (unless the
    text states it); ``first``: fields listed first in ``--help``; ``required``: fields the command line
    must give (unless a ``--config`` file does)."""
    first, required = list(first), set(required)
    hints = typing.get_type_hints(config_cls)
    # fields whose metadata says they are another name of a field: a flag of either overrides a config file's
    # value of the other (apply_config)
    other = {f.name: f.metadata["other_name_of"] for f in dataclasses.fields(config_cls)
             if "other_name_of" in f.metadata}
    parser.other_names = {**getattr(parser, "other_names", {}), **other}
    fields = sorted(dataclasses.fields(config_cls),
                    key=lambda f: first.index(f.name) if f.name in first else len(first))
    groups: Dict[str, Any] = {}
    for f in fields:
        default = _default_of(f)
        kwargs = _field_kwargs(config_cls, f, hints[f.name], default)
        text = f.metadata.get("help", "").replace("%", "%%")
        if f.name in required:
            kwargs.update(required=True)
        else:
            if isinstance(default, tuple):
                default = list(default)  # as nargs="+" gives it
            if "(default:" not in text:
                if kwargs.get("action") is argparse.BooleanOptionalAction:
                    name = f.name.replace("_", "-")
                    shown = "unset" if default is None else f"--{name}" if default else f"--no-{name}"
                else:
                    shown = _shown(default)
                text = f"{text} (default: {shown})".lstrip()
            kwargs.update(default=default)
        if "choices" in f.metadata:
            kwargs["choices"] = tuple(f.metadata["choices"])
        title = f.metadata.get("group")
        target = parser if title is None else groups.setdefault(title, parser.add_argument_group(title))
        target.add_argument("--" + f.name.replace("_", "-"), dest=f.name, help=text, **kwargs)


def config_from_args(config_cls: type, args: argparse.Namespace):
    """The ``config_cls`` instance the parsed options describe (options of no field are ignored; a list
    given to a tuple-typed field becomes a tuple)."""
    hints = typing.get_type_hints(config_cls)
    given = vars(args)
    kwargs = {}
    for f in dataclasses.fields(config_cls):
        if f.name not in given:
            continue
        value = given[f.name]
        inner, _ = _unwrap_optional(hints[f.name])
        if isinstance(value, list) and (typing.get_origin(inner) is tuple or inner is tuple):
            value = tuple(value)
        kwargs[f.name] = value
    return config_cls(**kwargs)
