"""Entry-point plumbing shared by ``train.py``, ``evaluate.py`` and the package's ``python -m`` tools.

Parse ``[--config FILE]... [key=value]...`` into the typed schema, answer ``--help`` (every key with its
type, default and meaning, read from the schema without importing torch) and ``print_config=true``, then
run the job; a mistake a user can fix prints one ``error:`` line and exits with code 2, an interruption
says what was kept and exits with 130 (Ctrl-C) or 143 (SIGTERM).

A key's help text lives in one place, the schema's source: the ``# comment`` on the field's line and the
comment lines right below it that are indented deeper than the field. A group (a nested dataclass) is
headed by the first line of its docstring.
"""

from __future__ import annotations

import ast
import functools
import inspect
import io
import os
import re
import shutil
import sys
import textwrap
import tokenize
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Type

from omegaconf import MISSING as REQUIRED
from omegaconf import OmegaConf

from diffguard_pl import config_loading
from diffguard_pl.errors import RunInterrupted, UserError


# ------------------------------------------------------------------------------------------------ help texts


@functools.lru_cache(maxsize=None)
def _own_help(cls: Type) -> Dict[str, str]:
    """The help of the fields a dataclass declares itself (not those it inherits), read from its source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {}  # line number -> (column, text) of every comment
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = (token.start[1], token.string.lstrip("#").strip())
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        parts = [comments[node.end_lineno][1]] if node.end_lineno in comments else []
        below = node.end_lineno + 1
        while (below in comments and lines[below - 1].lstrip().startswith("#")
               and comments[below][0] > node.col_offset):
            parts.append(comments[below][1])
            below += 1
        if parts:
            out[node.target.id] = " ".join(parts)
    return out


def field_help(cls: Type) -> Dict[str, str]:
    """Every field's help text, inherited fields included (a subclass's comment wins over its base's)."""
    out: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if is_dataclass(klass):
            out.update(_own_help(klass))
    return out


def group_summary(cls: Type) -> str:
    """The first line of a dataclass's own docstring ("" when it has none: dataclass then writes its signature)."""
    doc = inspect.getdoc(cls) or ""
    if doc.startswith(f"{cls.__name__}("):
        return ""
    return doc.split("\n")[0].replace("``", "")


def type_name(annotation: Any) -> str:
    """A field's annotation as a user reads it: ``int or null``, ``list of str``, ``mapping``."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    text = text.replace("typing.", "")
    optional = re.fullmatch(r"Optional\[(.*)\]", text)
    if optional:
        return f"{type_name(optional.group(1))} or null"
    listed = re.fullmatch(r"List\[(.*)\]", text)
    if listed:
        return f"list of {type_name(listed.group(1))}"
    return "mapping" if text.startswith("Dict[") else text


def show_value(value: Any) -> str:
    """A value as it is written on the command line: null, true, [a, b], {key: value}."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str) and value == "":
        return "''"
    return str(value)


def _schema_default(f) -> Any:
    """The schema's default of a field; ``MISSING`` for a required one (omegaconf's ``???`` or none at all)."""
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING if f.default in (MISSING, REQUIRED) else f.default


def describe_schema(schema: Type, values: Any = None, prefix: str = "") -> List[str]:
    """One entry per key, ``name (type, default): meaning``, then each group headed by its docstring's first line.

    ``values`` (a composed DictConfig of ``schema``) supplies the defaults shown; where they differ from the
    schema's, the schema's follows in brackets. A required key without a value shows ``required``."""
    values = OmegaConf.structured(schema) if values is None else values
    given = OmegaConf.to_container(values, resolve=True)
    helps, lines, groups = field_help(schema), [], []
    for f in fields(schema):
        schema_default = _schema_default(f)
        if is_dataclass(schema_default):
            groups.append(f)
            continue
        if OmegaConf.is_missing(values, f.name):
            shown = "required"
        else:
            value = given[f.name]
            shown = f"default {show_value(value)}"
            if schema_default is MISSING:
                shown += " [schema: required]"
            elif value != schema_default:
                shown += f" [schema {show_value(schema_default)}]"
        lines.append(f"{prefix}{f.name} ({type_name(f.type)}, {shown}): {helps.get(f.name, '')}".rstrip(": "))
    for f in groups:
        lines.append(f"\n{prefix}{f.name}: {group_summary(type(_schema_default(f)))}")
        lines += describe_schema(type(_schema_default(f)), values[f.name], f"{prefix}{f.name}.")
    return lines


def _wrap(entry: str, width: int) -> str:
    if entry.startswith("\n"):  # a group's heading
        return "\n" + textwrap.fill(entry[1:], width, subsequent_indent="    ")
    return textwrap.fill(entry, width, initial_indent="  ", subsequent_indent="      ", break_on_hyphens=False)


def help_text(schema: Type, program: str, argv: Sequence[str], default_config: Optional[str]) -> str:
    """The ``--help`` answer; the defaults shown are those of the given ``--config`` files and overrides (or of
    the entry point's default config file), so a preset's help shows the preset's values."""
    files, overrides = config_loading.parse_argv(argv, default_config)
    values = config_loading.merge(schema, files, overrides)
    width = max(60, min(shutil.get_terminal_size((100, 24)).columns, 120))
    default_name = Path(default_config).stem if default_config else "none"
    source = " + ".join(Path(f).name for f in files) or "no config file"
    if overrides:
        source += " + " + " ".join(overrides)
    return "\n".join([
        f"usage: {program} [--config FILE]... [key=value]...",
        "",
        textwrap.fill((inspect.getdoc(schema) or "").replace("``", ""), width),
        "",
        textwrap.fill(f"--config FILE  a YAML file or the name of a preset in conf/ (without --config: "
                      f"{default_name}), merged onto the schema's defaults; may be repeated (merged in order). "
                      "key=value arguments override on top; lists are written [a,b], None is written null.", width,
                      subsequent_indent=" " * 15),
        "",
        textwrap.fill(f"Keys: name (type, default: the value a run gets from {source}; [schema X] where that "
                      "changes the schema's default X): meaning.", width),
        *(_wrap(entry, width) for entry in describe_schema(schema, values)),
    ])


# -------------------------------------------------------------------------------------------------- running


def _print_to_reader(text: str) -> None:
    """Print, also to a reader that stops early (``--help | head``): then the rest is dropped without a traceback."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit


def run(schema: Type, job: Callable[[Any], Any], argv: Sequence[str], default_config: str,
        program: str = "") -> int:
    """Parse, answer --help / print_config, run ``job(cfg)``; returns the process's exit code."""
    argv = list(argv)
    try:
        if "-h" in argv or "--help" in argv:
            rest = [a for a in argv if a not in ("-h", "--help")]
            _print_to_reader(help_text(schema, program or sys.argv[0], rest, default_config))
            return 0
        files, overrides = config_loading.parse_argv(argv, default_config)
        cfg = config_loading.to_object(config_loading.compose(schema, files, overrides))
        if hasattr(cfg, "from_command_line"):
            cfg = cfg.from_command_line([str(f) for f in files], list(overrides))
        if getattr(cfg, "print_config", False):
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
