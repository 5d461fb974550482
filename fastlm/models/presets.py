"""Named configurations: the published sizes, and tiny ones for tests and CPU demos."""

from __future__ import annotations

from typing import Any

from torch import nn

from fastlm.models.bert import BertConfig, BertForMaskedLM
from fastlm.models.gpt import GPT, GPTConfig
from fastlm.models.t5 import T5, T5Config

_LLAMA = dict(
    norm="rmsnorm",
    position="rotary",
    activation="silu",
    gated_mlp=True,
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=False,
)

# Gemma 2: Llama's layout with a GeGLU MLP, (1 + weight) norms around both branches, scaled
# embeddings, soft-capped attention scores and logits, and a 4096-token sliding window on
# every other layer (the first included).
_GEMMA2 = dict(
    _LLAMA,
    activation="gelu_tanh",
    norm="gemma_rmsnorm",
    norm_eps=1e-6,
    tie_word_embeddings=True,
    vocab_size=256000,
    max_position_embeddings=8192,
    attn_softcap=50.0,
    final_softcap=30.0,
    sliding_window=4096,
    sandwich_norms=True,
    scale_embeddings=True,
)


def _alternating(num_layers: int) -> tuple[str, ...]:
    return tuple(("sliding_attention", "full_attention")[i % 2] for i in range(num_layers))


PRESETS: dict[str, tuple[type, dict[str, Any]]] = {
    "gpt2": (GPTConfig, {}),
    "gpt2-medium": (GPTConfig, dict(hidden_size=1024, num_layers=24, num_heads=16)),
    "gpt2-tiny": (
        GPTConfig,
        dict(hidden_size=128, num_layers=2, num_heads=4, max_position_embeddings=256),
    ),
    # Llama 3.2 1B's shape (it ties its embeddings).
    "llama-1b": (
        GPTConfig,
        dict(
            _LLAMA,
            vocab_size=128256,
            hidden_size=2048,
            num_layers=16,
            num_heads=32,
            num_kv_heads=8,
            intermediate_size=8192,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            tie_word_embeddings=True,
        ),
    ),
    "llama-tiny": (
        GPTConfig,
        dict(
            _LLAMA,
            vocab_size=32000,
            hidden_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=344,
            max_position_embeddings=256,
        ),
    ),
    "gemma2-2b": (
        GPTConfig,
        dict(
            _GEMMA2,
            hidden_size=2304,
            num_layers=26,
            num_heads=8,
            num_kv_heads=4,
            head_dim=256,
            query_pre_attn_scalar=256,
            intermediate_size=9216,
            layer_types=_alternating(26),
        ),
    ),
    "gemma2-9b": (
        GPTConfig,
        dict(
            _GEMMA2,
            hidden_size=3584,
            num_layers=42,
            num_heads=16,
            num_kv_heads=8,
            head_dim=256,
            query_pre_attn_scalar=256,
            intermediate_size=14336,
            layer_types=_alternating(42),
        ),
    ),
    "gemma2-27b": (
        GPTConfig,
        dict(
            _GEMMA2,
            hidden_size=4608,
            num_layers=46,
            num_heads=32,
            num_kv_heads=16,
            head_dim=128,
            query_pre_attn_scalar=144,  # hidden_size / num_heads, not head_dim
            intermediate_size=36864,
            layer_types=_alternating(46),
        ),
    ),
    # The 2B's layout at test size: a window short enough that tests cross it.
    "gemma2-tiny": (
        GPTConfig,
        dict(
            _GEMMA2,
            vocab_size=32000,
            hidden_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=48,
            query_pre_attn_scalar=48,
            intermediate_size=256,
            max_position_embeddings=256,
            sliding_window=16,
            layer_types=_alternating(2),
        ),
    ),
    "bert-base": (BertConfig, {}),
    "bert-tiny": (
        BertConfig,
        dict(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512),
    ),
    "t5-small": (T5Config, {}),
    "t5-base": (
        T5Config,
        dict(hidden_size=768, num_heads=12, intermediate_size=3072, num_layers=12),
    ),
    "t5-v1_1-small": (
        T5Config,
        dict(
            hidden_size=512,
            num_heads=6,
            intermediate_size=1024,
            num_layers=8,
            activation="gelu_tanh",
            gated_mlp=True,
            tie_word_embeddings=False,
            dropout=0.0,
        ),
    ),
    "t5-tiny": (
        T5Config,
        dict(hidden_size=128, head_dim=32, num_heads=4, intermediate_size=256, num_layers=2),
    ),
}

_MODELS = {GPTConfig: GPT, BertConfig: BertForMaskedLM, T5Config: T5}


def config(name: str, **overrides: Any) -> GPTConfig | BertConfig | T5Config:
    """The configuration called ``name`` (see :data:`PRESETS`), with ``overrides`` applied
    (and validated) on top."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    cls, fields = PRESETS[name]
    return cls(**{**fields, **overrides})


def create(name_or_config: str | GPTConfig | BertConfig | T5Config, **overrides: Any) -> nn.Module:
    """A freshly initialized model: :class:`GPT`, :class:`BertForMaskedLM` or :class:`T5`."""
    cfg = config(name_or_config, **overrides) if isinstance(name_or_config, str) else name_or_config
    if type(cfg) not in _MODELS:
        raise TypeError(f"expected a preset name or a model config, got {type(cfg).__name__}")
    return _MODELS[type(cfg)](cfg)
