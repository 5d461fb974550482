"""Captured attention maps against softmax(q k^T * scale + bias) recomputed here from each
layer's input and weights; heatmaps; per-token losses against the model's loss."""

from __future__ import annotations

import copy

import pytest
import torch

from fastlm import models
from fastlm.data import Tokenizer
from fastlm.eval.interpret import (
    attention_layers,
    capture_attention,
    save_attention_png,
    token_losses,
)
from fastlm.models.layers import Attention
from fastlm.testing import assert_loss_policy, assert_policy

VOCAB = 53
# The probabilities in float64 (the reference), then in float32 (PyTorch's own result).
DTYPES = (torch.float64, torch.float32)
TEXTS = ["The doctor said she would call back tomorrow.", "Rich people cook dinner."]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """This module's own tokenizer (it overrides the directory's); milliseconds."""
    return Tokenizer.train(TEXTS * 4, vocab_size=600)


@torch.no_grad()
def logits64(model, *args, **kwargs) -> torch.Tensor:
    """The model's float64 twin's logits: the reference of its float32 ones."""
    return copy.deepcopy(model).double()(*args, **kwargs).logits


def record_inputs(model) -> tuple[dict[str, dict], list]:
    """Each attention layer's input x (and cross-attention context) on its last call."""
    seen: dict[str, dict] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, Attention):

            def hook(module, args, kwargs, name=name):
                seen[name] = {"x": args[0], "context": kwargs.get("context")}

            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


def expected_probs(
    attn: Attention, x, context=None, bias=None, causal=False, rotary_s=None, dtype=torch.float64
):
    """softmax(q k^T * scale + bias) from the layer's own projections, in ``dtype`` (float64:
    the reference; float32: PyTorch's own result)."""
    b, s, _ = x.shape
    h, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    if attn.cross:
        q = attn.q(x).view(b, s, h, d)
        k = attn.kv(context).view(b, context.shape[1], 2, hkv, d)[:, :, 0]
    else:
        q, k, _ = attn.qkv(x).view(b, s, h + 2 * hkv, d).split([h, hkv, hkv], dim=2)
        if attn.rotary is not None:
            positions = torch.arange(s).expand(b, s)
            q, k = attn.rotary(q, k, position_ids=positions)
    k = k.repeat_interleave(h // hkv, dim=2)
    scale = d**-0.5 if attn.softmax_scale is None else attn.softmax_scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(dtype), k.to(dtype)) * scale
    if bias is not None:
        scores = scores + bias.to(dtype)
    if causal:
        scores = scores.masked_fill(torch.ones(s, s).triu(1).bool(), float("-inf"))
    return scores.softmax(-1)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_gpt_maps_are_causal_softmax_of_the_scores(preset):
    model = models.create(preset, vocab_size=VOCAB, max_position_embeddings=32).eval()
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        plain = model(ids).logits
        seen, handles = record_inputs(model)
        with capture_attention(model) as maps:
            captured = model(ids).logits
        for handle in handles:
            handle.remove()
    # The output is unchanged: as close to the float64 model as the kernel's.
    assert_policy(captured, logits64(model, ids), plain, "logits with capture")
    assert list(maps) == ["blocks.0.attn", "blocks.1.attn"]
    for name, (probs,) in maps.items():
        attn = model.get_submodule(name)
        assert probs.shape == (2, attn.num_heads, 11, 11) and probs.dtype == torch.float32
        expected = [expected_probs(attn, seen[name]["x"], causal=True, dtype=dt) for dt in DTYPES]
        assert_policy(probs, *expected, name)
        assert (probs.triu(1) == 0).all()  # no query sees a later key
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, attn.num_heads, 11))
    # Capture off again: the kernel runs, nothing is appended.
    assert all(m.capture is None for m in model.modules() if isinstance(m, Attention))
    with torch.no_grad():
        model(ids)
    assert len(maps["blocks.0.attn"]) == 1


def test_bert_maps_mask_padding():
    model = models.create("bert-tiny", vocab_size=VOCAB, max_position_embeddings=32).eval()
    ids = torch.randint(1, VOCAB, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # three padding tokens
    ids[1, 6:] = 0
    with torch.no_grad():
        plain = model(ids, mask).logits
        seen, handles = record_inputs(model)
        with capture_attention(model, layers=[1]) as maps:
            captured = model(ids, mask).logits
        for handle in handles:
            handle.remove()
    assert_policy(captured, logits64(model, ids, mask), plain, "logits with capture")
    ((name, (probs,)),) = maps.items()
    assert name == "bert.blocks.1.attn"
    bias = torch.zeros(2, 1, 1, 9).masked_fill(mask[:, None, None, :] == 0, float("-inf"))
    attn = model.get_submodule(name)
    expected = [expected_probs(attn, seen[name]["x"], bias=bias, dtype=dt) for dt in DTYPES]
    assert_policy(probs, *expected, name)
    assert (probs[1, :, :, 6:] == 0).all()  # no query attends to padding
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 9))


def test_t5_maps_carry_the_position_bias():
    model = models.create("t5-tiny", vocab_size=VOCAB).eval()
    src = torch.randint(2, VOCAB, (2, 7))
    src_mask = torch.ones(2, 7, dtype=torch.long)
    src_mask[0, 5:] = 0
    tgt = torch.randint(2, VOCAB, (2, 5))
    with torch.no_grad():
        plain = model(src, src_mask, decoder_input_ids=tgt).logits
        seen, handles = record_inputs(model)
        with capture_attention(model) as maps:
            captured = model(src, src_mask, decoder_input_ids=tgt).logits
        for handle in handles:
            handle.remove()
        padding = torch.zeros(2, 1, 1, 7).masked_fill(
            src_mask[:, None, None, :] == 0, float("-inf")
        )
        # T5's relative-position biases (unscaled scores), from each stack's bucket table.
        enc_bias = model.encoder.position_bias(7, 7) + padding
        dec_bias = model.decoder.position_bias(5, 5)
    reference = logits64(model, src, src_mask, decoder_input_ids=tgt)
    assert_policy(captured, reference, plain, "logits with capture")
    assert len(maps) == 2 + 2 * 2  # encoder self; decoder self and cross, per layer
    for name, (probs,) in maps.items():
        attn = model.get_submodule(name)
        x, context = seen[name]["x"], seen[name]["context"]
        if name.startswith("encoder"):
            args, kwargs = (x,), dict(bias=enc_bias)
        elif name.endswith("cross"):
            args, kwargs = (x, context), dict(bias=padding)
            assert probs.shape == (2, 4, 5, 7)
        else:
            args, kwargs = (x,), dict(bias=dec_bias, causal=True)
        expected = [expected_probs(attn, *args, **kwargs, dtype=dt) for dt in DTYPES]
        assert_policy(probs, *expected, name)


def test_capture_selection_and_errors():
    model = models.create("gpt2-tiny", vocab_size=VOCAB, max_position_embeddings=32).eval()
    assert attention_layers(model) == ["blocks.0.attn", "blocks.1.attn"]
    ids = torch.randint(0, VOCAB, (1, 4))
    with torch.no_grad(), capture_attention(model, layers=["blocks.1.attn", -1]) as maps:
        model(ids)
        model(ids[:, :3])
    assert list(maps) == ["blocks.1.attn"]
    assert [m.shape[-1] for m in maps["blocks.1.attn"]] == [4, 3]  # one map per call
    with pytest.raises(ValueError, match="layers: 'blocks.2.attn' is not an attention layer"):
        capture_attention(model, layers=["blocks.2.attn"]).__enter__()
    with pytest.raises(ValueError, match="layers: index 2 out of range for 2"):
        capture_attention(model, layers=[2]).__enter__()
    with pytest.raises(ValueError, match="model: Linear has no fastlm attention layers"):
        capture_attention(torch.nn.Linear(2, 2)).__enter__()
    with capture_attention(model, layers=[0]):
        with pytest.raises(ValueError, match="blocks.0.attn is already being captured"):
            capture_attention(model).__enter__()
        # A KV cache (generation) has no materializing path.
        with pytest.raises(ValueError, match="cache: attention capture does not run"):
            model.generate(ids, max_new_tokens=2)
    # Cleared on the way out, even after errors.
    assert all(m.capture is None for m in model.modules() if isinstance(m, Attention))
    assert model.generate(ids, max_new_tokens=2).shape == (1, 6)


def test_save_attention_png(tmp_path):
    pytest.importorskip("matplotlib")
    model = models.create("gpt2-tiny", vocab_size=VOCAB, max_position_embeddings=32).eval()
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad(), capture_attention(model) as maps:
        model(ids)
    path = tmp_path / "attn.png"
    save_attention_png(maps, path, "blocks.1.attn", head=3, tokens=list("abcdef"), row=1)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 2000
    # A bare (B, H, S, S) tensor per layer works too.
    save_attention_png({"x": maps["blocks.0.attn"][0]}, tmp_path / "b.png", "x", head=0)
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_save_attention_png_errors(tmp_path):
    maps = {"l": [torch.rand(1, 2, 3, 3)], "empty": []}
    with pytest.raises(ValueError, match="layer: 'm' was not captured"):
        save_attention_png(maps, tmp_path / "x.png", "m", 0)
    with pytest.raises(ValueError, match="layer: 'empty' has no captured call"):
        save_attention_png(maps, tmp_path / "x.png", "empty", 0)
    with pytest.raises(ValueError, match="head: 2 out of range for 2 heads"):
        save_attention_png(maps, tmp_path / "x.png", "l", 2)
    with pytest.raises(ValueError, match="row: 1 out of range"):
        save_attention_png(maps, tmp_path / "x.png", "l", 0, row=1)
    with pytest.raises(ValueError, match="tokens has 2 labels for 3 positions"):
        save_attention_png(maps, tmp_path / "x.png", "l", 0, tokens=["a", "b"])
    with pytest.raises(ValueError, match="call: 1 out of range for 1 captured calls"):
        save_attention_png(maps, tmp_path / "x.png", "l", 0, call=1)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("positions", [64, 8])  # one window; sliding windows
def test_token_losses_average_to_the_model_loss(tokenizer, positions):
    model = models.create(
        "gpt2-tiny", vocab_size=tokenizer.vocab_size, max_position_embeddings=positions
    ).eval()
    text = TEXTS[0]
    losses = token_losses(model, tokenizer, text, stride=1)
    ids = tokenizer.encode(text)
    assert (len(ids) > positions) == (positions == 8)  # both branches below are exercised
    assert [t for t, _ in losses] == [tokenizer.decode([i]) for i in ids]
    assert "".join(t for t, _ in losses) == text
    assert losses[0][1] is None
    nll = torch.tensor([v for _, v in losses[1:]], dtype=torch.float64)
    # Against the float64 model, within what the rounding of float32 logits allows.
    twin = copy.deepcopy(model).double()
    with torch.no_grad():
        if len(ids) <= positions:  # the model's own loss on the text
            batch = dict(input_ids=torch.tensor([ids]), labels=torch.tensor([ids]))
            out, out64 = (m(**batch, return_logits=True) for m in (model, twin))
            rows, rows64 = (o.logits[0, :-1] for o in (out, out64))
            assert_loss_policy(float(nll.mean()), out64.loss, rows, rows64, "mean NLL")
        else:  # each token after its last positions - 1 tokens
            for t in range(1, len(ids)):
                ctx = torch.tensor([ids[max(0, t - positions + 1) : t + 1]])
                row, row64 = (m(ctx).logits[0, -2] for m in (model, twin))
                expected = -float(row64.log_softmax(-1)[ids[t]])
                assert_loss_policy(float(nll[t - 1]), expected, row, row64, f"NLL {t}")
    with pytest.raises(ValueError, match="text encodes to no tokens"):
        token_losses(model, tokenizer, "")
    with pytest.raises(TypeError, match="tokenizer must be a fastlm Tokenizer"):
        token_losses(model, None, text)
