"""The command line of a stage script is its typed `main(...)`: the signature gives the flags and their
types, the Google-style docstring their help, and `--config recipe.yaml` sets any of them from a YAML file
whose keys are main's parameters (flags given on the command line win). One definition of every option, so
a recipe, a flag and a Python call cannot drift apart.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class UsageError(ValueError):
    """A wrong combination of arguments or outputs; the command line prints it without a traceback."""


def _arg_docs(doc: str | None) -> tuple[str, dict[str, str]]:
    """(summary, {param: help}) from a Google-style docstring ("Args:" then "name: text" lines)."""
    if not doc:
        return "", {}
    lines = inspect.cleandoc(doc).splitlines()
    summary, params, current, in_args = [], {}, None, False
    for line in lines:
        if line.strip() == "Args:":
            in_args = True
            continue
        if not in_args:
            summary.append(line)
            continue
        if line and not line.startswith(" "):  # another section
            in_args = False
            continue
        stripped = line.strip()
        head, sep, rest = stripped.partition(":")
        if sep and line.startswith("    ") and not line.startswith("     ") and head.isidentifier():
            current = head
            params[current] = rest.strip()
        elif current and stripped:
            params[current] += " " + stripped
    return "\n".join(summary).strip(), params


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(type, optional) for X | None."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return tp, False


def _convert(tp: Any, value: Any, name: str) -> Any:
    """A YAML or command-line value as the parameter's type (PyYAML reads "1e-3" as a string)."""
    base, optional = _unwrap(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name}: null is not allowed")
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        (item,) = typing.get_args(base)[:1]
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ValueError(f"{name}: expected a list, got {value!r}")
        return tuple(_convert(item, v, name) for v in value)
    if base is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name}: expected true/false, got {value!r}")
        return value
    if base is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        return int(value)
    if base in (float, str, Path):
        return base(value)
    raise TypeError(f"{name}: unsupported parameter type {tp!r}")


def cli(main: Callable, argv: Sequence[str] | None = None) -> Any:
    """Run `main` with arguments from the command line: its signature and docstring are the CLI."""
    hints = typing.get_type_hints(main)
    sig = inspect.signature(main)
    summary, docs = _arg_docs(main.__doc__)
    module = sys.modules.get(main.__module__)
    spec = getattr(module, "__spec__", None)  # run with -m, the module is "__main__"; its spec has the real name
    parser = argparse.ArgumentParser(
        prog=f"python -m {spec.name if spec else main.__module__}", description=summary,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="YAML recipe: its keys are the parameters below; flags given here win")
    for name, param in sig.parameters.items():
        tp = hints[name]
        base, _ = _unwrap(tp)
        flag = "--" + name.replace("_", "-")
        help_text = docs.get(name, "")
        if param.default is inspect.Parameter.empty:
            help_text += " (required)"
        else:
            help_text += f" (default: {param.default})"
        kwargs: dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS, help=help_text)
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(base) in (list, tuple):
            parser.add_argument(flag, nargs="+", **kwargs)
        else:
            parser.add_argument(flag, **kwargs)
    ns = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    config_path = ns.pop("config", None)
    if config_path is not None:
        import yaml

        recipe = yaml.safe_load(Path(config_path).read_text()) or {}
        if not isinstance(recipe, dict):
            parser.error(f"{config_path}: a recipe is a mapping of parameter: value")
        unknown = sorted(set(recipe) - set(sig.parameters))
        if unknown:
            parser.error(f"{config_path}: unknown keys {unknown}; known: {sorted(sig.parameters)}")
        values.update(recipe)
    values.update(ns)
    missing = [n for n, p in sig.parameters.items() if p.default is inspect.Parameter.empty and n not in values]
    if missing:
        parser.error("missing: " + ", ".join("--" + n.replace("_", "-") for n in missing))
    try:
        kwargs = {n: _convert(hints[n], v, n) for n, v in values.items()}
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(
        level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return main(**kwargs)
    except (UsageError, FileNotFoundError) as e:  # bad input, not a bug: the message says what to change
        parser.exit(2, f"error: {e}\n")


def jsonable(args: dict[str, Any]) -> dict[str, Any]:
    """main()'s arguments as JSON values (paths as strings, tuples as lists): how a run records them."""

    def conv(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        return v

    return {k: conv(v) for k, v in args.items()}
