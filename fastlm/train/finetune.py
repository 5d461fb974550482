"""GLUE-style fine-tuning: a BERT sequence classifier (or regressor) trained on a local
TSV / JSONL file of sentences or sentence pairs with labels, then scored on a validation
file the way GLUE scores its tasks; the ``fastlm finetune`` job.

1.-3. examples, labels and features come from :mod:`fastlm.data.glue`
   (:func:`~fastlm.data.glue.read_examples`, :class:`~fastlm.data.glue.GlueTask`, saved
   beside the model, and :func:`~fastlm.data.glue.encode`);
4. model: :class:`BertForSequenceClassification` whose encoder comes from a ``fastlm train
   --model bert`` checkpoint or a Hugging Face BERT directory (the classifier starts fresh),
   or a preset trained from scratch with a BPE tokenizer fitted to the training texts;
5. training: :class:`fastlm.train.Trainer` (AdamW, linear warmup over 10% of the steps then
   linear decay to 0, as BERT fine-tunes), validating with GLUE's metrics each
   ``eval_every`` steps; the checkpoint (with ``tokenizer.json`` and ``labels.json``) loads
   back with :func:`load_classifier`.

Metrics: accuracy, F1 and Matthews correlation for classification (F1 of the positive class
for two labels, as GLUE's MRPC/QQP, else the macro average over classes), Pearson and
Spearman correlation for regression (``num_labels`` 1, STS-B).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import tokenizers
import torch
from torch import Tensor, nn

import fastlm.train.run as train_run
import fastlm.train.runs as runs
from fastlm.data import Tokenizer
from fastlm.data.glue import (
    ClassificationDataset,
    GlueExample,
    GlueTask,
    encode,
    read_examples,
    special_ids,
)
from fastlm.eval import metrics
from fastlm.models import loading, presets
from fastlm.models.bert import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
)
from fastlm.models.hf import from_hf
from fastlm.parallel import unwrap
from fastlm.train.config import FinetuneConfig, TrainConfig
from fastlm.train.trainer import Trainer

LABELS_FILE = "labels.json"  # in each checkpoint: the GlueTask (label names by id)
PREDICTIONS_FILE = "predictions.jsonl"
RESULTS_FILE = "results.json"


def glue_metrics(
    task: GlueTask, outputs: Tensor, labels: Tensor, positive: int = 1
) -> dict[str, float]:
    """GLUE's scores of ``outputs`` (N, num_labels) against ``labels`` (N,): accuracy, F1
    (of class id ``positive`` for two labels, macro-averaged otherwise) and Matthews
    correlation; for regression Pearson and Spearman correlation."""
    if task.regression:
        predicted = outputs[:, 0].double()
        return {
            "pearson": metrics.pearson(predicted, labels),
            "spearman": metrics.spearman(predicted, labels),
        }
    predicted, gold = outputs.argmax(-1).tolist(), labels.tolist()
    binary = task.num_labels == 2
    f1 = metrics.precision_recall_f1(
        predicted, gold, average="binary" if binary else "macro", positive=positive
    )["f1"]
    return {
        "accuracy": metrics.accuracy(predicted, gold),
        "f1": f1,
        "matthews_corrcoef": metrics.matthews_corrcoef(predicted, gold),
    }


@torch.no_grad()
def predict(model: nn.Module, data: ClassificationDataset, batch_size: int = 64) -> Tensor:
    """The model's outputs (N, num_labels) float32 for every example of ``data``, in order,
    in eval mode (restored afterwards) on the model's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    for start in range(0, len(data), batch_size):
        batch = {k: v[start : start + batch_size].to(device) for k, v in data.features.items()}
        outputs.append(model(**batch).logits.float().cpu())
    model.train(was_training)
    return torch.cat(outputs)


def _loss(task: GlueTask, outputs: Tensor, labels: Tensor) -> float:
    if task.regression:
        return torch.nn.functional.mse_loss(outputs[:, 0].double(), labels.double()).item()
    return torch.nn.functional.cross_entropy(outputs.double(), labels).item()


# -- models ----------------------------------------------------------------------------------


def load_classifier(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[BertForSequenceClassification, Tokenizer, GlueTask]:
    """The fine-tuned model (eval mode), tokenizer and task of a ``fastlm finetune``
    checkpoint, or of its run directory (the newest checkpoint)."""
    path = loading.checkpoint_dir(path)
    if not (path / LABELS_FILE).is_file():
        raise ValueError(f"{path} is not a fastlm finetune checkpoint (no {LABELS_FILE})")
    model, tokenizer = train_run.load_model(path, device)
    if not isinstance(model, BertForSequenceClassification):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a sequence classifier")
    return model, tokenizer, GlueTask.load(path / LABELS_FILE)


def _hf_tokenizer(path: Path) -> Tokenizer:
    """A Hugging Face model directory's tokenizer: its ``tokenizer.json``, or BERT's
    WordPiece rebuilt from ``vocab.txt`` (directories written by the slow tokenizer)."""
    if (path / "tokenizer.json").is_file():
        return Tokenizer.load(path)
    vocab = path / "vocab.txt"
    if not vocab.is_file():
        raise ValueError(f"{path} has no tokenizer.json or vocab.txt")
    settings = path / "tokenizer_config.json"
    settings = json.loads(settings.read_text()) if settings.is_file() else {}
    wordpiece = tokenizers.models.WordPiece.from_file(str(vocab), unk_token="[UNK]")
    tok = tokenizers.Tokenizer(wordpiece)
    # BertTokenizer's default: lowercase (the "uncased" checkpoints) unless told otherwise.
    tok.normalizer = tokenizers.normalizers.BertNormalizer(
        lowercase=settings.get("do_lower_case", True)
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    tok.decoder = tokenizers.decoders.WordPiece()
    tok.add_special_tokens(
        [
            t
            for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
            if tok.token_to_id(t) is not None
        ]
    )
    return Tokenizer(tok)


def pretrained_encoder(path: str | Path) -> tuple[BertModel, Tokenizer]:
    """The BERT encoder and tokenizer of ``path``: a ``fastlm train --model bert`` checkpoint
    or run directory (a ``fastlm finetune`` one too), or a Hugging Face BERT directory
    (``config.json``, ``*.safetensors``, and ``tokenizer.json`` or ``vocab.txt``)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    if (path / "config.json").is_file():
        try:
            # The encoder is what gets fine-tuned: heads beyond it (BERT's next-sentence
            # head) are left out, with a warning naming them.
            model = from_hf(path, strict=False)
        except (FileNotFoundError, KeyError, ValueError) as e:
            raise ValueError(f"{path}: {e.args[0]}") from e
        tokenizer = _hf_tokenizer(path)
    elif (path / "trainer.json").is_file() or (path / "checkpoints").is_dir():
        if (loading.checkpoint_dir(path) / LABELS_FILE).is_file():
            model, tokenizer, _ = load_classifier(path)
        else:
            model, tokenizer = train_run.load_model(path)
    else:
        raise ValueError(
            f"{path} is neither a fastlm checkpoint (trainer.json) or run "
            f"directory nor a Hugging Face model directory (config.json)"
        )
    if isinstance(model, (BertForMaskedLM, BertForSequenceClassification)):
        model = model.bert
    if not isinstance(model, BertModel):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a BERT model")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, more than "
            f"the model's {model.config.vocab_size} embeddings"
        )
    return model, tokenizer


def classifier_from(encoder: BertModel, num_labels: int) -> BertForSequenceClassification:
    """A float32 :class:`BertForSequenceClassification` with ``encoder``'s weights (pooler
    included) and a freshly initialized classifier of ``num_labels`` outputs."""
    config = dataclasses.replace(encoder.config, num_labels=num_labels)
    model = BertForSequenceClassification(config)
    model.bert.load_state_dict(encoder.state_dict())
    return model


# -- the job ---------------------------------------------------------------------------------


class FinetuneTrainer(Trainer):
    """The Trainer, validating with GLUE's metrics on the whole validation set (not
    perplexity on its first batches). The last validation's outputs stay in
    ``outputs``. Each checkpoint holds the tokenizer and the task's labels."""

    run_files = (*Trainer.run_files, PREDICTIONS_FILE, RESULTS_FILE)

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_data: ClassificationDataset,
        eval_data: ClassificationDataset,
        task: GlueTask,
        positive: int,
        tokenizer: Tokenizer,
    ) -> None:
        self.task, self.positive = task, positive
        self.outputs: Tensor | None = None
        super().__init__(model, config, train_data, eval_data, self._save_labels, tokenizer)

    def _save_labels(self, directory: Path) -> None:
        self.task.save(directory / LABELS_FILE)

    def evaluate(self) -> dict[str, float]:
        with self.precision.autocast():
            self.outputs = predict(unwrap(self.model), self.eval_data, self.config.batch_size)
        labels = self.eval_data.labels
        loss = _loss(self.task, self.outputs, labels)
        scores = glue_metrics(self.task, self.outputs, labels, self.positive)
        return {"val_loss": loss, **{f"val_{k}": v for k, v in scores.items()}}

    def validation_line(self, metrics: dict[str, float]) -> str:
        """The task's scores, not the perplexity of a language model."""
        scores = ", ".join(
            f"{k.removeprefix('val_')} {v:.4f}" for k, v in metrics.items() if k != "val_loss"
        )
        return f"validation {scores} (loss {metrics['val_loss']:.4f})"


def _say(message: str) -> None:
    print(f"[fastlm finetune] {message}", flush=True)


def _model_and_tokenizer(
    config: FinetuneConfig, task: GlueTask, train: list[GlueExample]
) -> tuple[BertForSequenceClassification, Tokenizer, str]:
    torch.manual_seed(config.seed)  # the classifier's initialization (or the whole model's)
    if config.init is not None:
        encoder, tokenizer = pretrained_encoder(config.init)
        return classifier_from(encoder, task.num_labels), tokenizer, config.init
    preset, overrides = train_run.FAMILIES.get(config.model, (config.model, {}))
    base = presets.config(preset)
    if not isinstance(base, BertConfig):
        raise ValueError(f"model {config.model!r} is not a BERT preset")
    tokenizer = Tokenizer.train([t for e in train for t in e.texts], config.vocab_size)
    positions = max(base.max_position_embeddings, config.max_length)
    fields = {
        **overrides,
        "vocab_size": tokenizer.vocab_size,
        "num_labels": task.num_labels,
        "pad_token_id": special_ids(tokenizer)["pad"],
        "max_position_embeddings": positions,
    }
    model = BertForSequenceClassification(presets.config(preset, **fields))
    return model, tokenizer, f"{config.model} from scratch, BPE of {tokenizer.vocab_size} tokens"


def _positive(config: FinetuneConfig, task: GlueTask) -> int:
    if config.positive_label is None:
        return 1
    if task.num_labels != 2:
        raise ValueError(f"positive_label is for two-label tasks; this one has {task.num_labels}")
    if config.positive_label not in task.labels:
        raise ValueError(
            f"positive_label {config.positive_label!r} is not a training label "
            f"({', '.join(map(repr, task.labels))})"
        )
    return task.labels.index(config.positive_label)


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune and score as ``config`` says; writes the checkpoint, ``predictions.jsonl``
    (one line per validation example, in file order: its line, gold label and prediction)
    and ``results.json`` (the scores) into ``out_dir``, and returns the results."""
    t0 = time.perf_counter()
    files = FinetuneTrainer.run_files  # no --resume: fine-tuning runs are short
    runs.claim(config.out_dir, "", config.overwrite, files, dry_run=True, resumable=False)
    read = dict(
        text_fields=config.text_fields,
        label_field=config.label_field,
        regression=config.regression,
        header=config.header,
    )
    train_examples = read_examples(config.train, **read)
    val_examples = read_examples(config.validation, **read)
    task = GlueTask.from_examples(train_examples, config.regression)
    train_labels = task.targets(train_examples, config.train)
    val_labels = task.targets(val_examples, config.validation)
    positive = _positive(config, task)
    batch_size = min(config.batch_size, len(train_examples))
    if batch_size < config.batch_size:
        _say(
            f"{config.train} holds {len(train_examples)} examples, fewer than --batch-size "
            f"{config.batch_size}: batches of {batch_size}"
        )
    model, tokenizer, source = _model_and_tokenizer(config, task, train_examples)
    mc = model.config
    if config.max_length > mc.max_position_embeddings:
        raise ValueError(
            f"max_length {config.max_length} exceeds the model's "
            f"{mc.max_position_embeddings} positions"
        )
    if len(config.text_fields) == 2 and mc.type_vocab_size < 2:
        raise ValueError(f"sentence pairs need two token types; the model has {mc.type_vocab_size}")
    train_features = encode(tokenizer, [e.texts for e in train_examples], config.max_length)
    val_features = encode(tokenizer, [e.texts for e in val_examples], config.max_length)
    train_data = ClassificationDataset(train_features, train_labels)
    val_data = ClassificationDataset(val_features, val_labels)
    steps_per_epoch = len(train_data) // batch_size
    steps = config.epochs * steps_per_epoch
    train_config = TrainConfig(
        model=config.model or "bert",
        seq_len=train_features["input_ids"].shape[1],
        batch_size=batch_size,
        max_steps=steps,
        lr=config.learning_rate,
        warmup_steps=int(config.warmup_ratio * steps),
        schedule="linear",
        min_lr_ratio=0.0,
        weight_decay=config.weight_decay,
        betas=(0.9, 0.999),
        eval_every=config.eval_every or steps_per_epoch,
        log_every=min(10, steps),
        save_every=steps,
        keep_last=1,
        out_dir=config.out_dir,
        overwrite=config.overwrite,
        seed=config.seed,
        device=config.device,
        precision=config.precision,
        progress=config.progress,
    )
    kind = "regression" if task.regression else f"{task.num_labels} labels"
    _say(
        f"{config.train}: {len(train_data)} training, {config.validation}: {len(val_data)} "
        f"validation examples ({kind}); padded to {train_config.seq_len} / "
        f"{val_features['input_ids'].shape[1]} tokens"
    )
    params = sum(p.numel() for p in model.parameters())
    _say(
        f"model: {source}, {params / 1e6:.2f}M parameters; {steps} steps ({config.epochs} "
        f"epochs of {steps_per_epoch}), lr {config.learning_rate:g}; set-up took "
        f"{time.perf_counter() - t0:.1f} s"
    )

    trainer = FinetuneTrainer(model, train_config, train_data, val_data, task, positive, tokenizer)
    t1 = time.perf_counter()
    final = trainer.fit()
    _say(f"trained in {time.perf_counter() - t1:.0f} s; checkpoint: {trainer.last_checkpoint}")
    scores = {
        k[len("val_") :]: v for k, v in final.items() if k.startswith("val_") and k != "val_loss"
    }
    results: dict[str, Any] = {
        "task": "regression" if task.regression else "classification",
        "labels": list(task.labels),
        "train": config.train,
        "validation": config.validation,
        "model": source,
        "num_train": len(train_data),
        "num_validation": len(val_data),
        "steps": steps,
        "metrics": scores,
        "loss": final["val_loss"],
        "checkpoint": str(trainer.last_checkpoint),
        "predictions": str(Path(config.out_dir) / PREDICTIONS_FILE),
    }
    if not task.regression:
        results["f1_average"] = "binary" if task.num_labels == 2 else "macro"
        if task.num_labels == 2:
            results["positive_label"] = task.labels[positive]
    if trainer.main:
        _write_outputs(Path(config.out_dir), task, val_examples, trainer.outputs, results)
    return results


def _write_outputs(
    out_dir: Path,
    task: GlueTask,
    examples: list[GlueExample],
    outputs: Tensor,
    results: dict[str, Any],
) -> None:
    with (out_dir / PREDICTIONS_FILE).open("w") as f:
        for e, out in zip(examples, outputs, strict=True):
            prediction = float(out[0]) if task.regression else task.labels[int(out.argmax())]
            record = {"line": e.line, "label": e.label, "prediction": prediction}
            f.write(json.dumps(record) + "\n")
    (out_dir / RESULTS_FILE).write_text(json.dumps(results, indent=1) + "\n")


def _metric_name(key: str, results: dict[str, Any]) -> str:
    if key != "f1":
        return key
    if "positive_label" in results:
        return f"f1 (binary, positive {results['positive_label']!r})"
    return f"f1 ({results['f1_average']})"


def format_results(results: dict[str, Any]) -> str:
    """The scores as a two-column table, F1's averaging spelled out."""
    rows = [(_metric_name(k, results), v) for k, v in results["metrics"].items()]
    width = max(len(name) for name, _ in rows) + 2
    lines = [f"{'metric':<{width}}value"]
    lines += [f"{name:<{width}}{value:.4f}" for name, value in rows]
    return "\n".join(lines)


def print_summary(results: dict[str, Any]) -> None:
    """What ``fastlm finetune`` prints at the end: the scores and where the predictions are."""
    _say(f"validation ({results['num_validation']} examples):\n{format_results(results)}")
    _say(f"predictions: {results['predictions']}")
