"""Typed run configuration: the sections' dataclasses (sections.py), setting and checking keys
(checks.py), loading YAML with ``key.sub=value`` overrides. What the rest of flaxlm imports:

    from flaxlm.config import Config, ConfigError, load_config
    cfg = load_config("configs/gpt_demo.yaml", ["train.steps=100"])
"""

from flaxlm.config.checks import ConfigError, source_name
from flaxlm.config.sections import (
    CHOICES,
    CheckpointConfig,
    Config,
    DataConfig,
    DistributedConfig,
    GuardConfig,
    MeshConfig,
    ModelConfig,
    MoEConfig,
    ObjectiveConfig,
    OptimConfig,
    SourceConfig,
    StageConfig,
    TrainConfig,
    from_dict,
    load_config,
    save_config,
    to_dict,
)

__all__ = [
    "CHOICES",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "GuardConfig",
    "MeshConfig",
    "ModelConfig",
    "MoEConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "SourceConfig",
    "StageConfig",
    "TrainConfig",
    "from_dict",
    "load_config",
    "save_config",
    "source_name",
    "to_dict",
]
