"""Training steps: tokens/s, peak memory and (on GPUs) model FLOP utilization of one
optimizer step of ``fastlm.train.Trainer`` (autocast, loss scaling, clipping, AdamW), for
fastlm's GPT with and without activation checkpointing and the fused loss, and for the same
weights in Hugging Face transformers (SDPA attention, with and without its gradient
checkpointing) driven by the same loop.

FLOPs: PaLM's training estimate (``fastlm.train.metrics.flops_per_token``: 6 per linear
weight per token plus the attention products), the same for every provider, so TFLOP/s
divided by the GPU's dense bf16 peak (989 on H100/H200) is the MFU. Peak memory: what one
step allocates beyond the weights and optimizer state (activations, gradients, logits).
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from bench.harness import Case
from fastlm.data import CausalLMDataset
from fastlm.models import create
from fastlm.models.hf import to_hf
from fastlm.train import TrainConfig, Trainer
from fastlm.train.metrics import flops_per_token

# (preset, batch, seqlen)
SIZES = {
    ("cuda", True): [("gpt2", 8, 1024)],
    ("cuda", False): [("gpt2", 8, 1024), ("gpt2-medium", 8, 1024)],
    ("cpu", True): [("gpt2-tiny", 4, 128)],
    # gpt2-tiny at 16 x 256: activations outweigh weights, gradients and the loss chunk.
    ("cpu", False): [("gpt2-tiny", 4, 128), ("gpt2-tiny", 16, 256), ("gpt2", 1, 256)],
}


class UnfusedLoss(nn.Module):
    """fastlm's GPT with its loss computed the usual way: full (tokens, vocab) logits, then
    ``F.cross_entropy`` (the baseline the fused linear cross-entropy replaces)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor):
        out = self.model(input_ids, return_logits=True)
        logits = out.logits[:, :-1].float()
        out.loss = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten())
        return out


def _variants(preset: str) -> Iterator[tuple[str, Callable[[], nn.Module], int]]:
    """(provider, model factory, activation checkpointing every n blocks): built one at a
    time, so only one model and its optimizer state are alive."""

    def fastlm_model() -> nn.Module:
        torch.manual_seed(0)
        return create(preset, dropout=0.0)

    yield "fastlm", fastlm_model, 0
    yield "fastlm+checkpointing", fastlm_model, 1
    yield "fastlm unfused loss", lambda: UnfusedLoss(fastlm_model()), 0
    if importlib.util.find_spec("transformers") is None:
        return
    for checkpointing in (False, True):

        def hf_model(checkpointing: bool = checkpointing) -> nn.Module:
            hf = to_hf(fastlm_model())
            hf.set_attn_implementation("sdpa")
            if checkpointing:
                hf.gradient_checkpointing_enable({"use_reentrant": False})
            return hf

        yield "transformers-sdpa" + ("+checkpointing" if checkpointing else ""), hf_model, 0


def _step(
    model: nn.Module,
    checkpointing: int,
    device: torch.device,
    batch: int,
    seqlen: int,
    vocab: int,
    out_dir: str,
) -> Callable[[], object]:
    config = TrainConfig(
        batch_size=batch,
        seq_len=seqlen,
        checkpointing=checkpointing,
        device=device.type,
        progress=False,
        out_dir=out_dir,
        max_steps=10**6,
        warmup_steps=0,
    )
    # The same tokens for every provider, whatever random state building the model left.
    rows = torch.randint(
        0, vocab, (4 * batch, seqlen), dtype=torch.int32, generator=torch.Generator().manual_seed(0)
    )
    trainer = Trainer(model, config, CausalLMDataset(rows))
    trainer.train_step()  # allocates the optimizer state outside the measured step
    return trainer.train_step


def cases(quick: bool, device: torch.device) -> Iterator[Case]:
    precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with tempfile.TemporaryDirectory() as out_dir:
        for preset, batch, seqlen in SIZES[(device.type, quick)]:
            reference = create(preset)
            vocab = reference.config.vocab_size
            flops = int(flops_per_token(reference, seqlen) * batch * seqlen)
            weight_bytes = sum(p.numel() for p in reference.parameters()) * 4
            del reference
            for provider, factory, checkpointing in _variants(preset):
                fn = _step(factory(), checkpointing, device, batch, seqlen, vocab, out_dir)
                yield Case(
                    f"{preset} train step",
                    provider,
                    (batch, seqlen),
                    dtype,
                    fn,
                    weight_bytes,
                    flops,
                    batch * seqlen,
                )
