"""The ``fastlm train`` and ``fastlm generate`` jobs: corpus -> tokenizer -> packed
objective datasets -> model -> :class:`Trainer`, and sampling from a saved checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import fastlm.train.distributed as distributed
import fastlm.train.runs as runs
from fastlm.data import (
    CausalLMDataset,
    CleanConfig,
    MaskedLMDataset,
    SpanCorruptionDataset,
    Tokenizer,
    clean_corpus,
    contamination,
    default_corpus,
    pack,
    read_corpus,
    split_documents,
)
from fastlm.models import loading, presets
from fastlm.models.bert import BertConfig, BertForSequenceClassification
from fastlm.models.gpt import GPTConfig
from fastlm.models.t5 import T5Config
from fastlm.parallel.checkpoint import load_sharded
from fastlm.train.config import TrainConfig
from fastlm.train.trainer import Trainer

# What ``--model gpt|bert|t5`` means: a preset and the overrides that make it train in a
# few minutes on a 2-core CPU (the sizes of the default run; any preset name works too).
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt": ("gpt2-tiny", dict(hidden_size=256, num_layers=4, num_heads=4)),
    "bert": ("bert-tiny", dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024)),
    "t5": (
        "t5-tiny",
        dict(hidden_size=256, num_heads=4, head_dim=64, intermediate_size=1024, num_layers=3),
    ),
}


def _preset(config: TrainConfig) -> tuple[str, dict[str, Any]]:
    """The preset of ``--model`` and the family's overrides, once ``--model-overrides`` is
    known to name only fields of its config."""
    preset, overrides = FAMILIES.get(config.model, (config.model, {}))
    base = presets.config(preset)  # an unknown name fails here
    fields = {f.name for f in dataclasses.fields(base) if f.init}
    unknown = sorted(set(config.model_overrides) - fields)
    if unknown:
        raise ValueError(
            f"--model-overrides: {type(base).__name__} has no field "
            f"{', '.join(map(repr, unknown))}; its fields: {', '.join(sorted(fields))}"
        )
    return preset, overrides


def model_config(config: TrainConfig, tokenizer: Tokenizer) -> GPTConfig | BertConfig | T5Config:
    """The model config of a run: the preset (or family default), the token ids and vocabulary
    of the tokenizer, room for ``seq_len`` positions, then ``model_overrides``."""
    preset, overrides = _preset(config)
    base = presets.config(preset)
    fields: dict[str, Any] = {**overrides, "vocab_size": tokenizer.vocab_size}
    if isinstance(base, (GPTConfig, BertConfig)):
        fields["max_position_embeddings"] = max(base.max_position_embeddings, config.seq_len)
    if isinstance(base, BertConfig):
        fields["pad_token_id"] = tokenizer.require("<pad>", "a BERT model")
    if isinstance(base, T5Config):
        pad = tokenizer.require("<pad>", "a T5 model")
        fields.update(
            pad_token_id=pad,
            decoder_start_token_id=pad,
            eos_token_id=tokenizer.require("<|endoftext|>", "a T5 model"),
        )
    return presets.config(preset, **{**fields, **config.model_overrides})


def datasets(
    config: TrainConfig,
    model_cfg: Any,
    tokenizer: Tokenizer,
    train_docs: list[str],
    val_docs: list[str],
) -> tuple[Any, Any]:
    """The objective of the model family over packed documents: causal LM (GPT), masked LM
    (BERT), span corruption (T5)."""

    def build(docs: list[str], split: str) -> Any:
        def packed(length: int, separator: int | None) -> torch.Tensor:
            try:
                return pack(tokenizer.encode_batch(docs), length, separator)
            except ValueError as e:
                raise ValueError(
                    f"the {split} split ({len(docs)} documents): {e} (or change --val-fraction)"
                ) from e

        if isinstance(model_cfg, GPTConfig):
            return CausalLMDataset(packed(config.seq_len, tokenizer.eos_id))
        if isinstance(model_cfg, BertConfig):
            rows = packed(config.seq_len - MaskedLMDataset.extra_tokens, tokenizer.sep_id)
            return MaskedLMDataset(rows, tokenizer, seed=config.seed)
        # T5: seq_len raw tokens per row; the encoder sees ~0.87x that, the decoder ~0.2x.
        rows = packed(config.seq_len, tokenizer.eos_id)
        return SpanCorruptionDataset(rows, tokenizer, seed=config.seed)

    return build(train_docs, "training"), (build(val_docs, "validation") if val_docs else None)


def _say(message: str) -> None:
    if distributed.is_main():
        print(f"[fastlm train] {message}", flush=True)


def build_trainer(config: TrainConfig) -> Trainer:
    """Everything ``fastlm train`` sets up before the first step (under torchrun: on every
    rank, from the same seed). What can be refused without the corpus (the model and its
    overrides, the run directory, the tokenizer, a resumed run's identity) is, first."""
    t0 = time.perf_counter()
    distributed.init(config)
    _preset(config)
    resume = runs.claim(
        config.out_dir, config.resume, config.overwrite, Trainer.run_files, dry_run=True
    )
    tokenizer = None
    if config.tokenizer:
        tokenizer = Tokenizer.load(config.tokenizer)
    elif resume is not None:  # the resumed run's own, not a retrained one
        tokenizer = Tokenizer.load(resume / "tokenizer.json")
    if resume is not None:
        meta = runs.read_run_meta(resume)
        runs.check_same_run(resume, meta, model_config(config, tokenizer), None, tokenizer)
        loading.check_weights(resume)
    docs = read_corpus(config.data, config.text_field) if config.data else default_corpus()
    if config.clean_data:
        clean = CleanConfig(
            scrub_pii=config.scrub_pii, filters=config.filter_data, near_dedup=config.near_dedup
        )
        docs, report = clean_corpus(docs, clean)
    train_docs, val_docs = split_documents(docs, config.val_fraction)
    if config.clean_data:
        leaked = contamination(
            train_docs,
            val_docs,
            clean.threshold,
            clean.num_perm,
            clean.shingle,
            clean.shingle_size,
            clean.seed,
        )
        _say(
            f"cleaned: {report.summary()}; {len(leaked)} of {len(val_docs)} validation "
            f"documents duplicate a training document (same text or estimated Jaccard >= "
            f"{clean.threshold:g})"
        )
    source = ", ".join(config.data) if config.data else "built-in corpus (stdlib docstrings)"
    _say(
        f"corpus: {source}: {len(train_docs)} training / {len(val_docs)} validation "
        f"documents, {sum(map(len, docs)) / 1e6:.1f} MB of text"
    )
    trained = tokenizer is None
    if trained:  # by rank 0, once
        tokenizer = distributed.from_main(lambda: Tokenizer.train(train_docs, config.vocab_size))
    model_cfg = model_config(config, tokenizer)
    train_data, val_data = datasets(config, model_cfg, tokenizer, train_docs, val_docs)
    torch.manual_seed(config.seed)
    model = presets.create(model_cfg)
    params = sum(p.numel() for p in model.parameters())
    trainer = Trainer(model, config, train_data, val_data, tokenizer=tokenizer)
    saved = Path(config.out_dir) / "tokenizer.json"
    if distributed.is_main():  # after the Trainer made out_dir this run's
        tokenizer.save(saved)
    if trained:
        _say(f"trained a byte-level BPE tokenizer ({tokenizer.vocab_size} tokens) -> {saved}")
    _say(
        f"model: {type(model).__name__} ({config.model}), {params / 1e6:.2f}M parameters; "
        f"{len(train_data)} training sequences of {config.seq_len} tokens; set-up took "
        f"{time.perf_counter() - t0:.1f} s"
    )
    return trainer


def train(config: TrainConfig) -> dict[str, Any]:
    trainer = build_trainer(config)
    _say(
        f"device {trainer.device}, precision {trainer.precision.mode}, "
        f"{config.max_steps} steps of {config.batch_size * config.grad_accum} x "
        f"{config.seq_len} tokens"
    )
    if trainer.layout is not None:
        layout = trainer.layout
        if layout.fsdp:
            replicas = (
                f" in {layout.dp_replicate} replicas (HSDP)" if layout.dp_replicate > 1 else ""
            )
            data = f"fully sharded data parallel (FSDP2) {layout.dp}{replicas}"
        else:
            data = f"data parallel {layout.dp}"
        _say(
            f"{layout.tp * layout.dp} ranks: tensor parallel {layout.tp}"
            f"{' with sequence parallelism' if config.sequence_parallel else ''}, {data}"
        )
    t0 = time.perf_counter()
    result = trainer.fit()
    first = trainer.losses[min(trainer.losses)] if trainer.losses else float("nan")
    _say(
        f"done in {time.perf_counter() - t0:.0f} s: training loss {first:.3f} -> "
        f"{result.get('loss', float('nan')):.3f}"
    )
    if "val_ppl" in result:
        _say(f"validation loss {result['val_loss']:.4f}, perplexity {result['val_ppl']:.2f}")
    _say(f"checkpoint: {trainer.last_checkpoint}")
    plot = result.get("plot", 'none (matplotlib is not installed: pip install "fastlm[train]")')
    _say(f"metrics: {trainer.log.path}, loss plot: {plot}")
    return result


def main(args: argparse.Namespace) -> int:
    """``fastlm train``, its flags parsed by :func:`fastlm.train.config.argument_parser`:
    train; under torchrun, every rank leaves together."""
    train(runs.from_arguments(args))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        # Skip interpreter finalization: gloo's worker threads can still hold work objects
        # then, and tearing those down aborts the process now and then (pytorch#190489).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


# -- generation ------------------------------------------------------------------------------


def load_model(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Tokenizer]:
    """The model and tokenizer of a checkpoint directory, or of a run directory (its newest
    checkpoint); a distributed run's shards are reassembled. Every file is checked before it
    is used (CheckpointError names the one that is not whole)."""
    return loading.load_model(path, device, load_weights=load_sharded)


@torch.no_grad()
def generate(
    path: str | Path,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = 50,
    greedy: bool = False,
    seed: int = 0,
) -> str:
    """Continue ``prompt`` (GPT), answer it (T5: the prompt is the encoder input, the result
    the decoder's text), or fill its ``<mask>`` tokens (BERT)."""
    model, tokenizer = load_model(path)
    if isinstance(model, BertForSequenceClassification):
        raise ValueError(
            f"{path} holds a sequence classifier (fastlm finetune): nothing to "
            f"generate; a GPT, T5 or masked-LM BERT checkpoint can"
        )
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("prompt is empty")
    if isinstance(model.config, BertConfig):
        mask = tokenizer.require("<mask>", "filling masks")
        if mask not in ids:
            raise ValueError("a BERT checkpoint fills masks: put <mask> in the prompt")
        row = torch.tensor([[tokenizer.cls_id, *ids, tokenizer.sep_id]])
        limit = model.config.max_position_embeddings
        if row.shape[1] > limit:
            raise ValueError(
                f"the prompt holds {len(ids)} tokens; this BERT reads at most "
                f"{limit - 2} (max_position_embeddings {limit}, with <cls> and "
                f"<sep>)"
            )
        logits = model(row).logits[0, 1:-1]
        filled = [int(logits[i].argmax()) if t == mask else t for i, t in enumerate(ids)]
        return tokenizer.decode(filled)
    if isinstance(model.config, T5Config):
        ids = [*ids, tokenizer.eos_id]
    generator = torch.Generator().manual_seed(seed)
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens,
        do_sample=not greedy,
        temperature=temperature,
        top_k=top_k,
        eos_token_id=tokenizer.eos_id,
        generator=generator,
    )
    new = out[0, len(ids) :] if isinstance(model.config, GPTConfig) else out[0, 1:]
    if tokenizer.eos_id is not None and (new == tokenizer.eos_id).any():
        new = new[: int((new == tokenizer.eos_id).nonzero()[0])]
    text = tokenizer.decode(new.tolist())
    return prompt + text if isinstance(model.config, GPTConfig) else text
