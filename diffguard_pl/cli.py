"""Entry-point plumbing shared by ``train.py``, ``evaluate.py`` and the package's ``python -m`` tools.

Parse ``[--config FILE]... [key=value]...`` into the typed schema, answer ``--help`` (every key with its
type, default and meaning, read from the schema without importing torch) and ``print_config=true``, then
run the job; a mistake a user can fix prints one ``error:`` line and exits with code 2, an interruption
says what was kept and exits with 130 (Ctrl-C) or 143 (SIGTERM).
"""

from __future__ import annotations

import ast
import inspect
import io
import sys
import tokenize
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, Callable, Dict, List, Sequence, Type

from diffguard_pl import config as config_lib
from diffguard_pl.errors import RunInterrupted, UserError


def _comments(cls) -> Dict[str, str]:
    """The trailing ``# comment`` of every field line in a dataclass's source."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    lines = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            lines[node.lineno] = node.target.id
    out = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and token.start[0] in lines:
            out[lines[token.start[0]]] = token.string.lstrip("#").strip()
    return out


def _type_name(annotation: Any) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    text = text.replace("typing.", "")
    return text[len("Optional["):-1] if text.startswith("Optional[") and text.endswith("]") else text


def describe_schema(schema: Type, prefix: str = "") -> List[str]:
    """One line per key: ``name (type, default): meaning``, groups headed by their docstring's first line."""
    lines, comments = [], _comments(schema)
    nested = []
    for f in fields(schema):
        factory = f.default_factory if f.default_factory is not MISSING else None
        if factory is not None and is_dataclass(factory):
            nested.append((f, factory))
            continue
        default = f.default if f.default is not MISSING else (factory() if factory is not None else "required")
        meaning = comments.get(f.name, "")
        lines.append(f"  {prefix}{f.name} ({_type_name(f.type)}, default {default!r})" + (f": {meaning}" if meaning
                                                                                      else ""))
    for f, factory in nested:
        doc = (inspect.getdoc(factory) or "").split("\n")[0]
        lines.append(f"{prefix}{f.name}: {doc}" if doc else f"{prefix}{f.name}:")
        lines += describe_schema(factory, f"{prefix}{f.name}.")
    return lines


def _help(schema: Type, program: str, default_config: str) -> str:
    doc = inspect.getdoc(schema) or ""
    return "\n".join([
        f"usage: {program} [--config FILE]... [key=value]...",
        "",
        doc,
        f"--config FILE  YAML merged onto the defaults below, in order (default: {default_config});",
        "               presets live in conf/. key=value arguments override on top.",
        "Keys (type, default: meaning); lists are written [a,b], nothing is null:",
        *describe_schema(schema),
    ])


def run(schema: Type, job: Callable[[Any], Any], argv: Sequence[str], default_config: str,
        program: str = "") -> int:
    """Parse, answer --help / print_config, run ``job(cfg)``; returns the process's exit code."""
    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        print(_help(schema, program or sys.argv[0], default_config))
        return 0
    try:
        cfg = config_lib.load(schema, argv, default_config)
        if getattr(cfg, "print_config", False):
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
            return 0
        job(cfg)
    except RunInterrupted as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        return stop.exit_code
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
