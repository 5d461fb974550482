"""fastlm.patch on Hugging Face transformers models (GPT-2, BERT, T5, Llama): the patched
model's logits, loss and gradients match the unpatched model's under the numerical policy,
parameters and state_dict keys survive, the report says what was swapped; and the pieces
(attention function, norms, loss) against transformers' own."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

import fastlm
from fastlm.nn.patch import class_name
from fastlm.testing import assert_equal, assert_policy, max_error

VOCAB = 101
BATCH, SEQ, DEC_SEQ = 2, 9, 7
# (dtype, backend): the Triton attention and GEMM kernels take fp16/bf16 only.
PRECISIONS = [(torch.float32, "torch"), (torch.bfloat16, "torch"), (torch.bfloat16, "triton")]
PRECISION_IDS = ["fp32-torch", "bf16-torch", "bf16-triton"]
# The policy's factor for whole-model parameter gradients, per backend. The Triton attention
# backward, as FlashAttention's, rounds P and dS to bf16 before its GEMMs and takes
# D = rowsum(dO * O) from the bf16 output: per call that is about the policy's 2x SDPA's error
# (tests/kernels; 1-2.9x on T5's own activations), and a parameter's gradient sums it over
# every attention call: on T5 (unscaled scores, six attention calls, relative-bias gradients
# summed over positions) the worst element and the error's norm both reach 2.5x PyTorch's
# (40 seeds; GPT-2, BERT and Llama stay under 1.9x). A wiring error (a lost mask, bias or
# gradient) is off by the gradient's whole scale, far above either factor.
GRAD_FACTOR = {"torch": 2.0, "triton": 4.0}


@pytest.fixture
def hf():
    transformers = pytest.importorskip("transformers")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # tiny vocabularies trip config warnings
    yield transformers
    transformers.logging.set_verbosity(verbosity)


# Large initializations (0.3, not 0.02) make attention peaked, so a wrong mask or a dropped
# bias moves the logits by far more than the tolerances.
def _gpt2(hf):
    config = hf.GPT2Config(
        n_embd=48,
        n_layer=2,
        n_head=3,
        n_positions=32,
        vocab_size=VOCAB,
        initializer_range=0.3,
        bos_token_id=0,
        eos_token_id=0,
    )
    return hf.GPT2LMHeadModel(config)


def _bert(hf):
    config = hf.BertConfig(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=70,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        initializer_range=0.3,
    )
    return hf.BertForMaskedLM(config)


def _t5(hf):
    config = hf.T5Config(
        d_model=48,
        d_kv=16,
        num_heads=3,
        d_ff=70,
        num_layers=2,
        vocab_size=VOCAB,
        decoder_start_token_id=0,
    )
    model = hf.T5ForConditionalGeneration(config)
    # Relative position biases of order 1 (not T5's 0.14): without them the logits move by
    # 10-25x the tolerance, so a dropped or misaligned bias fails.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_attention_bias" in name:
                p.normal_()
    return model


def _llama(hf):
    config = hf.LlamaConfig(
        hidden_size=48,
        head_dim=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=70,
        num_hidden_layers=2,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        initializer_range=0.3,
    )
    return hf.LlamaForCausalLM(config)


MODELS = {"gpt2": _gpt2, "bert": _bert, "t5": _t5, "llama": _llama}
# Parameters whose gradients are compared: embeddings, a norm, projections, T5's relative
# position biases (their gradient flows through fastlm's attention bias).
GRAD_PARAMS = {
    "gpt2": [
        "transformer.wte.weight",
        "transformer.h.0.ln_1.weight",
        "transformer.h.1.attn.c_attn.weight",
    ],
    "bert": [
        "bert.embeddings.LayerNorm.weight",
        "bert.encoder.layer.0.attention.self.query.weight",
        "bert.encoder.layer.1.output.dense.weight",
    ],
    "t5": [
        "shared.weight",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "decoder.block.1.layer.1.layer_norm.weight",
    ],
    "llama": [
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
    ],
}


def _inputs(name):
    """Token ids, a padding mask (GPT-2: left padding, so padded queries see no key; BERT and
    T5's encoder: right padding; Llama: none, the causal-only path) and labels."""
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    if name == "gpt2":
        mask[1, :3] = 0
    else:
        mask[1, -3:] = 0
    if name == "t5":
        return dict(
            input_ids=ids, attention_mask=mask, labels=torch.randint(0, VOCAB, (BATCH, DEC_SEQ))
        )
    if name == "bert":
        labels = torch.where(torch.rand(BATCH, SEQ) < 0.5, ids, -100)
        return dict(input_ids=ids, attention_mask=mask, labels=labels)
    if name == "llama":
        return dict(input_ids=ids, labels=ids)
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def _run(model, inputs, params, backend=None):
    """Logits, loss and the gradients of ``params`` of one forward and backward."""
    with fastlm.use_backend(backend):
        out = model(**inputs)
        out.loss.backward()
    named = dict(model.named_parameters())
    return out.logits, out.loss, {p: named[p].grad for p in params}


@pytest.mark.parametrize("dtype, backend", PRECISIONS, ids=PRECISION_IDS)
@pytest.mark.parametrize("name", MODELS)
def test_patched_model_matches_unpatched(hf, name, dtype, backend):
    model = MODELS[name](hf).eval()
    inputs = _inputs(name)
    params = GRAD_PARAMS[name]
    # float64, but for Llama's and T5's norms, which transformers computes in float32: that
    # rounding is far below these tolerances.
    ref = _run(copy.deepcopy(model).double(), inputs, params)
    base = _run(copy.deepcopy(model).to(dtype), inputs, params)
    patched = fastlm.patch(copy.deepcopy(model).to(dtype))
    assert patched.config._attn_implementation == "fastlm"
    ours = _run(patched, inputs, params, backend)

    assert_policy(ours[0], ref[0], base[0], "logits")
    # A row's cross-entropy moves by at most twice its logits' largest change (its
    # log-sum-exp and its target logit each move by at most that), and so does their mean:
    # the loss is checked against the logits' actual error, plus its own rounding. (One
    # scalar's error against PyTorch's is a coin toss; the loss functions themselves are
    # compared under the policy below.)
    loss_bound = 2 * max_error(ours[0], ref[0]) + torch.finfo(ours[1].dtype).eps * ref[1].abs()
    assert (ours[1] - ref[1]).abs() <= loss_bound, (ours[1].item(), ref[1].item())
    for p in params:
        # Each gradient sums over every token (T5's relative-bias one over every (query, key)
        # pair of its buckets, with cancellation: a row's dS sums to zero), so its floor is a
        # few ulps of its scale, as the summed terms' roundings add up (tests/models does
        # the same).
        scale = 8 * ref[2][p].abs().max().item()
        assert_policy(
            ours[2][p], ref[2][p], base[2][p], f"grad {p}", GRAD_FACTOR[backend], scale=scale
        )


# Module path -> what it became, for one module of each kind; and what is left alone.
EXPECTED_SWAPS = {
    "gpt2": {
        "transformer.h.0.ln_1": "fastlm.nn.LayerNorm",
        "transformer.ln_f": "fastlm.nn.LayerNorm",
        "loss_function": "fastlm.nn.patch_hf.causal_lm_loss",
    },
    "bert": {
        "bert.embeddings.LayerNorm": "fastlm.nn.LayerNorm",
        "bert.encoder.layer.1.output.LayerNorm": "fastlm.nn.LayerNorm",
    },
    "t5": {
        "encoder.block.0.layer.0.layer_norm": "fastlm.nn.RMSNorm (T5LayerNorm dtypes)",
        "decoder.final_layer_norm": "fastlm.nn.RMSNorm (T5LayerNorm dtypes)",
    },
    "llama": {
        "model.layers.0.input_layernorm": "fastlm.nn.RMSNorm (LlamaRMSNorm dtypes)",
        "model.norm": "fastlm.nn.RMSNorm (LlamaRMSNorm dtypes)",
        "model.layers.1.mlp": "fastlm.nn.GatedMLP('silu')",
        "loss_function": "fastlm.nn.patch_hf.causal_lm_loss",
    },
}
EXPECTED_SKIPS = {
    "gpt2": {"transformer.h.0.mlp": "Conv1D"},
    "bert": {"bert.encoder.layer.0.intermediate": "split", "": "computes its loss itself"},
    "t5": {
        "encoder.block.0.layer.1.DenseReluDense": "state_dict keys",
        "": "computes its loss itself",
    },
    "llama": {"model.rotary_emb": "apply_rotary_pos_emb"},
}
# The norm class each model uses, as the report names it, and how many it has.
NORMS = {
    "gpt2": ("torch.nn.LayerNorm", 5),
    "bert": ("torch.nn.LayerNorm", 6),
    "t5": ("T5LayerNorm", 12),
    "llama": ("LlamaRMSNorm", 5),
}


@pytest.mark.parametrize("name", MODELS)
def test_report_parameters_and_state_dict(hf, name, capsys):
    model = MODELS[name](hf).eval()
    params = dict(model.named_parameters())
    keys = list(model.state_dict())

    assert fastlm.patch(model, verbose=True) is model

    printed = capsys.readouterr().out
    report = fastlm.nn.patch_report(model)
    assert report.model == type(model).__name__ and report.attn_implementation == "fastlm"
    swaps = {s.path: s.after for s in report.swaps}
    assert swaps["config._attn_implementation"] == "fastlm"
    for path, after in EXPECTED_SWAPS[name].items():
        assert swaps[path] == after, path
        assert f"-> {after}" in printed
    skips = {s.path: s.reason for s in report.skipped}
    for path, reason in EXPECTED_SKIPS[name].items():
        assert reason in skips[path], path
        assert reason in printed
    assert "attention implementation: 'fastlm'" in printed
    # Every norm is swapped, and reported once.
    norm, count = NORMS[name]
    assert [p for p, m in model.named_modules() if class_name(type(m)) == norm] == []
    assert sum(s.before == norm for s in report.swaps) == count
    # Same Parameter objects under the same names, same keys; new modules in eval mode too.
    assert list(model.state_dict()) == keys
    assert dict(model.named_parameters()).keys() == params.keys()
    for path, p in model.named_parameters():
        assert p is params[path], path
    assert [path for path, m in model.named_modules() if m.training] == []


def test_patching_twice_changes_nothing_more(hf):
    model = _llama(hf).eval()
    inputs = _inputs("llama")
    fastlm.patch(model)
    first = model(**inputs).logits
    modules = dict(model.named_modules())

    fastlm.patch(model)

    report = fastlm.nn.patch_report(model)
    assert report.swaps == [] and report.attn_implementation == "fastlm"
    assert all(m is modules[p] for p, m in model.named_modules())
    assert_equal(model(**inputs).logits, first, "logits", "the same modules and weights")


def test_mlps_that_are_not_exact_are_skipped(hf):
    model = hf.LlamaForCausalLM(
        hf.LlamaConfig(
            hidden_size=32,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=40,
            num_hidden_layers=2,
            vocab_size=VOCAB,
            hidden_act="relu2",
        )
    )

    class AdapterLinear(torch.nn.Linear):  # stands for a LoRA or quantized layer
        pass

    down = model.model.layers[1].mlp.down_proj
    adapter = AdapterLinear(down.in_features, down.out_features, bias=False)
    model.model.layers[1].mlp.down_proj = adapter
    mlps = [layer.mlp for layer in model.model.layers]

    fastlm.patch(model)

    assert [layer.mlp for layer in model.model.layers] == mlps
    skips = {s.path: s.reason for s in fastlm.nn.patch_report(model).skipped}
    assert "no fused ReLUSquaredActivation" in skips["model.layers.0.mlp"]
    assert "not plain nn.Linear" in skips["model.layers.1.mlp"]


def test_a_shared_module_is_swapped_in_every_place(hf):
    model = _llama(hf).eval()
    model.model.layers[1].mlp = model.model.layers[0].mlp  # e.g. layers tied by the user

    fastlm.patch(model)

    first, second = (layer.mlp for layer in model.model.layers)
    assert type(first) is fastlm.nn.GatedMLP and second is first
    assert [s.path for s in fastlm.nn.patch_report(model).swaps if s.before == "LlamaMLP"] == [
        "model.layers.0.mlp"
    ]


# ---------------------------------------------------------------------------------------------
# The pieces, against transformers' own.


ATTENTION_CASES = [
    "causal",
    "bool",
    "float",
    "bias+bool",
    "bias+causal",
    "decode",
    "gqa",
    "static_prefill",
]


def _attention_args(case, dtype):
    """(module, query, key, value, mask, kwargs) as transformers' attention modules call the
    interface: (B, H, S, D) tensors."""
    b, h, hkv, sq, sk, d = 2, 4, 4, 7, 7, 16
    if case == "gqa":
        hkv = 2
    if case == "decode":
        sq, sk = 1, 8
    if case == "static_prefill":  # empty static-cache slots past the prompt, no mask
        sk = 11
    query = torch.randn(b, h, sq, d, dtype=dtype)
    key, value = (torch.randn(b, hkv, sk, d, dtype=dtype) for _ in range(2))
    module = torch.nn.Module()
    module.is_causal = case in ("causal", "bias+causal", "gqa", "decode", "static_prefill")
    module.num_key_value_groups = h // hkv
    mask, kwargs = None, {"scaling": 0.3}
    if case in ("bool", "bias+bool"):
        mask = torch.rand(b, 1, sq, sk) < 0.7
        mask[..., 0] = True
    if case == "bool":
        mask[1, :, 2] = False  # a row that sees no key: zeros, as SDPA's, not NaN
    if case == "float":
        mask = torch.randn(b, 1, sq, sk, dtype=dtype)
    if case.startswith("bias"):
        kwargs["position_bias"] = torch.randn(1, h, sq, sk, dtype=dtype, requires_grad=True)
    return module, query, key, value, mask, kwargs


@pytest.mark.parametrize("dtype, backend", PRECISIONS, ids=PRECISION_IDS)
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention_matches_transformers_sdpa(hf, case, dtype, backend):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from fastlm.nn.patch_hf import fastlm_attention_forward

    module, query, key, value, mask, kwargs = _attention_args(case, dtype)
    bias = kwargs.get("position_bias")
    dout = torch.randn(query.shape[0], query.shape[2], query.shape[1], query.shape[3])

    def run(fn, cast, backend=None):
        kw = dict(kwargs)
        leaf = None
        if bias is not None:
            leaf = bias.detach().to(cast).requires_grad_()
            kw["position_bias"] = leaf
        m = mask if mask is None or mask.dtype == torch.bool else mask.to(cast)
        with fastlm.use_backend(backend):
            out, weights = fn(module, query.to(cast), key.to(cast), value.to(cast), m, **kw)
            if leaf is not None:
                (out * dout.to(cast)).sum().backward()
        assert weights is None
        return out, None if leaf is None else leaf.grad

    out, dbias = run(fastlm_attention_forward, dtype, backend)
    ref, dbias_ref = run(sdpa_attention_forward, torch.float64)
    base, dbias_base = run(sdpa_attention_forward, dtype)
    assert out.is_contiguous()
    assert_policy(out, ref, base, "out")
    if bias is not None:
        assert_policy(dbias, dbias_ref, dbias_base, "dbias")


def test_attention_rejects_softcap(hf):
    from fastlm.nn.patch_hf import fastlm_attention_forward

    module, query, key, value, mask, _ = _attention_args("causal", torch.float32)
    with pytest.raises(ValueError, match="softcap"):
        fastlm_attention_forward(module, query, key, value, mask, softcap=30.0)


NORM_DTYPES = [
    (w, x) for w in (torch.float32, torch.bfloat16) for x in (torch.float32, torch.bfloat16)
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("weight_dtype, x_dtype", NORM_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize(
    "name, norm_path", [("llama", "model.norm"), ("t5", "encoder.final_layer_norm")]
)
def test_rms_norms_keep_transformers_dtypes(hf, name, norm_path, weight_dtype, x_dtype, backend):
    """Mixed weight and input dtypes (T5 checkpoints keep ``wo`` in fp32, so a bf16 T5 feeds
    fp32 into bf16 norms): the swapped norm returns transformers' norm's dtype, with values
    in policy."""
    model = MODELS[name](hf)
    original = model.get_submodule(norm_path)
    with torch.no_grad():
        original.weight.normal_()
    original.to(weight_dtype)
    unpatched = copy.deepcopy(original)

    fastlm.patch(model)

    swapped = model.get_submodule(norm_path)
    assert isinstance(swapped, fastlm.nn.RMSNorm) and swapped.weight is original.weight
    assert swapped.eps == original.variance_epsilon
    x = torch.randn(3, 5, original.weight.shape[0], dtype=x_dtype) * 4
    base = unpatched(x)
    # The plain formula in float64: transformers' norms compute in float32 even when float64.
    ref = fastlm.ops.rms_norm_ref(
        x.double(), x.shape[-1:], original.weight.double(), original.variance_epsilon
    )
    with fastlm.use_backend(backend):
        y = swapped(x)
    assert y.dtype == base.dtype
    assert_policy(y, ref, base, "y")


def _gemma(hf, version):
    config_cls = hf.GemmaConfig if version == "gemma" else hf.Gemma2Config
    config = config_cls(
        hidden_size=48,
        head_dim=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=70,
        num_hidden_layers=2,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        initializer_range=0.3,
    )
    model_cls = hf.GemmaForCausalLM if version == "gemma" else hf.Gemma2ForCausalLM
    model = model_cls(config).eval()
    with torch.no_grad():  # Gemma's norms start at zero weights (scale 1): make them count
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_()
    return model


@pytest.mark.parametrize("dtype, backend", [(torch.float32, "torch"), (torch.bfloat16, "triton")])
@pytest.mark.parametrize("version", ["gemma", "gemma2"])
def test_patched_gemma_swaps_its_norms_and_matches(hf, version, dtype, backend):
    model = _gemma(hf, version)
    norm_cls = "GemmaRMSNorm" if version == "gemma" else "Gemma2RMSNorm"
    n_norms = sum(type(m).__name__ == norm_cls for m in model.modules())
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    param = "model.layers.0.input_layernorm.weight"
    ref = _run(copy.deepcopy(model).double(), dict(input_ids=ids, labels=ids), [param])
    base = _run(copy.deepcopy(model).to(dtype), dict(input_ids=ids, labels=ids), [param])
    patched = fastlm.patch(copy.deepcopy(model).to(dtype))
    swapped = [m for m in patched.modules() if type(m) is fastlm.nn.GemmaRMSNorm]
    assert n_norms > 0 and len(swapped) == n_norms
    hf_norms = [m for m in patched.modules() if type(m).__module__.startswith("transformers")]
    assert not any(type(m).__name__ == norm_cls for m in hf_norms)
    assert patched.state_dict().keys() == model.state_dict().keys()
    ours = _run(patched, dict(input_ids=ids, labels=ids), [param], backend)
    assert_policy(ours[0], ref[0], base[0], "logits")
    scale = 8 * ref[2][param].abs().max().item()
    assert_policy(ours[2][param], ref[2][param], base[2][param], "grad", 2.0, scale=scale)


def test_causal_lm_loss_matches_transformers(hf):
    from transformers.loss.loss_utils import ForCausalLMLoss

    from fastlm.nn.patch_hf import causal_lm_loss

    logits = torch.randn(2, 9, VOCAB, dtype=torch.bfloat16)
    labels = torch.randint(0, VOCAB, (2, 9))
    labels[0, :4] = -100
    shifted = torch.randint(0, VOCAB, (2, 9))
    for kwargs in (
        {},
        {"num_items_in_batch": torch.tensor(11)},
        {"shift_labels": shifted},
        {"ignore_index": 5, "num_items_in_batch": 7},
    ):
        target = labels.masked_fill(labels == -100, kwargs.get("ignore_index", -100))
        ours = causal_lm_loss(logits, target, VOCAB, **kwargs)
        theirs = ForCausalLMLoss(logits, target, VOCAB, **kwargs)
        ref = ForCausalLMLoss(logits.double(), target, VOCAB, **kwargs)
        assert ours.dtype == theirs.dtype == torch.float32
        assert_policy(ours, ref, theirs, f"loss {list(kwargs)}")


# ---------------------------------------------------------------------------------------------
# Plain torch models and bad input.


def test_plain_torch_model_report():
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Sequential(torch.nn.RMSNorm(8))
    )
    assert fastlm.nn.patch_report(model) is None
    fastlm.patch(model)
    report = fastlm.nn.patch_report(model)
    assert report.attn_implementation is None and report.skipped == []
    assert [(s.path, s.before, s.after) for s in report.swaps] == [
        ("1", "torch.nn.LayerNorm", "fastlm.nn.LayerNorm"),
        ("2.0", "torch.nn.RMSNorm", "fastlm.nn.RMSNorm"),
    ]
    assert str(report).splitlines() == [
        "fastlm.patch(Sequential):",
        "  1: torch.nn.LayerNorm -> fastlm.nn.LayerNorm",
        "  2.0: torch.nn.RMSNorm -> fastlm.nn.RMSNorm",
    ]


def test_fastlm_imports_and_patches_without_transformers():
    script = (
        "import sys\n"
        "sys.modules['transformers'] = None  # any import of it raises ImportError\n"
        "import torch, fastlm\n"
        "model = fastlm.patch(torch.nn.Sequential(torch.nn.LayerNorm(4)), verbose=True)\n"
        "assert type(model[0]) is fastlm.nn.LayerNorm\n"
        "assert 'fastlm.nn.patch_hf' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "torch.nn.LayerNorm -> fastlm.nn.LayerNorm" in result.stdout


def test_patch_rejects_non_modules():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fastlm.patch({"weight": torch.ones(3)})
