"""Feature-based fine-tuning: :func:`freeze` a model but its last blocks and its head."""

from __future__ import annotations

from torch import nn

# Heads of fastlm's and Hugging Face's models: what train_head unfreezes.
HEAD_NAMES = (
    "lm_head",
    "classifier",
    "score",
    "cls",
    "head_dense",
    "head_norm",
    "head_bias",
    "pooler",
)


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks: its longest ``nn.ModuleList``."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks to unfreeze")
    return max(lists, key=len)


def freeze(model: nn.Module, train_last_n_blocks: int = 0, train_head: bool = True) -> nn.Module:
    """Feature-based fine-tuning: freeze everything, then unfreeze the last
    ``train_last_n_blocks`` blocks (of the longest block list) and, with ``train_head``, the
    output head (parameters whose name has a component in :data:`HEAD_NAMES`; a head tied
    to the input embedding unfreezes that embedding too, being the same tensor)."""
    if (
        isinstance(train_last_n_blocks, bool)
        or not isinstance(train_last_n_blocks, int)
        or train_last_n_blocks < 0
    ):
        raise ValueError(
            f"train_last_n_blocks must be a non-negative int, got {train_last_n_blocks!r}"
        )
    model.requires_grad_(False)
    if train_last_n_blocks:
        blocks = _blocks(model)
        if train_last_n_blocks > len(blocks):
            raise ValueError(
                f"train_last_n_blocks {train_last_n_blocks} > the model's {len(blocks)} blocks"
            )
        for block in blocks[len(blocks) - train_last_n_blocks :]:
            block.requires_grad_(True)
    if train_head:
        found = [
            p
            for n, p in model.named_parameters(remove_duplicate=False)
            if set(n.split(".")) & set(HEAD_NAMES)
        ]
        if not found:
            raise ValueError(
                f"train_head: no head ({', '.join(HEAD_NAMES)}) in {type(model).__name__}"
            )
        for p in found:
            p.requires_grad_(True)
    return model
