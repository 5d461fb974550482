"""Fresh models start where their Hugging Face references start.

For each family, transformers builds its model (its own ``_init_weights``) and fastlm builds
the same configuration (mapped by ``from_hf``); under fastlm's key map (``hf_state_dict``:
fused q/k/v split, GPT-2's Conv1D transposed) every tensor must have the same mean and
standard deviation within sampling error, the same all-zero rows (padding embeddings), and
the same tied head. A sample mean has standard error std / sqrt(n), the std of a normal
sample std / sqrt(2 n); the two models are independent samples, so their variances add.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
from torch import Tensor, nn

from fastlm.models import GPT, T5
from fastlm.models.hf import from_hf, hf_state_dict

transformers = pytest.importorskip("transformers")

# Six standard errors per statistic (two-sided: 2e-9): over the ~400 random statistics of all
# cases, a false alarm is about one run in a million. A wrong scale (GPT-2's residual
# projections are 2.8x smaller, T5's query 4.9x) is tens of standard errors away.
SIGMAS = 6.0

SIZE = dict(
    vocab_size=512,
    hidden_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=192,
)

CASES = {
    # GPT-2: the residual projections (attn.c_proj, mlp.c_proj) at 0.02 / sqrt(2 x layers).
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=512,
            n_embd=96,
            n_layer=4,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        )
    ),
    "gpt2-untied-range-0.05": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=512,
            n_embd=96,
            n_layer=3,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
            tie_word_embeddings=False,
            initializer_range=0.05,
        )
    ),
    "llama": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**SIZE, num_key_value_heads=2, max_position_embeddings=64)
    ),
    "llama-biases-tied": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            **SIZE,
            num_key_value_heads=2,
            max_position_embeddings=64,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
        )
    ),
    "bert-mlm": lambda: transformers.BertForMaskedLM(
        transformers.BertConfig(**SIZE, max_position_embeddings=64, pad_token_id=3)
    ),
    "bert-classifier": lambda: transformers.BertForSequenceClassification(
        transformers.BertConfig(**SIZE, max_position_embeddings=64, num_labels=3)
    ),
    "bert-encoder": lambda: transformers.BertModel(
        transformers.BertConfig(**SIZE, max_position_embeddings=64)
    ),
    "t5": lambda: transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            vocab_size=512,
            d_model=96,
            d_kv=24,
            num_heads=4,
            d_ff=192,
            num_layers=2,
            num_decoder_layers=3,
        )
    ),
    # v1.1: gated-GELU, an untied head, and a non-default factor (norm scales start at it).
    "t5-v1_1-factor-0.5": lambda: transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            vocab_size=512,
            d_model=96,
            d_kv=24,
            num_heads=4,
            d_ff=192,
            num_layers=2,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            initializer_factor=0.5,
        )
    ),
}


def fresh_fastlm_twin(hf: nn.Module, case: str) -> nn.Module:
    """A freshly initialized fastlm model of ``hf``'s configuration."""
    config = from_hf(hf).config
    if case.startswith("gpt2-untied"):  # hf.py does not map initializer_range
        config = dataclasses.replace(config, initializer_range=hf.config.initializer_range)
    if case.startswith("t5-v1_1"):  # transformers 5 ties T5's head whatever the config says
        config = dataclasses.replace(config, tie_word_embeddings=False)
    return type(from_hf(hf))(config)


def assert_same_distribution(name: str, ours: Tensor, theirs: Tensor) -> None:
    if ours.shape != theirs.shape:
        raise AssertionError(f"{name}: fastlm {tuple(ours.shape)}, HF {tuple(theirs.shape)}")
    a, b = ours.detach().double().flatten(), theirs.detach().double().flatten()
    n = a.numel()
    mean_a, mean_b = a.mean().item(), b.mean().item()
    std_a, std_b = a.std(correction=0).item(), b.std(correction=0).item()
    mean_tol = SIGMAS * math.sqrt((std_a**2 + std_b**2) / n)
    std_tol = SIGMAS * math.sqrt((std_a**2 + std_b**2) / (2 * n))
    if not (abs(mean_a - mean_b) <= mean_tol and abs(std_a - std_b) <= std_tol):
        raise AssertionError(
            f"{name} ({n} elements): fastlm mean {mean_a:.5g} std {std_a:.5g}; transformers "
            f"mean {mean_b:.5g} std {std_b:.5g}; differences {abs(mean_a - mean_b):.3g}, "
            f"{abs(std_a - std_b):.3g}; allowed {mean_tol:.3g}, {std_tol:.3g} "
            f"({SIGMAS:g} standard errors)"
        )
    if ours.dim() == 2:
        zero_a = (ours == 0).all(dim=1).nonzero().flatten().tolist()
        zero_b = (theirs == 0).all(dim=1).nonzero().flatten().tolist()
        if zero_a != zero_b:
            raise AssertionError(f"{name}: all-zero rows fastlm {zero_a}, transformers {zero_b}")


@pytest.mark.parametrize("case", CASES)
def test_fresh_weights_match_transformers_init_statistics(case):
    hf = CASES[case]()
    model = fresh_fastlm_twin(hf, case)
    ours = hf_state_dict(model)
    theirs = dict(hf.named_parameters(remove_duplicate=False))
    assert set(ours) <= set(theirs), sorted(set(ours) - set(theirs))
    for key, tensor in ours.items():
        assert_same_distribution(key, tensor, theirs[key])
    # What fastlm leaves out is a tied copy in transformers (its head) and tied in fastlm.
    compared = {theirs[k].data_ptr() for k in ours}
    for key in set(theirs) - set(ours):
        assert theirs[key].data_ptr() in compared, f"{key} has no fastlm counterpart"
    if isinstance(model, (GPT, T5)) and model.config.tie_word_embeddings:
        embedding = model.tok_emb if isinstance(model, GPT) else model.shared
        assert model.lm_head.weight is embedding.weight
