"""Hugging Face interop: state-dict and config adapters, nothing inside ``forward``.

``from_hf(model_or_dir)`` takes an in-memory ``transformers`` model or a local directory
with ``config.json`` and ``*.safetensors`` (nothing is downloaded) of a GPT-2, Llama, BERT
(bare encoder, masked LM or sequence classification) or T5 checkpoint and returns the
fastlm model with the same weights; ``to_hf(model)`` goes back (it needs ``transformers``).
The maps are explicit per family: fastlm fuses q/k/v into one ``qkv`` projection (``kv``
for cross-attention), and GPT-2's ``Conv1D`` weights are stored transposed.
"""

from __future__ import annotations

import json
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

StateDict = dict[str, Tensor]


def _activation(name: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise ValueError(f"activation {name!r} has no fastlm kernel; supported: "
                         f"{sorted(HF_ACTIVATIONS)}")  # fmt: skip
    return HF_ACTIVATIONS[name]


def _get(cfg: dict[str, Any], key: str, default: Any = None) -> Any:
    value = cfg.get(key, default)
    return default if value is None else value


# ---------------------------------------------------------------------------------------------
# Configs: transformers' config.json fields <-> fastlm configs.


def _gpt2_config(cfg: dict[str, Any], state: StateDict) -> GPTConfig:
    if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("reorder_and_upcast_attn"):
        raise ValueError("GPT-2 variants with scale_attn_by_inverse_layer_idx or "
                         "reorder_and_upcast_attn are not supported")  # fmt: skip
    return GPTConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["n_embd"], num_layers=cfg["n_layer"],
        num_heads=cfg["n_head"], intermediate_size=cfg.get("n_inner"),
        max_position_embeddings=cfg["n_positions"],
        activation=_activation(_get(cfg, "activation_function", "gelu_new")),
        norm_eps=_get(cfg, "layer_norm_epsilon", 1e-5),
        tie_word_embeddings=_get(cfg, "tie_word_embeddings", True),
        dropout=_get(cfg, "resid_pdrop", 0.0),
    )  # fmt: skip


def _llama_config(cfg: dict[str, Any], state: StateDict) -> GPTConfig:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"Llama rope scaling {rope} is not supported (default RoPE only)")
    heads = cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, cfg["hidden_size"] // heads):
        raise ValueError("Llama configs with head_dim != hidden_size / num_heads are not "
                         "supported")  # fmt: skip
    return GPTConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"], num_heads=heads,
        num_kv_heads=_get(cfg, "num_key_value_heads", heads),
        intermediate_size=cfg["intermediate_size"],
        max_position_embeddings=_get(cfg, "max_position_embeddings", 2048),
        activation=_activation(_get(cfg, "hidden_act", "silu")), gated_mlp=True,
        norm="rmsnorm", norm_eps=_get(cfg, "rms_norm_eps", 1e-6), position="rotary",
        rope_theta=float(rope.get("rope_theta", _get(cfg, "rope_theta", 10000.0))),
        attention_bias=_get(cfg, "attention_bias", False), mlp_bias=_get(cfg, "mlp_bias", False),
        tie_word_embeddings=_get(cfg, "tie_word_embeddings", False),
        dropout=_get(cfg, "attention_dropout", 0.0),
    )  # fmt: skip


def _bert_config(cfg: dict[str, Any], state: StateDict) -> BertConfig:
    if _get(cfg, "position_embedding_type", "absolute") != "absolute":
        raise ValueError("only absolute position embeddings are supported for BERT")
    return BertConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
        intermediate_size=cfg["intermediate_size"],
        max_position_embeddings=cfg["max_position_embeddings"],
        type_vocab_size=cfg["type_vocab_size"], activation=_activation(cfg["hidden_act"]),
        norm_eps=cfg["layer_norm_eps"], dropout=cfg["hidden_dropout_prob"],
        attention_dropout=cfg["attention_probs_dropout_prob"],
        num_labels=len(cfg["id2label"]) if cfg.get("id2label") else 2,
        pad_token_id=_get(cfg, "pad_token_id", 0),
    )  # fmt: skip


def _t5_config(cfg: dict[str, Any], state: StateDict) -> T5Config:
    proj = _get(cfg, "feed_forward_proj", "relu")
    gated = proj.startswith("gated-")
    act = proj.split("-")[-1]
    act = "gelu_new" if proj == "gated-gelu" else act  # as transformers reads it
    head = state.get("lm_head.weight")
    tied = head is None or torch.equal(head, state["shared.weight"])
    return T5Config(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["d_model"], head_dim=cfg["d_kv"],
        num_heads=cfg["num_heads"], intermediate_size=cfg["d_ff"], num_layers=cfg["num_layers"],
        num_decoder_layers=cfg.get("num_decoder_layers"),
        relative_attention_num_buckets=_get(cfg, "relative_attention_num_buckets", 32),
        relative_attention_max_distance=_get(cfg, "relative_attention_max_distance", 128),
        activation=_activation(act), gated_mlp=gated,
        norm_eps=_get(cfg, "layer_norm_epsilon", 1e-6), dropout=_get(cfg, "dropout_rate", 0.1),
        tie_word_embeddings=tied,
        # transformers >= 5 ties T5's head always and keeps v1.1's "no scaling" here.
        scale_decoder_outputs=_get(cfg, "scale_decoder_outputs",
                                   _get(cfg, "tie_word_embeddings", True)),
        pad_token_id=_get(cfg, "pad_token_id", 0), eos_token_id=_get(cfg, "eos_token_id", 1),
        decoder_start_token_id=_get(cfg, "decoder_start_token_id", 0),
        initializer_factor=_get(cfg, "initializer_factor", 1.0),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# State dicts. Each family's map yields (fastlm key, hf keys, how to combine / split).


def _cat(*ts: Tensor) -> Tensor:
    return torch.cat(ts, dim=0)


def _transposed(t: Tensor) -> Tensor:
    return t.t().contiguous()


Rule = tuple[str, tuple[str, ...], str]  # (fastlm key, hf keys, "copy" | "cat" | "t")


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
    yield "tok_emb.weight", ("model.embed_tokens.weight",), "copy"
    for i in range(c.num_layers):
        ours, theirs = f"blocks.{i}", f"model.layers.{i}"
        attn = f"{theirs}.self_attn"
        yield from _norm(f"{ours}.norm1", f"{theirs}.input_layernorm", bias=False)
        yield from _fused(f"{ours}.attn.qkv", [f"{attn}.{p}_proj" for p in "qkv"],
                          c.attention_bias)  # fmt: skip
        yield from _linear(f"{ours}.attn.o", f"{attn}.o_proj", c.attention_bias)
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
    if head == "mlm":
        yield from _linear("head_dense", "cls.predictions.transform.dense", True)
        yield from _norm("head_norm", "cls.predictions.transform.LayerNorm")
        yield "head_bias", ("cls.predictions.bias",), "copy"
    else:
        yield from _linear("bert.pooler", "bert.pooler.dense", True)
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


_FAMILIES: dict[str, tuple[Callable, Callable, type]] = {
    # model_type: (config adapter, rules, fastlm class)
    "gpt2": (_gpt2_config, _gpt2_rules, GPT),
    "llama": (_llama_config, _llama_rules, GPT),
    "t5": (_t5_config, _t5_rules, T5),
    "bert": (_bert_config, _bert_rules, BertForMaskedLM),
}


def _bert_head(state: StateDict) -> str:
    if "classifier.weight" in state:
        return "cls"
    # BertModel.save_pretrained writes the encoder alone, without the "bert." prefix.
    return "encoder" if "embeddings.word_embeddings.weight" in state else "mlm"


def _read_dir(path: Path) -> tuple[dict[str, Any], StateDict]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors weights (pickled .bin files are "
                                "not read: they can execute code)")  # fmt: skip
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise ImportError("reading a checkpoint directory needs the safetensors package") from exc
    state: StateDict = {}
    for f in files:
        state.update(load_file(str(f)))
    return json.loads(config_file.read_text()), state


def from_hf(model_or_dir: nn.Module | str | Path) -> nn.Module:
    """The fastlm model holding the weights of a Hugging Face GPT-2, Llama, BERT (a bare
    ``BertModel`` gives :class:`BertModel`, else masked LM or sequence classification) or T5
    checkpoint: an in-memory ``transformers`` model, or a local directory with
    ``config.json`` and ``*.safetensors``. Returned in eval mode when the source model was,
    on the source's device and dtype."""
    if isinstance(model_or_dir, (str, Path)):
        cfg, state = _read_dir(Path(model_or_dir))
        training = False
    elif isinstance(model_or_dir, nn.Module) and hasattr(model_or_dir, "config"):
        cfg, state = model_or_dir.config.to_dict(), model_or_dir.state_dict()
        training = model_or_dir.training
    else:
        raise TypeError("model_or_dir must be a transformers model or a checkpoint directory, "
                        f"got {type(model_or_dir).__name__}")  # fmt: skip
    model_type = cfg.get("model_type")
    if model_type not in _FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(_FAMILIES)}")  # fmt: skip
    make_config, rules, cls = _FAMILIES[model_type]
    config = make_config(cfg, state)
    extra = ()
    if model_type == "bert":
        head = _bert_head(state)
        cls = {"cls": BertForSequenceClassification, "mlm": BertForMaskedLM,
               "encoder": BertModel}[head]  # fmt: skip
        extra = (head,)
    reference = next(iter(state.values()))
    with torch.device("meta"):
        model = cls(config)
    ours = {}
    for key, sources, kind in rules(config, *extra):
        missing = [s for s in sources if s not in state]
        if missing and key in _POOLER:
            continue  # BertModel(add_pooling_layer=False): _load initializes it
        if missing:
            raise KeyError(f"checkpoint lacks {missing} (needed for {key})")
        tensors = [state[s] for s in sources]
        ours[key] = {"copy": lambda ts: ts[0], "cat": lambda ts: _cat(*ts),
                     "t": lambda ts: _transposed(ts[0])}[kind](tensors)  # fmt: skip
    model = model.to_empty(device=reference.device).to(reference.dtype)
    _load(model, ours)
    return model.train(training)


# BERT's pooler, in fastlm's keys: the one part of a BERT encoder a checkpoint may lack.
_POOLER = {f"{p}pooler.{w}" for p in ("", "bert.") for w in ("weight", "bias")}


def _load(model: nn.Module, ours: StateDict) -> None:
    """Load ``ours`` strictly, except parameters the source format does not have (BERT's
    pooler, absent from masked-LM checkpoints and from a ``BertModel`` saved without it, is
    initialized), and re-tie tied weights."""
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
        return list((_llama_rules if c.position == "rotary" else _gpt2_rules)(c))
    if isinstance(model, (BertModel, BertForMaskedLM, BertForSequenceClassification)):
        return list(_bert_rules(model.config, _bert_head_of(model)))
    if isinstance(model, T5):
        return list(_t5_rules(model.config))
    raise TypeError(f"model must be a fastlm GPT, BERT or T5 model, got {type(model).__name__}")


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


def to_hf(model: nn.Module) -> nn.Module:
    """The ``transformers`` model holding ``model``'s weights (GPT-2 or Llama for a
    :class:`GPT` by its configuration, BERT encoder / masked LM / sequence classification,
    T5)."""
    import transformers

    c = getattr(model, "config", None)
    if isinstance(model, GPT):
        llama = c.position == "rotary"
        hf_config = _llama_hf_config(c, transformers) if llama else _gpt2_hf_config(c, transformers)
        hf_cls = transformers.LlamaForCausalLM if llama else transformers.GPT2LMHeadModel
    elif isinstance(model, (BertModel, BertForMaskedLM, BertForSequenceClassification)):
        head = _bert_head_of(model)
        hf_config = _bert_hf_config(c, transformers, head)
        hf_cls = {"mlm": transformers.BertForMaskedLM, "encoder": transformers.BertModel,
                  "cls": transformers.BertForSequenceClassification}[head]  # fmt: skip
    elif isinstance(model, T5):
        hf_config, hf_cls = _t5_hf_config(c, transformers), transformers.T5ForConditionalGeneration
    else:
        raise TypeError(f"model must be a fastlm GPT, BERT or T5 model, got {type(model).__name__}")
    theirs = hf_state_dict(model)
    hf = hf_cls(hf_config).to(device=next(model.parameters()).device,
                               dtype=next(model.parameters()).dtype)  # fmt: skip
    own_head = not getattr(model.config, "tie_word_embeddings", True)
    if own_head and _ties_head(hf):
        raise ValueError(
            f"transformers {transformers.__version__} ties this model's LM head to "
            "its embeddings; a fastlm model with its own head cannot be exported"
        )
    missing, unexpected = hf.load_state_dict(theirs, strict=False)
    if unexpected:
        raise KeyError(f"transformers' model has no {unexpected}")
    tied = {k for k in missing if hf.state_dict()[k].data_ptr() in
            {v.data_ptr() for k2, v in hf.state_dict().items() if k2 not in missing}}  # fmt: skip
    if set(missing) - tied:
        raise KeyError(f"no fastlm tensors for transformers' {sorted(set(missing) - tied)}")
    return hf.train(model.training)


def _bert_head_of(model: nn.Module) -> str:
    if isinstance(model, BertModel):
        return "encoder"
    return "mlm" if isinstance(model, BertForMaskedLM) else "cls"


def _ties_head(hf: nn.Module) -> bool:
    head, emb = hf.get_output_embeddings(), hf.get_input_embeddings()
    return head is not None and head.weight is emb.weight


def _split(t: Tensor, key: str, model: nn.Module) -> list[Tensor]:
    """Undo a ``cat`` rule: q/k/v (or k/v) chunks by the attention module's head counts."""
    attn = model.get_submodule(key.rsplit(".", 2)[0])
    q, kv = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
    sizes = [kv, kv] if attn.cross else [q, kv, kv]
    return list(t.split(sizes, dim=0))


def _gpt2_hf_config(c: GPTConfig, transformers):
    return transformers.GPT2Config(
        vocab_size=c.vocab_size, n_embd=c.hidden_size, n_layer=c.num_layers, n_head=c.num_heads,
        n_inner=c.intermediate_size, n_positions=c.max_position_embeddings,
        activation_function={"gelu_tanh": "gelu_new"}.get(c.activation, c.activation),
        layer_norm_epsilon=c.norm_eps, tie_word_embeddings=c.tie_word_embeddings,
        resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
    )  # fmt: skip


def _llama_hf_config(c: GPTConfig, transformers):
    return transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        intermediate_size=c.intermediate_size, max_position_embeddings=c.max_position_embeddings,
        hidden_act={"gelu_tanh": "gelu_pytorch_tanh"}.get(c.activation, c.activation),
        rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, attention_bias=c.attention_bias,
        mlp_bias=c.mlp_bias, tie_word_embeddings=c.tie_word_embeddings,
        attention_dropout=c.dropout,
    )  # fmt: skip


def _bert_hf_config(c: BertConfig, transformers, head: str):
    return transformers.BertConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings, type_vocab_size=c.type_vocab_size,
        hidden_act={"gelu_tanh": "gelu_new"}.get(c.activation, c.activation),
        layer_norm_eps=c.norm_eps, hidden_dropout_prob=c.dropout,
        attention_probs_dropout_prob=c.attention_dropout, num_labels=c.num_labels,
        pad_token_id=c.pad_token_id,
    )  # fmt: skip


def _t5_hf_config(c: T5Config, transformers):
    if c.gated_mlp and c.activation != "gelu_tanh":
        raise ValueError("transformers' T5 gates with gelu_new only ('gated-gelu')")
    proj = "gated-gelu" if c.gated_mlp else c.activation
    # transformers >= 5 reads tie_word_embeddings=False as "do not scale" (and ties anyway).
    return transformers.T5Config(
        vocab_size=c.vocab_size, d_model=c.hidden_size, d_kv=c.head_dim, num_heads=c.num_heads,
        d_ff=c.intermediate_size, num_layers=c.num_layers,
        num_decoder_layers=c.num_decoder_layers,
        relative_attention_num_buckets=c.relative_attention_num_buckets,
        relative_attention_max_distance=c.relative_attention_max_distance,
        feed_forward_proj=proj, layer_norm_epsilon=c.norm_eps, dropout_rate=c.dropout,
        tie_word_embeddings=c.scale_decoder_outputs, pad_token_id=c.pad_token_id,
        eos_token_id=c.eos_token_id, decoder_start_token_id=c.decoder_start_token_id,
    )  # fmt: skip
