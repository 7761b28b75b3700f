"""Training: configs, the pre-training loop, run folders, fine-tuning."""

from .config import ConfigError, TrainConfig, load_config
from .trainer import TrainingDiverged, TrainResult, pretrain

__all__ = ["ConfigError", "TrainConfig", "TrainResult", "TrainingDiverged", "load_config", "pretrain"]
