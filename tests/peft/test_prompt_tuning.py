"""Prompt tuning: a soft prompt before the input embeddings of a frozen fastlm GPT, BERT or
Hugging Face causal LM; virtual positions masked in, ignored by the loss, cut from the
output."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastlm.models import create
from fastlm.peft.prompt import PromptTuning
from fastlm.testing import assert_loss_policy

VOCAB, P = 100, 5


def gpt(name="gpt2-tiny", **overrides):
    return create(name, vocab_size=VOCAB, dropout=0.0, **overrides).eval()


def bert():
    return create("bert-tiny", vocab_size=VOCAB, dropout=0.0, attention_dropout=0.0).eval()


def test_shapes_and_only_the_prompt_trains():
    wrapped = PromptTuning(gpt(), P)
    ids = torch.randint(0, VOCAB, (2, 7))
    out = wrapped(ids, return_logits=True)
    assert out.logits.shape == (2, 7, VOCAB) and out.hidden_states.shape == (2, 7, 128)
    assert wrapped.prompt.shape == (P, 128)
    assert [n for n, p in wrapped.named_parameters() if p.requires_grad] == ["prompt"]
    # The embedding is not registered twice.
    assert sum("tok_emb" in k for k in wrapped.state_dict()) == 1


@pytest.mark.parametrize(
    "make", [gpt, lambda: gpt("llama-tiny"), bert], ids=["gpt2", "llama", "bert"]
)
def test_the_prompt_is_what_the_model_sees(make):
    # Real tokens' outputs depend on the prompt (causal and bidirectional attention alike),
    # and the gradient reaches it.
    wrapped = PromptTuning(make(), P)
    ids = torch.randint(1, VOCAB, (2, 6))
    out = wrapped(ids, return_logits=True).logits
    assert out.shape == (2, 6, VOCAB)
    with torch.no_grad():
        wrapped.prompt.add_(torch.randn_like(wrapped.prompt))
    assert not torch.allclose(wrapped(ids, return_logits=True).logits, out, atol=1e-4)
    out.sum().backward()
    assert wrapped.prompt.grad is not None and wrapped.prompt.grad.abs().sum() > 0


def test_gpt_matches_prepending_the_embeddings_by_hand():
    model = gpt()
    wrapped = PromptTuning(model, P)
    ids = torch.randint(0, VOCAB, (2, 6))
    positions = torch.arange(P + 6).expand(2, -1)
    h = torch.cat([wrapped.prompt.expand(2, -1, -1), model.tok_emb(ids)], dim=1)
    h = h + model.pos_emb(positions)
    for block in model.blocks:
        h = block(h, None, positions)
    expected = model.norm_f(h)[:, P:] @ model.lm_head.weight.T
    torch.testing.assert_close(wrapped(ids, return_logits=True).logits, expected)


def test_gpt_loss_ignores_the_virtual_tokens():
    wrapped = PromptTuning(gpt(), P)
    ids = torch.randint(0, VOCAB, (3, 8))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding: attention still sees every virtual token
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100  # the first token is predicted from the prompt: left out below
    inputs = dict(attention_mask=mask, labels=labels, return_logits=True)
    out, out64 = (m(ids, **inputs) for m in (wrapped, copy.deepcopy(wrapped).double()))
    logits, logits64 = (o.logits[:, :-1].reshape(-1, VOCAB) for o in (out, out64))
    manual = F.cross_entropy(logits64, labels[:, 1:].reshape(-1))  # in float64
    assert_loss_policy(out.loss, manual, logits, logits64)
    # With its label, the first real token counts too: predicted from the last virtual one.
    assert not torch.allclose(wrapped(ids, attention_mask=mask, labels=ids).loss, out.loss)


def test_bert_mlm_loss_ignores_the_virtual_tokens():
    wrapped = PromptTuning(bert(), P)
    ids = torch.randint(1, VOCAB, (2, 9))
    labels = torch.full_like(ids, -100)
    labels[:, [2, 5]] = ids[:, [2, 5]]
    inputs = dict(labels=labels, token_type_ids=torch.zeros_like(ids), return_logits=True)
    out, out64 = (m(ids, **inputs) for m in (wrapped, copy.deepcopy(wrapped).double()))
    logits, logits64 = (o.logits.reshape(-1, VOCAB) for o in (out, out64))
    manual = F.cross_entropy(logits64, labels.reshape(-1))  # in float64
    assert_loss_policy(out.loss, manual, logits, logits64)


def test_position_ids_follow_the_prompt():
    wrapped = PromptTuning(gpt(), P)
    ids = torch.randint(0, VOCAB, (2, 6))
    default = wrapped(ids, return_logits=True).logits
    positions = torch.arange(6).expand(2, 6)
    torch.testing.assert_close(
        wrapped(ids, position_ids=positions, return_logits=True).logits, default
    )


def test_a_few_steps_reduce_the_loss():
    wrapped = PromptTuning(gpt(), P, init="vocab")
    ids = torch.randint(0, VOCAB, (4, 12))
    opt = torch.optim.Adam([wrapped.prompt], lr=0.05)
    losses = []
    for _ in range(5):
        loss = wrapped(ids, labels=ids).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] - 0.05, losses


def test_init():
    model = gpt()
    weight = model.tok_emb.weight
    vocab = PromptTuning(model, P, init="vocab").prompt.detach()
    assert (vocab[:, None, :] == weight[None]).all(-1).any(-1).all()
    # "random" draws at the embedding's scale, not the vocabulary's rows.
    t5_like = gpt(initializer_range=1.0)
    random = PromptTuning(t5_like, 64, init="random").prompt.detach()
    assert 0.7 < random.std().item() < 1.3


def test_hugging_face_causal_lm():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    wrapped = PromptTuning(transformers.LlamaForCausalLM(cfg).eval(), P)
    ids = torch.randint(0, VOCAB, (2, 6))
    out = wrapped(ids, attention_mask=torch.ones_like(ids), labels=ids)
    assert out.logits.shape == (2, 6, VOCAB)
    out.loss.backward()
    assert wrapped.prompt.grad.abs().sum() > 0
    assert [n for n, p in wrapped.named_parameters() if p.requires_grad] == ["prompt"]


def test_errors():
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PromptTuning(gpt(), 0)
    with pytest.raises(ValueError, match="init"):
        PromptTuning(gpt(), P, init="text")
    with pytest.raises(ValueError, match="T5 is not supported"):
        PromptTuning(create("t5-tiny", vocab_size=VOCAB), P)
    with pytest.raises(ValueError, match="Linear is not supported"):
        PromptTuning(nn.Linear(4, 4), P)
    model = gpt()
    with pytest.raises(TypeError, match="embedding must be an nn.Embedding"):
        PromptTuning(model, P, embedding=model.lm_head)
    with pytest.raises(ValueError, match="not a submodule"):
        PromptTuning(model, P, embedding=nn.Embedding(VOCAB, 128))
    with pytest.raises(ValueError, match="leaves no room"):
        PromptTuning(model, 256)
    wrapped = PromptTuning(model, P)
    with pytest.raises(ValueError, match="5 virtual \\+ 252 input tokens exceed"):
        wrapped(torch.zeros(1, 252, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must be \\(2, 6\\)"):
        wrapped(torch.zeros(2, 6, dtype=torch.long), attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="input_ids must be"):
        wrapped(torch.zeros(6, dtype=torch.long))
