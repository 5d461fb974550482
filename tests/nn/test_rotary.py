"""fastlm.nn.RotaryEmbedding against Hugging Face Llama's rotary formula, and its cache."""

from __future__ import annotations

import pytest
import torch

import fastlm
from fastlm.nn.rotary import RotaryEmbedding
from fastlm.testing import assert_policy


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def hf_llama_rotary(q, k, position_ids, dim, base):
    """transformers' LlamaRotaryEmbedding + apply_rotary_pos_emb, on (B, S, H, D) tensors
    with the first ``dim`` features rotated (as GPT-NeoX's partial rotary)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, :, None, :], emb.sin()[:, :, None, :]  # unsqueeze the head dim

    def apply(x):
        rot, rest = x[..., :dim], x[..., dim:]
        c, s = cos.to(x.dtype), sin.to(x.dtype)
        return torch.cat((rot * c + rotate_half(rot) * s, rest), dim=-1)

    return apply(q), apply(k)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dim, head_dim", [(32, 32), (16, 40)])
def test_matches_hf_llama(backend_name, dtype, dim, head_dim):
    b, s, base = 2, 7, 10000.0
    q = torch.randn(b, s, 4, head_dim, dtype=dtype)
    k = torch.randn(b, s, 2, head_dim, dtype=dtype)
    ids = torch.randint(0, 64, (b, s))
    rope = RotaryEmbedding(dim, max_position_embeddings=64, base=base)
    with fastlm.use_backend(backend_name):
        qr, kr = rope(q, k, position_ids=ids)
    hq, hk = hf_llama_rotary(q, k, ids, dim, base)
    rq, rk = hf_llama_rotary(q.double(), k.double(), ids, dim, base)
    assert_policy(qr, rq, hq, "q")
    assert_policy(kr, rk, hk, "k")


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_transformers_llama_itself(backend_name, dtype):
    """The installed transformers' own LlamaRotaryEmbedding and apply_rotary_pos_emb (the
    formula above is their transcription; this checks against the library)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama

    b, s, heads, head_dim, base = 2, 9, 4, 32, 500000.0
    config = transformers.LlamaConfig(
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        rope_theta=base,
        max_position_embeddings=128,
    )
    q = torch.randn(b, s, heads, head_dim, dtype=dtype)
    k = torch.randn(b, s, heads, head_dim, dtype=dtype)
    ids = torch.randint(0, 128, (b, s))

    def hf(q, k):  # transformers works on (B, H, S, D)
        cos, sin = modeling_llama.LlamaRotaryEmbedding(config)(q, ids)
        qt, kt = modeling_llama.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return qt.transpose(1, 2), kt.transpose(1, 2)

    rope = RotaryEmbedding(head_dim, max_position_embeddings=128, base=base)
    with fastlm.use_backend(backend_name):
        qr, kr = rope(q, k, position_ids=ids)
    (hq, hk), (rq, rk) = hf(q, k), hf(q.double(), k.double())
    assert_policy(qr, rq, hq, "q")
    assert_policy(kr, rk, hk, "k")


def test_interleaved_matches_gptj_formula():
    b, s, d = 1, 6, 16
    q, k = torch.randn(b, s, 2, d), torch.randn(b, s, 2, d)
    rope = RotaryEmbedding(d, interleaved=True)
    qr, _ = rope(q, k, offset=3)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    ang = torch.outer(torch.arange(3, 3 + s).float(), inv_freq)
    cos = ang.cos().repeat_interleave(2, -1)[None, :, None]
    sin = ang.sin().repeat_interleave(2, -1)[None, :, None]
    rot_every_two = torch.stack((-q[..., 1::2], q[..., ::2]), dim=-1).flatten(-2)
    torch.testing.assert_close(qr, q * cos + rot_every_two * sin)


def test_cache_extends_on_demand_and_is_not_persistent():
    rope = RotaryEmbedding(8, max_position_embeddings=4)
    assert rope.state_dict() == {}
    assert rope.cos_cached.shape == (4, 4)
    q, k = torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8)
    rope(q, k, offset=10)
    assert rope.cos_cached.shape[0] >= 13
    rope(q, k, position_ids=torch.tensor([[0, 50, 2]]))
    assert rope.cos_cached.shape[0] >= 51
    rope(q, k, offset=torch.tensor([60], dtype=torch.int32))
    assert rope.cos_cached.shape[0] >= 63
    ids = torch.tensor([[0, 1, 2]])
    rope(q, k, position_ids=ids)
    ids[0, 1] = 200  # changed in place after a call: the module must see the new maximum
    rope(q, k, position_ids=ids)
    assert rope.cos_cached.shape[0] >= 201
    fresh = RotaryEmbedding(8, max_position_embeddings=rope.cos_cached.shape[0])
    torch.testing.assert_close(rope.cos_cached, fresh.cos_cached)
    assert "dim=8" in repr(rope)


def test_constructor_validation():
    with pytest.raises(ValueError, match="dim"):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match="base"):
        RotaryEmbedding(8, base=0)
    with pytest.raises(TypeError, match="dtype"):
        RotaryEmbedding(8, dtype=torch.int32)
