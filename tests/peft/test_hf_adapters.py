"""LoRA adapters move with the model between fastlm and Hugging Face, with real PEFT on the
other side: an adapter of a fastlm GPT-2 / Llama / BERT / T5 loads with
``PeftModel.from_pretrained`` onto the model's ``to_hf`` export, one trained with PEFT on the
export loads onto the fastlm model, and each side then computes what the other does."""

from __future__ import annotations

import copy

import pytest
import torch

from fastlm.models import T5, create
from fastlm.models.hf import from_hf_adapter, to_hf, to_hf_adapter
from fastlm.nn.lora import LoRALinear
from fastlm.peft import apply_lora, read_adapter, save_adapter

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

VOCAB = 101
# family: (preset overrides, fastlm LoRA targets, PEFT targets on the export)
FAMILIES = {
    "gpt2": (
        dict(hidden_size=48, num_heads=4),
        ["qkv", "o", "fc1", "fc2"],
        ["c_attn", "c_proj", "c_fc"],
    ),
    "llama": (
        dict(hidden_size=48, num_heads=4, num_kv_heads=2, intermediate_size=88),
        ["qkv", "o", "gate_proj", "up_proj", "down_proj"],
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    "bert": (
        dict(hidden_size=48, num_heads=4, intermediate_size=72, attention_dropout=0.0),
        ["qkv", "o", "fc1", "fc2", "head_dense"],
        ["query", "key", "value", "dense"],
    ),
    "t5": (
        dict(hidden_size=48, head_dim=12, num_heads=4, intermediate_size=72),
        ["qkv", "o", "q", "kv", "fc1", "fc2"],
        ["q", "k", "v", "o", "wi", "wo"],
    ),
}
# The Hugging Face layer holding the last rows of the first block's fused q/k/v.
LAST_PROJECTION = {
    "gpt2": "transformer.h.0.attn.c_attn",
    "llama": "model.layers.0.self_attn.v_proj",
    "bert": "bert.encoder.layer.0.attention.self.value",
    "t5": "encoder.block.0.layer.0.SelfAttention.v",
}


def base_model(family: str):
    overrides, _, _ = FAMILIES[family]
    return create(f"{family}-tiny", vocab_size=VOCAB, dropout=0.0, **overrides).eval()


def inputs():
    ids = torch.randint(0, VOCAB, (2, 9))
    return dict(input_ids=ids, decoder_input_ids=ids[:, :5])


@torch.no_grad()
def logits(model, batch):
    """Logits of a fastlm model, a transformers model or a PEFT model around one."""
    if isinstance(model, T5) or hasattr(model.config, "d_model"):
        return model(
            input_ids=batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"]
        ).logits
    return model(input_ids=batch["input_ids"]).logits


def randomize_b(model, std=0.2):
    with torch.no_grad():
        for m in model.modules():
            for b in getattr(m, "lora_B", {}).values():
                b.weight.normal_(std=std)


def assert_same_outputs(got, want, model) -> float:
    """fp32 outputs of two evaluations of the same function: the error bound is fp32's
    epsilon times the longest reduction on the way (a layer's input width times the layer
    count, both sides rounding), relative to the outputs' scale."""
    c = model.config
    reduction = max(c.hidden_size, c.intermediate_size) * 2 * c.num_layers
    bound = torch.finfo(torch.float32).eps * reduction * want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= bound, f"max |difference| {err:.3g} > {bound:.3g}"
    return err


@pytest.mark.parametrize("family", FAMILIES)
def test_a_fastlm_adapter_loads_in_peft_on_the_export(family, tmp_path):
    base = base_model(family)
    hf = to_hf(base).eval()
    ours = apply_lora(copy.deepcopy(base), r=4, alpha=8, target_modules=FAMILIES[family][1])
    randomize_b(ours)
    batch = inputs()
    changed = (logits(ours, batch) - logits(base, batch)).abs().max().item()
    to_hf_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    assert_same_outputs(logits(theirs, batch), logits(ours, batch), base)
    assert changed > 1e3 * torch.finfo(torch.float32).eps * logits(base, batch).abs().max()
    # The fused q/k/v adapter was split exactly: the shared A, B's rows per projection.
    fused = next(m for n, m in ours.named_modules() if n.endswith("blocks.0.attn.qkv"))
    their_layer = theirs.get_submodule(f"base_model.model.{LAST_PROJECTION[family]}")
    assert torch.equal(their_layer.lora_A["default"].weight, fused.lora_A["default"].weight)
    rows = fused.lora_B["default"].weight[-their_layer.lora_B["default"].weight.shape[0] :]
    assert torch.equal(their_layer.lora_B["default"].weight, rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_peft_adapter_of_the_export_loads_on_the_fastlm_model(family, tmp_path):
    base = base_model(family)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=FAMILIES[family][2])
    theirs = peft.get_peft_model(to_hf(base), config).eval()
    randomize_b(theirs)
    theirs.save_pretrained(tmp_path / "hf")
    ours = from_hf_adapter(copy.deepcopy(base), tmp_path / "hf")
    batch = inputs()
    assert_same_outputs(logits(ours, batch), logits(theirs, batch), base)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # q/k/v trained separately (different A's): one LoRA of rank 3 x 4 on the fused layer
    # (2 x 4 on T5's cross-attention k/v). GPT-2's c_attn is fused in transformers too.
    ranks: dict[str, set[int]] = {}
    for name, m in ours.named_modules():
        if isinstance(m, LoRALinear):
            ranks.setdefault(name.split(".")[-1], set()).add(m.lora_A["default"].out_features)
    assert ranks["qkv"] == {4 if family == "gpt2" else 12}
    assert ranks.get("kv") == ({8} if family == "t5" else None)
    # And back to PEFT (each projection at that rank, in PEFT's rank_pattern).
    to_hf_adapter(ours, tmp_path / "back")
    again = peft.PeftModel.from_pretrained(to_hf(base), tmp_path / "back").eval()
    assert_same_outputs(logits(again, batch), logits(theirs, batch), base)


def test_the_round_trip_through_peft_keeps_the_tensors(tmp_path):
    """fastlm -> PEFT file of the export -> fastlm: the fused adapter comes back at rank r,
    bit for bit (the projections' shared A is recognized)."""
    base = base_model("llama")
    ours = apply_lora(copy.deepcopy(base), r=4, alpha=8, target_modules=FAMILIES["llama"][1])
    randomize_b(ours)
    to_hf_adapter(ours, tmp_path / "hf")
    back = from_hf_adapter(copy.deepcopy(base), tmp_path / "hf")
    save_adapter(ours, tmp_path / "ours")
    save_adapter(back, tmp_path / "back")
    first, second = read_adapter(tmp_path / "ours"), read_adapter(tmp_path / "back")
    assert first.weights.keys() == second.weights.keys()
    for name, (a, b) in first.weights.items():
        assert torch.equal(a, second.weights[name][0]) and torch.equal(b, second.weights[name][1])
    assert first.alphas == second.alphas


def test_projections_without_an_adapter_get_zero_rows(tmp_path):
    """PEFT's usual Llama targets, q_proj and v_proj: the fused layer gets rank 2r, and the
    k rows of its B are zero."""
    base = base_model("llama")
    config = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True
    )
    theirs = peft.get_peft_model(to_hf(base), config).eval()
    randomize_b(theirs)
    theirs.save_pretrained(tmp_path)
    ours = from_hf_adapter(copy.deepcopy(base), tmp_path)
    batch = inputs()
    assert_same_outputs(logits(ours, batch), logits(theirs, batch), base)
    qkv = ours.blocks[1].attn.qkv
    b = qkv.lora_B["default"].weight
    assert b.shape == (48 + 2 * 24, 8) and torch.equal(b[48:72], torch.zeros(24, 8))


def test_errors(tmp_path):
    base = base_model("llama")
    with pytest.raises(ValueError, match="model has no LoRA adapter 'default'"):
        to_hf_adapter(base, tmp_path)
    bert = apply_lora(base_model("bert"), r=4, target_modules=["pooler", "qkv"])
    with pytest.raises(ValueError, match=r"bert\.pooler has no Hugging Face counterpart"):
        to_hf_adapter(bert, tmp_path / "pooler")  # transformers' masked LM has no pooler
    gpt2 = base_model("gpt2")
    # An adapter of another model's layers says which.
    config = peft.LoraConfig(r=4, target_modules=["c_fc"])
    peft.get_peft_model(to_hf(gpt2), config).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(
        ValueError,
        match=r"transformer\.h\.0\.mlp\.c_fc, .* are not a layer of the Hugging Face "
        r"counterpart of GPT",
    ):
        from_hf_adapter(copy.deepcopy(base), tmp_path / "gpt2")
    dora = peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    peft.get_peft_model(to_hf(base), dora).save_pretrained(tmp_path / "dora")
    with pytest.raises(ValueError, match="use_dora is not supported"):
        from_hf_adapter(copy.deepcopy(base), tmp_path / "dora")
    assert not any(isinstance(m, LoRALinear) for m in base.modules())
