import re

import pytest
from omegaconf import OmegaConf

from diffguard_pl import config as config_lib
from diffguard_pl.config import ConfigError, EvalConfig, TrainConfig

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
