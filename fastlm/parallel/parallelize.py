"""``tensor_parallel(model)``: Megatron-style tensor parallelism applied from outside to a
built fastlm model (the models know nothing of process groups).

Every self-attention's fused q/k/v projection becomes column-parallel (each rank keeps
``num_heads / tp`` query heads and ``num_kv_heads / tp`` key/value heads) and its output
projection row-parallel; every MLP's first projection(s) column-parallel and its last
row-parallel. The blocks then call their projections as modules (fastlm's MLP blocks fall
back to that for non-``nn.Linear`` projections), one all-reduce per attention and per MLP in
the forward, one each in the backward. Embeddings, norms and the head stay replicated.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from fastlm.models.layers import Attention
from fastlm.nn.mlp import FusedMLP, GatedMLP
from fastlm.parallel.layers import ColumnParallelLinear, RowParallelLinear


def _heads(count: int, tp: int, what: str) -> int:
    if count % tp:
        raise ValueError(f"{what} = {count} does not split over {tp} tensor-parallel ranks")
    return count // tp


def tensor_parallel(model: nn.Module, group=None) -> nn.Module:
    """Shard ``model``'s attention and MLP projections over ``group`` (default: the world),
    in place, slicing the full weights every rank holds (so the result does not depend on
    the number of ranks); returns ``model``."""
    if not dist.is_initialized():
        raise RuntimeError("tensor_parallel needs torch.distributed initialized "
                           "(launch with torchrun)")  # fmt: skip
    tp = dist.get_world_size(group)
    for module in list(model.modules()):
        if isinstance(module, Attention):
            if module.cross:
                raise ValueError("cross-attention (T5's decoder) is not tensor-parallel yet")
            d = module.head_dim
            h = _heads(module.num_heads, tp, "num_heads")
            hkv = _heads(module.num_kv_heads, tp, "num_kv_heads")
            module.qkv = ColumnParallelLinear(
                module.qkv, group,
                segments=[module.num_heads * d, module.num_kv_heads * d,
                          module.num_kv_heads * d])  # fmt: skip
            module.o = RowParallelLinear(module.o, group)
            module.num_heads, module.num_kv_heads = h, hkv
        elif isinstance(module, FusedMLP):
            module.fc1 = ColumnParallelLinear(module.fc1, group)
            module.fc2 = RowParallelLinear(module.fc2, group)
        elif isinstance(module, GatedMLP):
            module.gate_proj = ColumnParallelLinear(module.gate_proj, group)
            module.up_proj = ColumnParallelLinear(module.up_proj, group)
            module.down_proj = RowParallelLinear(module.down_proj, group)
    return model


def parallelize(model: nn.Module, tp_size: int = 1, dp_size: int | None = None):
    """Tensor parallel over groups of ``tp_size`` ranks and data parallel (DDP) across them,
    on a 2D ``torch.distributed`` device mesh (dp x tp = world size; ``dp_size`` None: the
    rest of the world). Returns ``(model, mesh)``: the model is wrapped in
    ``DistributedDataParallel`` over the mesh's "dp" dimension when dp > 1."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_initialized():
        raise RuntimeError("parallelize needs torch.distributed initialized (torchrun)")
    world = dist.get_world_size()
    if tp_size < 1 or world % tp_size:
        raise ValueError(f"tp_size {tp_size} does not divide the world size {world}")
    dp = world // tp_size if dp_size is None else dp_size
    if dp * tp_size != world:
        raise ValueError(f"dp_size {dp} x tp_size {tp_size} != world size {world}")
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dp, tp_size), mesh_dim_names=("dp", "tp"))
    if tp_size > 1:
        tensor_parallel(model, mesh.get_group("tp"))
    if dp > 1:
        model = DistributedDataParallel(model, process_group=mesh.get_group("dp"))
    return model, mesh
