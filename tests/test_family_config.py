"""A family owns its config section: a user family registers ``model.running_mean`` (a
dataclass and its check) with its entry, and YAML, overrides, the one-line errors and
``flaxlm config show`` know it, with no edit to flaxlm/config/."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import flaxlm.config.registry
import flaxlm.families.base
from flaxlm.cli import main
from flaxlm.config import (
    Config,
    ConfigError,
    ConfigSection,
    from_dict,
    load_config,
    register_section,
    to_dict,
)
from flaxlm.families import GPT_FAMILY, build_model, register_family

CONFIG_PACKAGE = Path(flaxlm.config.registry.__file__).parent


@dataclass(unsafe_hash=True)  # under ``model``: hashable, as ModelConfig (a static jit argument)
class RunningMeanConfig:
    window: int = 4  # tokens averaged
    mode: str = "mean"


def check_running_mean(cfg: Config) -> None:
    window = cfg.model.running_mean.window
    if window <= 0:
        raise ConfigError(f"model.running_mean.window={window} must be > 0")


RUNNING_MEAN = ConfigSection(
    "model.running_mean",
    RunningMeanConfig,
    check=check_running_mean,
    choices={"mode": ("mean", "median")},
)


@pytest.fixture
def running_mean_family(monkeypatch):
    """The family and its section registered for one test: the tables are copies, so the
    next test sees the registry as it was."""
    monkeypatch.setattr(flaxlm.families.base, "_FAMILIES", dict(flaxlm.families.base._FAMILIES))
    monkeypatch.setattr(flaxlm.config.registry, "_SECTIONS", dict(flaxlm.config.registry._SECTIONS))
    return register_family(
        dataclasses.replace(GPT_FAMILY, name="running_mean", config_sections=(RUNNING_MEAN,)),
        replace=True,
    )


def write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_section_loads_from_yaml_and_overrides(running_mean_family, tmp_path):
    path = write(tmp_path / "c.yaml", {"model": {"family": "running_mean",
                                                 "running_mean": {"window": 8}}})  # fmt: skip
    cfg = load_config(path)
    assert cfg.model.running_mean == RunningMeanConfig(window=8)
    assert load_config(path, ["model.running_mean.mode=median"]).model.running_mean.mode == (
        "median"
    )
    assert load_config(None).model.running_mean.window == 4  # every config has its defaults
    # The model builder sees it, and it is part of ModelConfig's hash (jit's static argument).
    assert build_model(cfg.model).cfg.running_mean.window == 8  # GPT's builder: the whole cfg
    assert hash(cfg.model) != hash(load_config(None, ["model.family=running_mean"]).model)


def test_the_resolved_config_round_trips_with_the_section(running_mean_family, tmp_path):
    cfg = load_config(None, ["model.running_mean.window=8"])
    saved = to_dict(cfg)
    assert saved["model"]["running_mean"] == {"window": 8, "mode": "mean"}
    assert "objective" in saved  # bert's section, registered by flaxlm.families
    again = from_dict(yaml.safe_load(yaml.safe_dump(saved)), check_paths=False)
    assert again.model == cfg.model and to_dict(again) == saved


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.running_mean.window=0", "model.running_mean.window=0 must be > 0"),
        (
            "model.running_mean.window=wide",
            "model.running_mean.window='wide' should be of type int, got str",
        ),
        (
            "model.running_mean.windw=8",
            "unknown config key 'model.running_mean.windw' "
            "(did you mean 'model.running_mean.window'?)",
        ),
        ("model.running_mean.mode=max", "model.running_mean.mode='max' is not one of mean, median"),
        ("model.runing_mean.window=8", "(did you mean 'model.running_mean'?)"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_key(running_mean_family, override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_config_show_prints_the_section(running_mean_family, tmp_path, capsys):
    path = write(tmp_path / "c.yaml", {"model": {"running_mean": {"window": 8}}})
    assert main(["config", "show", str(path)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["model"]["running_mean"] == {"window": 8, "mode": "mean"}
    assert main(["config", "show", str(path), "model.running_mean.window=-1"]) == 2
    err = capsys.readouterr().err
    assert err.endswith(": error: model.running_mean.window=-1 must be > 0\n")
    assert err.startswith("flaxlm config") and err.count("\n") == 1  # one line, no traceback


def test_without_the_family_the_section_is_unknown(tmp_path):
    path = write(tmp_path / "c.yaml", {"model": {"running_mean": {"window": 8}}})
    with pytest.raises(ConfigError, match="unknown config key 'model.running_mean'"):
        load_config(path)


def test_a_section_cannot_take_a_built_in_key_or_be_unhashable_under_model(running_mean_family):
    with pytest.raises(ValueError, match="built-in key"):
        register_section(ConfigSection("model.d_model", RunningMeanConfig))
    with pytest.raises(ValueError, match="already registered"):
        register_section(ConfigSection("model.running_mean", RunningMeanConfig))

    @dataclass
    class Unhashable:
        x: int = 0

    with pytest.raises(TypeError, match="unsafe_hash=True"):
        register_section(ConfigSection("model.unhashable", Unhashable))
    register_section(ConfigSection("unhashable", Unhashable))  # top level: Config is not hashed
    assert Config().unhashable == Unhashable()


def test_the_config_package_names_no_family_section():
    """Sections are looked up in the registry, never imported: the config package is the
    bottom floor and must not know a family (tests/test_imports.py checks the floors)."""
    for path in CONFIG_PACKAGE.glob("*.py"):
        text = path.read_text()
        assert "running_mean" not in text and "ObjectiveConfig" not in text, path.name
        assert not re.search(r"^\s+objective:", text, re.MULTILINE), path.name
