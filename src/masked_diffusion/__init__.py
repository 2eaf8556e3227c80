"""Masked (absorbing-state) discrete diffusion models for binarized images.

The public API is what ``__all__`` lists; everything else is internal.

Example:
    >>> from masked_diffusion import MaskedDiffusionModel, MaskSchedule, MDMUNet, ModelConfig
    >>> model = MaskedDiffusionModel(MDMUNet(ModelConfig()), MaskSchedule("linear"))
"""

from masked_diffusion._version import __version__
from masked_diffusion.checkpoint import CheckpointError, load_model
from masked_diffusion.config import (
    DataConfig,
    DiffusionConfig,
    ExperimentConfig,
    ModelConfig,
    ScheduleConfig,
    TrainerConfig,
    apply_overrides,
    load_config,
    save_config,
)
from masked_diffusion.data import (
    BinaryImageDataset,
    DatasetNotFoundError,
    TensorBatchLoader,
    binarize,
    load_dataset,
    load_dataset_from_config,
    make_obs_mask,
)
from masked_diffusion.diffusion import LikelihoodEstimate, MaskedDiffusionModel
from masked_diffusion.metrics import SampleQuality, sample_quality
from masked_diffusion.network import MDMUNet
from masked_diffusion.samplers import SamplingResult
from masked_diffusion.schedule import MaskSchedule
from masked_diffusion.trainer import NonFiniteLossError, Trainer, seed_everything

__all__ = [
    "BinaryImageDataset",
    "CheckpointError",
    "DataConfig",
    "DatasetNotFoundError",
    "DiffusionConfig",
    "ExperimentConfig",
    "LikelihoodEstimate",
    "MDMUNet",
    "MaskSchedule",
    "MaskedDiffusionModel",
    "ModelConfig",
    "NonFiniteLossError",
    "SampleQuality",
    "SamplingResult",
    "ScheduleConfig",
    "TensorBatchLoader",
    "Trainer",
    "TrainerConfig",
    "__version__",
    "apply_overrides",
    "binarize",
    "load_config",
    "load_dataset",
    "load_dataset_from_config",
    "load_model",
    "make_obs_mask",
    "sample_quality",
    "save_config",
    "seed_everything",
]
