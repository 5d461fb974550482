"""Tensor and data parallelism on torch.distributed (work in progress: the tensor-parallel
layers and their collectives; ``parallelize``, the mesh and sharded checkpoints follow)."""

from fastlm.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy",
]
