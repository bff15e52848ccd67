"""The gateway's YAML configuration: strict models, loading with file:line errors, starters."""

from floorline.edge.config.fit import check_fit
from floorline.edge.config.model import (
    Config,
    LimitsConfig,
    PipelineConfig,
    TopicsConfig,
    load_config,
    parse_config,
)

__all__ = [
    "Config",
    "LimitsConfig",
    "PipelineConfig",
    "TopicsConfig",
    "check_fit",
    "load_config",
    "parse_config",
]
