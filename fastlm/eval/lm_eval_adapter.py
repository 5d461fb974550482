"""fastlm checkpoints as a model type of EleutherAI's lm-evaluation-harness (``lm_eval``).

Nothing in fastlm imports this module, so fastlm works without lm-eval installed; importing
it registers the model type ``fastlm`` beside lm-eval's own (``hf``, ``vllm``, ...)::

    import lm_eval
    import fastlm.eval.lm_eval_adapter  # noqa: F401  (registers "fastlm")

    lm_eval.simple_evaluate(model="fastlm", tasks=["hellaswag"],
                            model_args="checkpoint=runs/gpt,batch_size=8,device=cpu")

From the shell, ``python -m fastlm.eval.lm_eval_adapter`` is lm-eval's own command line with
the model type registered: ``python -m fastlm.eval.lm_eval_adapter run --model fastlm
--model_args checkpoint=runs/gpt --tasks hellaswag``.

``model_args``: ``checkpoint`` (a checkpoint or run directory of ``fastlm train``, GPT or
T5), ``batch_size`` (default 8), ``device`` (default: cuda when there is one, else cpu; a
CUDA device asked for where there is none falls back to the CPU with a warning, as for
lm-eval's Hugging Face models, since lm-eval's command line asks for cuda:0 by default),
``max_length`` (the rolling window of ``loglikelihood_rolling``; default: a GPT's context,
512 tokens for T5) and ``max_gen_toks`` (the default generation length, 256 tokens). The
three request types run on :mod:`fastlm.eval.scoring`; empty contexts are conditioned on an
EOS, and generated text leaves special tokens out, as lm-eval does for Hugging Face models: on
a checkpoint's ``to_hf`` export (with ``hf_tokenizer``), lm-eval's ``hf`` model type gives the
same accuracies, strings and (up to fp32 rounding) log-likelihoods.
"""

from __future__ import annotations

import logging

import lm_eval.models  # noqa: F401  (registers lm-eval's own model types: see below)
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry

from fastlm.eval import scoring
from fastlm.models.loading import load_model
from fastlm.parallel.checkpoint import load_sharded

# T5 has no position limit; rolling windows need one (Hugging Face's T5 tokenizers say 512).
T5_MAX_LENGTH = 512
_GENERATION_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature")
log = logging.getLogger(__name__)


def _positive_int(name: str, value) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class FastLM(LM):
    """A ``fastlm train`` checkpoint (GPT or T5) behind lm-eval's ``LM`` interface."""

    def __init__(
        self,
        checkpoint: str,
        batch_size: int | str = 8,
        device: str | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
    ) -> None:
        super().__init__()
        self.batch_size = _positive_int("batch_size", batch_size)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        cuda = torch.cuda.is_available()
        if device is None or (torch.device(device).type == "cuda" and not cuda):
            if device is not None:
                log.warning("device %s: no CUDA device is available; running on the CPU", device)
            device = "cuda" if cuda else "cpu"
        self.model, self.tokenizer = load_model(checkpoint, device, load_weights=load_sharded)
        scoring.check_model(self.model)
        self._device = next(self.model.parameters()).device
        limit = scoring.context_limit(self.model)
        default = limit or T5_MAX_LENGTH
        self.max_length = _positive_int("max_length", default if max_length is None else max_length)
        if limit is not None and self.max_length > limit:
            raise ValueError(
                f"max_length {self.max_length} exceeds the model's {limit}-token context"
            )
        self.eos_id = self.tokenizer.require("<|endoftext|>", "lm-eval (the empty context)")

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context:
            return scoring.encode_pair(self.tokenizer, context, continuation)
        return [self.eos_id], self.tokenizer.encode(continuation)

    def loglikelihood(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), whether greedy decoding produces it)`` for each
        request's ``(context, continuation)``."""
        pairs = [self._pair(*r.args) for r in requests]
        scores = scoring.score(self.model, pairs, self.batch_size, progress=not disable_tqdm)
        return [(s.logprob, s.greedy) for s in scores]

    def loglikelihood_rolling(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[float]:
        """The log-likelihood of each request's whole text, every token predicted once from
        up to ``max_length`` tokens before it (the first from an EOS)."""
        windows, owners = [], []
        for i, r in enumerate(requests):
            (text,) = r.args
            ids = self.tokenizer.encode(text)
            for window in scoring.rolling_windows(ids, self.eos_id, self.max_length):
                windows.append(window)
                owners.append(i)
        scores = scoring.score(self.model, windows, self.batch_size, progress=not disable_tqdm)
        totals = [0.0] * len(requests)
        for i, s in zip(owners, scores, strict=True):
            totals[i] += s.logprob
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Each request's ``(context, gen_kwargs)`` continued until one of the ``until``
        strings, EOS or ``max_gen_toks`` tokens; greedy unless ``do_sample`` with a positive
        ``temperature``. Requests with the same settings run together."""
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(self._generation_settings(r.args[1]), []).append(i)
        out: list[str | None] = [None] * len(requests)
        for (until, max_new, sample, temperature), members in groups.items():
            texts = scoring.generate_until(
                self.model,
                self.tokenizer,
                [requests[i].args[0] for i in members],
                max_new,
                until,
                self.batch_size,
                sample,
                temperature,
                progress=not disable_tqdm,
            )
            for i, text in zip(members, texts, strict=True):
                out[i] = text
        return out

    def _generation_settings(self, kwargs: dict) -> tuple[tuple[str, ...], int, bool, float]:
        unknown = sorted(set(kwargs) - set(_GENERATION_KWARGS))
        if unknown:
            raise ValueError(
                f"gen_kwargs {unknown} are not supported (only {', '.join(_GENERATION_KWARGS)})"
            )
        until = kwargs.get("until", ())
        until = (until,) if isinstance(until, str) else tuple(until)
        max_new = _positive_int("max_gen_toks", kwargs.get("max_gen_toks", self.max_gen_toks))
        temperature = float(kwargs.get("temperature", 1.0))
        sample = bool(kwargs.get("do_sample", False)) and temperature > 0
        return until, max_new, sample, temperature if sample else 1.0


# lm-eval fills its registry with its own model types ("hf", "vllm", ...) only while the
# registry is empty: registering after importing lm_eval.models keeps them. A lazy entry
# names the class by its import path, so running this file as __main__ and importing it
# register the same entry.
model_registry.register("fastlm", target="fastlm.eval.lm_eval_adapter:FastLM")

if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
