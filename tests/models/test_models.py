"""Configs and presets, the losses without logits, and the models on the Triton kernels
(interpreter) against the torch backend."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm.models import PRESETS, BertConfig, GPTConfig, T5Config, config, create
from fastlm.testing import assert_loss_policy, assert_policy, max_error

TINY = ["gpt2-tiny", "llama-tiny", "gemma2-tiny", "bert-tiny", "t5-tiny"]


def _no_dropout(name):
    return (
        dict(dropout=0.0, attention_dropout=0.0) if name.startswith("bert") else dict(dropout=0.0)
    )


def _inputs(name, batch=2, seqlen=9, vocab=500):
    ids = torch.randint(1, vocab, (batch, seqlen))
    if name.startswith("t5"):
        return dict(input_ids=ids, labels=torch.randint(1, vocab, (batch, 5)))
    return dict(input_ids=ids, labels=ids)


# --- configs -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds_a_valid_config(name):
    c = config(name)
    assert c.hidden_size % c.num_heads == 0 or isinstance(c, T5Config)
    if isinstance(c, GPTConfig):
        # Gemma 2 sets its own head_dim; every other GPT derives it.
        assert c.head_dim * c.num_heads == c.hidden_size or name.startswith("gemma2")
        assert c.intermediate_size > 0 and len(c.layer_types) == c.num_layers


def test_published_sizes():
    assert sum(p.numel() for p in create("gpt2-tiny").parameters()) > 0
    gpt2 = config("gpt2")
    assert (gpt2.hidden_size, gpt2.num_layers, gpt2.intermediate_size) == (768, 12, 3072)
    llama = config("llama-1b")
    assert (llama.num_kv_heads, llama.head_dim, llama.rope_theta) == (8, 64, 500000.0)
    assert config("t5-v1_1-small").scale_decoder_outputs is False
    # Gemma 2's published parameter counts (embeddings tied), with the shape Hugging Face
    # gives them.
    for name, billions in (("gemma2-2b", 2.614), ("gemma2-9b", 9.242), ("gemma2-27b", 27.227)):
        with torch.device("meta"):
            model = create(name)
        assert round(sum(p.numel() for p in model.parameters()) / 1e9, 3) == billions, name
    gemma = config("gemma2-9b")
    assert gemma.layer_types[:3] == ("sliding_attention", "full_attention", "sliding_attention")
    assert (gemma.window(0), gemma.window(1)) == ((4095, 0), (-1, -1))


@pytest.mark.parametrize(
    "make, word",
    [
        (lambda: GPTConfig(hidden_size=100, num_heads=3), "divisible"),
        (lambda: GPTConfig(num_heads=12, num_kv_heads=5), "num_kv_heads"),
        (lambda: GPTConfig(activation="swish"), "activation"),
        (lambda: GPTConfig(norm="batchnorm"), "norm"),
        (lambda: GPTConfig(position="alibi"), "position"),
        (lambda: BertConfig(hidden_size=10, num_heads=4), "divisible"),
        (lambda: BertConfig(dropout=1.5), "dropout"),
        (lambda: T5Config(activation="tanh"), "activation"),
        (lambda: T5Config(num_layers=0), "num_layers"),
        (lambda: config("gpt5"), "unknown preset"),
        (lambda: config("gpt2", num_layers=-1), "num_layers"),
        (lambda: GPTConfig(num_layers=2, layer_types=("full_attention",)), "layer_types"),
        (lambda: GPTConfig(num_layers=1, layer_types=("local",)), "layer_types"),
        (lambda: GPTConfig(num_layers=1, layer_types=("sliding_attention",)), "sliding_window"),
        (lambda: GPTConfig(sliding_window=0), "sliding_window"),
        (lambda: GPTConfig(attn_softcap=-1.0), "attn_softcap"),
        (lambda: GPTConfig(final_softcap=float("nan")), "final_softcap"),
        (lambda: GPTConfig(hidden_size=100, num_heads=3, head_dim=0), "head_dim"),
    ],
)
def test_bad_configs_say_what_is_wrong(make, word):
    with pytest.raises(ValueError, match=word):
        make()


# --- losses and logits -----------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_loss_without_logits_equals_cross_entropy_of_the_logits(name):
    model = create(name, vocab_size=500).eval()
    batch = _inputs(name)
    out = model(**batch)
    assert out.logits is None and out.loss is not None
    twin = copy.deepcopy(model).double()  # the float64 reference
    logits, logits64 = (m(**batch, return_logits=True).logits for m in (model, twin))
    labels = batch["labels"]
    if name.startswith(("gpt2", "llama", "gemma2")):
        logits, logits64, labels = logits[:, :-1], logits64[:, :-1], labels[:, 1:]
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    # Both are float32 means over the tokens: each against the float64 twin's loss.
    loss64 = twin(**batch).loss
    for loss, what in ((out.loss, "loss without logits"), (expected, "cross_entropy(logits)")):
        assert_loss_policy(loss, loss64, logits, logits64, what)


def test_bert_mlm_loss_ignores_unmasked_positions():
    model = create("bert-tiny", vocab_size=500).eval()
    ids = torch.randint(1, 500, (2, 12))
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 7] = ids[0, 3], ids[1, 7]
    out = model(ids, labels=labels, return_logits=True)
    out64 = copy.deepcopy(model).double()(ids, labels=labels, return_logits=True)
    picked, picked64 = (o.logits[[0, 1], [3, 7]] for o in (out, out64))
    assert_loss_policy(out.loss, F.cross_entropy(picked64, ids[[0, 1], [3, 7]]), picked, picked64)


# --- T5's relative position bias through the kernel ----------------------------------------


def test_t5_position_bias_gets_its_gradient_through_the_attention_bias():
    """The relative-position embeddings are trained only through the attention kernel's bias
    gradient: on the Triton kernels (bf16) it matches the float64 model under the policy."""
    model = create("t5-tiny", vocab_size=500, dropout=0.0)
    reference = copy.deepcopy(model).double()
    low = model.to(torch.bfloat16)
    batch = _inputs("t5")

    def grads(m, be):
        m.zero_grad()
        with fastlm.use_backend(be):
            m(**batch).loss.backward()
        return [
            m.encoder.position_bias.embedding.weight.grad.clone(),
            m.decoder.position_bias.embedding.weight.grad.clone(),
        ]

    ref, base, got = grads(reference, "torch"), grads(low, "torch"), grads(low, "triton")
    for name, g, r, b in zip(("encoder", "decoder"), got, ref, base, strict=True):
        assert r.abs().sum() > 0
        # Each bucket's gradient sums dS over many (query, key) pairs: a few bf16 ulps of
        # the largest per term, as for the qkv weights below. Factor 4, not 2: the Triton
        # attention backward (as FlashAttention's) rounds P and dS to bf16 and takes
        # rowsum(dO * O) from the bf16 output, measured up to ~3x SDPA's error on T5's
        # unscaled scores (tests/nn/test_patch_hf.py, tests/models/test_hf_parity.py).
        assert_policy(
            g, r, b, f"{name} position bias grad", factor=4.0, scale=8 * r.abs().max().item()
        )


# --- the Triton path ------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_forward_and_backward_on_the_triton_kernels(name):
    """Every kernel in model context (under the interpreter here): loss and gradients of a
    bf16 model against the float64 model, with the torch backend's bf16 run as baseline."""
    # Gemma 2's one layer is its sliding one: the window (16) is longer than the sequence.
    one_layer = dict(layer_types=("sliding_attention",)) if name.startswith("gemma2") else {}
    model = create(name, vocab_size=300, num_layers=1, **one_layer, **_no_dropout(name))
    batch = _inputs(name, vocab=300)
    reference = copy.deepcopy(model).double()
    low = model.to(torch.bfloat16)

    def run(m, be):
        m.zero_grad()
        with fastlm.use_backend(be):
            out = m(**batch, return_logits=True)
            out.loss.backward()
        return out, {k: p.grad for k, p in m.named_parameters() if p.grad is not None}

    ref, ref_grads = run(reference, "torch")
    base, base_grads = run(low, "torch")
    base_grads = {k: g.clone() for k, g in base_grads.items()}
    got, grads = run(low, "triton")
    assert_policy(got.logits, ref.logits, base.logits, "logits")
    # The loss moves at most 2x the largest logit change: held to the policy on the logits.
    assert abs(got.loss.item() - ref.loss.item()) <= 2 * 2 * max_error(base.logits, ref.logits)
    for key in (
        "blocks.0.attn.qkv.weight",
        "bert.blocks.0.attn.qkv.weight",
        "encoder.blocks.0.attn.qkv.weight",
    ):
        if key in grads:
            scale = ref_grads[key].abs().max().item()
            # The qkv gradient sums over every token and passes attention, norm and MLP
            # backward kernels: a few bf16 ulps of its scale per term it collects.
            assert_policy(grads[key], ref_grads[key], base_grads[key], key, scale=8 * scale)
