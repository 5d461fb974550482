"""``from_hf`` on checkpoint directories as they are found: sharded, pickled (``.bin``), bare
base models, pre-training heads; and every way one can be wrong (weights that do not fit
the config, unreadable files, a config that is not an object) refused in a ValueError that
names the file, with ``strict=False`` as the one way to load past unused tensors."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastlm.models.bert import BertForMaskedLM
from fastlm.models.hf import from_hf

T = pytest.importorskip("transformers")

VOCAB = 101


def gpt2(layers=2):
    config = T.GPT2Config(n_embd=48, n_head=4, n_layer=layers, vocab_size=VOCAB, n_positions=64)
    return T.GPT2LMHeadModel(config).eval()


def llama(layers=2):
    config = T.LlamaConfig(
        hidden_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=layers,
        intermediate_size=88,
        vocab_size=VOCAB,
        tie_word_embeddings=False,
    )
    return T.LlamaForCausalLM(config).eval()


def logits_match(ours, hf) -> None:
    ids = torch.randint(0, VOCAB, (2, 9))
    got, want = ours(ids).logits, hf(ids).logits
    # fp32, reductions over 48 to 88 terms: a few hundred epsilons of the logits' scale.
    tolerance = 1e-4 * want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= tolerance, f"max |fastlm - transformers| = {err:.3g} > {tolerance:.3g}"


def rewrite_config(path, **fields) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(fields)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("make, layers_field", [(gpt2, "n_layer"), (llama, "num_hidden_layers")])
def test_weights_with_more_layers_than_the_config_are_refused(make, layers_field, tmp_path):
    hf = make(layers=2)
    hf.save_pretrained(tmp_path)
    rewrite_config(tmp_path, **{layers_field: 1})
    layer = "transformer.h.1." if make is gpt2 else "model.layers.1."
    per_layer = sum(k.startswith(layer) for k in hf.state_dict())
    with pytest.raises(ValueError) as info:
        from_hf(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "model.safetensors") in message and "strict=False" in message
    assert f"{per_layer} tensors ({layer}" in message, message
    # The opt-in loads the first layer and says what it left out.
    with pytest.warns(UserWarning, match=rf"ignored {per_layer} tensors \({re.escape(layer)}"):
        ours = from_hf(tmp_path, strict=False)
    assert len(ours.blocks) == 1
    truncated = make(layers=1)
    truncated.load_state_dict({k: v for k, v in hf.state_dict().items() if not k.startswith(layer)})
    logits_match(ours, truncated)


def test_an_unknown_tensor_is_named(tmp_path):
    gpt2().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["transformer.h.0.attn.adapter.weight"] = torch.zeros(4, 4)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"holds 1 tensor \(transformer\.h\.0\.attn\.adapter"):
        from_hf(tmp_path)
    with pytest.raises(TypeError, match="strict must be a bool"):
        from_hf(tmp_path, strict="no")


def test_missing_and_misshapen_tensors_name_the_file(tmp_path):
    llama().save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    state = load_file(file)
    save_file({k: v for k, v in state.items() if "layers.1.mlp" not in k}, file)
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(file))} lacks 3 tensors \(model\.layers\.1\.mlp\."
    ):
        from_hf(tmp_path)
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(12, 48)
    save_file(state, file)
    with pytest.raises(
        ValueError,
        match=r"k_proj.weight, .*\(48, 48\) \+ \(12, 48\) \+ "
        r"\(24, 48\) does not fit .* needs \(96, 48\)",
    ):
        from_hf(tmp_path)


def test_config_errors_name_the_file(tmp_path):
    gpt2().save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    cases = {
        "{'model_type': 'gpt2'": "not valid JSON",
        "[1, 2]": "expected a JSON object, got a list",
        '{"model_type": "mistral"}': "model_type 'mistral' is not supported; supported: gpt2",
        '{"vocab_size": 101}': "model_type None is not supported",
        '{"model_type": "gpt2", "n_embd": 48}': "no 'vocab_size' field",
        '{"model_type": "gpt2", "n_embd": 48, "n_layer": 2, "n_head": 5, "n_positions": 64, '
        '"vocab_size": 101}': "hidden_size 48 is not divisible by num_heads 5",
    }
    for text, reason in cases.items():
        config_file.write_text(text)
        with pytest.raises(ValueError, match=f"{re.escape(str(config_file))}: .*{reason}"):
            from_hf(tmp_path)
    # A config of another family than the weights: the weights it needs are not there.
    llama_dir = tmp_path / "llama"
    llama().save_pretrained(llama_dir)
    (llama_dir / "config.json").write_text(json.dumps({**gpt2().config.to_dict()}))
    with pytest.raises(ValueError, match=r"lacks 28 tensors \(transformer\.wte\.weight"):
        from_hf(llama_dir)


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_truncated_or_corrupt_weights_name_the_file(kind, tmp_path):
    hf = gpt2()
    hf.save_pretrained(tmp_path)
    file = tmp_path / ("model.safetensors" if kind == "safetensors" else "pytorch_model.bin")
    if kind == "bin":
        (tmp_path / "model.safetensors").unlink()
        torch.save(hf.state_dict(), file)
        logits_match(from_hf(tmp_path), hf)  # a good one loads
    whole = file.read_bytes()
    for bad in (whole[: len(whole) // 2], b"", b"\x00garbage" * 20):
        file.write_bytes(bad)
        with pytest.raises(ValueError, match=f"{re.escape(str(file))}: not a readable") as info:
            from_hf(tmp_path)
        assert "weights_only=False" not in str(info.value)
    if kind == "bin":  # pickled objects other than tensors are not run, and said so
        torch.save({"config": {"lr": 1.0}}, file)
        with pytest.raises(ValueError, match=f"{re.escape(str(file))}: "):
            from_hf(tmp_path)
        torch.save([torch.zeros(1)], file)
        with pytest.raises(
            ValueError, match=f"{re.escape(str(file))}: expected a dict of tensor names"
        ):
            from_hf(tmp_path)


def test_sharded_checkpoints_load_and_a_missing_shard_is_named(tmp_path):
    hf = llama()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2
    logits_match(from_hf(tmp_path), hf)
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=f"names the shard {shards[1].name}"):
        from_hf(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": []}')
    with pytest.raises(ValueError, match="model.safetensors.index.json: expected an object"):
        from_hf(tmp_path)


def test_a_bare_gpt2_model_with_its_causal_mask_buffers(tmp_path):
    """The layout of the GPT-2 checkpoints on the Hugging Face hub: a ``GPT2Model`` (keys
    without ``transformer.``, no ``lm_head``), with older transformers' ``attn.bias`` mask
    buffers, which are derived from the config and carry no weights."""
    hf = gpt2()
    hf.transformer.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    assert "wte.weight" in state and "lm_head.weight" not in state
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, tmp_path / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = from_hf(tmp_path)
    logits_match(ours, hf)


def test_tied_copies_must_equal_what_they_are_tied_to(tmp_path):
    hf = gpt2()
    state = {k: v.clone() for k, v in hf.state_dict().items()}  # lm_head.weight included
    hf.save_pretrained(tmp_path)
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    logits_match(from_hf(tmp_path), hf)  # an equal copy is accepted
    state["lm_head.weight"] += 1
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(
        ValueError,
        match="lm_head.weight differs from transformer.wte.weight, but .*config.json ties them",
    ):
        from_hf(tmp_path)


def test_a_bert_pre_training_checkpoint_keeps_its_pooler(tmp_path):
    """``BertForPreTraining`` (how BERT checkpoints are published): the masked-LM head and
    the pooler load; the next-sentence head has no place in fastlm and needs the opt-in."""
    config = T.BertConfig(
        hidden_size=48,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=72,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    hf = T.BertForPreTraining(config).eval()
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"2 tensors \(cls\.seq_relationship\.(weight|bias)"):
        from_hf(tmp_path)
    with pytest.warns(UserWarning, match=r"ignored 2 tensors \(cls\.seq_relationship"):
        ours = from_hf(tmp_path, strict=False)
    assert type(ours) is BertForMaskedLM
    ids = torch.randint(0, VOCAB, (2, 9))
    theirs = hf(ids, output_hidden_states=True)
    hidden, pooled = ours.bert(ids)
    want_pooled = hf.bert.pooler(theirs.hidden_states[-1])
    for got, want in ((ours(ids).logits, theirs.prediction_logits), (pooled, want_pooled)):
        err = (got - want).abs().max().item()
        assert err <= 1e-4 * want.abs().max().item(), err
