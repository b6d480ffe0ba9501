"""megalite configuration: typed schema, YAML/DeepSpeed/CLI loading and validation.

Deliberately torch-free, so ``megalite train`` rejects a bad command line before torch loads.
"""
from .deepspeed import map_deepspeed
from .load import (SECTIONS, config_from_dict, config_to_dict, field_docs, help_text, parse_args,
                   parse_or_exit, save_yaml)
from .schema import (CheckpointConfig, Config, DataConfig, ModelConfig, ParallelConfig,
                     RunConfig, TrainConfig)
from .validate import ConfigError, resolve_batch, validate

__all__ = [
    "CheckpointConfig", "Config", "ConfigError", "DataConfig", "ModelConfig", "ParallelConfig",
    "RunConfig", "SECTIONS", "TrainConfig", "config_from_dict", "config_to_dict", "field_docs",
    "help_text", "map_deepspeed", "parse_args", "parse_or_exit", "resolve_batch", "save_yaml",
    "validate",
]
