"""Hugging Face interop: state-dict and config adapters, nothing inside ``forward``.

``from_hf(model_or_dir)`` takes an in-memory ``transformers`` model or a local checkpoint
directory (``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``, sharded or
not; nothing is downloaded) of a GPT-2, Llama, BERT (bare encoder, masked LM or sequence
classification) or T5 checkpoint and returns the fastlm model with the same weights, using
every tensor or refusing; ``to_hf(model, tokenizer)`` goes back (it needs ``transformers``),
with the tokenizer's special-token ids, and ``hf_tokenizer`` gives the matching transformers
tokenizer. The maps are explicit per family: fastlm fuses q/k/v into one ``qkv`` projection
(``kv`` for cross-attention), and GPT-2's ``Conv1D`` weights are stored transposed.
``to_hf_adapter`` / ``from_hf_adapter`` carry PEFT LoRA adapters across the same maps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastlm.models.bert import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
)
from fastlm.models.gpt import GPT, GPTConfig
from fastlm.models.layers import HF_ACTIVATIONS
from fastlm.models.t5 import T5, T5Config
from fastlm.nn import RotaryEmbedding
from fastlm.nn.lora import LoRALinear
from fastlm.peft import LoRAState, adapter_state, attach_lora, read_adapter, write_adapter

StateDict = dict[str, Tensor]


def _activation(name: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise ValueError(
            f"activation {name!r} has no fastlm kernel; supported: {sorted(HF_ACTIVATIONS)}"
        )
    return HF_ACTIVATIONS[name]


def _get(cfg: dict[str, Any], key: str, default: Any = None) -> Any:
    value = cfg.get(key, default)
    return default if value is None else value


# ---------------------------------------------------------------------------------------------
# Configs: transformers' config.json fields <-> fastlm configs.


def _gpt2_config(cfg: dict[str, Any], state: StateDict) -> GPTConfig:
    if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("reorder_and_upcast_attn"):
        raise ValueError(
            "GPT-2 variants with scale_attn_by_inverse_layer_idx or "
            "reorder_and_upcast_attn are not supported"
        )
    return GPTConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["n_embd"],
        num_layers=cfg["n_layer"],
        num_heads=cfg["n_head"],
        intermediate_size=cfg.get("n_inner"),
        max_position_embeddings=cfg["n_positions"],
        activation=_activation(_get(cfg, "activation_function", "gelu_new")),
        norm_eps=_get(cfg, "layer_norm_epsilon", 1e-5),
        tie_word_embeddings=_get(cfg, "tie_word_embeddings", True),
        dropout=_get(cfg, "resid_pdrop", 0.0),
    )


def _llama_config(cfg: dict[str, Any], state: StateDict) -> GPTConfig:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"Llama rope scaling {rope} is not supported (default RoPE only)")
    heads = cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, cfg["hidden_size"] // heads):
        raise ValueError("Llama configs with head_dim != hidden_size / num_heads are not supported")
    return GPTConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=_get(cfg, "num_key_value_heads", heads),
        intermediate_size=cfg["intermediate_size"],
        max_position_embeddings=_get(cfg, "max_position_embeddings", 2048),
        activation=_activation(_get(cfg, "hidden_act", "silu")),
        gated_mlp=True,
        norm="rmsnorm",
        norm_eps=_get(cfg, "rms_norm_eps", 1e-6),
        position="rotary",
        rope_theta=float(rope.get("rope_theta", _get(cfg, "rope_theta", 10000.0))),
        attention_bias=_get(cfg, "attention_bias", False),
        mlp_bias=_get(cfg, "mlp_bias", False),
        tie_word_embeddings=_get(cfg, "tie_word_embeddings", False),
        dropout=_get(cfg, "attention_dropout", 0.0),
    )


def _gemma2_config(cfg: dict[str, Any], state: StateDict) -> GPTConfig:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"Gemma 2 rope scaling {rope} is not supported (default RoPE only)")
    heads, layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
    head_dim = _get(cfg, "head_dim", cfg["hidden_size"] // heads)
    # Checkpoints older than ``layer_types``: every other layer slides, the first included.
    kinds = ("sliding_attention", "full_attention")
    layer_types = cfg.get("layer_types") or [kinds[i % 2] for i in range(layers)]
    return GPTConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=_get(cfg, "num_key_value_heads", heads),
        head_dim=head_dim,
        intermediate_size=cfg["intermediate_size"],
        max_position_embeddings=_get(cfg, "max_position_embeddings", 8192),
        activation=_activation(_get(cfg, "hidden_activation", "gelu_pytorch_tanh")),
        gated_mlp=True,
        norm="gemma_rmsnorm",
        norm_eps=_get(cfg, "rms_norm_eps", 1e-6),
        position="rotary",
        rope_theta=float(rope.get("rope_theta", _get(cfg, "rope_theta", 10000.0))),
        attention_bias=_get(cfg, "attention_bias", False),
        mlp_bias=False,
        tie_word_embeddings=_get(cfg, "tie_word_embeddings", True),
        dropout=_get(cfg, "attention_dropout", 0.0),
        query_pre_attn_scalar=_get(cfg, "query_pre_attn_scalar", head_dim),
        attn_softcap=cfg.get("attn_logit_softcapping"),
        final_softcap=cfg.get("final_logit_softcapping"),
        sliding_window=cfg.get("sliding_window"),
        layer_types=tuple(layer_types),
        sandwich_norms=True,
        scale_embeddings=True,
    )


def _bert_config(cfg: dict[str, Any], state: StateDict) -> BertConfig:
    if _get(cfg, "position_embedding_type", "absolute") != "absolute":
        raise ValueError("only absolute position embeddings are supported for BERT")
    return BertConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        intermediate_size=cfg["intermediate_size"],
        max_position_embeddings=cfg["max_position_embeddings"],
        type_vocab_size=cfg["type_vocab_size"],
        activation=_activation(cfg["hidden_act"]),
        norm_eps=cfg["layer_norm_eps"],
        dropout=cfg["hidden_dropout_prob"],
        attention_dropout=cfg["attention_probs_dropout_prob"],
        num_labels=len(cfg["id2label"]) if cfg.get("id2label") else 2,
        pad_token_id=_get(cfg, "pad_token_id", 0),
    )


def _t5_config(cfg: dict[str, Any], state: StateDict) -> T5Config:
    proj = _get(cfg, "feed_forward_proj", "relu")
    gated = proj.startswith("gated-")
    act = proj.split("-")[-1]
    act = "gelu_new" if proj == "gated-gelu" else act  # as transformers reads it
    head, shared = state.get("lm_head.weight"), state.get("shared.weight")
    tied = head is None or shared is None or torch.equal(head, shared)
    return T5Config(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["d_model"],
        head_dim=cfg["d_kv"],
        num_heads=cfg["num_heads"],
        intermediate_size=cfg["d_ff"],
        num_layers=cfg["num_layers"],
        num_decoder_layers=cfg.get("num_decoder_layers"),
        relative_attention_num_buckets=_get(cfg, "relative_attention_num_buckets", 32),
        relative_attention_max_distance=_get(cfg, "relative_attention_max_distance", 128),
        activation=_activation(act),
        gated_mlp=gated,
        norm_eps=_get(cfg, "layer_norm_epsilon", 1e-6),
        dropout=_get(cfg, "dropout_rate", 0.1),
        tie_word_embeddings=tied,
        # transformers >= 5 ties T5's head always and keeps v1.1's "no scaling" here.
        scale_decoder_outputs=_get(
            cfg, "scale_decoder_outputs", _get(cfg, "tie_word_embeddings", True)
        ),
        pad_token_id=_get(cfg, "pad_token_id", 0),
        eos_token_id=_get(cfg, "eos_token_id", 1),
        decoder_start_token_id=_get(cfg, "decoder_start_token_id", 0),
        initializer_factor=_get(cfg, "initializer_factor", 1.0),
    )


# ---------------------------------------------------------------------------------------------
# State dicts. Each family's map yields (fastlm key, hf keys, how to combine / split).


def _cat(*ts: Tensor) -> Tensor:
    return torch.cat(ts, dim=0)


def _transposed(t: Tensor) -> Tensor:
    return t.t().contiguous()


Rule = tuple[str, tuple[str, ...], str]  # (fastlm key, hf keys, "copy" | "cat" | "t")
_COMBINE: dict[str, Callable[[list[Tensor]], Tensor]] = {
    "copy": lambda ts: ts[0],
    "cat": lambda ts: _cat(*ts),
    "t": lambda ts: _transposed(ts[0]),
}


def _linear(ours: str, theirs: str, bias: bool, kind: str = "copy") -> Iterator[Rule]:
    yield f"{ours}.weight", (f"{theirs}.weight",), kind
    if bias:
        yield f"{ours}.bias", (f"{theirs}.bias",), "copy"


def _fused(ours: str, theirs: list[str], bias: bool) -> Iterator[Rule]:
    yield f"{ours}.weight", tuple(f"{t}.weight" for t in theirs), "cat"
    if bias:
        yield f"{ours}.bias", tuple(f"{t}.bias" for t in theirs), "cat"


def _norm(ours: str, theirs: str, bias: bool = True) -> Iterator[Rule]:
    yield f"{ours}.weight", (f"{theirs}.weight",), "copy"
    if bias:
        yield f"{ours}.bias", (f"{theirs}.bias",), "copy"


def _gpt2_rules(c: GPTConfig) -> Iterator[Rule]:
    yield "tok_emb.weight", ("transformer.wte.weight",), "copy"
    yield "pos_emb.weight", ("transformer.wpe.weight",), "copy"
    for i in range(c.num_layers):
        ours, theirs = f"blocks.{i}", f"transformer.h.{i}"
        yield from _norm(f"{ours}.norm1", f"{theirs}.ln_1")
        # Conv1D stores (in, out): the transpose of nn.Linear's weight.
        yield from _linear(f"{ours}.attn.qkv", f"{theirs}.attn.c_attn", True, "t")
        yield from _linear(f"{ours}.attn.o", f"{theirs}.attn.c_proj", True, "t")
        yield from _norm(f"{ours}.norm2", f"{theirs}.ln_2")
        yield from _linear(f"{ours}.mlp.fc1", f"{theirs}.mlp.c_fc", True, "t")
        yield from _linear(f"{ours}.mlp.fc2", f"{theirs}.mlp.c_proj", True, "t")
    yield from _norm("norm_f", "transformer.ln_f")
    if not c.tie_word_embeddings:
        yield "lm_head.weight", ("lm_head.weight",), "copy"


def _llama_rules(c: GPTConfig) -> Iterator[Rule]:
    """Llama's keys, and Gemma 2's (``sandwich_norms``: four norms per layer)."""
    yield "tok_emb.weight", ("model.embed_tokens.weight",), "copy"
    for i in range(c.num_layers):
        ours, theirs = f"blocks.{i}", f"model.layers.{i}"
        attn = f"{theirs}.self_attn"
        yield from _norm(f"{ours}.norm1", f"{theirs}.input_layernorm", bias=False)
        yield from _fused(f"{ours}.attn.qkv", [f"{attn}.{p}_proj" for p in "qkv"], c.attention_bias)
        yield from _linear(f"{ours}.attn.o", f"{attn}.o_proj", c.attention_bias)
        if c.sandwich_norms:
            yield from _norm(f"{ours}.attn_out_norm", f"{theirs}.post_attention_layernorm", False)
            yield from _norm(f"{ours}.norm2", f"{theirs}.pre_feedforward_layernorm", bias=False)
            yield from _norm(f"{ours}.mlp_out_norm", f"{theirs}.post_feedforward_layernorm", False)
        else:
            yield from _norm(f"{ours}.norm2", f"{theirs}.post_attention_layernorm", bias=False)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            yield from _linear(f"{ours}.mlp.{proj}", f"{theirs}.mlp.{proj}", c.mlp_bias)
    yield from _norm("norm_f", "model.norm", bias=False)
    if not c.tie_word_embeddings:
        yield "lm_head.weight", ("lm_head.weight",), "copy"


def _bert_rules(c: BertConfig, head: str) -> Iterator[Rule]:
    if head == "encoder":  # transformers' BertModel and ours: the same keys, unprefixed
        for ours, theirs, kind in _bert_rules(c, "cls"):
            if ours.startswith("bert."):
                yield ours[len("bert.") :], tuple(t[len("bert.") :] for t in theirs), kind
        return
    emb = "bert.embeddings"
    yield "bert.word_emb.weight", (f"{emb}.word_embeddings.weight",), "copy"
    yield "bert.pos_emb.weight", (f"{emb}.position_embeddings.weight",), "copy"
    yield "bert.type_emb.weight", (f"{emb}.token_type_embeddings.weight",), "copy"
    yield from _norm("bert.emb_norm", f"{emb}.LayerNorm")
    for i in range(c.num_layers):
        ours, theirs = f"bert.blocks.{i}", f"bert.encoder.layer.{i}"
        attn = f"{theirs}.attention"
        yield from _fused(
            f"{ours}.attn.qkv", [f"{attn}.self.{p}" for p in ("query", "key", "value")], True
        )
        yield from _linear(f"{ours}.attn.o", f"{attn}.output.dense", True)
        yield from _norm(f"{ours}.norm1", f"{attn}.output.LayerNorm")
        yield from _linear(f"{ours}.mlp.fc1", f"{theirs}.intermediate.dense", True)
        yield from _linear(f"{ours}.mlp.fc2", f"{theirs}.output.dense", True)
        yield from _norm(f"{ours}.norm2", f"{theirs}.output.LayerNorm")
    # transformers' masked LM has no pooler, its pre-training checkpoints do: loaded when there.
    yield from _linear("bert.pooler", "bert.pooler.dense", True)
    if head == "mlm":
        yield from _linear("head_dense", "cls.predictions.transform.dense", True)
        yield from _norm("head_norm", "cls.predictions.transform.LayerNorm")
        yield "head_bias", ("cls.predictions.bias",), "copy"
    else:
        yield from _linear("classifier", "classifier", True)


def _t5_rules(c: T5Config) -> Iterator[Rule]:
    yield "shared.weight", ("shared.weight",), "copy"
    for stack, layers in (("encoder", c.num_layers), ("decoder", c.num_decoder_layers)):
        rel = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        yield f"{stack}.position_bias.embedding.weight", (rel,), "copy"
        for i in range(layers):
            ours, theirs = f"{stack}.blocks.{i}", f"{stack}.block.{i}.layer"
            self_attn = f"{theirs}.0.SelfAttention"
            yield from _norm(f"{ours}.norm1", f"{theirs}.0.layer_norm", bias=False)
            yield from _fused(f"{ours}.attn.qkv", [f"{self_attn}.{p}" for p in "qkv"], False)
            yield from _linear(f"{ours}.attn.o", f"{self_attn}.o", False)
            ff = 1
            if stack == "decoder":
                cross = f"{theirs}.1.EncDecAttention"
                yield from _norm(f"{ours}.norm_cross", f"{theirs}.1.layer_norm", bias=False)
                yield from _linear(f"{ours}.cross.q", f"{cross}.q", False)
                yield from _fused(f"{ours}.cross.kv", [f"{cross}.k", f"{cross}.v"], False)
                yield from _linear(f"{ours}.cross.o", f"{cross}.o", False)
                ff = 2
            dense = f"{theirs}.{ff}.DenseReluDense"
            if c.gated_mlp:
                yield from _linear(f"{ours}.mlp.gate_proj", f"{dense}.wi_0", False)
                yield from _linear(f"{ours}.mlp.up_proj", f"{dense}.wi_1", False)
                yield from _linear(f"{ours}.mlp.down_proj", f"{dense}.wo", False)
            else:
                yield from _linear(f"{ours}.mlp.fc1", f"{dense}.wi", False)
                yield from _linear(f"{ours}.mlp.fc2", f"{dense}.wo", False)
            yield from _norm(f"{ours}.norm2", f"{theirs}.{ff}.layer_norm", bias=False)
        yield from _norm(f"{stack}.norm_f", f"{stack}.final_layer_norm", bias=False)
    if not c.tie_word_embeddings:
        yield "lm_head.weight", ("lm_head.weight",), "copy"


# ---------------------------------------------------------------------------------------------
# Families


@dataclasses.dataclass(frozen=True)
class _Family:
    config: Callable[[dict[str, Any], StateDict], Any]  # config.json -> fastlm config
    rules: Callable[..., Iterator[Rule]]
    cls: type
    # The base model's key prefix: a bare base model (GPT2Model, LlamaModel) saves without it.
    prefix: str
    # Buffers transformers derives from the config (causal masks, rotary frequencies, position
    # ids): older checkpoints hold them, and they carry no weights.
    buffers: str
    # Tied copies a checkpoint may hold: key -> the key it must equal.
    aliases: Callable[[Any], dict[str, str]]


def _head_alias(embedding: str) -> Callable[[Any], dict[str, str]]:
    return lambda c: {"lm_head.weight": embedding} if c.tie_word_embeddings else {}


_FAMILIES: dict[str, _Family] = {
    "gpt2": _Family(
        _gpt2_config,
        _gpt2_rules,
        GPT,
        "transformer.",
        r"transformer\.h\.\d+\.attn\.(bias|masked_bias)",
        _head_alias("transformer.wte.weight"),
    ),
    "llama": _Family(
        _llama_config,
        _llama_rules,
        GPT,
        "model.",
        r"model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",
        _head_alias("model.embed_tokens.weight"),
    ),
    "gemma2": _Family(
        _gemma2_config,
        _llama_rules,
        GPT,
        "model.",
        r"model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",
        _head_alias("model.embed_tokens.weight"),
    ),
    "t5": _Family(
        _t5_config,
        _t5_rules,
        T5,
        "",
        r"",
        lambda c: {
            "encoder.embed_tokens.weight": "shared.weight",
            "decoder.embed_tokens.weight": "shared.weight",
            **_head_alias("shared.weight")(c),
        },
    ),
    # BertModel's keys have no prefix: _bert_head tells the heads apart.
    "bert": _Family(
        _bert_config,
        _bert_rules,
        BertForMaskedLM,
        "",
        r"(bert\.)?embeddings\.(position_ids|token_type_ids)",
        lambda c: {
            "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
            "cls.predictions.decoder.bias": "cls.predictions.bias",
        },
    ),
}


_BERT_CLASSES = {"cls": BertForSequenceClassification, "mlm": BertForMaskedLM, "encoder": BertModel}


def _bert_head(state: StateDict) -> str:
    if "classifier.weight" in state:
        return "cls"
    # BertModel.save_pretrained writes the encoder alone, without the "bert." prefix.
    return "encoder" if "embeddings.word_embeddings.weight" in state else "mlm"


@dataclasses.dataclass
class _Checkpoint:
    """A Hugging Face checkpoint as read: its config.json, its tensors, and how to name
    each in messages."""

    cfg: dict[str, Any]
    state: StateDict
    config_name: str  # the config file, or "<class>'s config" for an in-memory model
    weights_name: str  # the weights file(s), or "<class>'s state_dict"
    training: bool = False


_SAFETENSORS, _PICKLED = "model.safetensors", "pytorch_model.bin"


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from exc


def _weight_files(path: Path) -> list[Path]:
    """The checkpoint's weight files, by transformers' names: ``model.safetensors`` or its
    shards (``model.safetensors.index.json``), else ``pytorch_model.bin`` or its shards."""
    for name in (_SAFETENSORS, _PICKLED):
        index = path / f"{name}.index.json"
        if index.is_file():
            weight_map = _read_json(index)
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if (
                not isinstance(weight_map, dict)
                or not weight_map
                or not all(isinstance(f, str) for f in weight_map.values())
            ):
                raise ValueError(
                    f'{index}: expected an object with a non-empty "weight_map" '
                    "of tensor names to file names"
                )
            files = [path / f for f in sorted(set(weight_map.values()))]
            for f in files:
                if not f.is_file():
                    raise FileNotFoundError(f"{index} names the shard {f.name}, which is missing")
            return files
        if (path / name).is_file():
            return [path / name]
    raise FileNotFoundError(
        f"{path} has no weights: {_SAFETENSORS} or {_PICKLED} (or their "
        "shards with an .index.json) expected"
    )


def _read_weights(file: Path) -> StateDict:
    """The tensors of one weights file; ValueError naming the file when it is truncated,
    corrupt or holds anything but tensors (a .bin is unpickled without running code)."""
    if file.suffix == ".safetensors":
        try:
            from safetensors import SafetensorError
            from safetensors.torch import load_file
        except ImportError as exc:
            raise ImportError("reading safetensors weights needs the safetensors package") from exc
        try:
            return load_file(str(file))
        except SafetensorError as exc:
            raise ValueError(f"{file}: not a readable safetensors file ({exc})") from exc
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
        # torch's message advises weights_only=False, i.e. running the file's code: not here.
        raise ValueError(
            f"{file}: not a readable PyTorch weights file (truncated, corrupt, "
            "or holding objects other than tensors)"
        ) from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise ValueError(
            f"{file}: expected a dict of tensor names to tensors, got {type(state).__name__}"
        )
    return state


def _read_dir(path: Path) -> _Checkpoint:
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is not a directory (a Hugging Face checkpoint "
            "directory with config.json and weights expected)"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json")
    cfg = _read_json(config_file)
    if not isinstance(cfg, dict):
        raise ValueError(f"{config_file}: expected a JSON object, got a {type(cfg).__name__}")
    files = _weight_files(path)
    state: StateDict = {}
    for f in files:
        state.update(_read_weights(f))
    names = str(files[0]) if len(files) == 1 else f"{path} ({len(files)} weight shards)"
    return _Checkpoint(cfg, state, str(config_file), names)


def from_hf(model_or_dir: nn.Module | str | Path, strict: bool = True) -> nn.Module:
    """The fastlm model holding the weights of a Hugging Face GPT-2, Llama, BERT (a bare
    ``BertModel`` gives :class:`BertModel`, else masked LM or sequence classification) or T5
    checkpoint: an in-memory ``transformers`` model, or a local directory with
    ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``, read without running
    pickled code; sharded checkpoints too). Returned in eval mode when the source model was,
    on the source's device and dtype.

    The config decides the model; the weights must fit it. Every tensor the model needs must
    be there with its shape, and every tensor of the checkpoint must be used: a tensor the
    model has no place for (layers beyond the config's count, a head fastlm does not have,
    a tied copy that differs) raises ValueError naming them. ``strict=False`` loads the
    model all the same, ignoring the unused tensors with a warning that names them.
    Unreadable files, a config that is not a JSON object, missing fields and unsupported
    ``model_type`` raise ValueError naming the file."""
    if isinstance(model_or_dir, (str, Path)):
        ckpt = _read_dir(Path(model_or_dir))
    elif isinstance(model_or_dir, nn.Module) and hasattr(model_or_dir, "config"):
        name = type(model_or_dir).__name__
        ckpt = _Checkpoint(
            model_or_dir.config.to_dict(),
            model_or_dir.state_dict(),
            f"{name}'s config",
            f"{name}'s state_dict",
            model_or_dir.training,
        )
    else:
        raise TypeError(
            "model_or_dir must be a transformers model or a checkpoint directory, "
            f"got {type(model_or_dir).__name__}"
        )
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
    if not ckpt.state:
        raise ValueError(f"{ckpt.weights_name} holds no tensors")
    model_type = ckpt.cfg.get("model_type")
    if model_type not in _FAMILIES:
        raise ValueError(
            f"{ckpt.config_name}: model_type {model_type!r} is not supported; "
            f"supported: {', '.join(_FAMILIES)}"
        )
    family = _FAMILIES[model_type]
    state = ckpt.state
    if family.prefix and not any(k.startswith(family.prefix) for k in state):
        state = {family.prefix + k: v for k, v in state.items()}
    try:
        config = family.config(ckpt.cfg, state)
    except KeyError as exc:
        raise ValueError(
            f"{ckpt.config_name}: no {exc.args[0]!r} field (a {model_type} config needs it)"
        ) from exc
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{ckpt.config_name}: {exc}") from exc
    cls, extra = family.cls, ()
    if model_type == "bert":
        head = _bert_head(state)
        cls, extra = _BERT_CLASSES[head], (head,)
    with torch.device("meta"):
        model = cls(config)
    shapes = {k: t.shape for k, t in model.state_dict().items()}
    ours, used, missing = {}, set(), []
    for key, sources, kind in family.rules(config, *extra):
        absent = [s for s in sources if s not in state]
        if absent and key in _POOLER:
            continue  # BertModel(add_pooling_layer=False), masked LM: _load initializes it
        if absent:
            missing += absent
            continue
        used.update(sources)
        tensor = _COMBINE[kind]([state[s] for s in sources])
        if tensor.shape != shapes[key]:
            got = " + ".join(str(tuple(state[s].shape)) for s in sources)
            raise ValueError(
                f"{ckpt.weights_name}: {', '.join(sources)} {got} does not fit the "
                f"model {ckpt.config_name} describes, which needs "
                f"{tuple(shapes[key])} for {key}"
            )
        ours[key] = tensor
    if missing:
        raise ValueError(
            f"{ckpt.weights_name} lacks {_some(missing)}, which the model "
            f"{ckpt.config_name} describes needs"
        )
    for alias, target in family.aliases(config).items():
        if alias in state:
            if target in state and torch.equal(state[alias], state[target]):
                used.add(alias)
            else:
                raise ValueError(
                    f"{ckpt.weights_name}: {alias} differs from {target}, but "
                    f"{ckpt.config_name} ties them"
                )
    unused = [
        k
        for k in state
        if k not in used and not (family.buffers and re.fullmatch(family.buffers, k))
    ]
    if unused and strict:
        raise ValueError(
            f"{ckpt.weights_name} holds {_some(unused)}, which the model "
            f"{ckpt.config_name} describes has no place for; pass strict=False to "
            "load it without them"
        )
    if unused:
        warnings.warn(f"from_hf: ignored {_some(unused)} of {ckpt.weights_name}", stacklevel=2)
    reference = next(iter(ours.values()))
    model = model.to_empty(device=reference.device).to(reference.dtype)
    _load(model, ours)
    return model.train(ckpt.training)


def _some(keys: list[str], shown: int = 5) -> str:
    """``"3 tensors (a, b, c)"``, or the first ``shown`` names and how many more."""
    more = f", ... {len(keys) - shown} more" if len(keys) > shown else ""
    noun = "tensor" if len(keys) == 1 else "tensors"
    return f"{len(keys)} {noun} ({', '.join(keys[:shown])}{more})"


# BERT's pooler, in fastlm's keys: the one part of a BERT encoder a checkpoint may lack.
_POOLER = {f"{p}pooler.{w}" for p in ("", "bert.") for w in ("weight", "bias")}


def _load(model: nn.Module, ours: StateDict) -> None:
    """Load ``ours`` (every key checked against the model by :func:`from_hf`), initialize
    parameters the source format may lack (BERT's pooler, absent from a ``BertModel`` saved
    without it) as BERT does, and re-tie tied weights."""
    if isinstance(model, GPT) and model.config.tie_word_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    if isinstance(model, T5) and model.config.tie_word_embeddings:
        model.lm_head.weight = model.shared.weight
    expected = set(model.state_dict())
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    untouched = expected - set(ours) - tied
    if untouched - _POOLER:
        raise KeyError(f"no checkpoint tensors for {sorted(untouched)}")
    if untouched:  # initialize the pooler as BERT does
        pooler = model.pooler if isinstance(model, BertModel) else model.bert.pooler
        with torch.no_grad():
            pooler.weight.normal_(std=model.config.initializer_range)
            pooler.bias.zero_()
    model.load_state_dict(ours, strict=False)
    # Non-persistent buffers (rotary tables) were created on the meta device: rebuild them.
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_cache()


def _rules_of(model: nn.Module) -> list[Rule]:
    if isinstance(model, GPT):
        c = model.config
        return list((_gpt2_rules if _gpt_family(c) == "gpt2" else _llama_rules)(c))
    if isinstance(model, (BertModel, BertForMaskedLM, BertForSequenceClassification)):
        rules = _bert_rules(model.config, _bert_head_of(model))
        if isinstance(model, BertForMaskedLM):  # transformers' has no pooler (the LM needs none)
            return [r for r in rules if r[0] not in _POOLER]
        return list(rules)
    if isinstance(model, T5):
        return list(_t5_rules(model.config))
    raise TypeError(f"model must be a fastlm GPT, BERT or T5 model, got {type(model).__name__}")


def _gpt_family(c: GPTConfig) -> str:
    """The transformers family a GPT configuration exports to: Gemma 2 when it has Gemma's
    layout, Llama for other rotary models, else GPT-2. Settings neither can express are
    refused."""
    gemma = c.norm == "gemma_rmsnorm" or c.sandwich_norms or c.scale_embeddings
    if gemma:
        if not (c.norm == "gemma_rmsnorm" and c.sandwich_norms and c.scale_embeddings):
            raise ValueError(
                "a GPT with only some of Gemma 2's layout (gemma_rmsnorm, sandwich_norms, "
                "scale_embeddings) has no transformers counterpart"
            )
        return "gemma2"
    if c.attn_softcap or c.final_softcap or c.query_pre_attn_scalar or c.sliding_window:
        raise ValueError(
            "soft-capping, sliding windows and query_pre_attn_scalar export only with "
            "Gemma 2's layout"
        )
    if c.position == "rotary":
        if c.head_dim * c.num_heads != c.hidden_size:
            raise ValueError("a Llama export needs head_dim * num_heads == hidden_size")
        return "llama"
    return "gpt2"


def hf_state_dict(model: nn.Module, tensors: StateDict | None = None) -> StateDict:
    """``tensors`` (default: ``model.state_dict()``; e.g. parameter gradients, keyed like it)
    under the Hugging Face checkpoint's keys and layouts. Tied copies appear once."""
    ours = model.state_dict() if tensors is None else tensors
    theirs: StateDict = {}
    for key, sources, kind in _rules_of(model):
        if key not in ours:
            continue
        t = ours[key]
        if kind == "t":
            theirs[sources[0]] = _transposed(t)
        elif kind == "cat":
            theirs.update(zip(sources, _split(t, key, model), strict=True))
        else:
            theirs[sources[0]] = t
    return theirs


def to_hf(model: nn.Module, tokenizer=None) -> nn.Module:
    """The ``transformers`` model holding ``model``'s weights (GPT-2 or Llama for a
    :class:`GPT` by its configuration, BERT encoder / masked LM / sequence classification,
    T5).

    ``tokenizer``, the fastlm :class:`~fastlm.data.Tokenizer` the model was trained with,
    gives the export's special-token ids (in ``config`` and ``generation_config``, so
    ``save_pretrained`` writes them and ``generate`` stops at the end of text): a GPT's EOS
    and BOS are ``<|endoftext|>`` (fastlm's document separator: one text's end begins the
    next, as in GPT-2), its padding ``<pad>``; T5 and BERT configs hold their own ids, which
    the tokenizer must agree with. Without a tokenizer a GPT export has no special-token ids
    (transformers' defaults belong to other vocabularies). :func:`hf_tokenizer` gives the
    matching transformers tokenizer."""
    import transformers

    c = getattr(model, "config", None)
    if isinstance(model, GPT):
        family = _gpt_family(c)
        build = {"llama": _llama_hf_config, "gemma2": _gemma2_hf_config}.get(
            family, _gpt2_hf_config
        )
        hf_config = build(c, transformers, _special_token_ids(model, tokenizer))
        hf_cls = {
            "llama": transformers.LlamaForCausalLM,
            "gemma2": transformers.Gemma2ForCausalLM,
        }.get(family, transformers.GPT2LMHeadModel)
    elif isinstance(model, (BertModel, BertForMaskedLM, BertForSequenceClassification)):
        head = _bert_head_of(model)
        _special_token_ids(model, tokenizer)
        hf_config = _bert_hf_config(c, transformers, head)
        hf_cls = {
            "mlm": transformers.BertForMaskedLM,
            "encoder": transformers.BertModel,
            "cls": transformers.BertForSequenceClassification,
        }[head]
    elif isinstance(model, T5):
        _special_token_ids(model, tokenizer)
        hf_config, hf_cls = _t5_hf_config(c, transformers), transformers.T5ForConditionalGeneration
    else:
        raise TypeError(f"model must be a fastlm GPT, BERT or T5 model, got {type(model).__name__}")
    theirs = hf_state_dict(model)
    hf = hf_cls(hf_config).to(
        device=next(model.parameters()).device, dtype=next(model.parameters()).dtype
    )
    own_head = not getattr(model.config, "tie_word_embeddings", True)
    if own_head and _ties_head(hf):
        raise ValueError(
            f"transformers {transformers.__version__} ties this model's LM head to "
            "its embeddings; a fastlm model with its own head cannot be exported"
        )
    missing, unexpected = hf.load_state_dict(theirs, strict=False)
    if unexpected:
        raise KeyError(f"transformers' model has no {unexpected}")
    tied = {
        k
        for k in missing
        if hf.state_dict()[k].data_ptr()
        in {v.data_ptr() for k2, v in hf.state_dict().items() if k2 not in missing}
    }
    if set(missing) - tied:
        raise KeyError(f"no fastlm tensors for transformers' {sorted(set(missing) - tied)}")
    return hf.train(model.training)


def _check_tokenizer(tokenizer, model: nn.Module) -> None:
    if not all(hasattr(tokenizer, a) for a in ("eos_id", "pad_id", "vocab_size", "save")):
        raise TypeError(f"tokenizer must be a fastlm Tokenizer, got {type(tokenizer).__name__}")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
            f"vocab_size {model.config.vocab_size}"
        )


def _special_token_ids(model: nn.Module, tokenizer) -> dict[str, int | None]:
    """A GPT export's special-token ids, as transformers config fields (given to the config
    itself: transformers validates them there and derives the generation_config from them);
    for T5 and BERT, whose configs hold their own, checks that the tokenizer agrees."""
    if tokenizer is None and isinstance(model, GPT):
        return dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id"))
    if tokenizer is None:
        return {}
    _check_tokenizer(tokenizer, model)
    eos, pad = tokenizer.eos_id, tokenizer.pad_id
    if isinstance(model, GPT):
        return {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": pad}
    theirs = {"pad_token_id": ("<pad>", pad), "eos_token_id": ("<|endoftext|>", eos)}
    fields = ("pad_token_id", "eos_token_id") if isinstance(model, T5) else ("pad_token_id",)
    for field in fields:
        token, value = theirs[field]
        if value != getattr(model.config, field):
            raise ValueError(
                f"the tokenizer's {token} is {value}, the model's {field} is "
                f"{getattr(model.config, field)}: not the model's tokenizer"
            )
    return {}


def hf_tokenizer(tokenizer, model: nn.Module):
    """``tokenizer`` (a fastlm :class:`~fastlm.data.Tokenizer`) as a transformers
    ``PreTrainedTokenizerFast`` for :func:`to_hf` ``(model, tokenizer)``: the same
    vocabulary, merges and special tokens, with their roles (``<|endoftext|>`` EOS and BOS,
    ``<pad>``, BERT's ``<cls>``, ``<sep>``, ``<mask>``), adding what fastlm's models read
    around a text as transformers' tokenizers add it: T5's encoder input ends with
    ``<|endoftext|>``, BERT's is ``<cls> text <sep>`` (``<cls> a <sep> b <sep>`` for a
    pair, types 0 then 1); a GPT's gets nothing. Save it beside the model with
    ``save_pretrained``."""
    import tempfile

    import tokenizers
    import transformers

    _check_tokenizer(tokenizer, model)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(Path(tmp) / "tokenizer.json")
        tok = tokenizers.Tokenizer.from_file(str(Path(tmp) / "tokenizer.json"))
    ids = {"eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
    if isinstance(model.config, BertConfig):
        ids.update(cls=tokenizer.cls_id, sep=tokenizer.sep_id, mask=tokenizer.mask_id)
    names = {role: tok.id_to_token(i) for role, i in ids.items() if i is not None}
    if isinstance(model, T5):
        if "eos" not in names:
            raise ValueError("tokenizer has no <|endoftext|>, which ends T5's encoder input")
        eos = names["eos"]
        tok.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, ids["eos"])]
        )
    elif isinstance(model.config, BertConfig):
        if "cls" not in names or "sep" not in names:
            raise ValueError("tokenizer has no <cls> or <sep>, which frame BERT's input")
        cls, sep = names["cls"], names["sep"]
        tok.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{cls} $A {sep}",
            pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, ids["cls"]), (sep, ids["sep"])],
        )
    roles = {f"{role}_token": name for role, name in names.items()}
    if isinstance(model, GPT) and "eos" in names:
        roles["bos_token"] = names["eos"]
    limit = model.config.max_position_embeddings if isinstance(model, GPT) else None
    extra = {} if limit is None else {"model_max_length": limit}
    if isinstance(model.config, BertConfig):
        extra["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **roles, **extra)


def _bert_head_of(model: nn.Module) -> str:
    if isinstance(model, BertModel):
        return "encoder"
    return "mlm" if isinstance(model, BertForMaskedLM) else "cls"


def _ties_head(hf: nn.Module) -> bool:
    head, emb = hf.get_output_embeddings(), hf.get_input_embeddings()
    return head is not None and head.weight is emb.weight


def _split_sizes(key: str, model: nn.Module) -> list[int]:
    """The rows of each part of a ``cat`` rule's tensor: q/k/v (or k/v) by the attention
    module's head counts."""
    attn = model.get_submodule(key.rsplit(".", 2)[0])
    q, kv = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
    return [kv, kv] if attn.cross else [q, kv, kv]


def _split(t: Tensor, key: str, model: nn.Module) -> list[Tensor]:
    """Undo a ``cat`` rule."""
    return list(t.split(_split_sizes(key, model), dim=0))


def _gpt2_hf_config(c: GPTConfig, transformers, token_ids: dict[str, int | None]):
    return transformers.GPT2Config(
        vocab_size=c.vocab_size,
        n_embd=c.hidden_size,
        n_layer=c.num_layers,
        n_head=c.num_heads,
        n_inner=c.intermediate_size,
        n_positions=c.max_position_embeddings,
        activation_function={"gelu_tanh": "gelu_new"}.get(c.activation, c.activation),
        layer_norm_epsilon=c.norm_eps,
        tie_word_embeddings=c.tie_word_embeddings,
        resid_pdrop=c.dropout,
        embd_pdrop=c.dropout,
        attn_pdrop=c.dropout,
        **token_ids,
    )


def _llama_hf_config(c: GPTConfig, transformers, token_ids: dict[str, int | None]):
    return transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings,
        hidden_act={"gelu_tanh": "gelu_pytorch_tanh"}.get(c.activation, c.activation),
        rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta,
        attention_bias=c.attention_bias,
        mlp_bias=c.mlp_bias,
        tie_word_embeddings=c.tie_word_embeddings,
        attention_dropout=c.dropout,
        **token_ids,
    )


def _gemma2_hf_config(c: GPTConfig, transformers, token_ids: dict[str, int | None]):
    return transformers.Gemma2Config(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings,
        hidden_activation={"gelu_tanh": "gelu_pytorch_tanh"}.get(c.activation, c.activation),
        rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta,
        attention_bias=c.attention_bias,
        tie_word_embeddings=c.tie_word_embeddings,
        attention_dropout=c.dropout,
        query_pre_attn_scalar=c.query_pre_attn_scalar or c.head_dim,
        attn_logit_softcapping=c.attn_softcap,
        final_logit_softcapping=c.final_softcap,
        sliding_window=c.sliding_window,
        layer_types=list(c.layer_types),
        **token_ids,
    )


def _bert_hf_config(c: BertConfig, transformers, head: str):
    return transformers.BertConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings,
        type_vocab_size=c.type_vocab_size,
        hidden_act={"gelu_tanh": "gelu_new"}.get(c.activation, c.activation),
        layer_norm_eps=c.norm_eps,
        hidden_dropout_prob=c.dropout,
        attention_probs_dropout_prob=c.attention_dropout,
        num_labels=c.num_labels,
        pad_token_id=c.pad_token_id,
    )


def _t5_hf_config(c: T5Config, transformers):
    if c.gated_mlp and c.activation != "gelu_tanh":
        raise ValueError("transformers' T5 gates with gelu_new only ('gated-gelu')")
    proj = "gated-gelu" if c.gated_mlp else c.activation
    # transformers >= 5 reads tie_word_embeddings=False as "do not scale" (and ties anyway).
    return transformers.T5Config(
        vocab_size=c.vocab_size,
        d_model=c.hidden_size,
        d_kv=c.head_dim,
        num_heads=c.num_heads,
        d_ff=c.intermediate_size,
        num_layers=c.num_layers,
        num_decoder_layers=c.num_decoder_layers,
        relative_attention_num_buckets=c.relative_attention_num_buckets,
        relative_attention_max_distance=c.relative_attention_max_distance,
        feed_forward_proj=proj,
        layer_norm_epsilon=c.norm_eps,
        dropout_rate=c.dropout,
        tie_word_embeddings=c.scale_decoder_outputs,
        pad_token_id=c.pad_token_id,
        eos_token_id=c.eos_token_id,
        decoder_start_token_id=c.decoder_start_token_id,
    )


# ---------------------------------------------------------------------------------------------
# LoRA adapters: a PEFT adapter of the fastlm model <-> one of its Hugging Face counterpart,
# the layers mapped as their weights are.


def _linear_map(model: nn.Module) -> dict[str, tuple[tuple[str, ...], str]]:
    """Each fastlm linear layer's name -> (its Hugging Face layers, the rule's kind)."""
    out = {}
    for key, sources, kind in _rules_of(model):
        name = key.removesuffix(".weight")
        if name != key and isinstance(model.get_submodule(name), (nn.Linear, LoRALinear)):
            out[name] = (tuple(s.removesuffix(".weight") for s in sources), kind)
    return out


def to_hf_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default") -> None:
    """Write LoRA adapter ``adapter_name`` of fastlm ``model`` as a PEFT adapter directory
    of :func:`to_hf` ``(model)`` (``peft.PeftModel.from_pretrained(to_hf(model), path)``
    computes what ``model`` computes). Layers are renamed as their weights are; a fused
    q/k/v (or k/v) layer's LoRA becomes one per projection, exactly: each gets the shared
    A and its own rows of B. GPT-2's ``Conv1D`` layers take A and B as they are (PEFT's
    ``fan_in_fan_out`` is set for them)."""
    adapter = adapter_state(model, adapter_name)
    mapping = _linear_map(model)
    weights, alphas, conv1d = {}, {}, False
    for name, (a, b) in adapter.weights.items():
        if name not in mapping:
            raise ValueError(
                f"{name} has no Hugging Face counterpart (only layers whose "
                "weights to_hf exports carry an adapter over)"
            )
        theirs, kind = mapping[name]
        parts = _split(b, f"{name}.weight", model) if kind == "cat" else [b]
        for their_name, part in zip(theirs, parts, strict=True):
            weights[their_name], alphas[their_name] = (a, part), adapter.alphas[name]
        conv1d |= kind == "t"
    write_adapter(path, LoRAState(weights, alphas, adapter.dropout, adapter.use_rslora, conv1d))


def from_hf_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default") -> nn.Module:
    """Load a PEFT LoRA adapter of the Hugging Face model (:func:`to_hf` ``(model)``, or the
    checkpoint :func:`from_hf` read) into fastlm ``model`` as adapter ``adapter_name``; the
    model then computes what the PEFT model computes.

    Where fastlm fuses projections that are separate in transformers (q/k/v; T5's
    cross-attention k/v), one LoRA on the fused layer does the work of the separate ones:
    when they share A and scaling (as :func:`to_hf_adapter` writes them) it keeps rank r
    with B's rows stacked; otherwise (trained separately: different A's) it has rank
    ``r_q + r_k + r_v``, the A's stacked and B block-diagonal, which is exact but larger
    (saved back, each projection gets that rank). A projection without an adapter gets
    zero rows. Dropout, where set, draws one mask for the fused layer instead of one per
    projection."""
    adapter = read_adapter(path)
    mapping = _linear_map(model)
    owner = {t: name for name, (theirs, _) in mapping.items() for t in theirs}
    unknown = [n for n in adapter.weights if n not in owner]
    if unknown:
        raise ValueError(
            f"{path}: {', '.join(unknown[:5])} {'is' if len(unknown) == 1 else 'are'}"
            f" not a layer of the Hugging Face counterpart of {type(model).__name__}"
            " (or carries no weights to_hf exports)"
        )
    weights, alphas = {}, {}
    for name in dict.fromkeys(owner[n] for n in adapter.weights):
        theirs, kind = mapping[name]
        if kind != "cat":
            weights[name], alphas[name] = adapter.weights[theirs[0]], adapter.alphas[theirs[0]]
            continue
        sizes = _split_sizes(f"{name}.weight", model)
        parts = [
            (adapter.weights[t], adapter.alphas[t]) if t in adapter.weights else None
            for t in theirs
        ]
        weights[name], alphas[name] = _fuse(parts, sizes, adapter.use_rslora)
    fused = LoRAState(weights, alphas, adapter.dropout, adapter.use_rslora)
    return attach_lora(model, fused, adapter_name, str(path))


def _fuse(
    parts: list[tuple[tuple[Tensor, Tensor], float] | None], sizes: list[int], rslora: bool
) -> tuple[tuple[Tensor, Tensor], float]:
    """One LoRA ``((A, B), alpha)`` computing, on the fused layer, what ``parts`` (each a
    projection's ``((A, B), alpha)``, or None without one) compute on the ``sizes`` rows of
    their projections."""
    present = [p for p in parts if p is not None]
    (a0, b0), alpha0 = present[0]

    def scaling(a: Tensor, alpha: float) -> float:
        r = a.shape[0]
        return alpha / (math.sqrt(r) if rslora else r)

    scale = scaling(a0, alpha0)
    shared = all(torch.equal(a, a0) and scaling(a, al) == scale for (a, _), al in present)
    rank = a0.shape[0] if shared else sum(a.shape[0] for (a, _), _ in present)
    b = b0.new_zeros(sum(sizes), rank)
    rows = cols = 0
    for size, part in zip(sizes, parts, strict=True):
        if part is not None:
            (a, bi), alpha = part
            width = a.shape[0]
            factor = scaling(a, alpha) / scale
            b[rows : rows + size, cols : cols + width] = bi if factor == 1 else bi * factor
            cols += 0 if shared else width
        rows += size
    a = a0 if shared else torch.cat([a for (a, _), _ in present])
    return (a, b), scale * (math.sqrt(rank) if rslora else rank)
