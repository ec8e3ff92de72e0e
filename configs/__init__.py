from ftflow.configs.loader import ConfigError, apply_overrides, load_config
from ftflow.configs.schema import PipelineConfig

__all__ = ["ConfigError", "PipelineConfig", "apply_overrides", "load_config"]
