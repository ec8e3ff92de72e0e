from ftflow.configs.loader import ConfigError, load_config, apply_overrides
from ftflow.configs.schema import PipelineConfig

__all__ = ["ConfigError", "PipelineConfig", "apply_overrides", "load_config"]
