"""Attention: the reference every attention kernel is tested against.

The public ops (``flash_attention``, ``flash_attention_varlen``, ``attention_with_kvcache``,
``scaled_dot_product_attention``) are being built on ``kernels/attention.py`` (issue 3).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    window: tuple[int, int] = (-1, -1),
    attn_bias: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    dropout_mask: Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Attention computed the plain way, materializing every score. Returns ``(out, lse)``.

    q: (B, Sq, H, D); k, v: (B, Sk, Hkv, D) with H % Hkv == 0. Query i sees key j when
    ``i + shift - left <= j <= i + shift + right`` with ``shift = Sk - Sq`` (bottom-right
    aligned; -1: unbounded side; ``causal`` sets right = 0). ``attn_bias`` broadcasts to
    (B, H, Sq, Sk); ALiBi adds ``-slope * |i + shift - j|`` with slopes (H,) or (B, H).
    ``dropout_mask`` (B, H, Sq, Sk), True = kept, scales kept probabilities by 1/(1 - p).
    Rows that see no key give out 0 and lse -inf. lse: (B, H, Sq).
    """
    batch, seqlen_q, n_heads, head_dim = q.shape
    seqlen_k, n_kv_heads = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
    k = k.repeat_interleave(n_heads // n_kv_heads, dim=2)
    v = v.repeat_interleave(n_heads // n_kv_heads, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    i = torch.arange(seqlen_q, device=q.device)[:, None]
    j = torch.arange(seqlen_k, device=q.device)[None, :]
    diag = i + seqlen_k - seqlen_q
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
    if left >= 0:
        visible &= j >= diag - left
    if right >= 0:
        visible &= j <= diag + right
    if attn_bias is not None:
        scores = scores + attn_bias
    if alibi_slopes is not None:
        scores = scores - alibi_slopes.reshape(-1, n_heads, 1, 1) * (diag - j).abs()
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    if dropout_mask is not None:
        probs = probs * dropout_mask / (1.0 - dropout_p)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v), lse
