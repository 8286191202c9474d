"""Run configuration: OmegaConf structured configs, YAML + dot-list overrides, validation."""

from mopd.config.load import RESOLVED_CONFIG_NAME, ConfigError, load_config, save_resolved, to_yaml
from mopd.config.schema import RunConfig

__all__ = [
    "RESOLVED_CONFIG_NAME",
    "ConfigError",
    "RunConfig",
    "load_config",
    "save_resolved",
    "to_yaml",
]
