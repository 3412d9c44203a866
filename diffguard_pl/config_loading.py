"""Reading a config into the schema, and writing it next to a run's outputs.

``[--config FILE]... [key=value]...``: each file (a YAML path, or the name of a preset in ``conf/``) and then each
override is merged onto the schema's defaults with OmegaConf, which rejects an unknown key or a value of the wrong
type; relative input paths are made absolute; instantiating the dataclasses runs their value checks. Every
mistake raises :class:`ConfigError` naming the key (and, for a misspelt key or preset, the closest names).
"""

from __future__ import annotations

import argparse
import difflib
import re
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Type, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from diffguard_pl.config_shared import PROJECT_ROOT
from diffguard_pl.errors import ConfigError

T = TypeVar("T")
PRESETS = PROJECT_ROOT / "conf"  # --config NAME finds conf/NAME.yaml here


def _describe(error: OmegaConfBaseException, cfg: Optional[DictConfig] = None, written: Optional[str] = None) -> str:
    """OmegaConf's error as one line, led by the dotted key it concerns (when it names one). An unknown key
    (``written``: the key as the override spelt it, else OmegaConf's) is answered with the schema's closest keys
    in ``cfg`` (:func:`closest_keys`) instead of OmegaConf's siblings of its last part."""
    key = getattr(error, "full_key", None)
    message = str(error).splitlines()[0]
    if isinstance(error, ConfigKeyError) and key and cfg is not None:
        written = written or key
        close = closest_keys(written, cfg)
        hint = f"did you mean {' or '.join(close)}?" if close else "--help lists every key"
        return f"config key '{written}' is not in the schema: {hint}"
    return f"config key '{key}': {message}" if key else message


def leaf_keys(cfg: DictConfig, prefix: str = "") -> List[str]:
    """The dotted name of every value of ``cfg`` (groups recursed, a mapping-valued key kept whole)."""
    keys = []
    for name in cfg.keys():
        node = cfg._get_node(name)
        dotted = f"{prefix}{name}"
        if isinstance(node, DictConfig) and node._metadata.object_type not in (None, dict):
            keys += leaf_keys(node, f"{dotted}.")
        else:
            keys.append(dotted)
    return keys


def closest_keys(written: str, cfg: DictConfig, n: int = 3) -> List[str]:
    """The schema's keys a misspelt or misplaced ``written`` most likely means, best first: the keys ending in
    its last part, wherever they are nested (``diffguard.scale`` -> ``diffguard.guidance.scale``); when none
    does, the keys closest to it as a whole or by their last part (``trainer.max_stepz`` -> ``trainer.max_steps``),
    the closest and those nearly as close."""
    keys = leaf_keys(cfg)
    last = written.rsplit(".", 1)[-1]

    def likeness(key: str) -> float:
        return difflib.SequenceMatcher(None, written, key).ratio()

    same_last = [k for k in keys if k.rsplit(".", 1)[-1] == last]
    if same_last:
        return sorted(same_last, key=likeness, reverse=True)[:n]
    by_last: dict = {}
    for key in keys:
        by_last.setdefault(key.rsplit(".", 1)[-1], []).append(key)
    near = set(difflib.get_close_matches(written, keys, n=n, cutoff=0.6))
    near |= {k for name in difflib.get_close_matches(last, list(by_last), n=n, cutoff=0.75) for k in by_last[name]}
    ranked = sorted(near, key=likeness, reverse=True)
    return [k for k in ranked if likeness(k) >= likeness(ranked[0]) - 0.05][:n] if ranked else []


# Keys that hold an input path. They are made absolute when the config is composed: a relative value in a YAML
# file is relative to the file's project (the folder that holds its conf/ folder), so presets work from any
# working directory; on the command line, to the working directory. A saved config.yaml is then self-contained.
PATH_KEYS = ("models.classifier", "models.diffusion", "models.encoder", "diffusion_detectors.model",
             "cotrain.diffusion_path", "classifier.pretrained_path", "data.root")
HUB_KEYS = ("models.diffusion", "diffusion_detectors.model")  # diffusers models, which may be Hub ids
HUB_ID = r"^[A-Za-z0-9][\w.-]*/[\w.-]+$"


def project_root(config_file: Path) -> Path:
    """The folder a config file's relative input paths refer to: the parent of its ``conf/`` folder."""
    folder = config_file.resolve().parent
    return folder.parent if folder.name == "conf" else folder


def resolve_paths(tree: DictConfig, base: Path) -> None:
    """Make the relative input paths (PATH_KEYS) of a loaded YAML file absolute against ``base``, in place.

    A value that looks like a Hugging Face Hub id (``org/name``) and is not a folder under ``base`` stays as it
    is (it is then looked up in the local Hub cache)."""
    for key in PATH_KEYS:
        value = OmegaConf.select(tree, key, default=None)
        if not isinstance(value, str) or Path(value).is_absolute():
            continue
        candidate = base / value
        if re.match(HUB_ID, value) and not candidate.exists() and key in HUB_KEYS:
            continue
        OmegaConf.update(tree, key, str(candidate), merge=False)


def find_config_file(name: str | Path) -> Path:
    """A config file as given, else the project's preset of that name: ``fashion_gdm``, ``fashion_gdm.yaml`` and
    ``conf/fashion_gdm.yaml`` all name conf/fashion_gdm.yaml from any working directory. ConfigError otherwise,
    suggesting the closest preset names."""
    path = Path(name)
    if path.is_file():
        return path
    stem = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    preset = PRESETS / f"{stem}.yaml"
    if path.parent in (Path("."), Path("conf")) and preset.is_file():
        return preset
    names = sorted(p.stem for p in PRESETS.glob("*.yaml"))
    close = difflib.get_close_matches(stem, names, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}?" if close else f"the presets are {', '.join(names)}"
    raise ConfigError(f"config file {name} does not exist and names no preset in {PRESETS}: {hint} "
                      f"(--config takes a YAML path or a preset's name)")


def merge(schema: Type[T], config_files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> DictConfig:
    """YAML files then ``key=value`` overrides merged onto the schema's defaults; required keys may stay unset."""
    cfg = OmegaConf.structured(schema)
    for name in config_files:
        path = find_config_file(name)
        try:
            loaded = OmegaConf.load(path)
            resolve_paths(loaded, project_root(path))
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as error:
            raise ConfigError(f"{path}: {_describe(error, cfg)}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            given = OmegaConf.from_dotlist([item])
            resolve_paths(given, Path.cwd())
            cfg = OmegaConf.merge(cfg, given)
        except OmegaConfBaseException as error:
            raise ConfigError(f"override {item!r}: {_describe(error, cfg, item.split('=', 1)[0])}") from None
    return cfg


def compose(schema: Type[T], config_files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> DictConfig:
    """Merge YAML files then ``key=value`` overrides onto the schema's defaults; every required key must be set."""
    cfg = merge(schema, config_files, overrides)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"config key(s) {', '.join(missing)} must be set (e.g. {missing[0]}=...)")
    return cfg


def to_object(cfg: DictConfig) -> Any:
    """Instantiate the dataclasses, which runs their value checks."""
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as error:
        raise ConfigError(_describe(error)) from None


def parse_argv(argv: Sequence[str], default_config: Optional[str]) -> Tuple[List[str], List[str]]:
    """``[--config FILE]... [key=value]...`` -> (config files, overrides); without --config: the default file."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", action="append", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(list(argv))
    files = args.config if args.config is not None else ([default_config] if default_config else [])
    return files, list(args.overrides)


def load(schema: Type[T], argv: Sequence[str], default_config: Optional[str]) -> T:
    """Parse ``[--config FILE]... [key=value]...`` into a checked schema instance."""
    return to_object(compose(schema, *parse_argv(argv, default_config)))


def save(cfg: Any, path: str | Path) -> None:
    """Write the resolved config next to a run's outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
