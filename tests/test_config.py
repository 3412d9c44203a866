import ast
import re
from dataclasses import MISSING, fields, is_dataclass

import pytest
from omegaconf import OmegaConf

from diffguard_pl import cli
from diffguard_pl import config as config_lib
from diffguard_pl.config import ConfigError, EvalConfig, TrainConfig, DiffGuardConfig
from diffguard_pl.jobs.calibration import CalibrationConfig

from helpers.paths import ROOT


def load(*overrides, files=()):
    return config_lib.load(TrainConfig, [f"--config={f}" for f in files] + list(overrides), None)


def test_defaults_and_overrides_apply():
    cfg = load("task=diffusion", "trainer.max_steps=7", "data.resolution=32", "diffusion.block_out_channels=[32,32,64]")
    assert cfg.task == "diffusion" and cfg.trainer.max_steps == 7 and cfg.data.resolution == 32
    assert list(cfg.diffusion.block_out_channels) == [32, 32, 64]
    assert cfg.optim.name == "adamw"  # untouched default


@pytest.mark.parametrize("override,key", [
    ("task=classifier trainer.max_stepz=3", "max_stepz"),
    ("task=classifier data.resolutoin=32", "resolutoin"),
    ("task=classifier bogus=1", "bogus"),
])
def test_unknown_key_is_named(override, key):
    with pytest.raises(ConfigError, match=key):
        load(*override.split())


def test_unknown_key_in_yaml_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("task: classifier\nclassifier:\n  archh: resnet18\n")
    with pytest.raises(ConfigError, match="archh") as info:
        load(files=[path])
    assert str(path) in str(info.value)


@pytest.mark.parametrize("written, meant", [
    ("diffguard.scale", "diffguard.guidance.scale"),  # the right name one group too high: found by its last part
    ("scale", "diffguard.guidance.scale"),
    ("depth", "diffguard.depth"),
    ("diffguard.guidanc.scale", "diffguard.guidance.scale"),  # a misspelt group
    ("trainer.max_stepz", "trainer.max_steps"),  # a misspelt last part
])
def test_an_unknown_key_suggests_the_schema_key_it_means_at_any_depth(written, meant):
    with pytest.raises(ConfigError) as info:
        config_lib.load(EvalConfig, [f"{written}=3"], None)
    message = str(info.value)
    assert f"'{written}' is not in the schema: did you mean {meant}?" in message, message
    assert "'score'" not in message  # OmegaConf's guess among the siblings of the last group is not repeated


def test_an_unknown_key_in_yaml_gets_the_same_suggestion_and_nothing_close_points_to_help(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("diffguard:\n  scale: 3\n")
    with pytest.raises(ConfigError, match=r"did you mean diffguard\.guidance\.scale\?"):
        config_lib.load(EvalConfig, [f"--config={path}"], None)
    with pytest.raises(ConfigError, match="qqqq' is not in the schema: --help lists every key"):
        config_lib.load(EvalConfig, ["qqqq=1"], None)


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        load("task=classifier", "trainer.max_steps=many")


def test_missing_required_value_is_named():
    with pytest.raises(ConfigError, match="task"):
        load("trainer.max_steps=3")


def test_bad_choice_is_named():
    with pytest.raises(ConfigError, match="data.channels"):
        load("task=classifier", "data.channels=2")
    with pytest.raises(ConfigError, match="logger"):
        load("task=classifier", "logger=tensorboard")


@pytest.mark.parametrize("override, key", [
    ("oracle=true", "oracle"), ("diffguard.clip_x0=true", "diffguard.clip_x0"),
    ("diffguard.guidance.mode=cfg", "diffguard.guidance.mode"),
])
def test_retired_values_get_the_plain_choice_error(override, key):
    """Values of earlier versions (oracle and clip_x0 as switches, mode=cfg) have no special message any more."""
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}=.* is not allowed; choose one of \["):
        config_lib.load(EvalConfig, [override], None)


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="key=value"):
        load("task=classifier", "trainer.max_steps")


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nothere.yaml"):
        load(files=[tmp_path / "nothere.yaml"])


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "conf").glob("train_*.yaml")))
def test_shipped_configs_load(name):
    cfg = load(files=[ROOT / "conf" / name])
    assert cfg.task in ("classifier", "diffusion", "cotrain", "joint", "contrastive")


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "conf").glob("*.yaml") if not p.name.startswith("train_")))
def test_shipped_evaluation_presets_load(name):
    from diffguard_pl.config import EvalConfig

    cfg = config_lib.load(EvalConfig, [f"--config={ROOT / 'conf' / name}"], None)
    assert cfg.diffguard.depth <= cfg.diffguard.num_steps


def test_every_model_path_of_a_preset_is_found_from_any_folder(tmp_path, monkeypatch):
    """The input paths of a preset are relative to its project, whatever the working directory (a model read from
    a path relative to the working directory is missing elsewhere)."""
    from pathlib import Path

    from diffguard_pl.config import EvalConfig

    monkeypatch.chdir(tmp_path)
    cfg = config_lib.load(EvalConfig, ["--config", "fashion_classifier_free"], None)
    paths = [cfg.models.classifier, cfg.models.diffusion, cfg.models.encoder, cfg.diffusion_detectors.model]
    assert all(Path(p).is_absolute() and Path(p).is_dir() for p in paths), paths


def test_saved_config_round_trips(tmp_path):
    cfg = load("task=diffusion", "diffusion.conditional=true", "seed=5")
    config_lib.save(cfg, tmp_path / "config.yaml")
    again = load(files=[tmp_path / "config.yaml"])
    assert OmegaConf.structured(again) == OmegaConf.structured(cfg)


# ------------------------------------------------------------------------------------- preset names


@pytest.mark.parametrize("name", ["fashion_gdm", "fashion_gdm.yaml", "conf/fashion_gdm.yaml"])
def test_a_preset_is_found_by_its_name_from_any_folder_after_a_file_of_that_name(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    by_path = config_lib.load(EvalConfig, [f"--config={ROOT / 'conf' / 'fashion_gdm.yaml'}"], None)
    assert config_lib.load(EvalConfig, ["--config", name], None) == by_path
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_text("diffguard:\n  depth: 3\n")  # a file the name points at comes first
    assert config_lib.load(EvalConfig, ["--config", name], None).diffguard.depth == 3


def test_an_unknown_config_name_suggests_the_closest_presets():
    with pytest.raises(ConfigError, match=r"fashion_gmd .*did you mean fashion_gdm\b"):
        config_lib.load(EvalConfig, ["--config", "fashion_gmd"], None)
    with pytest.raises(ConfigError) as info:  # nothing close: every preset is listed
        config_lib.load(EvalConfig, ["--config", "qqqq"], None)
    assert all(p.stem in str(info.value) for p in (ROOT / "conf").glob("*.yaml"))


# --------------------------------------------------------------------------------- --help explains every key

ROOTS = {"evaluate": EvalConfig, "train": TrainConfig, "calibration": CalibrationConfig}


def walk(schema, prefix=""):
    """(dotted key, field, the dataclass declaring it, its group class or None) for every field, groups recursed."""
    for f in fields(schema):
        group = type(f.default_factory()) if f.default_factory is not MISSING else None
        group = group if group is not None and is_dataclass(group) else None
        yield f"{prefix}{f.name}", f, schema, group
        if group is not None:
            yield from walk(group, f"{prefix}{f.name}.")


def help_entries(schema, argv=(), default_config=None):
    """The --help answer split into entries: {dotted key: its (unwrapped) line}."""
    text = cli.help_text(schema, "prog", list(argv), default_config)
    entries = {}
    for line in text.splitlines():
        if line.startswith("  ") and not line.startswith("      "):
            key = line.split()[0]
            entries[key] = line.strip()
        elif line.startswith("      ") and entries:
            entries[key] += " " + line.strip()
    return text, entries


@pytest.mark.parametrize("schema", ROOTS.values(), ids=ROOTS.keys())
def test_every_key_has_help_text_and_every_group_a_heading(schema):
    bare = [key for key, f, owner, group in walk(schema) if group is None and not cli.field_help(owner).get(f.name)]
    assert not bare, f"keys without help text: {bare}"
    for key, _, _, group in walk(schema):
        if group is not None:
            heading = cli.group_summary(group)
            assert heading.endswith(".") and not heading.startswith(group.__name__), (key, heading)


@pytest.mark.parametrize("schema", ROOTS.values(), ids=ROOTS.keys())
def test_help_is_whole_and_points_at_nothing_missing(schema):
    text, entries = help_entries(schema)
    leaves = {key for key, _, _, group in walk(schema) if group is None}
    assert leaves <= set(entries)
    assert "???" not in text and "see above" not in text and "<factory>" not in text


PROBES = {"str": "zz_no_such_choice", "Optional[str]": "zz_no_such_choice", "int": -987, "List[str]": ["zz_no_choice"]}


@pytest.mark.parametrize("schema", ROOTS.values(), ids=ROOTS.keys())
def test_help_lists_every_choice_the_schema_accepts(schema):
    """Probe each key with a value outside any choice list: where the schema answers "choose one of [...]",
    the key's help must name every one of those choices."""
    _, entries = help_entries(schema)
    checked = 0
    for key, f, owner, group in walk(schema):
        if group is not None or f.type not in PROBES:
            continue
        required = {"task": "classifier"} if "task" in {g.name for g in fields(owner)} and f.name != "task" else {}
        try:
            owner(**required, **{f.name: PROBES[f.type]})
            continue
        except ConfigError as error:
            found = re.search(r"choose one of (\[.*?\])", str(error))
        if found:
            checked += 1
            meaning = entries[key].split("):", 1)[1]
            missing = [c for c in ast.literal_eval(found.group(1))
                       if not re.search(rf"\b{re.escape(str(c))}\b", meaning)]
            assert not missing, f"{key}: the help does not name {missing}: {entries[key]}"
    assert checked >= 10


def test_help_shows_the_given_presets_values():
    preset = ROOT / "conf" / "fashion_gdm.yaml"
    depth, schema_depth = OmegaConf.load(preset).diffguard.depth, DiffGuardConfig().depth
    assert depth != schema_depth
    _, entries = help_entries(EvalConfig, ["--config", "fashion_gdm"], str(ROOT / "conf" / "digits_gdm.yaml"))
    assert entries["diffguard.depth"].startswith(f"diffguard.depth (int, default {depth} [schema {schema_depth}])")
    composed = config_lib.merge(EvalConfig, [preset])
    for key, _, _, group in walk(EvalConfig):
        if group is None:
            value = OmegaConf.select(composed, key)
            value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
            assert f", default {cli.show_value(value)}" in entries[key], entries[key]


def test_help_without_a_config_file_shows_a_required_key_as_required(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("seed: 1\n")
    _, entries = help_entries(TrainConfig, ["--config", str(empty)])
    assert entries["task"].startswith("task (str, required):")
    _, entries = help_entries(TrainConfig, [], str(ROOT / "conf" / "train_classifier.yaml"))
    assert entries["task"].startswith("task (str, default classifier [schema: required]):")
