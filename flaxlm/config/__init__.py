"""Typed run configuration: the core sections' dataclasses (sections.py), setting keys
(checks.py), checking values (validation.py), the sections families register (registry.py),
loading YAML with ``key.sub=value`` overrides. What the rest of flaxlm imports:

    from flaxlm.config import Config, ConfigError, load_config
    cfg = load_config("configs/gpt_demo.yaml", ["train.steps=100"])
"""

from flaxlm.config.checks import ConfigError, source_name
from flaxlm.config.registry import (
    ConfigSection,
    register_section,
    registered_sections,
    section_items,
)
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
    "ConfigSection",
    "DataConfig",
    "DistributedConfig",
    "GuardConfig",
    "MeshConfig",
    "ModelConfig",
    "MoEConfig",
    "OptimConfig",
    "SourceConfig",
    "StageConfig",
    "TrainConfig",
    "from_dict",
    "load_config",
    "register_section",
    "registered_sections",
    "save_config",
    "section_items",
    "source_name",
    "to_dict",
]
