"""LoRA adapters move between fastlm and Hugging Face PEFT, both ways, with equal outputs."""

from __future__ import annotations

import copy

import pytest
import torch

from fastlm.nn.lora import LoRALinear
from fastlm.peft import apply_lora, load_adapter, lora_state_dict, merge_lora, save_adapter
from fastlm.testing import assert_equal, assert_policy

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def llama():
    cfg = transformers.LlamaConfig(
        vocab_size=120,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def logits64(model, ids):
    """The model's float64 twin's logits: the reference of float32 ones."""
    return copy.deepcopy(model).double()(ids).logits


def randomize_b(model):
    for m in model.modules():
        for b in getattr(m, "lora_B", {}).values():
            torch.nn.init.normal_(b.weight, std=0.05)


def test_fresh_adapter_is_the_identity_and_only_lora_trains():
    model = llama()
    ids = torch.randint(0, 120, (2, 7))
    before = model(ids).logits
    apply_lora(model, r=4, alpha=8, target_modules=TARGETS)
    assert torch.equal(model(ids).logits, before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2 * len(TARGETS)


def test_fastlm_adapter_loads_in_peft(tmp_path):
    base = llama()
    ours = apply_lora(copy.deepcopy(base), r=4, alpha=8, target_modules=TARGETS)
    randomize_b(ours)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = torch.randint(0, 120, (2, 7))
    # PEFT's run of our adapter against ours in float64, with ours in float32 as baseline.
    assert_policy(theirs(ids).logits, logits64(ours, ids), ours(ids).logits, "PEFT's logits")
    assert not torch.allclose(ours(ids).logits, base(ids).logits, atol=1e-3)


def test_peft_adapter_loads_in_fastlm(tmp_path):
    base = llama()
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    randomize_b(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    ids = torch.randint(0, 120, (2, 7))
    theirs.eval()
    assert_policy(ours(ids).logits, logits64(theirs, ids), theirs(ids).logits, "our logits")
    # Keys and shapes are PEFT's, tensor for tensor.
    saved = peft.get_peft_model_state_dict(theirs)
    mine = lora_state_dict(ours)
    assert set(saved) == set(mine)
    for k in saved:
        assert torch.equal(saved[k], mine[k]), k


def test_merge_matches_and_unmerge_restores_exactly():
    model = apply_lora(llama(), r=4, alpha=8, target_modules=TARGETS)
    randomize_b(model)
    ids = torch.randint(0, 120, (2, 7))
    before = model(ids).logits
    layer = model.model.layers[0].self_attn.q_proj
    w = layer.base_layer.weight.clone()
    layer.merge()
    merged_weight = w + layer.delta_weight("default")
    assert_equal(layer.base_layer.weight, merged_weight, "weight", "one float32 add, in place")
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, w)
    reference = logits64(model, ids)  # unmerged, in float64
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    # W + BA rounded once, against x W + (x A) B: both within the policy of float64.
    assert_policy(merged(ids).logits, reference, before, "merged logits")


def test_errors(tmp_path):
    model = llama()
    with pytest.raises(ValueError, match="matches no linear layer of LlamaForCausalLM"):
        apply_lora(model, target_modules=["nope"])
    with pytest.raises(ValueError, match="r must be a positive int"):
        apply_lora(model, r=0, target_modules=TARGETS)
    with pytest.raises(ValueError, match="is not a PEFT adapter directory"):
        load_adapter(model, tmp_path)
    small = apply_lora(llama(), r=4, target_modules=TARGETS)
    save_adapter(small, tmp_path)
    other = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=120,
            hidden_size=32,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(
        ValueError,
        match=r"lora_B of model.layers.0.mlp.down_proj is \(64, 4\), the model needs \(32, 4\)",
    ):
        load_adapter(other, tmp_path)


def test_freeze_trains_the_last_blocks_and_the_head():
    from fastlm.models import create
    from fastlm.peft import freeze

    model = create("gpt2-tiny", vocab_size=120, num_layers=3, tie_word_embeddings=False)
    freeze(model, train_last_n_blocks=1, train_head=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("blocks.2.", "lm_head.")) for n in trainable)
    assert any(n.startswith("lm_head.") for n in trainable)
    hf = freeze(llama(), train_last_n_blocks=2, train_head=False)
    names = {n for n, p in hf.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("model.layers.0.", "model.layers.1.")) for n in names)
    with pytest.raises(ValueError, match="train_last_n_blocks 5 > the model's 3 blocks"):
        freeze(model, train_last_n_blocks=5)
