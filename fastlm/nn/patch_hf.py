"""Patching Hugging Face ``transformers`` models: fastlm's attention through transformers'
attention registry, and fastlm's norms, MLPs and loss where the swap is exact.

Imported by :func:`fastlm.patch` only for a transformers model, so it may import transformers
at the top. Modules are recognized by their exact class (module and name: a subclass with its
own forward, or a same-named class elsewhere, is left alone); only these were checked against
transformers' source and tested (``tests/nn/test_patch_hf.py``):

- attention: models supporting ``"sdpa"`` whose attention calls transformers'
  ``ALL_ATTENTION_FUNCTIONS`` (GPT-2, BERT, T5 with its relative position bias, Llama) are
  set to ``"fastlm"``: :func:`fastlm_attention_forward`, fed SDPA's masks.
- ``LlamaRMSNorm``, ``T5LayerNorm`` -> :class:`fastlm.nn.RMSNorm` returning their dtypes.
- ``GemmaRMSNorm``, ``Gemma2RMSNorm`` -> :class:`fastlm.nn.GemmaRMSNorm` (scale
  ``1 + weight``, float32 math, one rounding to the input's dtype: their numbers exactly).
- ``LlamaMLP`` -> :class:`fastlm.nn.GatedMLP` (silu, gelu, tanh-gelu; plain ``nn.Linear``
  projections).
- the causal-LM loss (``ForCausalLMLoss``: GPT-2, Llama) -> :func:`causal_lm_loss`.
- ``torch.nn.LayerNorm`` (GPT-2, BERT) -> :class:`fastlm.nn.LayerNorm`, by :func:`fastlm.patch`.

Left alone, and reported: GPT-2's MLP (``Conv1D`` weights are stored transposed, (in, out),
under ``c_fc``/``c_proj``), BERT's (split across ``BertIntermediate`` and ``BertOutput``, which
also holds the residual LayerNorm), T5's (``wi``/``wo`` keys, not ``FusedMLP``'s ``fc1``/``fc2``
or ``GatedMLP``'s ``gate_proj``/``up_proj``/``down_proj``, and one dropout between the
activation and ``wo`` where ``FusedMLP`` drops twice), Llama's rotary embedding (applied by a
module-level function inside ``LlamaAttention.forward``), and losses a model's ``forward``
computes itself (BERT's masked-LM, T5's).
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor
from transformers.activations import GELUActivation, GELUTanh, NewGELUActivation, SiLUActivation
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface, PreTrainedModel

from fastlm import ops
from fastlm.nn.mlp import GatedMLP
from fastlm.nn.norm import GemmaRMSNorm, RMSNorm
from fastlm.nn.patch_report import PatchReport, Skip, Swap

ATTN_IMPLEMENTATION = "fastlm"

_LLAMA = "transformers.models.llama.modeling_llama"
_T5 = "transformers.models.t5.modeling_t5"
_GPT2 = "transformers.models.gpt2.modeling_gpt2"
_BERT = "transformers.models.bert.modeling_bert"
_GEMMA = "transformers.models.gemma.modeling_gemma"
_GEMMA2 = "transformers.models.gemma2.modeling_gemma2"

# (module, class name) -> the dtype rule of the scale-only RMS norm (see _HFRMSNorm).
_RMS_NORMS = {(_LLAMA, "LlamaRMSNorm"): "llama", (_T5, "T5LayerNorm"): "t5"}
# (1 + weight) norms, computed in float32 and rounded once (transformers' source, 5.x).
_GEMMA_NORMS = {(_GEMMA, "GemmaRMSNorm"), (_GEMMA2, "Gemma2RMSNorm")}
_GATED_MLPS = {(_LLAMA, "LlamaMLP")}
_SKIPPED = {
    (_GPT2, "GPT2MLP"): "its Conv1D weights are stored (in, out) under c_fc/c_proj; fastlm's "
    "fused MLP takes (out, in) nn.Linear weights, so a swap would copy them every call or "
    "change the parameters and state_dict keys",
    (_BERT, "BertIntermediate"): "BERT's MLP is split across BertIntermediate and BertOutput "
    "(which also holds the residual LayerNorm): there is no one module to swap for FusedMLP "
    "(the LayerNorms are swapped)",
    (_T5, "T5DenseActDense"): "its state_dict keys (wi, wo) differ from FusedMLP's (fc1, fc2), "
    "and its one dropout (between the activation and wo) differs from FusedMLP's two",
    (_T5, "T5DenseGatedActDense"): "its state_dict keys (wi_0, wi_1, wo) differ from "
    "GatedMLP's (gate_proj, up_proj, down_proj), and GatedMLP has no dropout",
    (_LLAMA, "LlamaRotaryEmbedding"): "the rotation is applied by a module-level function "
    "(apply_rotary_pos_emb) inside LlamaAttention.forward on cos/sin this module computes "
    "(with rope scaling variants): no module to swap without replacing transformers' function "
    "for every model",
}

# transformers' activation modules -> fastlm's activation names (same function).
_ACTIVATIONS = {
    GELUActivation: "gelu",
    GELUTanh: "gelu_tanh",
    NewGELUActivation: "gelu_tanh",
    SiLUActivation: "silu",
    torch.nn.SiLU: "silu",
    torch.nn.ReLU: "relu",
}


# ---------------------------------------------------------------------------------------------
# Attention.


def fastlm_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: Tensor | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' ``AttentionInterface`` signature on :func:`fastlm.ops.flash_attention`,
    with the semantics of transformers' ``sdpa_attention_forward``.

    Args:
        module: the calling attention module (its ``is_causal`` is the default).
        query: (B, H, Sq, D); key, value: (B, Hkv, Sk, D) with H % Hkv == 0 (GQA/MQA: K/V
            are not repeated).
        attention_mask: None, a boolean mask (True = attend) or an additive float mask,
            broadcastable to (B, H, Sq, Sk). Masks come from transformers' ``sdpa_mask``
            (registered for ``"fastlm"``), so sliding windows and padding arrive in it and the
            ``sliding_window`` kwarg needs no handling.
        dropout: attention-probability dropout (the caller passes 0 in eval mode).
        scaling: softmax scale (None: 1/sqrt(D)).
        is_causal: overrides ``module.is_causal``; causal attention applies only with no mask
            and Sq > 1 (a mask already holds causality), aligned top-left as SDPA's: with
            Sk > Sq the keys past Sq are unfilled static-cache slots and are dropped.
        position_bias: additive bias broadcastable to (B, H, Sq, Sk), differentiable (T5's
            relative positions).

    Returns ``(out, None)``: out (B, Sq, H, D) contiguous; no attention weights.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError("softcap is not supported by the fastlm attention implementation")
    q_len = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and attention_mask is None and q_len > 1
    if causal and key.shape[2] > q_len:
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        if position_bias is not None:
            position_bias = position_bias[..., :q_len]
    bias = position_bias
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            bias = ops.masks.additive_mask(attention_mask, query.dtype, bias)
        else:
            bias = attention_mask if bias is None else bias + attention_mask
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, S, H, D) views
    out = ops.flash_attention(
        q, k, v, causal=causal, softmax_scale=scaling, dropout_p=dropout, attn_bias=bias
    )
    return out.contiguous(), None


def register_attention() -> None:
    """Register :func:`fastlm_attention_forward` as ``"fastlm"`` in transformers' attention
    registry, with SDPA's mask builder (boolean masks, or None where causality alone does)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, fastlm_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def _switch_attention(model: PreTrainedModel, report: PatchReport) -> None:
    current = model.config._attn_implementation
    reason = None
    if current not in ("sdpa", "eager", ATTN_IMPLEMENTATION):
        reason = f"the model uses {current!r}, chosen explicitly"
    elif not model._supports_sdpa:
        reason = "the model does not support 'sdpa', whose calling convention fastlm's follows"
    elif not model._can_set_attn_implementation():
        reason = "its attention does not go through transformers' AttentionInterface"
    if reason is None:
        register_attention()
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        if current != ATTN_IMPLEMENTATION:
            report.swaps.append(Swap("config._attn_implementation", current, ATTN_IMPLEMENTATION))
    else:
        report.skipped.append(Skip("", "attention", reason))
    report.attn_implementation = model.config._attn_implementation


# ---------------------------------------------------------------------------------------------
# Norms and MLPs.


class _HFRMSNorm(RMSNorm):
    """:class:`fastlm.nn.RMSNorm` returning the dtype the Hugging Face norm it replaced
    returns when input and weight dtypes differ: ``LlamaRMSNorm`` promotes the two (rule
    ``"llama"``), ``T5LayerNorm`` returns a half-precision weight's dtype, else float32 or
    wider (rule ``"t5"``). T5 checkpoints keep ``wo`` in float32, so a bf16 T5 feeds its
    norms float32 inputs and needs bf16 back. The value is rounded once, from float32, where
    transformers rounds the normalized input before the weight multiplies it."""

    def __init__(self, hidden_size: int, eps: float, dtype_rule: str, **factory) -> None:
        super().__init__(hidden_size, eps=eps, **factory)
        self.dtype_rule = dtype_rule

    def forward(self, x: Tensor, residual: Tensor | None = None):
        w = self.weight.dtype
        if self.dtype_rule == "llama":
            out_dtype = torch.promote_types(x.dtype, w)
        elif w in (torch.float16, torch.bfloat16):
            out_dtype = w
        else:
            out_dtype = torch.promote_types(x.dtype, torch.float32)
        return ops.rms_norm(
            x, self.normalized_shape, self.weight, self.eps, residual=residual, out_dtype=out_dtype
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dtype_rule={self.dtype_rule!r}"


def _rms_norm(old: torch.nn.Module, rule: str) -> tuple[torch.nn.Module, str]:
    new = _HFRMSNorm(old.weight.shape[0], old.variance_epsilon, rule, device="meta")
    new.weight = old.weight
    return new, f"fastlm.nn.RMSNorm ({type(old).__name__} dtypes)"


def _gemma_norm(old: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    new = GemmaRMSNorm(old.weight.shape[0], old.eps, device="meta")
    new.weight = old.weight
    return new, "fastlm.nn.GemmaRMSNorm"


def _gated_mlp(old: torch.nn.Module) -> tuple[torch.nn.Module | None, str]:
    linears = (old.gate_proj, old.up_proj, old.down_proj)
    activation = _ACTIVATIONS.get(type(old.act_fn))
    if any(type(lin) is not torch.nn.Linear for lin in linears):
        return None, "its projections are not plain nn.Linear (quantized or adapter layers)"
    if activation is None:
        return None, f"fastlm has no fused {type(old.act_fn).__name__}"
    if len({lin.weight.dtype for lin in linears}) > 1:
        return None, "its projections have different dtypes"
    if len({lin.bias is None for lin in linears}) > 1:
        return None, "some of its projections have a bias and some do not"
    gate = old.gate_proj
    new = GatedMLP(
        gate.in_features, gate.out_features, activation, bias=gate.bias is not None, device="meta"
    )
    new.gate_proj, new.up_proj, new.down_proj = linears
    return new, f"fastlm.nn.GatedMLP({activation!r})"


def _replacement(old: torch.nn.Module, key: tuple[str, str]) -> tuple[torch.nn.Module | None, str]:
    """The module to put in ``old``'s place and what it is, or None and why there is none."""
    if "forward" in vars(old):
        return None, "its forward is replaced on the instance (e.g. by accelerate's hooks)"
    if key in _RMS_NORMS:
        return _rms_norm(old, _RMS_NORMS[key])
    if key in _GEMMA_NORMS:
        return _gemma_norm(old)
    return _gated_mlp(old)


def _swap_modules(model: torch.nn.Module, report: PatchReport) -> None:
    # Every (parent, name) slot holding each module, found before the tree is edited: a shared
    # module is swapped once, into all its slots, and reported under its first path.
    slots: dict[int, tuple[str, torch.nn.Module, list[tuple[torch.nn.Module, str]]]] = {}
    for parent_path, parent in model.named_modules():
        for name, child in parent.named_children():
            path = f"{parent_path}.{name}" if parent_path else name
            slots.setdefault(id(child), (path, child, []))[2].append((parent, name))
    for path, old, parents in slots.values():
        key = (type(old).__module__, type(old).__qualname__)
        if key in _SKIPPED:
            report.skipped.append(Skip(path, type(old).__name__, _SKIPPED[key]))
        if key not in _RMS_NORMS and key not in _GEMMA_NORMS and key not in _GATED_MLPS:
            continue
        new, description = _replacement(old, key)
        if new is None:
            report.skipped.append(Skip(path, type(old).__name__, description))
            continue
        new.train(old.training)
        for parent, name in parents:
            setattr(parent, name, new)
        report.swaps.append(Swap(path, type(old).__name__, description))


# ---------------------------------------------------------------------------------------------
# Loss.


def causal_lm_loss(
    logits: Tensor,
    labels: Tensor,
    vocab_size: int,
    num_items_in_batch: Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: Tensor | None = None,
    **kwargs,
) -> Tensor:
    """transformers' ``ForCausalLMLoss`` (same arguments and result) on
    :func:`fastlm.ops.cross_entropy`: logits (B, S, V) in float32, each position predicting
    the next label (or ``shift_labels`` as given); mean over non-ignored positions, or the sum
    divided by ``num_items_in_batch`` when given (gradient accumulation)."""
    logits = logits.float()
    if shift_labels is None:
        labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    logits = logits.view(-1, vocab_size)
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = ops.cross_entropy(logits, shift_labels, ignore_index, reduction=reduction)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _swap_loss(model: PreTrainedModel, report: PatchReport) -> None:
    if "_loss_function" in vars(model):
        if model._loss_function is not causal_lm_loss:
            report.skipped.append(Skip("loss_function", "loss", "set by the user"))
        return
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        source = ""
    # The same heuristic transformers applies to attention: a forward that never calls
    # self.loss_function computes its loss itself (BERT's masked-LM, T5's).
    if "self.loss_function(" not in source:
        report.skipped.append(
            Skip(
                "",
                "loss",
                f"{type(model).__name__}.forward computes its "
                "loss itself, not through self.loss_function",
            )
        )
        return
    loss_type = getattr(model, "loss_type", None)
    # As the loss_function property resolves it, without its warning.
    resolved = LOSS_MAPPING[loss_type if loss_type in LOSS_MAPPING else "ForCausalLM"]
    if resolved is not ForCausalLMLoss:
        report.skipped.append(
            Skip("loss_function", resolved.__name__, "fastlm swaps the causal-LM loss only")
        )
        return
    model.loss_function = causal_lm_loss
    report.swaps.append(
        Swap("loss_function", "ForCausalLMLoss", f"{__name__}.{causal_lm_loss.__name__}")
    )


def patch_hf(model: PreTrainedModel, report: PatchReport) -> None:
    """The transformers part of :func:`fastlm.patch`: switch the attention to
    ``"fastlm"``, swap the norms and MLPs listed in this module's docstring (same Parameter
    objects and ``state_dict`` keys: the new modules hold the original Parameters and
    ``nn.Linear`` children, and take the training flag of the modules they replace), and
    the causal-LM loss; record everything in ``report``. ``torch.nn`` LayerNorms are left to
    :func:`fastlm.patch`'s re-classing."""
    _switch_attention(model, report)
    _swap_modules(model, report)
    _swap_loss(model, report)
