"""T5: the encoder-decoder, v1.0 (ReLU feed-forward, tied embeddings) or v1.1 (gated-GELU,
untied) by configuration.

Pre-norm blocks with T5's scale-only RMS norm; attention is unscaled and biased by bucketed
relative positions, computed once per stack and handed to the flash-attention kernel as an
additive bias (so the bias embedding gets its gradient through the kernel). T5 v1.0 scales
the decoder output by ``hidden_size ** -0.5`` before its (tied) LM head.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastlm.models.generation import GenerationMixin, decode_loop
from fastlm.models.layers import (
    Attention,
    KVCache,
    ModelOutput,
    VocabProjection,
    check_positive,
    check_probability,
    lm_loss,
    make_mlp,
    merge_bias,
    padding_bias,
)
from fastlm.nn import RMSNorm
from fastlm.ops.activation import check_activation


@dataclasses.dataclass
class T5Config:
    vocab_size: int = 32128
    hidden_size: int = 512  # d_model
    head_dim: int = 64  # d_kv
    num_heads: int = 8
    intermediate_size: int = 2048  # d_ff
    num_layers: int = 6
    num_decoder_layers: int | None = None  # None: num_layers
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    activation: str = "relu"  # v1.1: "gelu_tanh" with gated_mlp
    gated_mlp: bool = False
    norm_eps: float = 1e-6
    dropout: float = 0.1
    tie_word_embeddings: bool = True
    # Scale the decoder output by hidden_size ** -0.5 before the LM head (T5 v1.0; v1.1 does
    # not). None: as tie_word_embeddings.
    scale_decoder_outputs: bool | None = None
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    initializer_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = self.tie_word_embeddings
        for name in (
            "vocab_size",
            "hidden_size",
            "head_dim",
            "num_heads",
            "intermediate_size",
            "num_layers",
            "num_decoder_layers",
            "relative_attention_num_buckets",
            "relative_attention_max_distance",
        ):
            check_positive(name, getattr(self, name))
        check_activation(self.activation)
        check_probability("dropout", self.dropout)


def relative_position_bucket(
    relative_position: Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> Tensor:
    """T5's bucketing of ``key - query`` offsets: half the buckets for exact small offsets,
    the rest logarithmically spaced up to ``max_distance``; bidirectional buckets split by
    sign, unidirectional ones (the decoder) only look back."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    log_ratio = torch.log(distance.float().clamp(min=1) / max_exact) / math.log(
        max_distance / max_exact
    )
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Module):
    """Per-head bias for each (query, key) offset bucket: (1, H, Sq, Sk) for queries at
    ``query_offset + i``."""

    def __init__(self, c: T5Config, bidirectional: bool) -> None:
        super().__init__()
        self.embedding = nn.Embedding(c.relative_attention_num_buckets, c.num_heads)
        self.bidirectional = bidirectional
        self.num_buckets = c.relative_attention_num_buckets
        self.max_distance = c.relative_attention_max_distance

    def forward(self, seqlen_q: int, seqlen_k: int, query_offset: int = 0) -> Tensor:
        device = self.embedding.weight.device
        query = torch.arange(query_offset, query_offset + seqlen_q, device=device)[:, None]
        key = torch.arange(seqlen_k, device=device)[None, :]
        buckets = relative_position_bucket(
            key - query, self.bidirectional, self.num_buckets, self.max_distance
        )
        return self.embedding(buckets).permute(2, 0, 1)[None]  # (1, H, Sq, Sk)


class T5Block(nn.Module):
    def __init__(self, c: T5Config, decoder: bool) -> None:
        super().__init__()
        attn = dict(bias=False, dropout=c.dropout, softmax_scale=1.0)
        self.norm1 = RMSNorm(c.hidden_size, eps=c.norm_eps)
        self.attn = Attention(
            c.hidden_size, c.num_heads, c.head_dim, num_kv_heads=c.num_heads, **attn
        )
        if decoder:
            self.norm_cross = RMSNorm(c.hidden_size, eps=c.norm_eps)
            self.cross = Attention(
                c.hidden_size, c.num_heads, c.head_dim, num_kv_heads=c.num_heads, cross=True, **attn
            )
        self.norm2 = RMSNorm(c.hidden_size, eps=c.norm_eps)
        self.mlp = make_mlp(
            c.hidden_size,
            c.intermediate_size,
            c.activation,
            gated=c.gated_mlp,
            bias=False,
            dropout=c.dropout,
        )
        self.decoder = decoder
        self.dropout = c.dropout
        # FusedMLP drops out its hidden layer and its output (T5's feed-forward dropout and
        # the block's); GatedMLP has no dropout, so the block applies the output one.
        self.mlp_drops_output = not c.gated_mlp

    def forward(
        self,
        h: Tensor,
        bias: Tensor | None,
        context: Tensor | None = None,
        context_bias: Tensor | None = None,
        cache: KVCache | None = None,
        context_kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        # F.dropout returns its input in eval mode or at p = 0: skipped there (decoding).
        p = self.dropout if self.training else 0.0
        a = self.attn(self.norm1(h), bias=bias, causal=self.decoder, cache=cache)
        h = h + (F.dropout(a, p) if p else a)
        if self.decoder:
            x = self.norm_cross(h)
            a = self.cross(x, bias=context_bias, context=context, context_kv=context_kv)
            h = h + (F.dropout(a, p) if p else a)
        m = self.mlp(self.norm2(h))
        return h + (m if self.mlp_drops_output or not p else F.dropout(m, p))


class T5Stack(nn.Module):
    def __init__(self, c: T5Config, decoder: bool) -> None:
        super().__init__()
        layers = c.num_decoder_layers if decoder else c.num_layers
        self.blocks = nn.ModuleList(T5Block(c, decoder) for _ in range(layers))
        self.position_bias = RelativePositionBias(c, bidirectional=not decoder)
        self.norm_f = RMSNorm(c.hidden_size, eps=c.norm_eps)
        self.dropout = c.dropout

    def forward(
        self,
        h: Tensor,
        attention_mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        caches: list[KVCache] | None = None,
        context_kvs: list[tuple[Tensor, Tensor]] | None = None,
    ) -> Tensor:
        p = self.dropout if self.training else 0.0
        s = h.shape[1]
        if caches is None:
            offset = 0
        else:  # the host's count where the caches keep one (no device read)
            first = caches[0]
            offset = int(first.lengths[0]) if first.filled is None else first.filled
        bias = self.position_bias(s, offset + s, offset).to(h.dtype)
        bias = merge_bias(bias, padding_bias(attention_mask, h.dtype))
        context_bias = padding_bias(context_mask, h.dtype)
        if p:
            h = F.dropout(h, p)
        for i, block in enumerate(self.blocks):
            h = block(
                h,
                bias=bias,
                context=context,
                context_bias=context_bias,
                cache=None if caches is None else caches[i],
                context_kv=None if context_kvs is None else context_kvs[i],
            )
        h = self.norm_f(h)
        return F.dropout(h, p) if p else h


class T5(GenerationMixin, nn.Module):
    """Encoder-decoder. ``forward(input_ids, attention_mask=None, decoder_input_ids=None,
    labels=None, decoder_attention_mask=None)``: without ``decoder_input_ids`` they are the
    labels shifted right (the decoder start token first, -100 as padding), as Hugging Face's
    T5. Returns :class:`ModelOutput` (loss from the fused linear cross-entropy; no logits
    with labels unless ``return_logits=True``)."""

    # How fastlm.parallel may cut it (module names, "*" one part of a name; anything not
    # named stays whole on every rank), and the stacks of blocks (sequence parallelism and
    # activation checkpointing act on them).
    tp_plan = {
        "*.blocks.*.attn": "attention",
        "decoder.blocks.*.cross": "attention",
        "*.blocks.*.mlp": "mlp",
        "*.position_bias.embedding": "position_bias_heads",
        "shared": "vocab_embedding",
        "lm_head": "vocab_head",
        "to_vocab": "vocab_projection",
    }
    block_stacks = ("encoder.blocks", "decoder.blocks")

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        c = self.config = config
        self.shared = nn.Embedding(c.vocab_size, c.hidden_size)
        self.encoder = T5Stack(c, decoder=False)
        self.decoder = T5Stack(c, decoder=True)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.to_vocab = VocabProjection()
        self._init_weights()
        if c.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight

    def _init_weights(self) -> None:
        # Hugging Face's T5 scheme (from Mesh TensorFlow), each std times
        # initializer_factor: a projection's std is its fan-in ** -0.5, the query's also
        # head_dim ** -0.5 (T5 does not scale its attention scores), embeddings and an
        # untied head 1; norm scales start at the factor itself.
        c, f = self.config, self.config.initializer_factor
        nn.init.normal_(self.shared.weight, std=f)
        nn.init.normal_(self.lm_head.weight, std=f)
        q_std = f * (c.hidden_size * c.head_dim) ** -0.5
        for m in self.modules():
            if isinstance(m, nn.Linear) and m is not self.lm_head:
                nn.init.normal_(m.weight, std=f * m.in_features**-0.5)
            elif isinstance(m, RelativePositionBias):
                nn.init.normal_(m.embedding.weight, std=f * c.hidden_size**-0.5)
            elif isinstance(m, RMSNorm):
                nn.init.constant_(m.weight, f)
        for m in self.modules():
            if isinstance(m, Attention):  # after its linears: q is a slice of the fused qkv
                q = m.q.weight if m.cross else m.qkv.weight[: m.num_heads * m.head_dim]
                nn.init.normal_(q, std=q_std)

    def shift_right(self, labels: Tensor) -> Tensor:
        start = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.encoder(self.shared(input_ids), attention_mask)

    def head_scale(self) -> float:
        return self.config.hidden_size**-0.5 if self.config.scale_decoder_outputs else 1.0

    def logits(self, h: Tensor) -> Tensor:
        """The LM head's logits of decoder states ``h`` (..., hidden)."""
        scale = self.head_scale()
        return self.to_vocab.logits(h * scale if scale != 1.0 else h, self.lm_head.weight)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        labels: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        return_logits: bool | None = None,
    ) -> ModelOutput:
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels)
        context = self.encode(input_ids, attention_mask)
        h = self.decoder(
            self.shared(decoder_input_ids),
            decoder_attention_mask,
            context=context,
            context_mask=attention_mask,
        )
        loss = None
        if labels is not None:
            loss = lm_loss(self.to_vocab, h, labels, self.lm_head.weight, scale=self.head_scale())
        want_logits = labels is None if return_logits is None else return_logits
        logits = self.logits(h) if want_logits else None
        return ModelOutput(logits=logits, loss=loss, hidden_states=h)

    def _decode(self, input_ids, mask, max_new_tokens, select, eos, pad) -> Tensor:
        c = self.config
        b = input_ids.shape[0]
        context = self.encode(input_ids, mask)  # once
        like = self.shared.weight
        caches = [
            KVCache.empty(b, max_new_tokens + 1, block.attn.num_kv_heads, c.head_dim, like)
            for block in self.decoder.blocks
        ]
        for cache in caches:  # every row decodes in step: the host counts the positions
            cache.filled = 0
        context_kvs = [block.cross.project_kv(context) for block in self.decoder.blocks]

        def logits_after(tokens: Tensor) -> Tensor:
            h = self.decoder(
                self.shared(tokens[:, None]),
                context=context,
                context_mask=mask,
                caches=caches,
                context_kvs=context_kvs,
            )
            return self.logits(h[:, -1])

        start = torch.full((b,), c.decoder_start_token_id, device=input_ids.device)
        new = decode_loop(
            logits_after(start),
            max_new_tokens,
            select,
            lambda token, i: logits_after(token),
            eos,
            pad,
        )
        return torch.cat([start[:, None], new], dim=1)
