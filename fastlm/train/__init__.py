"""Training: ``Trainer`` and ``TrainConfig`` (precision, activation checkpointing, AdamW
with a schedule, exact resumable checkpoints), and the ``fastlm train`` job in
:mod:`fastlm.train.run`."""

from fastlm.train.checkpoint import latest_checkpoint, list_checkpoints
from fastlm.train.config import TrainConfig
from fastlm.train.trainer import Trainer, TrainingDiverged

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "latest_checkpoint", "list_checkpoints"]
