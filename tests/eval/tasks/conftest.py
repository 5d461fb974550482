"""Shared set-up of the evaluation tests: a small trained tokenizer, tiny untrained models
(GPT-2 style, Llama style, T5) with sharp random preferences, checkpoints of them in the
``fastlm train`` format, and the naive oracles: one unpadded forward per request, and greedy
decoding by a full forward per token (no KV cache)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from fastlm.data import Tokenizer
from fastlm.models import presets
from fastlm.models.bert import BertConfig
from fastlm.models.gpt import GPTConfig
from fastlm.models.t5 import T5Config
from fastlm.testing import assert_loss_policy
from fastlm.train.checkpoint import save_checkpoint
from fastlm.train.trainer import model_config_dict

TEXTS = [
    "Question: what is the answer?\nA. one\nB. two\nC. three\nD. four\nAnswer: B",
    "The trophy did not fit in the suitcase because the trophy was too big.",
    "Q: Is the sky blue?\nA: yes",
    "Return the number of items in the container; raise an error when it is closed.",
]


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(TEXTS * 5, 420)


@pytest.fixture(scope="session")
def models(tokenizer) -> dict:
    """Untrained models, the same ones every run. A wide initialization makes their
    preferences between choices clear (log-likelihood gaps of nats, not of rounding
    errors), so a batched and an unbatched pass agree on the winner."""
    v, eos, pad = tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id
    configs = {
        "gpt": GPTConfig(
            vocab_size=v,
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            max_position_embeddings=192,
            initializer_range=0.3,
        ),
        "llama": GPTConfig(
            vocab_size=v,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            max_position_embeddings=192,
            position="rotary",
            norm="rmsnorm",
            gated_mlp=True,
            activation="silu",
            attention_bias=False,
            mlp_bias=False,
            tie_word_embeddings=False,
            initializer_range=0.3,
        ),
        "t5": T5Config(
            vocab_size=v,
            hidden_size=32,
            head_dim=16,
            num_heads=2,
            intermediate_size=64,
            num_layers=2,
            dropout=0.0,
            pad_token_id=pad,
            eos_token_id=eos,
            decoder_start_token_id=pad,
            initializer_factor=3.0,
        ),
        "bert": BertConfig(
            vocab_size=v,
            hidden_size=32,
            num_layers=1,
            num_heads=2,
            intermediate_size=64,
            pad_token_id=pad,
        ),
    }
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return {name: presets.create(c).eval() for name, c in configs.items()}


@pytest.fixture(scope="session")
def checkpoints(models, tokenizer, tmp_path_factory) -> dict:
    """Each model saved as ``fastlm train`` saves a checkpoint (weights, trainer.json with
    the model config, tokenizer.json)."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        name: save_checkpoint(
            root / name,
            1,
            model,
            {},
            {"model": model_config_dict(model)},
            extra=lambda d: tokenizer.save(d / "tokenizer.json"),
        )
        for name, model in models.items()
    }


@torch.no_grad()
def _naive_rows(model, context: list[int], continuation: list[int]) -> torch.Tensor:
    """The logits that predict ``continuation`` after ``context``: one unpadded forward."""
    if isinstance(model.config, GPTConfig):
        logits = model(torch.tensor([context + continuation])).logits[0]
        return logits[len(context) - 1 : len(context) - 1 + len(continuation)]
    c = model.config
    return model(
        torch.tensor([context + [c.eos_token_id]]),
        decoder_input_ids=torch.tensor([[c.decoder_start_token_id] + continuation[:-1]]),
    ).logits[0]


def _naive_logprob(model, context: list[int], continuation: list[int]) -> float:
    """log P(continuation | context) from one unpadded forward through the model's own
    logits, summed in float64."""
    logprobs = _naive_rows(model, context, continuation).double().log_softmax(-1)
    return sum(float(logprobs[j, t]) for j, t in enumerate(continuation))


@pytest.fixture
def naive_logprob():
    return _naive_logprob


_TWINS: dict[int, tuple] = {}


def float64_twin(model):
    """The model in float64, made once per model: the reference of its float32 scores."""
    if _TWINS.get(id(model), (None,))[0] is not model:
        _TWINS[id(model)] = (model, copy.deepcopy(model).double())
    return _TWINS[id(model)][1]


def _assert_logprob(got: float, model, pairs: list[tuple[list[int], list[int]]], name="logprob"):
    """``got``, a float32 model's log-likelihood summed over the (context, continuation)
    ``pairs``, against the naive one of its float64 twin: within what the rounding of the
    float32 logits allows (fastlm.testing.assert_loss_policy, 2 per scored token)."""
    twin = float64_twin(model)
    expected = sum(_naive_logprob(twin, *pair) for pair in pairs)
    rows, rows64 = (torch.cat([_naive_rows(m, *pair) for pair in pairs]) for m in (model, twin))
    tokens = sum(len(cont) for _, cont in pairs)
    assert_loss_policy(got, expected, rows, rows64, name, weight=2 * tokens)


@pytest.fixture
def assert_logprob():
    return _assert_logprob


@torch.no_grad()
def _naive_greedy_ids(
    model, tokenizer: Tokenizer, ids: list[int], max_new_tokens: int
) -> list[int]:
    """Greedy token ids after the prompt ``ids``: the argmax of a full forward per new
    token, until EOS (not included) or ``max_new_tokens``."""
    eos, new = tokenizer.eos_id, []
    for _ in range(max_new_tokens):
        if isinstance(model.config, GPTConfig):
            logits = model(torch.tensor([ids + new])).logits[0, -1]
        else:
            c = model.config
            dec = torch.tensor([[c.decoder_start_token_id] + new])
            logits = model(torch.tensor([ids + [eos]]), decoder_input_ids=dec).logits[0, -1]
        token = int(logits.argmax())
        if token == eos:
            break
        new.append(token)
    return new


@pytest.fixture
def naive_greedy_ids():
    return _naive_greedy_ids


def _naive_greedy(
    model, tokenizer: Tokenizer, ids: list[int], max_new_tokens: int, stop: str = "\n"
) -> str:
    """The text of ``_naive_greedy_ids`` without special tokens (as Hugging Face decodes
    with ``skip_special_tokens=True``), cut before ``stop``."""
    new = _naive_greedy_ids(model, tokenizer, ids, max_new_tokens)
    text = tokenizer.decode([i for i in new if i not in tokenizer.special_ids])
    return text[: text.index(stop)] if stop in text else text


@pytest.fixture
def naive_greedy():
    return _naive_greedy


@pytest.fixture
def write_jsonl(tmp_path):
    """Write records as a JSONL file under tmp_path; returns its path."""

    def write(name: str, records: list[dict]):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return path

    return write
