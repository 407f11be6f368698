"""Config loading, overrides and the one-line validation errors."""

import pytest
import yaml

from flaxlm.config import ConfigError, load_config, save_config, to_dict
from flaxlm.parallel.sharding import resolve_mesh_shape


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"d_model": 128, "n_heads": 4}}))
    cfg = load_config(path, ["train.steps=7", "optim.lr=0.01", "data.seq_len=64"])
    assert (cfg.model.d_model, cfg.train.steps, cfg.optim.lr, cfg.data.seq_len) == (
        128,
        7,
        0.01,
        64,
    )
    assert cfg.model.n_layers == 6  # default from the dataclass


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    # YAML 1.1 reads 1e-3 as a string; a float field takes it as the number users meant.
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-3\n")
    cfg = load_config(path, ["model.dropout=5E-2", "optim.eps=1e-6"])
    assert (cfg.optim.lr, cfg.model.dropout, cfg.optim.eps) == (1e-3, 0.05, 1e-6)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.seed=3", "model.positions=rope"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.stepz=3"], "unknown config key 'train.stepz' (did you mean 'train.steps'?)"),
        (["trian.steps=3"], "unknown config section 'trian' (did you mean 'train'?)"),
        (["train.steps=abc"], "train.steps='abc' should be of type int, got str"),
        (["model.dropout=high"], "model.dropout='high' should be of type float"),
        (["model.d_model=100", "model.n_heads=3"], "model.d_model=100 is not divisible by"),
        (["data.seq_len=2048"], "data.seq_len=2048 exceeds the position table"),
        (["data.paths=[/no/such/dir]"], "data.paths entry '/no/such/dir' does not exist"),
        (["model.positions=alibi"], "model.positions='alibi' is not one of"),
        (["mesh.data=-1", "mesh.fsdp=-1"], "at most one axis may be -1"),
        (["train.steps"], "is not of the form section.key=value"),
        (["checkpoint.every=0"], "checkpoint.every=0 must be > 0"),
        (["train.eval_every=-5"], "train.eval_every=-5 must be >= 0 (0 = off)"),
        (["train.watchdog_min_s=0"], "train.watchdog_min_s=0 must be > 0 while the watchdog"),
        (["data.paths=[a, b"], "override 'data.paths=[a, b' is not valid YAML: expected"),
    ],
)
def test_validation_errors_name_the_value(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  steps: 3\n  run_dir: runs/x: y\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"config file {str(path)!r} is not valid YAML at line 3, column 18: "
        "mapping values are not allowed here"
    )


def test_watchdog_off_needs_no_floor():
    cfg = load_config(None, ["train.watchdog_factor=0", "train.watchdog_min_s=0"])
    assert cfg.train.watchdog_factor == 0


def test_rope_has_no_position_table_limit():
    cfg = load_config(None, ["model.positions=rope", "data.seq_len=4096"])
    assert cfg.data.seq_len == 4096


def test_mesh_product_must_match_devices():
    cfg = load_config(None, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    assert resolve_mesh_shape(cfg.mesh, 8) == (2, 2, 1, 1, 2)
    with pytest.raises(ConfigError, match="has 8 devices but 4 are available"):
        resolve_mesh_shape(cfg.mesh, 4)
    fill = load_config(None, ["mesh.data=-1", "mesh.tensor=2"])
    assert resolve_mesh_shape(fill.mesh, 8) == (4, 1, 1, 1, 2)
    with pytest.raises(ConfigError, match="cannot fill 6 devices"):
        resolve_mesh_shape(load_config(None, ["mesh.tensor=4"]).mesh, 6)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")


def test_shipped_configs_load():
    for name in ("gpt_small", "gpt_tiny"):
        cfg = load_config(f"configs/{name}.yaml")
        assert cfg.model.d_model % cfg.model.n_heads == 0
    small = load_config("configs/gpt_small.yaml")
    assert (small.model.n_layers, small.model.d_model, small.model.max_seq_len) == (12, 768, 1024)


@pytest.mark.parametrize("bad", ["4", "-1"])
def test_kv_heads_must_divide_the_heads(bad):
    with pytest.raises(ConfigError, match=rf"model.n_kv_heads={bad} must divide model.n_heads=6"):
        load_config(None, [f"model.n_kv_heads={bad}", "model.n_heads=6", "model.d_model=384"])
    assert load_config(None, ["model.n_kv_heads=2", "model.n_heads=6"]).model.n_kv_heads == 2


def test_a_family_section_loads_like_a_core_one(tmp_path):
    """BERT's ``objective`` is declared in flaxlm/data/mlm_masks.py and registered by its
    family entry (importing flaxlm.families); YAML, overrides and attributes work as for the
    core sections, and every config holds it, so any run dir's config.yaml loads back."""
    import flaxlm.families  # noqa: F401

    path = tmp_path / "c.yaml"
    raw = {"model": {"family": "bert"}, "objective": {"mlm": 0.5, "causal": 0.5, "nsp": False}}
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path, ["objective.mask_prob=0.2"])
    assert (cfg.objective.mlm, cfg.objective.nsp, cfg.objective.mask_prob) == (0.5, False, 0.2)
    gpt = to_dict(load_config(None))
    assert gpt["objective"]["mlm"] == 1.0
    save_config(cfg, tmp_path / "config.yaml")
    assert to_dict(load_config(tmp_path / "config.yaml")) == to_dict(cfg)
    with pytest.raises(ConfigError, match=r"objective.mask_prob=1.5 must be in \(0, 1\)"):
        load_config(path, ["objective.mask_prob=1.5"])


def test_an_unknown_section_without_a_near_name_hints_at_registration():
    with pytest.raises(ConfigError, match="unknown config section 'zzz' .*import flaxlm.families"):
        load_config(None, ["zzz.window=8"])
