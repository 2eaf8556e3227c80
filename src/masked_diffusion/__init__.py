"""Masked (absorbing-state) discrete diffusion models for binarized images."""

from masked_diffusion._version import __version__
from masked_diffusion.config import (
    DataConfig,
    DiffusionConfig,
    ExperimentConfig,
    ModelConfig,
    ScheduleConfig,
    TrainerConfig,
    load_config,
    save_config,
)

__all__ = [
    "DataConfig",
    "DiffusionConfig",
    "ExperimentConfig",
    "ModelConfig",
    "ScheduleConfig",
    "TrainerConfig",
    "__version__",
    "load_config",
    "save_config",
]
