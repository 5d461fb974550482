"""fastlm models against Hugging Face transformers with the same weights: logits, loss and
gradients in fp32; bf16 under the numerical policy; the adapters round trip; checkpoint
directories load without transformers' help."""

from __future__ import annotations

import copy

import pytest
import torch

import fastlm
from fastlm.models.hf import from_hf, hf_state_dict, to_hf
from fastlm.testing import assert_loss_policy, assert_policy, assert_policy_norm

T = pytest.importorskip("transformers")

VOCAB = 101


def gpt2(hidden=48, heads=4, layers=2):
    return T.GPT2LMHeadModel(
        T.GPT2Config(n_embd=hidden, n_head=heads, n_layer=layers, vocab_size=VOCAB, n_positions=64)
    )


def llama(hidden=48, heads=4, kv_heads=2, layers=2, bias=False):
    return T.LlamaForCausalLM(
        T.LlamaConfig(
            hidden_size=hidden,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            num_hidden_layers=layers,
            intermediate_size=88,
            vocab_size=VOCAB,
            attention_bias=bias,
            mlp_bias=bias,
            rope_theta=500000.0,
            tie_word_embeddings=False,
        )
    )


def gemma2(hidden=48, heads=4, kv_heads=2, head_dim=16, layers=3):
    """Gemma 2's layout with a window shorter than the test's sequences and caps low enough
    that tanh bends the small scores and logits of a random model."""
    return T.Gemma2ForCausalLM(
        T.Gemma2Config(
            hidden_size=hidden,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            query_pre_attn_scalar=24,
            num_hidden_layers=layers,
            intermediate_size=88,
            vocab_size=VOCAB,
            sliding_window=4,
            attn_logit_softcapping=0.5,
            final_logit_softcapping=0.3,
            attn_implementation="eager",
        )
    )


def bert(hidden=48, heads=4, layers=2, classify=False):
    config = T.BertConfig(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        intermediate_size=72,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        num_labels=3,
    )
    return T.BertForSequenceClassification(config) if classify else T.BertForMaskedLM(config)


def t5(hidden=48, heads=4, d_kv=12, layers=2, decoder_layers=None, gated=False):
    return T.T5ForConditionalGeneration(
        T.T5Config(
            d_model=hidden,
            num_heads=heads,
            d_kv=d_kv,
            num_layers=layers,
            num_decoder_layers=decoder_layers,
            d_ff=72,
            vocab_size=VOCAB,
            feed_forward_proj="gated-gelu" if gated else "relu",
            tie_word_embeddings=not gated,
            decoder_start_token_id=0,
        )
    )


MODELS = {
    "gpt2": gpt2,
    "gpt2-odd": lambda: gpt2(hidden=60, heads=5, layers=3),
    "llama-gqa": llama,
    "llama-bias-mqa": lambda: llama(hidden=40, heads=5, kv_heads=1, bias=True),
    "gemma2": gemma2,
    "bert-mlm": bert,
    "bert-cls-odd": lambda: bert(hidden=36, heads=3, layers=3, classify=True),
    "t5-v1.0": t5,
    "t5-v1.1-odd": lambda: t5(hidden=40, heads=5, d_kv=8, layers=2, decoder_layers=3, gated=True),
}


def _batch(name: str, batch: int = 2, seqlen: int = 11):
    ids = torch.randint(2, VOCAB, (batch, seqlen))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # right padding on one row
    if name.startswith("t5"):
        labels = torch.randint(2, VOCAB, (batch, 7))
        labels[1, -2:] = -100
        return dict(input_ids=ids, attention_mask=mask, labels=labels)
    if name.startswith("bert-cls"):
        return dict(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2]))
    labels = ids.masked_fill(mask == 0, -100)
    if name.startswith("bert"):
        labels = labels.masked_fill(torch.rand(ids.shape) < 0.5, -100)
        labels[:, 0] = ids[:, 0]  # at least one label per row
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _fastlm_call(model, name, batch):
    kwargs = dict(batch)
    if not name.startswith("bert-cls"):
        kwargs["return_logits"] = True
    return model(**kwargs)


def _valid(name, batch, logits):
    """Logits at real (non-padded) positions: padded queries differ by design (fastlm gives
    a query with no visible key zeros; transformers spreads it over masked keys)."""
    if name.startswith(("t5", "bert-cls")):
        return logits
    return logits[batch["attention_mask"].bool()]


@pytest.mark.parametrize("name", MODELS)
def test_fp32_logits_loss_and_gradients_match_transformers(name):
    """fastlm in fp32 against transformers in float64 (the reference), with transformers in
    fp32 as PyTorch's baseline."""
    hf = MODELS[name]().eval()
    reference = copy.deepcopy(hf).double()
    ours = from_hf(hf)
    batch = _batch(name)
    theirs_out, ref_out = hf(**batch), reference(**batch)
    our_out = _fastlm_call(ours, name, batch)
    logits = [_valid(name, batch, o.logits) for o in (our_out, ref_out, theirs_out)]
    assert_policy(*logits, "logits")
    assert_loss_policy(our_out.loss, ref_out.loss, logits[2], logits[1])
    for out in (theirs_out, ref_out, our_out):
        out.loss.backward()
    our_grads = {k: p.grad for k, p in ours.named_parameters() if p.grad is not None}
    grads = hf_state_dict(ours, our_grads)
    hf_grads = {k: p.grad for k, p in hf.named_parameters() if p.grad is not None}
    assert grads.keys() <= hf_grads.keys() and len(grads) > 10
    ref_grads = {k: p.grad for k, p in reference.named_parameters() if k in grads}
    # In 2-norm over every gradient: some are zero in exact arithmetic (a key bias shifts
    # every score of a row alike) and hold rounding noise in both models.
    assert_policy_norm(grads, ref_grads, hf_grads, "gradients")


@pytest.mark.parametrize("be", ["torch", "triton"])
@pytest.mark.parametrize("name", MODELS)
def test_bf16_logits_loss_and_gradients_within_the_numerical_policy(name, be):
    """fastlm in bf16 against transformers in float64 (the reference), with transformers in
    bf16 as PyTorch's baseline: logits, loss, and the gradients of the embeddings and of the
    first and last layers' weights."""
    hf = MODELS[name]().eval()
    reference = copy.deepcopy(hf).double()
    baseline = copy.deepcopy(hf).to(torch.bfloat16)
    ours = from_hf(baseline)
    batch = _batch(name)
    with fastlm.use_backend(be):
        got = _fastlm_call(ours, name, batch)
        got.loss.backward()
    ref, base = reference(**batch), baseline(**batch)
    ref.loss.backward()
    base.loss.backward()
    assert_policy(
        _valid(name, batch, got.logits),
        _valid(name, batch, ref.logits),
        _valid(name, batch, base.logits),
        "logits",
    )
    # One scalar's baseline error is noise: the loss is held to the policy on the logits.
    assert_loss_policy(
        got.loss, ref.loss, _valid(name, batch, base.logits), _valid(name, batch, ref.logits)
    )
    grads = hf_state_dict(
        ours, {k: p.grad for k, p in ours.named_parameters() if p.grad is not None}
    )
    ref_params, base_params = dict(reference.named_parameters()), dict(baseline.named_parameters())
    # Embeddings and the first and last layers' attention projections: sums over every
    # token. (MLP weights behind ReLU are left to the fp32 test: a pre-activation within
    # rounding of zero takes a different branch in any two bf16 runs.)
    last = _layers(ours) - 1
    edge_attention = [
        k
        for k in grads
        if any(f".{i}." in k for i in (0, last)) and any(a in k for a in _ATTENTION)
    ]
    embeddings = [k for k in grads if any(e in k for e in ("emb", "wte", "shared"))]
    checked = [k for k in edge_attention + embeddings if k.endswith("weight")]
    assert len(checked) >= 3
    # The Triton attention backward (as FlashAttention's) rounds P and dS to bf16 and takes
    # rowsum(dO * O) from the bf16 output: on T5's unscaled, peaked scores its weight
    # gradients reach 6.1x PyTorch's bf16 error in 2-norm at the worst of 40 seeds (median
    # 0.8x; the value projections), elsewhere under 2x. An open accuracy gap (README).
    factor = 8.0 if name.startswith("t5") and be == "triton" else 2.0
    for key in checked:
        # In 2-norm, each weight's gradient: its largest element error is a noisy statistic
        # in bf16 (one element of 2,304 over by 1.2x failed CI at one seed).
        assert_policy_norm(
            grads[key], ref_params[key].grad, base_params[key].grad, key, factor=factor
        )


_ATTENTION = ("attn", "attention", "Attention", "self_attn")


def _layers(model) -> int:
    blocks = (
        getattr(model, "blocks", None)
        or getattr(getattr(model, "bert", None), "blocks", None)
        or model.decoder.blocks
    )
    return len(blocks)


@pytest.mark.parametrize("name", MODELS)
def test_to_hf_round_trips_every_tensor(name):
    hf = MODELS[name]()
    back = to_hf(from_hf(hf))
    assert type(back) is type(hf)
    theirs, again = hf.state_dict(), back.state_dict()
    assert theirs.keys() == again.keys()
    for key in theirs:
        assert torch.equal(theirs[key], again[key]), key


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "bert-mlm", "t5-v1.0"])
def test_from_a_safetensors_directory(name, tmp_path):
    hf = MODELS[name]().eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    assert not list(tmp_path.glob("*.bin"))
    ours = from_hf(tmp_path)
    batch = _batch(name)
    batch.pop("labels")
    if name.startswith("t5"):
        batch["decoder_input_ids"] = torch.randint(2, VOCAB, (2, 6))
    logits = (m(**batch).logits for m in (ours, copy.deepcopy(hf).double(), hf))
    assert_policy(*(_valid(name, batch, t) for t in logits), "logits")


@pytest.mark.parametrize("pooler", [True, False])
def test_a_bare_bert_encoder(pooler, tmp_path):
    """transformers' ``BertModel`` (saved without the ``bert.`` prefix, with or without its
    pooler) <-> fastlm's: the same hidden states and pooled output, from memory and from a
    directory, and back."""
    hf = T.BertModel(bert().config, add_pooling_layer=pooler).eval()
    hf.save_pretrained(tmp_path)
    batch = _batch("bert-encoder")
    batch.pop("labels")
    mask = batch["attention_mask"].bool()
    theirs, ref = hf(**batch), copy.deepcopy(hf).double()(**batch)  # ref: float64
    for ours in (from_hf(hf), from_hf(tmp_path)):
        assert type(ours) is fastlm.models.bert.BertModel
        hidden, pooled = ours(**batch)
        states = (t.last_hidden_state[mask] for t in (ref, theirs))
        assert_policy(hidden[mask], *states, "hidden states")
        if pooler:
            assert_policy(pooled, ref.pooler_output, theirs.pooler_output, "pooled")
        else:  # initialized as BERT's: normal(0, initializer_range) weight, zero bias
            assert ours.pooler.bias.abs().max() == 0
            assert 0.5 < ours.pooler.weight.std().item() / ours.config.initializer_range < 1.5
    if pooler:
        back = to_hf(from_hf(hf))
        assert type(back) is T.BertModel
        assert back.state_dict().keys() == hf.state_dict().keys()
        for key, t in hf.state_dict().items():
            assert torch.equal(t, back.state_dict()[key]), key


def test_unsupported_checkpoints_say_why(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(FileNotFoundError, match="safetensors"):
        from_hf(tmp_path)
    with pytest.raises(TypeError, match="model_or_dir"):
        from_hf(42)
    scaled = T.LlamaForCausalLM(
        T.LlamaConfig(
            hidden_size=32,
            num_attention_heads=2,
            num_hidden_layers=1,
            intermediate_size=48,
            vocab_size=50,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        )
    )
    with pytest.raises(ValueError, match="rope"):
        from_hf(scaled)
