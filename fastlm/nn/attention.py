"""Drop-in MultiheadAttention.

It subclasses ``torch.nn.MultiheadAttention``, so constructor, parameters, ``state_dict``
keys, initialisation, ``extra_repr`` and ``isinstance`` checks are torch's own; only
``forward`` is fastlm's: the projections are ``F.linear`` calls (one fused matmul for
self-attention) and attention runs through :func:`fastlm.ops.scaled_dot_product_attention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import backend, ops


def _scores_mask(mask: Tensor | None, name: str, dtype: torch.dtype) -> Tensor | None:
    """``nn.MultiheadAttention``'s masks as scores to add: a bool mask is True where
    attention is NOT allowed (the opposite of SDPA's), a float mask is added as it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return ops.masks.additive_mask(~mask, dtype)
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
    # Under autocast the projections come out in the autocast dtype while a float mask
    # stays in the input's; attention needs one dtype.
    return mask.to(dtype)


class MultiheadAttention(torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` computed by fastlm.

    ``forward`` takes torch's arguments and returns torch's outputs (see
    :meth:`torch.nn.MultiheadAttention.forward`):

    - ``query`` ``(L, E)`` unbatched, ``(L, N, E)``, or ``(N, L, E)`` with ``batch_first``;
      ``key`` / ``value`` likewise with ``S`` rows and ``kdim`` / ``vdim`` features.
    - ``key_padding_mask`` ``(N, S)`` (``(S,)`` unbatched) and ``attn_mask`` ``(L, S)`` or
      ``(N * num_heads, L, S)``: bool masks are True where attention is not allowed, float
      masks are added to the scores. Both merge into one additive mask.
    - ``is_causal`` is a hint that ``attn_mask`` is the causal mask; as in torch, it needs
      ``attn_mask`` and is used in place of it only when there is no ``key_padding_mask``
      and ``need_weights=False``.
    - Returns ``(attn_output, attn_weights)``; ``attn_weights`` is ``(N, L, S)`` averaged
      over heads, ``(N, num_heads, L, S)`` without ``average_attn_weights``, or ``None``
      when ``need_weights=False``.

    ``need_weights=True`` (torch's default) is the slow path: the weights are materialized
    with an explicit matmul and softmax, and, as in torch, the returned weights are the
    ones attention used, dropout included in training mode. Pass ``need_weights=False``
    for the fused kernel.

    Differences from torch: a query whose keys are all masked gets zero weights and a zero
    attention output (torch's ``need_weights=True`` path gives NaN); bad shapes or dtypes
    raise ``ValueError`` / ``TypeError``; NestedTensor inputs are handed to torch's own
    forward, the only one that takes them.
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if (
            need_weights is False
            and attn_mask is None
            and key_padding_mask is None
            and query is key
            and key is value
            and not self.training
            and self._native_inference(query)
        ):
            # Inference on CPU tensors: the one native op torch's own forward calls for
            # this call (the same numbers), without torch's Python preamble before it.
            out = torch._native_multi_head_attention(
                query,
                key,
                value,
                self.embed_dim,
                self.num_heads,
                self.in_proj_weight,
                self.in_proj_bias,
                self.out_proj.weight,
                self.out_proj.bias,
                None,
                False,
                average_attn_weights,
                None,
            )
            return out[0], None
        if query.is_nested or key.is_nested or value.is_nested:
            return super().forward(
                query,
                key,
                value,
                key_padding_mask,
                need_weights,
                attn_mask,
                average_attn_weights,
                is_causal,
            )
        batch, tgt_len, src_len = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        if is_causal and attn_mask is None:
            raise ValueError(
                "is_causal=True needs attn_mask (the causal mask itself), as in torch: see "
                "torch.nn.Transformer.generate_square_subsequent_mask"
            )
        num_heads, head_dim = self.num_heads, self.head_dim
        # Projections are per token, so they run in the input's own layout; the identity
        # tests decide how many matmuls the in-projection takes.
        q, k, v = self._in_projection(query, key, value)
        seq_first = query.dim() == 3 and not self.batch_first

        def heads(x: Tensor) -> Tensor:  # (S, N, E) / (N, S, E) / (S, E) -> (N, H, S, D)
            if seq_first:
                x = x.transpose(0, 1)
            elif x.dim() == 2:
                x = x.unsqueeze(0)
            return x.unflatten(-1, (num_heads, head_dim)).transpose(1, 2)

        q, k, v = heads(q), heads(k), heads(v)
        extra_keys = 0
        if self.bias_k is not None and self.bias_v is not None:
            bias_k = self.bias_k.view(1, num_heads, 1, head_dim).expand(batch, -1, -1, -1)
            bias_v = self.bias_v.view(1, num_heads, 1, head_dim).expand(batch, -1, -1, -1)
            k, v = torch.cat([k, bias_k], dim=2), torch.cat([v, bias_v], dim=2)
            extra_keys += 1
        if self.add_zero_attn:
            zeros = k.new_zeros(batch, num_heads, 1, head_dim)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
            extra_keys += 1

        # torch drops attn_mask for the is_causal hint only where the hint alone says all:
        # a padding mask or materialized weights need the explicit mask.
        use_causal_hint = is_causal and key_padding_mask is None and not need_weights
        mask = None
        if not use_causal_hint:
            mask = _scores_mask(attn_mask, "attn_mask", q.dtype)
            if mask is not None and mask.dim() == 3:
                mask = mask.view(batch, num_heads, tgt_len, src_len)
        padding = _scores_mask(key_padding_mask, "key_padding_mask", q.dtype)
        if padding is not None:
            padding = padding.view(batch, 1, 1, src_len)
            mask = padding if mask is None else mask + padding
        if mask is not None and extra_keys:
            mask = F.pad(mask, (0, extra_keys))  # the appended keys are never masked

        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            out, weights = self._attention_with_weights(q, k, v, mask, dropout_p)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if query.dim() == 2:
                weights = weights.squeeze(0)
        else:
            out = ops.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=use_causal_hint
            )
            weights = None

        # (N, H, L, D) -> the query's layout, heads concatenated
        out = out.permute(2, 0, 1, 3) if seq_first else out.transpose(1, 2)
        out = out.flatten(-2)
        if query.dim() == 2:
            out = out.squeeze(0)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        return out, weights

    def _native_inference(self, x: Tensor) -> bool:
        """Whether torch's forward would answer self-attention on ``x`` (no masks, no
        weights, eval mode: checked by the caller) with its fused native op, and fastlm's
        choice is PyTorch's own: CPU tensors, no backend forced. These are torch's
        conditions for that op, in torch's order of cost."""
        weight, bias = self.in_proj_weight, self.in_proj_bias
        return (
            type(x) is Tensor
            and x.is_cpu
            and not x.is_nested
            and x.dim() == 3
            and x.shape[-1] == self.embed_dim
            and self.batch_first
            and weight is not None
            and bias is not None
            and x.dtype is weight.dtype
            and x.dtype is bias.dtype
            and self.num_heads % 2 == 0
            and self.bias_k is None
            and self.bias_v is None
            and not self.add_zero_attn
            and self._qkv_same_embed_dim
            and not torch.is_autocast_enabled()
            and torch.backends.mha.get_fastpath_enabled()
            and backend.forced_backend() is None
            and not torch.compiler.is_compiling()
            and not torch._C._len_torch_dispatch_stack()  # make_fx and other tracers
            and self._plain_parameters()
            and not (
                torch.is_grad_enabled()
                and (
                    x.requires_grad
                    or weight.requires_grad
                    or bias.requires_grad
                    or self.out_proj.weight.requires_grad
                    or (self.out_proj.bias is not None and self.out_proj.bias.requires_grad)
                )
            )
        )

    def _plain_parameters(self) -> bool:
        """No tensor subclass among the projections (torch's own test: has_torch_function)."""
        tensors = (self.in_proj_weight, self.in_proj_bias, self.out_proj.weight)
        plain = (Tensor, torch.nn.Parameter)
        bias = self.out_proj.bias
        return all(type(t) in plain for t in tensors) and (bias is None or type(bias) in plain)

    def _check_inputs(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
    ) -> tuple[int, int, int]:
        """Validate shapes as torch's forward does; return (batch, tgt_len, src_len)."""
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 2-D (unbatched) or 3-D (batched), got {query.dim()}-D")
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                f"key and value must be {query.dim()}-D like query, got {key.dim()}-D and "
                f"{value.dim()}-D"
            )
        for name, x, features in (
            ("query", query, self.embed_dim),
            ("key", key, self.kdim),
            ("value", value, self.vdim),
        ):
            if x.shape[-1] != features:
                raise ValueError(f"{name} must have {features} features, got {x.shape[-1]}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(
                f"key and value must have the same sequence and batch sizes, got "
                f"{tuple(key.shape[:-1])} and {tuple(value.shape[:-1])}"
            )
        if query.dim() == 2:
            batch, tgt_len, src_len = 1, query.shape[0], key.shape[0]
            padding_shape: tuple[int, ...] = (src_len,)
        else:
            seq, bat = (1, 0) if self.batch_first else (0, 1)
            batch, tgt_len, src_len = query.shape[bat], query.shape[seq], key.shape[seq]
            if key.shape[bat] != batch:
                raise ValueError(
                    f"key and value must have query's batch size {batch}, got {key.shape[bat]}"
                )
            padding_shape = (batch, src_len)
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != padding_shape:
            raise ValueError(
                f"key_padding_mask must have shape {padding_shape}, got "
                f"{tuple(key_padding_mask.shape)}"
            )
        if attn_mask is not None and tuple(attn_mask.shape) not in (
            (tgt_len, src_len),
            (batch * self.num_heads, tgt_len, src_len),
        ):
            raise ValueError(
                f"attn_mask must have shape {(tgt_len, src_len)} or "
                f"{(batch * self.num_heads, tgt_len, src_len)}, got {tuple(attn_mask.shape)}"
            )
        return batch, tgt_len, src_len

    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor):
        embed_dim = self.embed_dim
        bias = self.in_proj_bias
        b_q, b_k, b_v = (None, None, None) if bias is None else bias.chunk(3)
        if not self._qkv_same_embed_dim:
            return (
                F.linear(query, self.q_proj_weight, b_q),
                F.linear(key, self.k_proj_weight, b_k),
                F.linear(value, self.v_proj_weight, b_v),
            )
        weight = self.in_proj_weight
        if query is key and key is value:
            return F.linear(query, weight, bias).chunk(3, dim=-1)
        w_q, w_kv = weight[:embed_dim], weight[embed_dim:]
        if key is value:
            b_kv = None if bias is None else bias[embed_dim:]
            return (F.linear(query, w_q, b_q), *F.linear(key, w_kv, b_kv).chunk(2, dim=-1))
        w_k, w_v = w_kv.chunk(2)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _attention_with_weights(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float
    ) -> tuple[Tensor, Tensor]:
        """Attention that also returns its (N, H, L, S) weights: torch's need_weights path."""
        # Scaling q before the matmul, as torch does, keeps results bit-comparable.
        scores = torch.matmul(q * math.sqrt(1.0 / self.head_dim), k.transpose(-2, -1))
        if mask is not None:
            scores = scores + mask
        # Safe softmax: a row with every key masked gets zeros, not NaN (DESIGN.md), the
        # same as the fused kernel gives.
        weights = torch.ops.aten._safe_softmax(scores, -1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        return torch.matmul(weights, v), weights
