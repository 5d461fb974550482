"""Training: ``Trainer`` and ``TrainConfig`` (precision, activation checkpointing, AdamW
with a schedule, exact resumable checkpoints), and the ``fastlm train`` job in
:mod:`fastlm.train.run`."""

from fastlm.models.loading import latest_checkpoint, list_checkpoints
from fastlm.train.activation_checkpointing import apply_activation_checkpointing
from fastlm.train.config import TrainConfig
from fastlm.train.trainer import Trainer, TrainingDiverged

__all__ = [
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "apply_activation_checkpointing",
    "latest_checkpoint",
    "list_checkpoints",
]
