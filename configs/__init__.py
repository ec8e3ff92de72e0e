from configs.loader import ConfigError, load_config, apply_overrides
from configs.schema import PipelineConfig

__all__ = ["ConfigError", "PipelineConfig", "apply_overrides", "load_config"]
