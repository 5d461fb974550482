"""The ``fastlm train`` and ``fastlm generate`` jobs: corpus -> tokenizer -> packed
objective datasets -> model -> :class:`Trainer`, and sampling from a saved checkpoint."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
from fastlm.models import presets
from fastlm.models.bert import BertConfig, BertForMaskedLM, BertForSequenceClassification
from fastlm.models.gpt import GPT, GPTConfig
from fastlm.models.t5 import T5, T5Config
from fastlm.parallel.checkpoint import load_sharded
from fastlm.train import checkpoint as ckpt
from fastlm.train import distributed
from fastlm.train.config import TrainConfig
from fastlm.train.trainer import Trainer

# What ``--model gpt|bert|t5`` means: a preset and the overrides that make it train in a
# few minutes on a 2-core CPU (the sizes of the default run; any preset name works too).
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt": ("gpt2-tiny", dict(hidden_size=256, num_layers=4, num_heads=4)),
    "bert": ("bert-tiny", dict(hidden_size=256, num_layers=4, num_heads=4,
                               intermediate_size=1024)),
    "t5": ("t5-tiny", dict(hidden_size=256, num_heads=4, head_dim=64, intermediate_size=1024,
                           num_layers=3)),
}  # fmt: skip
_CONFIGS = {c.__name__: c for c in (GPTConfig, BertConfig, T5Config)}
_MODULES = {m.__name__: m for m in (GPT, BertForMaskedLM, BertForSequenceClassification, T5)}


def model_config(config: TrainConfig, tokenizer: Tokenizer) -> GPTConfig | BertConfig | T5Config:
    """The model config of a run: the preset (or family default), the token ids and vocabulary
    of the tokenizer, room for ``seq_len`` positions, then ``model_overrides``."""
    preset, overrides = FAMILIES.get(config.model, (config.model, {}))
    base = presets.config(preset)
    fields: dict[str, Any] = {**overrides, "vocab_size": tokenizer.vocab_size}
    if isinstance(base, (GPTConfig, BertConfig)):
        fields["max_position_embeddings"] = max(base.max_position_embeddings, config.seq_len)
    if isinstance(base, BertConfig):
        fields["pad_token_id"] = tokenizer.require("<pad>", "a BERT model")
    if isinstance(base, T5Config):
        pad = tokenizer.require("<pad>", "a T5 model")
        fields.update(pad_token_id=pad, decoder_start_token_id=pad,
                      eos_token_id=tokenizer.require("<|endoftext|>", "a T5 model"))  # fmt: skip
    return presets.config(preset, **{**fields, **config.model_overrides})


def datasets(config: TrainConfig, model_cfg: Any, tokenizer: Tokenizer,
             train_docs: list[str], val_docs: list[str]) -> tuple[Any, Any]:  # fmt: skip
    """The objective of the model family over packed documents: causal LM (GPT), masked LM
    (BERT), span corruption (T5)."""

    def build(docs: list[str], split: str) -> Any:
        def packed(length: int, separator: int | None) -> torch.Tensor:
            try:
                return pack(tokenizer.encode_batch(docs), length, separator)
            except ValueError as e:
                raise ValueError(f"the {split} split ({len(docs)} documents): {e} (or change "
                                 f"--val-fraction)") from e  # fmt: skip

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
    rank, from the same seed)."""
    t0 = time.perf_counter()
    distributed.init(config)
    presets.config(FAMILIES.get(config.model, (config.model,))[0])  # an unknown name fails now
    docs = read_corpus(config.data, config.text_field) if config.data else default_corpus()
    if config.clean_data:
        clean = CleanConfig(scrub_pii=config.scrub_pii, filters=config.filter_data,
                            near_dedup=config.near_dedup)  # fmt: skip
        docs, report = clean_corpus(docs, clean)
    train_docs, val_docs = split_documents(docs, config.val_fraction)
    if config.clean_data:
        leaked = contamination(train_docs, val_docs, clean.threshold, clean.num_perm,
                               clean.shingle, clean.shingle_size, clean.seed)  # fmt: skip
        _say(f"cleaned: {report.summary()}; {len(leaked)} of {len(val_docs)} validation "
             f"documents duplicate a training document (same text or estimated Jaccard >= "
             f"{clean.threshold:g})")  # fmt: skip
    source = ", ".join(config.data) if config.data else "built-in corpus (stdlib docstrings)"
    _say(f"corpus: {source}: {len(train_docs)} training / {len(val_docs)} validation "
         f"documents, {sum(map(len, docs)) / 1e6:.1f} MB of text")  # fmt: skip
    out_dir = Path(config.out_dir)
    saved = out_dir / "tokenizer.json"
    if config.tokenizer:
        tokenizer = Tokenizer.load(config.tokenizer)
    elif config.resume and saved.is_file():
        tokenizer = Tokenizer.load(saved)  # the resumed run's own, not a retrained one
    else:  # trained once, by rank 0; the other ranks read it
        if distributed.is_main():
            Tokenizer.train(train_docs, config.vocab_size).save(saved)
        distributed.barrier()
        tokenizer = Tokenizer.load(saved)
        _say(f"trained a byte-level BPE tokenizer ({tokenizer.vocab_size} tokens) -> {saved}")
    model_cfg = model_config(config, tokenizer)
    train_data, val_data = datasets(config, model_cfg, tokenizer, train_docs, val_docs)
    torch.manual_seed(config.seed)
    model = presets.create(model_cfg)
    params = sum(p.numel() for p in model.parameters())
    _say(f"model: {type(model).__name__} ({config.model}), {params / 1e6:.2f}M parameters; "
         f"{len(train_data)} training sequences of {config.seq_len} tokens; set-up took "
         f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
    return Trainer(model, config, train_data, val_data,
                   save_extra=lambda d: tokenizer.save(d / "tokenizer.json"))  # fmt: skip


def train(config: TrainConfig) -> dict[str, Any]:
    trainer = build_trainer(config)
    _say(f"device {trainer.device}, precision {trainer.precision.mode}, "
         f"{config.max_steps} steps of {config.batch_size * config.grad_accum} x "
         f"{config.seq_len} tokens")  # fmt: skip
    if trainer.layout is not None:
        layout = trainer.layout
        _say(f"{layout.tp * layout.dp} ranks: tensor parallel {layout.tp}"
             f"{' with sequence parallelism' if config.sequence_parallel else ''}, data "
             f"parallel {layout.dp}")  # fmt: skip
    t0 = time.perf_counter()
    result = trainer.fit()
    first = trainer.losses[min(trainer.losses)] if trainer.losses else float("nan")
    _say(f"done in {time.perf_counter() - t0:.0f} s: training loss {first:.3f} -> "
         f"{result.get('loss', float('nan')):.3f}")  # fmt: skip
    if "val_ppl" in result:
        _say(f"validation loss {result['val_loss']:.4f}, perplexity {result['val_ppl']:.2f}")
    _say(f"checkpoint: {trainer.last_checkpoint}")
    plot = result.get("plot", "none (install matplotlib for one)")
    _say(f"metrics: {trainer.log.path}, loss plot: {plot}")
    return result


# -- generation ------------------------------------------------------------------------------


def model_of(checkpoint: str | Path) -> nn.Module:
    """A freshly initialized model of the config (and model class) a checkpoint directory
    records."""
    meta = ckpt.read_meta(checkpoint)
    if meta.get("model") is None or meta["model"]["class"] not in _CONFIGS:
        raise ValueError(f"checkpoint {checkpoint} does not hold a fastlm model config")
    config = _CONFIGS[meta["model"]["class"]](**meta["model"]["fields"])
    module = _MODULES.get(meta["model"].get("module"))  # older checkpoints: the preset's
    return module(config) if module is not None else presets.create(config)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Tokenizer]:
    """The model and tokenizer of a checkpoint directory, or of a run directory (its newest
    checkpoint)."""
    path = Path(path)
    if not (path / "trainer.json").is_file():
        latest = ckpt.latest_checkpoint(path / "checkpoints")
        if latest is None:
            raise ValueError(f"{path} is neither a checkpoint nor a run directory with one")
        path = latest
    model = model_of(path)
    load_sharded(model, path)  # a distributed run's shards are reassembled
    return model.to(device).eval(), Tokenizer.load(path / "tokenizer.json")


@torch.no_grad()
def generate(path: str | Path, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8,
             top_k: int | None = 50, greedy: bool = False, seed: int = 0) -> str:  # fmt: skip
    """Continue ``prompt`` (GPT), answer it (T5: the prompt is the encoder input, the result
    the decoder's text), or fill its ``<mask>`` tokens (BERT)."""
    model, tokenizer = load_model(path)
    if isinstance(model, BertForSequenceClassification):
        raise ValueError(f"{path} holds a sequence classifier (fastlm finetune): nothing to "
                         f"generate; a GPT, T5 or masked-LM BERT checkpoint can")  # fmt: skip
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("prompt is empty")
    if isinstance(model.config, BertConfig):
        mask = tokenizer.require("<mask>", "filling masks")
        if mask not in ids:
            raise ValueError("a BERT checkpoint fills masks: put <mask> in the prompt")
        row = torch.tensor([[tokenizer.cls_id, *ids, tokenizer.sep_id]])
        logits = model(row).logits[0, 1:-1]
        filled = [int(logits[i].argmax()) if t == mask else t for i, t in enumerate(ids)]
        return tokenizer.decode(filled)
    if isinstance(model.config, T5Config):
        ids = [*ids, tokenizer.eos_id]
    generator = torch.Generator().manual_seed(seed)
    out = model.generate(torch.tensor([ids]), max_new_tokens, do_sample=not greedy,
                         temperature=temperature, top_k=top_k,
                         eos_token_id=tokenizer.eos_id, generator=generator)  # fmt: skip
    new = out[0, len(ids) :] if isinstance(model.config, GPTConfig) else out[0, 1:]
    if tokenizer.eos_id is not None and (new == tokenizer.eos_id).any():
        new = new[: int((new == tokenizer.eos_id).nonzero()[0])]
    text = tokenizer.decode(new.tolist())
    return prompt + text if isinstance(model.config, GPTConfig) else text
