"""The one config schema: typed dataclasses -> YAML files and dotted CLI overrides.

Every stage reads the same `Config`; each section is a dataclass whose fields carry a one-line help
text. `load_config("run.yaml", ["train.lr=1e-4", "peft.method=lora"])` validates everything before
any model loads: an unknown key, a bad type or a bad value raises `ConfigError` naming the key (with
the closest valid name for a typo).

    >>> cfg = load_config(None, ["train.lr=3e-4", "peft.method=lora"])
    >>> cfg.train.lr, cfg.peft.method
    (0.0003, 'lora')
    >>> load_config(None, ["train.lrr=1"])
    Traceback (most recent call last):
    ...
    chatforge.errors.ConfigError: unknown config key 'train.lrr' (did you mean 'train.lr'?)
"""

from chatforge.config.load import (
    all_keys,
    build_config,
    describe,
    load_config,
    read_yaml,
    save_config,
    to_dict,
    to_flat,
)
from chatforge.config.schema import (
    Config,
    DataConfig,
    DistConfig,
    DPOConfig,
    GenerateConfig,
    GRPOConfig,
    ModelConfig,
    PeftConfig,
    PipelineConfig,
    PPOConfig,
    PretrainConfig,
    RewardConfig,
    TrainConfig,
    opt,
)

__all__ = [
    "Config",
    "DPOConfig",
    "DataConfig",
    "DistConfig",
    "GRPOConfig",
    "GenerateConfig",
    "ModelConfig",
    "PPOConfig",
    "PeftConfig",
    "PipelineConfig",
    "PretrainConfig",
    "RewardConfig",
    "TrainConfig",
    "all_keys",
    "build_config",
    "describe",
    "load_config",
    "opt",
    "read_yaml",
    "save_config",
    "to_dict",
    "to_flat",
]
