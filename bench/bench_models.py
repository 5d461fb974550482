"""Whole models: forward and forward+backward tokens/s and peak memory, and decode tokens/s.

fastlm's GPT against the same weights in Hugging Face transformers (``to_hf``) with eager
and SDPA attention, and against the transformers model patched by ``fastlm.patch``. The
training step is ``loss.backward()`` with labels: fastlm's loss is the fused linear
cross-entropy (no (tokens, vocab) logits), transformers' the logits then cross-entropy.

FLOPs: ``2 * params * tokens`` forward (the weight matmuls; attention's share is small at
these lengths) and three times that forward+backward. Bytes: the weights read once per
call (the memory-bound floor of decoding). Decode: ``generate`` of ``new`` greedy tokens
after a ``prompt``-token prompt, tokens/s counting generated tokens of every row.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator

import torch
from torch import nn

import fastlm
from bench.harness import Case
from fastlm.models import create
from fastlm.models.hf import to_hf

# (preset, batch, seqlen) for the training cases; (batch sizes, prompt, new) for decoding.
SIZES = {
    ("cuda", True): ([("gpt2-medium", 8, 1024)], ((1, 16), 128, 64)),
    ("cuda", False): (
        [("gpt2", 8, 1024), ("gpt2-medium", 8, 1024), ("llama-1b", 4, 1024)],
        ((1, 16), 512, 128),
    ),
    ("cpu", True): ([("gpt2-tiny", 4, 128)], ((1, 16), 16, 8)),
    ("cpu", False): ([("gpt2-tiny", 4, 128), ("gpt2", 1, 256)], ((1, 16), 32, 16)),
}


def _transformers_available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def providers(model: nn.Module) -> dict[str, nn.Module]:
    """fastlm's model and, with transformers installed, the same weights there."""
    found: dict[str, nn.Module] = {"fastlm": model}
    if not _transformers_available():
        return found
    for attn in ("eager", "sdpa"):
        hf = to_hf(model)
        hf.set_attn_implementation(attn)
        found[f"transformers-{attn}"] = hf
    patched = to_hf(model)
    found["transformers+fastlm.patch"] = fastlm.patch(patched)
    return found


def _forward(model: nn.Module, ids: torch.Tensor) -> Callable[[], object]:
    def step():
        with torch.no_grad():
            return model(input_ids=ids).logits

    return step


def _train_step(model: nn.Module, ids: torch.Tensor) -> Callable[[], object]:
    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss

    return step


def _decode(model: nn.Module, ids: torch.Tensor, new: int) -> Callable[[], object]:
    hf = not hasattr(model, "_decode")

    def step():
        if hf:  # min_new_tokens: no early stop, so both generate exactly `new` tokens
            return model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
            )
        return model.generate(ids, new)

    return step


def cases(quick: bool, device: torch.device) -> Iterator[Case]:
    training, (batches, prompt, new) = SIZES[(device.type, quick)]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    e = dtype.itemsize
    for preset, batch, seqlen in training:
        model = create(preset, dropout=0.0).to(device=device, dtype=dtype).train()
        params = sum(p.numel() for p in model.parameters())
        ids = torch.randint(0, model.config.vocab_size, (batch, seqlen), device=device)
        tokens = batch * seqlen
        for name, m in providers(model).items():
            m.train()
            yield Case(
                f"{preset} fwd",
                name,
                (batch, seqlen),
                dtype,
                _forward(m, ids),
                params * e,
                2 * params * tokens,
                tokens,
            )
            yield Case(
                f"{preset} fwd+bwd",
                name,
                (batch, seqlen),
                dtype,
                _train_step(m, ids),
                params * e,
                6 * params * tokens,
                tokens,
            )
        # Decoding the first training preset's model at each batch size.
        if preset != training[0][0]:
            continue
        prompts = {
            b: torch.randint(0, model.config.vocab_size, (b, prompt), device=device)
            for b in batches
        }
        for name, m in providers(model.eval()).items():
            m.eval()
            for b, ids in prompts.items():
                yield Case(
                    f"{preset} decode",
                    name,
                    (b, prompt, new),
                    dtype,
                    _decode(m, ids, new),
                    params * e * new,
                    2 * params * b * new,
                    b * new,
                )
