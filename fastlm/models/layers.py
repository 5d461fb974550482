"""What every model family shares: attention with its KV cache, the MLP choice, masks, the
output container and the projection onto the vocabulary."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastlm import ops
from fastlm.nn import FusedMLP, GatedMLP, GemmaRMSNorm, LayerNorm, RMSNorm, RotaryEmbedding

# Hugging Face activation names and fastlm's.
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


def check_positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_probability(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


@dataclasses.dataclass
class ModelOutput:
    """What a model's ``forward`` returns. ``logits`` is None when the loss was computed
    from the hidden states directly (labels given, logits not asked for)."""

    logits: Tensor | None = None
    loss: Tensor | None = None
    hidden_states: Tensor | None = None


def make_norm(kind: str, size: int, eps: float) -> nn.Module:
    if kind == "layernorm":
        return LayerNorm(size, eps=eps)
    if kind == "rmsnorm":
        return RMSNorm(size, eps=eps)
    if kind == "gemma_rmsnorm":
        return GemmaRMSNorm(size, eps=eps)
    raise ValueError(f"norm must be 'layernorm', 'rmsnorm' or 'gemma_rmsnorm', got {kind!r}")


def make_mlp(
    hidden: int, intermediate: int, activation: str, gated: bool, bias: bool, dropout: float
) -> nn.Module:
    if gated:
        return GatedMLP(hidden, intermediate, activation, bias=bias)
    return FusedMLP(hidden, intermediate, activation=activation, bias=bias, dropout=dropout)


def padding_bias(attention_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """(B, S) keep-mask (1 = token, 0 = padding) as an additive (B, 1, 1, S) attention bias:
    0 where kept, -inf on padding (a query that sees only padding gets zeros)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask must be (batch, seqlen), got {tuple(attention_mask.shape)}"
        )
    return ops.masks.additive_mask(attention_mask != 0, dtype)[:, None, None, :]


def merge_bias(*biases: Tensor | None) -> Tensor | None:
    present = [b for b in biases if b is not None]
    if not present:
        return None
    total = present[0]
    for b in present[1:]:
        total = total + b
    return total


@dataclasses.dataclass
class KVCache:
    """One attention layer's keys and values for incremental decoding.

    Contiguous (``block_table`` None): k, v (B, S_max, Hkv, D), sequence b holding
    ``lengths[b]`` tokens (int32, (B,)), left-aligned; the layer advances ``lengths`` itself,
    unless ``shared``: then every layer's cache holds this one ``lengths`` tensor and the
    model advances it once per forward, after its last layer (a GPT's caches: one in-place
    add per step instead of one per layer, and the same tensor for every layer's call).

    ``filled``: where every row holds the same number of tokens and the host counts them
    (T5's decoder), that count: read in place of ``lengths[0]`` (a device read, a host sync
    on GPUs, per layer and step) and advanced with it (a cache of its own, not ``shared``).

    Paged: k, v are the layer's page pools (num_pages, page_size, Hkv, D) and sequence b's
    position j lives in slot ``j % page_size`` of page ``block_table[b, j // page_size]``
    (int32 (B, max_pages)). Every layer of a paged cache shares one ``lengths`` and one
    ``block_table``, so the layer does not advance them: the
    :class:`fastlm.models.generation.PagedKVCache` that holds them does, once per forward.
    """

    k: Tensor
    v: Tensor
    lengths: Tensor
    block_table: Tensor | None = None
    shared: bool = False
    filled: int | None = None

    @classmethod
    def empty(
        cls,
        batch: int,
        max_len: int,
        kv_heads: int,
        head_dim: int,
        like: Tensor,
        lengths: Tensor | None = None,
    ):
        """Zeroed k and v; ``lengths`` given: a ``shared`` cache over that tensor (one for
        every layer), else its own zero lengths."""
        shape = (batch, max_len, kv_heads, head_dim)
        shared = lengths is not None
        if lengths is None:
            lengths = torch.zeros(batch, dtype=torch.int32, device=like.device)
        return cls(like.new_zeros(shape), like.new_zeros(shape), lengths, shared=shared)


class Attention(nn.Module):
    """Multi-head attention with GQA, optional rotary embeddings and biases, on fastlm's
    flash-attention kernel (an additive bias, e.g. padding or T5's relative positions, goes
    to the kernel with its gradient).

    Self-attention projects q, k, v with one fused ``qkv`` linear ((H + 2 Hkv) * D
    outputs); cross-attention (``cross=True``) has ``q`` and a fused ``kv`` over the
    context. ``o`` projects back. ``softmax_scale`` None is 1/sqrt(D) (T5 uses 1.0).
    ``softcap`` caps the scaled scores (``s -> softcap * tanh(s / softcap)``, Gemma 2) and
    ``window`` = (left, right) limits the keys each query sees (-1: unbounded), as in
    :func:`fastlm.ops.flash_attention`.

    ``capture``: None (the default) runs the kernel. A list switches the layer to the
    materializing path, softmax(q k^T * scale + bias) then times v in fp32, which appends
    each call's probabilities (B, H, S, S_k), detached, to the list: the attention maps the
    fused kernel never forms (``fastlm.eval.interpret.capture_attention`` sets and clears
    it). Slower and O(S^2) in memory, for inspection only; no KV cache.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int,
        bias: bool,
        dropout: float = 0.0,
        softmax_scale: float | None = None,
        rotary: RotaryEmbedding | None = None,
        cross: bool = False,
        softcap: float | None = None,
        window: tuple[int, int] = (-1, -1),
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        q_out, kv_out = num_heads * head_dim, 2 * num_kv_heads * head_dim
        if cross:
            self.q = nn.Linear(hidden_size, q_out, bias=bias)
            self.kv = nn.Linear(hidden_size, kv_out, bias=bias)
        else:
            self.qkv = nn.Linear(hidden_size, q_out + kv_out, bias=bias)
        self.o = nn.Linear(q_out, hidden_size, bias=bias)
        self.cross = cross
        self.dropout = dropout
        self.softmax_scale = softmax_scale
        self.rotary = rotary
        self.softcap = softcap or 0.0  # 0: no cap (flash-attn's convention)
        self.window = window
        self.capture: list[Tensor] | None = None

    def project_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys and values of ``context`` (B, S, hidden): (B, S, Hkv, D)."""
        b, s, _ = context.shape
        kv = self.kv(context).view(b, s, 2, self.num_kv_heads, self.head_dim)
        return kv[:, :, 0], kv[:, :, 1]

    def forward(
        self,
        x: Tensor,
        bias: Tensor | None = None,
        causal: bool = False,
        position_ids: Tensor | None = None,
        context: Tensor | None = None,
        context_kv: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """x: (B, S, hidden). ``bias`` broadcasts to (B, H, S, S_k). Self-attention rotates
        q and k at ``position_ids`` (B, S) when the layer has rotary embeddings. With a
        ``cache``, x holds new tokens that extend each sequence's cache in place."""
        b, s, _ = x.shape
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        if self.cross:
            q = self.q(x).view(b, s, h, d)
            k, v = context_kv if context_kv is not None else self.project_kv(context)
        else:
            qkv = self.qkv(x).view(b, s, h + 2 * hkv, d)
            # split_with_sizes: the op Tensor.split's Python wrapper calls, without it.
            q, k, v = qkv.split_with_sizes((h, hkv, hkv), 2)
            if self.rotary is not None:
                q, k = self._rotate(q, k, position_ids)
        if self.capture is not None:
            if cache is not None:
                raise ValueError("cache: attention capture does not run with a KV cache")
            out = self._materialized(q, k, v, bias, causal)
        elif cache is not None:
            out = self._cached(q, k, v, bias, causal, cache)
        else:
            p = self.dropout if self.training else 0.0
            out = ops.flash_attention(
                q,
                k,
                v,
                causal=causal,
                softmax_scale=self.softmax_scale,
                dropout_p=p,
                window=self.window,
                attn_bias=bias,
                softcap=self.softcap,
            )
        return self.o(out.reshape(b, s, h * d))

    def _rotate(self, q: Tensor, k: Tensor, position_ids: Tensor | None) -> tuple[Tensor, Tensor]:
        rotary = self.rotary
        if not torch.compiler.is_compiling():
            return rotary(q, k, position_ids=position_ids)
        # RotaryEmbedding.forward reads the largest position back to grow its tables, a
        # graph break under torch.compile. A traced call rotates with the tables as they
        # are: they hold max_position_embeddings positions, and a longer run grows them
        # before tracing (GPT.reserve_positions). The same op, so the same numbers.
        cos, sin = rotary.cos_cached, rotary.sin_cached
        return ops.apply_rotary(q, k, cos, sin, rotary.interleaved, position_ids)

    def _materialized(self, q, k, v, bias, causal) -> Tensor:
        # The reference's probabilities (the kernel's masking: causal bottom-right, rows
        # that see no key give zeros), kept, then applied to v.
        bias = None if bias is None else bias.float()
        probs, _ = ops.attention_probs(
            q.float(),
            k.float(),
            causal,
            self.softmax_scale,
            window=self.window,
            attn_bias=bias,
            softcap=self.softcap,
        )
        self.capture.append(probs.detach())
        p = self.dropout if self.training else 0.0
        v = v.float().repeat_interleave(self.num_heads // self.num_kv_heads, dim=2)
        out = torch.einsum("bhqk,bkhd->bqhd", F.dropout(probs, p, self.training), v)
        return out.to(q.dtype)

    def _cached(self, q, k, v, bias, causal, cache: KVCache) -> Tensor:
        if bias is None:  # the decode kernel: per-sequence lengths, appends in place
            # k and v go as the fused projection's views: the op copies them into the cache
            # whatever their strides (a .contiguous() here was two more copies per layer).
            out = ops.attention_with_kvcache(
                q,
                cache.k,
                cache.v,
                cache.lengths,
                k,
                v,
                causal=causal,
                softmax_scale=self.softmax_scale,
                block_table=cache.block_table,
                window=self.window,
                softcap=self.softcap,
            )
            # A paged cache's owner, or a shared one's model, advances the shared lengths.
            if cache.block_table is None and not cache.shared:
                cache.lengths += q.shape[1]
            return out
        # A bias (T5's relative positions) needs the general kernel: append, then attend
        # over the filled prefix. Every sequence has the same length here (T5's decoder).
        start = int(cache.lengths[0]) if cache.filled is None else cache.filled
        end = start + q.shape[1]
        cache.k[:, start:end], cache.v[:, start:end] = k, v
        if not cache.shared:
            cache.lengths += q.shape[1]
            if cache.filled is not None:
                cache.filled = end
        return ops.flash_attention(
            q,
            cache.k[:, :end],
            cache.v[:, :end],
            causal=causal,
            softmax_scale=self.softmax_scale,
            attn_bias=bias,
        )


def init_weights(module: nn.Module, std: float) -> None:
    """Hugging Face's default initialization (its ``PreTrainedModel._init_weights``), which
    BERT and Llama use as is: normal(0, std) linear and embedding weights, the padding
    embedding row and biases zero, norm scales one. GPT-2 then rescales its residual
    projections (:class:`fastlm.models.gpt.GPT`)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                nn.init.zeros_(m.weight[m.padding_idx])
        elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def few_rows_linear(hidden: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(hidden, weight, bias)``, computed as ``weight @ hidden.T`` for a few rows
    against a large matrix on the CPU: the logits of one decode step (one row per sequence)
    over a vocabulary. There MKL's sgemm packs the transposed (V, hidden) operand before the
    product, which for 2-8 rows costs more than the product itself: 4 x 384 x 50257 took
    29 ms as ``F.linear`` and 9.7 ms as ``weight @ hidden.T`` (3.0x; 1.7x at hidden 768;
    2-core AMD EPYC, one thread, torch 2.14). The same sums in another order: equal within
    fp32 rounding."""
    rows = hidden.shape[0] if hidden.dim() == 2 else 0
    if not (hidden.is_cpu and 2 <= rows <= 8 and weight.shape[0] >= 16384):
        return F.linear(hidden, weight, bias)
    out = (weight @ hidden.T).T
    return out if bias is None else out + bias


class VocabProjection(nn.Module):
    """Hidden states onto the vocabulary through the head weight (V, hidden) and bias (V,)
    that the model holds (so a head tied to the embedding stays tied): as logits, or as
    the fused cross-entropy of labels without materializing them.

    ``softcap`` caps the logits, ``softcap * tanh(logits / softcap)`` (Gemma 2's final
    soft-capping), in the loss too (inside the fused kernel: still no logits formed).

    Holds no parameters: ``fastlm.parallel`` swaps in a twin with the same two methods when
    it splits the vocabulary over ranks, so the model never asks whether its head is
    split."""

    def __init__(self, softcap: float | None = None) -> None:
        super().__init__()
        self.softcap = softcap

    def logits(self, hidden: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return cap_logits(few_rows_linear(hidden, weight, bias), self.softcap)

    def loss(
        self, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None
    ) -> Tensor:
        """Mean cross-entropy of ``labels`` (N,) given ``hidden`` (N, hidden), in fp32
        whatever the model's dtype (as Hugging Face's losses: a bf16 scalar is too coarse to
        log)."""
        return ops.linear_cross_entropy(
            hidden, weight, labels, bias=bias, out_dtype=torch.float32, softcap=self.softcap
        )

    def extra_repr(self) -> str:
        return "" if self.softcap is None else f"softcap={self.softcap}"


def cap_logits(logits: Tensor, softcap: float | None) -> Tensor:
    """``softcap * tanh(logits / softcap)`` (None: the logits unchanged)."""
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def lm_loss(
    to_vocab: VocabProjection,
    hidden: Tensor,
    labels: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    scale: float = 1.0,
) -> Tensor:
    """Mean cross-entropy of ``labels`` (-100 ignored) over the projection ``to_vocab`` of
    ``hidden`` (scaled by ``scale``) with the head ``weight`` and ``bias``; only the
    labelled rows are projected."""
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    # Dropping the ignored rows is a data-dependent shape (a graph break under
    # torch.compile): a traced call projects them too, and the loss gives them zero weight.
    if not torch.compiler.is_compiling():
        keep = labels != -100
        if not bool(keep.all()):
            hidden, labels = hidden[keep], labels[keep]
    if scale != 1.0:
        hidden = hidden * scale
    return to_vocab.loss(hidden, weight, labels, bias)
