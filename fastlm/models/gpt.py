"""GPT: the autoregressive decoder, GPT-2 style (learned positions, LayerNorm, GELU MLP, tied
head), Llama style (rotary, RMSNorm, SwiGLU, GQA, untied head) or Gemma 2 style (Llama's plus
(1 + weight) norms around both branches, scaled embeddings, soft-capped attention scores and
logits, sliding-window attention on alternate layers) by configuration.

Pre-LN blocks: ``h = h + attn(norm1(h)); h = h + mlp(norm2(h))``, the second norm fused
with the residual add; with ``sandwich_norms`` each branch's output is normed too before
it is added. Built from fastlm layers only: flash attention (decode kernel with a
KV cache), fused norms, fused/gated MLPs, rotary, and the fused linear cross-entropy.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastlm.models.generation import GenerationMixin, decode_loop, left_align
from fastlm.models.layers import (
    Attention,
    KVCache,
    ModelOutput,
    VocabProjection,
    check_positive,
    check_probability,
    init_weights,
    lm_loss,
    make_mlp,
    make_norm,
    padding_bias,
)
from fastlm.nn import RotaryEmbedding
from fastlm.ops.activation import check_activation


@dataclasses.dataclass
class GPTConfig:
    vocab_size: int = 50257
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    num_kv_heads: int | None = None  # None: num_heads (no GQA)
    intermediate_size: int | None = None  # None: 4 * hidden_size
    max_position_embeddings: int = 1024
    activation: str = "gelu_tanh"
    gated_mlp: bool = False  # SwiGLU/GeGLU (gate_proj, up_proj, down_proj)
    norm: str = "layernorm"  # "rmsnorm", or "gemma_rmsnorm": RMSNorm times (1 + weight)
    norm_eps: float = 1e-5
    position: str = "learned"  # or "rotary"
    rope_theta: float = 10000.0
    attention_bias: bool = True
    mlp_bias: bool = True
    tie_word_embeddings: bool = True
    dropout: float = 0.0  # embeddings, attention probabilities, residual branches
    initializer_range: float = 0.02
    head_dim: int | None = None  # None: hidden_size // num_heads (Gemma 2 sets its own)
    query_pre_attn_scalar: float | None = None  # softmax scale 1/sqrt(this); None: head_dim
    attn_softcap: float | None = None  # attention scores s -> cap * tanh(s / cap) (Gemma 2: 50)
    final_softcap: float | None = None  # the same on the logits, in the loss too (Gemma 2: 30)
    # Sliding-window attention: a query sees the last ``sliding_window`` positions, its own
    # included, on the layers whose ``layer_types`` entry is "sliding_attention" (None: all of
    # them when sliding_window is set), the others "full_attention" (Hugging Face's names).
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    sandwich_norms: bool = False  # Gemma 2: a norm after attention and after the MLP too
    scale_embeddings: bool = False  # Gemma: token embeddings times sqrt(hidden_size)

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "max_position_embeddings",
        ):
            check_positive(name, getattr(self, name))
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        check_positive("num_kv_heads", self.num_kv_heads)
        check_positive("intermediate_size", self.intermediate_size)
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads "
                    f"{self.num_heads}: set head_dim"
                )
            self.head_dim = self.hidden_size // self.num_heads
        check_positive("head_dim", self.head_dim)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads {self.num_kv_heads} does not divide num_heads {self.num_heads}"
            )
        check_activation(self.activation)
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.position not in ("learned", "rotary"):
            raise ValueError(f"position must be 'learned' or 'rotary', got {self.position!r}")
        check_probability("dropout", self.dropout)
        if self.sliding_window is not None:
            check_positive("sliding_window", self.sliding_window)
        for name in ("query_pre_attn_scalar", "attn_softcap", "final_softcap"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ValueError(f"{name} must be a positive number or None, got {value!r}")
        self._check_layer_types()

    def _check_layer_types(self) -> None:
        if self.layer_types is None:
            kind = "full_attention" if self.sliding_window is None else "sliding_attention"
            self.layer_types = (kind,) * self.num_layers
        self.layer_types = tuple(self.layer_types)  # a list, read back from JSON
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers"
            )
        for kind in self.layer_types:
            if kind not in LAYER_TYPES:
                raise ValueError(f"layer_types entries must be one of {LAYER_TYPES}, got {kind!r}")
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ValueError("layer_types has sliding_attention layers but sliding_window is None")

    def window(self, layer: int) -> tuple[int, int]:
        """Layer ``layer``'s attention window as fastlm's ``(left, right)`` (-1: unbounded)."""
        if self.layer_types[layer] == "sliding_attention":
            return (self.sliding_window - 1, 0)
        return (-1, -1)

    @property
    def softmax_scale(self) -> float | None:
        """The attention's softmax scale (None: the kernels' 1/sqrt(head_dim))."""
        if self.query_pre_attn_scalar is None:
            return None
        return self.query_pre_attn_scalar**-0.5


NORMS = ("layernorm", "rmsnorm", "gemma_rmsnorm")
_EMBEDDING_SCALES: dict[tuple[int, torch.dtype], float] = {}


@torch.compiler.assume_constant_result
def embedding_scale(hidden_size: int, dtype: torch.dtype) -> float:
    """sqrt(hidden_size) rounded to ``dtype`` (Gemma's normalizer, a tensor in the
    embeddings' dtype) as a Python number: ``h * scale`` gives ``h * tensor(scale)``'s bits
    (the mul takes either as a scalar in its compute type) without creating a CPU tensor per
    forward, which a compiled step would hold as a CPU constant, one that can keep CUDA
    graphs off. Remembered per (size, dtype); a constant to torch.compile."""
    scale = _EMBEDDING_SCALES.get((hidden_size, dtype))
    if scale is None:
        scale = torch.tensor(hidden_size**0.5, dtype=dtype).item()
        _EMBEDDING_SCALES[hidden_size, dtype] = scale
    return scale


LAYER_TYPES = ("full_attention", "sliding_attention")


class Block(nn.Module):
    def __init__(self, config: GPTConfig, rotary: RotaryEmbedding | None, layer: int) -> None:
        super().__init__()
        c = config
        self.norm1 = make_norm(c.norm, c.hidden_size, c.norm_eps)
        self.attn = Attention(
            c.hidden_size,
            c.num_heads,
            c.head_dim,
            num_kv_heads=c.num_kv_heads,
            bias=c.attention_bias,
            dropout=c.dropout,
            softmax_scale=c.softmax_scale,
            rotary=rotary,
            softcap=c.attn_softcap,
            window=c.window(layer),
        )
        # Gemma 2's names: post_attention_layernorm, post_feedforward_layernorm.
        self.attn_out_norm, self.mlp_out_norm = (
            (make_norm(c.norm, c.hidden_size, c.norm_eps) for _ in range(2))
            if c.sandwich_norms
            else (None, None)
        )
        self.norm2 = make_norm(c.norm, c.hidden_size, c.norm_eps)
        self.mlp = make_mlp(
            c.hidden_size,
            c.intermediate_size,
            c.activation,
            gated=c.gated_mlp,
            bias=c.mlp_bias,
            dropout=0.0,
        )
        self.dropout = c.dropout

    def forward(
        self,
        h: Tensor,
        bias: Tensor | None,
        position_ids: Tensor | None,
        cache: KVCache | None = None,
    ) -> Tensor:
        # Dropout only where it drops something: F.dropout returns its input unchanged in
        # eval mode or at p = 0, so the two calls per layer are skipped there (decoding).
        p = self.dropout if self.training else 0.0
        x = self.norm1(h)
        a = self.attn(x, bias=bias, causal=True, position_ids=position_ids, cache=cache)
        if self.attn_out_norm is not None:
            a = self.attn_out_norm(a)
        if p:
            a = F.dropout(a, p)
        x, h = self.norm2(a, residual=h)  # h += a; x = norm(h)
        m = self.mlp(x)
        if self.mlp_out_norm is not None:
            m = self.mlp_out_norm(m)
        return h + (F.dropout(m, p) if p else m)


class GPT(GenerationMixin, nn.Module):
    """Decoder-only language model. ``forward(input_ids, attention_mask=None, labels=None,
    position_ids=None)``: input_ids (B, S); attention_mask (B, S), 1 for tokens and 0 for
    padding; labels (B, S) are the input ids themselves (shifted inside, -100 ignored), as in
    Hugging Face causal LMs. Returns :class:`ModelOutput`: with labels, the mean loss from
    the fused linear cross-entropy, and no logits unless ``return_logits=True``.

    Freshly built, it starts where its reference does: as Hugging Face's GPT2LMHeadModel
    (residual output projections scaled by 1 / sqrt(2 x layers)) with learned positions, as
    its LlamaForCausalLM with rotary ones.
    """

    # How fastlm.parallel may cut it (module names, "*" one part of a name; anything not
    # named stays whole on every rank), and the stacks of blocks (sequence parallelism and
    # activation checkpointing act on them).
    tp_plan = {
        "blocks.*.attn": "attention",
        "blocks.*.mlp": "mlp",
        "tok_emb": "vocab_embedding",
        "lm_head": "vocab_head",
        "to_vocab": "vocab_projection",
    }
    block_stacks = ("blocks",)

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        c = self.config = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.hidden_size)
        self.pos_emb = (
            nn.Embedding(c.max_position_embeddings, c.hidden_size)
            if c.position == "learned"
            else None
        )
        # One rotary module (its cos/sin cache) shared by every layer.
        rotary = (
            RotaryEmbedding(c.head_dim, c.max_position_embeddings, c.rope_theta)
            if c.position == "rotary"
            else None
        )
        self.blocks = nn.ModuleList(Block(c, rotary, i) for i in range(c.num_layers))
        self.norm_f = make_norm(c.norm, c.hidden_size, c.norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.to_vocab = VocabProjection(softcap=c.final_softcap)
        self._init_weights()
        if c.tie_word_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def _init_weights(self) -> None:
        c = self.config
        init_weights(self, c.initializer_range)
        if c.position == "rotary":  # Llama: every weight at initializer_range
            return
        # GPT-2 (as nanoGPT and Megatron): each block adds two branches to the residual
        # stream, 2 x layers in all; their output projections start at std / sqrt(2 x layers)
        # so that the stream's variance at initialization does not grow with depth.
        std = c.initializer_range / math.sqrt(2 * c.num_layers)
        for block in self.blocks:
            mlp_out = block.mlp.down_proj if c.gated_mlp else block.mlp.fc2
            for linear in (block.attn.o, mlp_out):
                nn.init.normal_(linear.weight, std=std)

    def hidden_states(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        caches: list[KVCache] | None = None,
    ) -> Tensor:
        """The final-norm hidden states (B, S, hidden)."""
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        h = self.tok_emb(input_ids)
        if self.config.scale_embeddings:  # the scale in the weights' dtype, as Gemma's
            h = h * embedding_scale(self.config.hidden_size, h.dtype)
        if self.pos_emb is not None:
            h = h + self.pos_emb(position_ids)
        if self.training and self.config.dropout:
            h = F.dropout(h, self.config.dropout)
        if caches is None:
            bias = padding_bias(attention_mask, h.dtype)
            for block in self.blocks:
                h = block(h, bias=bias, position_ids=position_ids)
            return self.norm_f(h)
        if len(caches) != len(self.blocks):
            raise ValueError(f"caches: {len(caches)} for {len(self.blocks)} layers")
        shared = caches[0].lengths if caches[0].shared else None
        for block, cache in zip(self.blocks, caches, strict=True):
            # A shared cache's layers do not advance its lengths: each must hold that tensor
            # (else a layer would keep a stale length, silently).
            if not (cache.lengths is shared if cache.shared else shared is None):
                raise ValueError(
                    "caches: shared caches (KVCache.shared) must all be shared and hold one "
                    "lengths tensor"
                )
            h = block(h, bias=None, position_ids=position_ids, cache=cache)
        if shared is not None:  # once for every layer, after the last one has read it
            shared += s
        return self.norm_f(h)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        position_ids: Tensor | None = None,
        return_logits: bool | None = None,
    ) -> ModelOutput:
        h = self.hidden_states(input_ids, attention_mask, position_ids)
        loss = None
        if labels is not None:
            loss = lm_loss(self.to_vocab, h[:, :-1], labels[:, 1:], self.lm_head.weight)
        want_logits = labels is None if return_logits is None else return_logits
        logits = self.to_vocab.logits(h, self.lm_head.weight) if want_logits else None
        return ModelOutput(logits=logits, loss=loss, hidden_states=h)

    def position_limit(self) -> int | None:
        # Rotary positions extend past max_position_embeddings; learned ones end there.
        return self.config.max_position_embeddings if self.pos_emb is not None else None

    def new_caches(self, batch: int, max_len: int, like: Tensor) -> list[KVCache]:
        if self.blocks[0].attn.rotary is not None:
            # Tables for every position the caches can hold, so that a compiled step never
            # has to grow them (the same values: each row depends on its position only).
            self.blocks[0].attn.rotary._extend(max_len)
        # Each layer's own head count: a tensor-parallel rank holds some of the heads. One
        # lengths tensor for every layer (shared): the model advances it once per forward.
        lengths = torch.zeros(batch, dtype=torch.int32, device=like.device)
        return [
            KVCache.empty(batch, max_len, b.attn.num_kv_heads, b.attn.head_dim, like, lengths)
            for b in self.blocks
        ]

    def kv_layout(self) -> list[tuple[int, int]]:
        """Each layer's (kv_heads, head_dim), for a paged cache."""
        return [(b.attn.num_kv_heads, b.attn.head_dim) for b in self.blocks]

    def _cached_logits(
        self, input_ids: Tensor, position_ids: Tensor | None, caches: list[KVCache]
    ) -> Tensor:
        """The last position's logits (B, V) of ``input_ids`` (B, S) at ``position_ids``
        (None: 0..S-1), extending the caches (a paged cache's lengths: the caller advances)."""
        h = self.hidden_states(input_ids, position_ids=position_ids, caches=caches)
        return self.to_vocab.logits(h[:, -1], self.lm_head.weight)

    def _prefill_logits(self, prompt: Tensor, lengths: Tensor, caches: list[KVCache]) -> Tensor:
        """Run the left-aligned ``prompt`` (B, S) into empty ``caches``, set each row's
        cache length to its ``lengths`` (B,) real tokens and return the logits (B, V) after
        each row's last one."""
        h = self.hidden_states(prompt, caches=caches)  # (B, S, hidden)
        # The right-padding tail is beyond each length: overwritten. A shared lengths
        # tensor once, else each layer's.
        for cache in caches[:1] if caches[0].shared else caches:
            cache.lengths.copy_(lengths)
        rows = torch.arange(prompt.shape[0], device=prompt.device)
        return self.to_vocab.logits(h[rows, lengths - 1], self.lm_head.weight)

    def _decode(self, input_ids, mask, max_new_tokens, select, eos, pad) -> Tensor:
        b, s = input_ids.shape
        prompt, lengths = left_align(input_ids, mask)
        caches = self.new_caches(b, s + max_new_tokens, self.tok_emb.weight)
        first = self._prefill_logits(prompt, lengths, caches)

        def step(token: Tensor, i: int) -> Tensor:
            positions = (lengths + i)[:, None]
            h = self.hidden_states(token[:, None], position_ids=positions, caches=caches)
            return self.to_vocab.logits(h[:, -1], self.lm_head.weight)

        new = decode_loop(first, max_new_tokens, select, step, eos, pad)
        return torch.cat([input_ids, new.to(input_ids.dtype)], dim=1)
