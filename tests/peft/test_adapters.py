"""Bottleneck adapters: identity when fresh, only they train, and they are found in fastlm's
GPT, BERT and T5 blocks and in Hugging Face Llama's decoder layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastlm.models import T5, create
from fastlm.peft.adapters import Adapted, Adapter, apply_adapters

VOCAB = 100


def fastlm_model(name):
    overrides = dict(vocab_size=VOCAB, dropout=0.0)
    if name.startswith("bert"):
        overrides["attention_dropout"] = 0.0
    return create(name, **overrides).eval()


def hf_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


# (model factory, number of blocks: T5 has encoder and decoder stacks)
MODELS = {
    "gpt2-tiny": (lambda: fastlm_model("gpt2-tiny"), 2),
    "llama-tiny": (lambda: fastlm_model("llama-tiny"), 2),
    "bert-tiny": (lambda: fastlm_model("bert-tiny"), 2),
    "t5-tiny": (lambda: fastlm_model("t5-tiny"), 4),
    "hf-llama": (hf_llama, 2),
}


def logits(model, ids):
    if isinstance(model, T5):
        return model(ids, decoder_input_ids=ids).logits
    return model(ids).logits


def randomize_up(model, std=0.5):
    for m in model.modules():
        if isinstance(m, Adapter):
            nn.init.normal_(m.up.weight, std=std)


@pytest.mark.parametrize("name", list(MODELS))
def test_fresh_adapters_are_the_identity_and_only_they_train(name):
    make, blocks = MODELS[name]
    model = make()
    ids = torch.randint(1, VOCAB, (2, 7))
    # No grad on both sides: SDPA on CPU can pick another kernel once the model is frozen
    # (T5's trainable relative-position bias is an SDPA mask), which is not the adapters'.
    with torch.no_grad():
        before = logits(model, ids)
        assert apply_adapters(model, 8) is model
        after = logits(model, ids)
    assert torch.equal(after, before)
    assert sum(isinstance(m, Adapter) for m in model.modules()) == 2 * blocks
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n for n in trainable)
    assert len(trainable) == 4 * 2 * blocks  # down and up, weight and bias


@pytest.mark.parametrize("name", ["gpt2-tiny", "t5-tiny", "hf-llama"])
def test_trained_adapters_change_outputs_and_get_all_the_gradient(name):
    model = MODELS[name][0]()
    ids = torch.randint(1, VOCAB, (2, 7))
    with torch.no_grad():
        before = logits(model, ids)
    apply_adapters(model, 8, activation="gelu")
    randomize_up(model)
    out = logits(model, ids)
    assert not torch.allclose(out, before, atol=1e-3)
    out.square().mean().backward()
    for n, p in model.named_parameters():
        if ".adapter." in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_where_selects_the_places():
    model = fastlm_model("gpt2-tiny")
    apply_adapters(model, 4, where="mlp")
    block = model.blocks[0]
    assert isinstance(block.mlp, Adapted) and isinstance(block.attn.o, nn.Linear)
    # The other place can be added later; the adapter's width comes from the block.
    apply_adapters(model, 4, where=["attention"])
    assert isinstance(block.attn.o, Adapted) and block.attn.o.adapter.up.out_features == 128
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp already has an adapter"):
        apply_adapters(model, 4, where="mlp")


def test_t5_adapts_self_attention_not_cross_attention():
    model = fastlm_model("t5-tiny")
    apply_adapters(model, 4)
    block = model.decoder.blocks[0]
    assert isinstance(block.attn.o, Adapted) and isinstance(block.mlp, Adapted)
    assert isinstance(block.cross.o, nn.Linear)


def test_hf_llama_layers_are_wrapped_in_place():
    model = apply_adapters(hf_llama(), 4)
    layer = model.model.layers[1]
    assert isinstance(layer.self_attn.o_proj, Adapted) and isinstance(layer.mlp, Adapted)
    assert "model.layers.1.self_attn.o_proj.adapter.down.weight" in model.state_dict()


def test_a_few_sgd_steps_reduce_the_loss():
    model = fastlm_model("gpt2-tiny").train()
    apply_adapters(model, 16)
    ids = torch.randint(0, VOCAB, (4, 16))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] - 0.05, losses


def test_adapter_dtype_follows_the_layer():
    model = fastlm_model("gpt2-tiny").to(torch.bfloat16)
    apply_adapters(model, 4)
    assert model.blocks[0].mlp.adapter.down.weight.dtype == torch.bfloat16


def test_errors():
    model = fastlm_model("gpt2-tiny")
    with pytest.raises(ValueError, match="where"):
        apply_adapters(model, 4, where=("attention", "ffn"))
    with pytest.raises(ValueError, match="where"):
        apply_adapters(model, 4, where=())
    with pytest.raises(ValueError, match="bottleneck"):
        apply_adapters(model, 0)
    with pytest.raises(ValueError, match="activation"):
        apply_adapters(model, 4, activation="tanh")
    with pytest.raises(ValueError, match="init_scale"):
        apply_adapters(model, 4, init_scale=-1.0)
    # Failed calls change nothing.
    assert not any(isinstance(m, Adapted) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="Sequential has no transformer block"):
        apply_adapters(nn.Sequential(nn.Linear(4, 4)), 2)
    with pytest.raises(ValueError, match="hidden_size"):
        Adapter(0, 4)
