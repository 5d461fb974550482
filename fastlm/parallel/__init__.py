"""Tensor and data parallelism on torch.distributed: Megatron-style column/row-parallel
layers, vocabulary-parallel embedding and cross-entropy, sequence parallelism,
``parallelize(model, tp_size, dp_size)`` on a 2D device mesh with DDP (applied by reading
the ``tp_plan`` a model's class declares), and sharded checkpoints that load at any
tensor-parallel size."""

from fastlm.parallel.comm import CollectiveCounter
from fastlm.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelProjection,
    vocab_parallel_cross_entropy,
)
from fastlm.parallel.parallelize import (
    DataParallelLayout,
    TensorParallelLayout,
    check_consistent,
    clip_grad_norm_,
    data_parallel_layout,
    fsdp_rows,
    local,
    model_class,
    parallelize,
    tensor_parallel,
    unwrap,
)

__all__ = [
    "CollectiveCounter",
    "DataParallelLayout",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "TensorParallelLayout",
    "VocabParallelEmbedding",
    "VocabParallelProjection",
    "check_consistent",
    "clip_grad_norm_",
    "data_parallel_layout",
    "fsdp_rows",
    "local",
    "model_class",
    "parallelize",
    "tensor_parallel",
    "unwrap",
    "vocab_parallel_cross_entropy",
]
