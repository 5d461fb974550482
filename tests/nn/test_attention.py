"""fastlm.nn.MultiheadAttention drops in for torch's: constructor, state_dict, outputs,
weights and gradients for every input layout and mask kind, dropout, and patch."""

from __future__ import annotations

import pytest
import torch

import fastlm
from fastlm.testing import assert_equal, assert_policy

CONFIGS = [
    dict(embed_dim=16, num_heads=4),
    dict(embed_dim=12, num_heads=3, batch_first=True),
    dict(embed_dim=16, num_heads=2, bias=False),
    dict(embed_dim=16, num_heads=4, add_bias_kv=True),
    dict(embed_dim=16, num_heads=4, add_zero_attn=True, batch_first=True),
    dict(embed_dim=16, num_heads=4, kdim=10, vdim=7),
    dict(embed_dim=16, num_heads=4, kdim=10, vdim=10, batch_first=True),
    dict(
        embed_dim=16,
        num_heads=4,
        kdim=10,
        vdim=7,
        bias=False,
        add_bias_kv=True,
        add_zero_attn=True,
        batch_first=True,
    ),
    dict(embed_dim=16, num_heads=4, dropout=0.3),  # compared in eval mode: no dropout
    dict(embed_dim=16, num_heads=2, batch_first=True, dtype=torch.bfloat16),
    dict(embed_dim=24, num_heads=3, kdim=16, add_bias_kv=True, dtype=torch.bfloat16),
]
CONFIG_IDS = [
    "-".join(f"{k}={getattr(v, 'itemsize', v)}" for k, v in kw.items() if k != "embed_dim")
    for kw in CONFIGS
]
SCENARIOS = [
    "self",
    "cross",
    "kv_shared",
    "kpm_bool",
    "kpm_float",
    "attn2d_bool",
    "attn3d_float",
    "both_masks",
    "causal",
    "causal_kpm",
    "unbatched",
]
# Averaging over heads is one mean after everything else: a few scenarios cover it.
CASES = [(s, w) for s in SCENARIOS for w in ("none", "per_head")] + [
    (s, "averaged") for s in ("self", "both_masks", "unbatched")
]


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)
    return module


def _modules(kwargs):
    """torch's module with random parameters, fastlm's and torch's in float64 loaded from it."""
    ref = _randomize(torch.nn.MultiheadAttention(**kwargs)).eval()
    ours = fastlm.nn.MultiheadAttention(**kwargs).eval()
    ours.load_state_dict(ref.state_dict())
    ref64 = torch.nn.MultiheadAttention(**{**kwargs, "dtype": torch.float64}).eval()
    ref64.load_state_dict(ref.state_dict())
    return ours, ref, ref64


def _inputs(mha, scenario, dtype):
    """(query, key, value) leaves (the same tensor where the scenario shares them) and the
    forward's mask arguments."""
    same_dims = mha.kdim == mha.vdim == mha.embed_dim
    self_attention = scenario in ("self", "causal", "causal_kpm", "kpm_bool") and same_dims
    batch, heads, tgt_len = 3, mha.num_heads, 5
    src_len = tgt_len if self_attention or scenario.startswith("causal") else 7
    unbatched = scenario == "unbatched"

    def seq(n, features):
        if unbatched:
            return torch.randn(n, features, dtype=dtype)
        return torch.randn(*((batch, n) if mha.batch_first else (n, batch)), features, dtype=dtype)

    if self_attention:
        query = key = value = seq(tgt_len, mha.embed_dim)
    else:
        query, key = seq(tgt_len, mha.embed_dim), seq(src_len, mha.kdim)
        value = key if scenario == "kv_shared" and mha.kdim == mha.vdim else seq(src_len, mha.vdim)

    # Key 0 always stays visible: fully masked rows are tested on their own.
    def padding_bool():
        kpm = torch.rand(batch, src_len) < 0.4
        kpm[:, 0] = False
        return kpm

    def attn_bool():
        mask = torch.rand(tgt_len, src_len) < 0.4
        mask[:, 0] = False
        return mask

    masks = {}
    if scenario in ("kpm_bool", "both_masks", "causal_kpm"):
        masks["key_padding_mask"] = padding_bool()
    if scenario == "kpm_float":
        masks["key_padding_mask"] = torch.randn(batch, src_len, dtype=dtype).masked_fill(
            padding_bool(), float("-inf")
        )
    if scenario in ("attn2d_bool", "both_masks"):
        masks["attn_mask"] = attn_bool()
    if scenario == "attn3d_float":
        masks["attn_mask"] = torch.randn(batch * heads, tgt_len, src_len, dtype=dtype)
    if scenario == "causal":
        masks["attn_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(
            tgt_len, dtype=dtype
        )
    if scenario == "causal_kpm":  # bool like the padding mask: torch warns on mixed types
        masks["attn_mask"] = torch.ones(tgt_len, tgt_len, dtype=torch.bool).triu(1)
    if scenario.startswith("causal"):
        masks["is_causal"] = True
    if unbatched:
        masks["key_padding_mask"] = torch.randn(batch, src_len, dtype=dtype)[0]
        masks["attn_mask"] = torch.randn(heads, tgt_len, src_len, dtype=dtype)
    return (query, key, value), masks


def _leaves(tensors, dtype):
    """Fresh leaf copies at ``dtype`` that keep which of the tensors are the same one."""
    memo = {}
    for t in tensors:
        if id(t) not in memo:
            memo[id(t)] = t.detach().to(dtype).requires_grad_()
    return [memo[id(t)] for t in tensors]


def _forward_backward(mha, qkv, masks, grads, **kwargs):
    out, weights = mha(*qkv, **masks, **kwargs)
    if grads is None:  # the first run draws the upstream gradients
        grads = torch.randn_like(out), None if weights is None else torch.randn_like(weights)
    d_out, d_weights = (None if g is None else g.to(out.dtype) for g in grads)
    loss = (out * d_out).sum()
    if weights is not None:
        loss = loss + (weights * d_weights).sum()
    loss.backward()
    return out, weights, grads


@pytest.mark.parametrize("kwargs", CONFIGS, ids=CONFIG_IDS)
def test_same_parameters_state_dict_and_repr(kwargs):
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(**kwargs)
    torch.manual_seed(0)
    ours = fastlm.nn.MultiheadAttention(**kwargs)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(our_sd) == list(ref_sd)
    for key in ref_sd:
        assert our_sd[key].shape == ref_sd[key].shape and our_sd[key].dtype == ref_sd[key].dtype
        assert_equal(our_sd[key], ref_sd[key], key, "the same initialization")
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert repr(ours) == repr(ref)
    assert isinstance(ours, torch.nn.MultiheadAttention)


@pytest.mark.parametrize("scenario, weights_mode", CASES, ids=[f"{s}-{w}" for s, w in CASES])
@pytest.mark.parametrize("kwargs", CONFIGS, ids=CONFIG_IDS)
def test_matches_torch_outputs_weights_and_grads(kwargs, scenario, weights_mode):
    dtype = kwargs.get("dtype", torch.float32)
    ours, ref, ref64 = _modules(kwargs)
    qkv, masks = _inputs(ref, scenario, dtype)
    masks64 = {
        k: m.double() if isinstance(m, torch.Tensor) and m.is_floating_point() else m
        for k, m in masks.items()
    }
    call = dict(
        need_weights=weights_mode != "none", average_attn_weights=weights_mode == "averaged"
    )

    ref_in = _leaves(qkv, dtype)
    ref_out, ref_w, grads = _forward_backward(ref, ref_in, masks, None, **call)
    our_in = _leaves(qkv, dtype)
    out, w, _ = _forward_backward(ours, our_in, masks, grads, **call)
    in64 = _leaves(qkv, torch.float64)
    out64, w64, _ = _forward_backward(ref64, in64, masks64, grads, **call)

    assert_policy(out, out64, ref_out, "attn_output")
    if weights_mode == "none":
        assert w is None
    else:
        assert_policy(w, w64, ref_w, "attn_weights")
    # Gradients are sums, rounded at the inputs' dtype: a random-order sum of T terms carries
    # ~sqrt(T) ulps of rounding whichever order adds them, so the floor scales by that. An
    # input's gradient sums over the other sequence's positions (T = the longer of the two),
    # a parameter's over every token.
    seqlen_dim = 1 if kwargs.get("batch_first") and in64[0].dim() == 3 else 0
    positions = max(x.shape[seqlen_dim] for x in in64)
    seen = set()
    for name, x, x_ref, x64 in zip(("query", "key", "value"), our_in, ref_in, in64, strict=True):
        if id(x) not in seen:
            seen.add(id(x))
            scale = positions**0.5 * x64.grad.abs().max().item()
            assert_policy(x.grad, x64.grad, x_ref.grad, f"d{name}", scale=scale)
    tokens = max(x.numel() // x.shape[-1] for x in in64)
    for (name, p), p_ref, p64 in zip(
        ours.named_parameters(), ref.parameters(), ref64.parameters(), strict=True
    ):
        scale = tokens**0.5 * p64.grad.abs().max().item()
        assert_policy(p.grad, p64.grad, p_ref.grad, f"d{name}", scale=scale)


def test_need_weights_false_runs_the_fused_op_and_need_weights_true_does_not(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return torch.nn.functional.scaled_dot_product_attention(*args, **kwargs)

    monkeypatch.setattr(fastlm.ops, "scaled_dot_product_attention", spy)
    mha = fastlm.nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(5)
    mha(x, x, x, need_weights=True)
    assert calls == []
    mha(x, x, x, need_weights=False, attn_mask=causal, is_causal=True)
    # The causal hint replaces the mask, as torch does, so the kernel can skip the masking.
    assert calls[-1]["attn_mask"] is None and calls[-1]["is_causal"] is True
    mha(x, x, x, need_weights=False, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    assert calls[-1]["attn_mask"].shape == (2, 1, 1, 5) and calls[-1]["is_causal"] is False


@pytest.mark.parametrize("batch_first", [False, True])
def test_training_dropout_on_weights_matches_torch_bit_for_bit(batch_first):
    # need_weights=True draws the dropout mask with F.dropout on weights of torch's shape
    # and order, so the same seed gives torch's exact numbers, returned weights included.
    ours, ref, _ = _modules(dict(embed_dim=16, num_heads=4, dropout=0.4, batch_first=batch_first))
    ours.train(), ref.train()
    q, kv = torch.randn(3, 6, 16), torch.randn(3, 9, 16)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    seed = torch.seed()
    out, w = ours(q, kv, kv, average_attn_weights=False)
    torch.manual_seed(seed)
    ref_out, ref_w = ref(q, kv, kv, average_attn_weights=False)
    torch.testing.assert_close(w, ref_w)
    torch.testing.assert_close(out, ref_out)
    assert (w == 0).any()  # dropout did drop


def test_training_dropout_without_weights_is_unbiased():
    ours, _, _ = _modules(dict(embed_dim=16, num_heads=4, dropout=0.5))
    x = torch.randn(4, 2, 16)
    expected, _ = ours(x, x, x, need_weights=False)
    ours.train()
    with torch.no_grad():
        samples = torch.stack([ours(x, x, x, need_weights=False)[0] for _ in range(400)])
    assert torch.isfinite(samples).all()
    one_error = (samples[0] - expected).abs().max()
    mean_error = (samples.mean(0) - expected).abs().max()
    assert one_error > 0  # dropout is on in training mode
    assert mean_error < 0.25 * one_error  # ~ 1/sqrt(400) expected: the mean converges


@pytest.mark.parametrize("need_weights", [False, True])
def test_fully_masked_query_gives_zero_attention_not_nan(need_weights):
    ours, ref, _ = _modules(dict(embed_dim=16, num_heads=4))
    q, kv = torch.randn(5, 2, 16, requires_grad=True), torch.randn(7, 2, 16)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[0] = True  # every key of sequence 0 is padding
    out, w = ours(q, kv, kv, key_padding_mask=kpm, need_weights=need_weights)
    torch.testing.assert_close(out[:, 0], ref.out_proj.bias.expand(5, -1))
    # torch's own fused path gives the same (its need_weights=True path gives NaN)
    ref_out, _ = ref(q, kv, kv, key_padding_mask=kpm, need_weights=False)
    torch.testing.assert_close(out, ref_out)
    if need_weights:
        assert (w[0] == 0).all() and torch.isfinite(w).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_empty_batch_gives_torchs_empty_result(batch_first, need_weights):
    ours, ref, _ = _modules(dict(embed_dim=16, num_heads=4, batch_first=batch_first))
    x = torch.randn(0, 5, 16) if batch_first else torch.randn(5, 0, 16)
    out, weights = ours(x, x, x, need_weights=need_weights)
    ref_out, ref_weights = ref(x, x, x, need_weights=need_weights)
    assert out.shape == ref_out.shape == x.shape
    if need_weights:
        assert weights.shape == ref_weights.shape == (0, 5, 5)
    else:
        assert weights is None and ref_weights is None


def test_bad_inputs_raise_naming_the_argument():
    mha = fastlm.nn.MultiheadAttention(16, 4, kdim=8, vdim=8)
    q, k = torch.randn(5, 2, 16), torch.randn(7, 2, 8)
    with pytest.raises(ValueError, match="key_padding_mask"):
        mha(q, k, k, key_padding_mask=torch.zeros(1, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        mha(q, k, k, attn_mask=torch.zeros(5, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask"):
        mha(q, k, k, attn_mask=torch.zeros(5, 7, dtype=torch.int64))
    with pytest.raises(ValueError, match="is_causal"):
        mha(q, k, k, is_causal=True)
    with pytest.raises(ValueError, match="key must have 8 features"):
        mha(q, q, q)
    with pytest.raises(ValueError, match="batch size"):
        mha(q, k[:, :1], k[:, :1])
    with pytest.raises(ValueError, match="query"):
        mha(q[None], k[None], k[None])


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_nested_tensor_input_takes_torchs_native_path():
    mha = fastlm.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    seqs = [torch.randn(3, 8), torch.randn(5, 8)]
    x = torch.nested.as_nested_tensor(seqs)
    with torch.no_grad():
        out, _ = mha(x, x, x, need_weights=False)
        for y, s in zip(out.unbind(), seqs, strict=True):
            torch.testing.assert_close(y, mha(s, s, s, need_weights=False)[0])


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(16, 4, batch_first=True)
        self.norm = torch.nn.LayerNorm(16)
        self.layer = torch.nn.TransformerEncoderLayer(
            16, 4, dim_feedforward=32, dropout=0.0, batch_first=True
        )

    def forward(self, x):
        h = self.norm(x + self.attn(x, x, x, need_weights=False)[0])
        return self.layer(h)


def test_patch_swaps_multihead_attention_in_place(monkeypatch):
    model = _randomize(_Model())
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    x = torch.randn(2, 5, 16)
    before = model(x)

    assert fastlm.patch(model) is model

    assert type(model.attn) is fastlm.nn.MultiheadAttention
    assert type(model.layer.self_attn) is fastlm.nn.MultiheadAttention
    assert type(model.layer.norm1) is fastlm.nn.LayerNorm
    assert list(model.state_dict()) == keys
    for name, p in model.named_parameters():
        assert p is params[name]  # same Parameter objects: optimizers keep working

    calls = []
    real_sdpa = fastlm.ops.scaled_dot_product_attention
    monkeypatch.setattr(
        fastlm.ops,
        "scaled_dot_product_attention",
        lambda *a, **k: calls.append(1) or real_sdpa(*a, **k),
    )
    torch.testing.assert_close(model(x), before)
    assert len(calls) == 2  # with autograd on, the encoder layer calls its self_attn
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), before)
    # In eval mode without autograd on CPU tensors, TransformerEncoderLayer runs torch's
    # fused layer (torch._transformer_encoder_layer_fwd) from self_attn's weights and never
    # calls self_attn.forward, and fastlm's MultiheadAttention answers with the fused op
    # torch's own forward calls there (torch._native_multi_head_attention): same numbers,
    # torch's kernels.
    assert len(calls) == 0


@pytest.mark.parametrize("grad", [False, True])
def test_cpu_inference_is_torchs_own_fused_op_bit_for_bit(monkeypatch, grad):
    """Eval-mode self-attention without masks or weights on CPU tensors: the native op torch's
    own forward calls, so the same bits; with grad needed, fastlm's path (same policy)."""
    ours, ref, _ = _modules(dict(embed_dim=16, num_heads=4, batch_first=True))
    ours.eval(), ref.eval()
    x = torch.randn(3, 5, 16)
    native = []
    real = torch._native_multi_head_attention
    monkeypatch.setattr(
        torch, "_native_multi_head_attention", lambda *a: native.append(1) or real(*a)
    )
    with torch.set_grad_enabled(grad):
        got, weights = ours(x, x, x, need_weights=False)
        want, _ = ref(x, x, x, need_weights=False)
    assert weights is None and native == ([] if grad else [1, 1])  # ours, then torch's
    if grad:
        torch.testing.assert_close(got, want)
    else:
        assert torch.equal(got, want)
    with torch.no_grad(), fastlm.use_backend("torch"):  # a forced backend: fastlm's path
        ours(x, x, x, need_weights=False)
    assert len(native) == (0 if grad else 2)
