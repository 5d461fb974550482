"""Training: ``Trainer`` and ``TrainConfig`` (precision, activation checkpointing, AdamW
with a schedule, exact resumable checkpoints), and the ``fastlm train`` job in
:mod:`fastlm.train.run`.

The names below load on first use (PEP 562): ``fastlm train --help`` reads
:mod:`fastlm.train.config` without importing torch.
"""

from fastlm import lazy

__getattr__, __dir__, __all__ = lazy.exports(
    __name__,
    {
        "fastlm.train.config": ("TrainConfig",),
        "fastlm.train.trainer": ("Trainer", "TrainingDiverged"),
        "fastlm.train.activation_checkpointing": ("apply_activation_checkpointing",),
        "fastlm.models.loading": ("latest_checkpoint", "list_checkpoints"),
    },
)
