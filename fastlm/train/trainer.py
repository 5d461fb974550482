"""``Trainer``: the training loop, on one device or under torchrun (see
``fastlm.train.distributed``).

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` sequences, forward and
backward under the precision's autocast, gradients unscaled (fp16) and clipped by global
norm, AdamW on the fp32 master weights, then the schedule. Every ``save_every`` steps a
checkpoint holds everything needed to continue exactly (see ``fastlm.train.checkpoint``):
resuming from it reproduces the uninterrupted run's losses bit for bit on the CPU.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

import fastlm.train.checkpoint as ckpt
import fastlm.train.distributed as distributed
import fastlm.train.runs as runs
from fastlm.data import ResumableSampler, Tokenizer, collate
from fastlm.errors import FastlmError
from fastlm.models import loading
from fastlm.parallel import clip_grad_norm_, local, model_class, unwrap
from fastlm.train.activation_checkpointing import apply_activation_checkpointing
from fastlm.train.config import TrainConfig
from fastlm.train.metrics import (
    MetricsLog,
    flops_per_token,
    peak_flops,
    peak_memory_mb,
    plot_losses,
)
from fastlm.train.optim import build_optimizer, build_scheduler
from fastlm.train.precision import Precision, resolve


class TrainingDiverged(FastlmError, RuntimeError):
    """A non-finite loss or gradient outside fp16 (where the loss scaler skips the step), or
    non-finite weights about to be saved."""


class Dataset(Protocol):
    """What the trainer reads: ``len`` and ``data[i]``, a dict of model ``forward`` keyword
    arguments (equal shapes across examples, ``labels`` with -100 where nothing is
    predicted). An optional ``set_epoch(epoch)`` is called before each batch is read, so
    per-epoch randomness (masking) is a function of (epoch, index), not of call order."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Tensor]: ...


def resolve_device(name: str) -> torch.device:
    """``TrainConfig.device`` (checked there) as the device to train on."""
    if name == "auto":  # under torchrun, the GPU init() gave this process
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA device is available")
    return device


def model_config_dict(model: nn.Module) -> dict[str, Any] | None:
    """The model's config dataclass as ``{"class": name, "fields": {...}, "module": the
    model's class}`` (constructor fields only), so a checkpoint can rebuild the model (a
    BERT config serves a masked LM and a classifier)."""
    config = getattr(model, "config", None)
    if not dataclasses.is_dataclass(config):
        return None
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    return {"class": type(config).__name__, "fields": fields, "module": model_class(model).__name__}


class Trainer:
    """Train ``model`` (fp32 parameters; it must return an output with ``.loss`` when
    called with a batch) on ``train_data`` as ``config`` says, validating on ``eval_data``.

    ``tokenizer``, if given, is saved in each checkpoint, and a resumed checkpoint's must
    equal it; ``save_extra(directory)`` writes more files into each checkpoint.
    ``config.out_dir`` is this run's alone (see :func:`fastlm.train.runs.claim`).
    ``fit()`` runs to ``config.max_steps`` and returns the final metrics.
    """

    # What a run writes into its out_dir (an existing one means another run is there).
    run_files: tuple[str, ...] = (
        "checkpoints",
        "metrics.jsonl",
        "metrics.tmp",
        "tokenizer.json",
        "loss.png",
        "tensorboard",
    )

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_data: Dataset,
        eval_data: Dataset | None = None,
        save_extra: Any = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        dtypes = {p.dtype for p in model.parameters()}
        if dtypes != {torch.float32}:
            raise ValueError(
                f"model parameters must be float32 (the master weights; "
                f"config.precision picks the compute dtype), "
                f"got {dtypes}"
            )
        if len(train_data) < config.batch_size:
            raise ValueError(
                f"train_data has {len(train_data)} examples, fewer than "
                f"batch_size {config.batch_size}"
            )
        model = model.to(self.device)
        if config.checkpointing:
            apply_activation_checkpointing(model, config.checkpointing)
        self._flops_per_token = flops_per_token(model, config.seq_len)  # of the whole model
        self.precision = Precision(resolve(config.precision, self.device), self.device)
        self.layout: distributed.Layout | None = None
        self.checkpointer: distributed.Checkpointer | None = None
        if distributed.init(config):
            self.model, self.layout = distributed.parallelize_model(
                model, config, self.precision.mode
            )
            if self.layout.dp_rank:  # replicas draw their own dropout masks
                torch.manual_seed(config.seed + self.layout.dp_rank)
            self.checkpointer = distributed.Checkpointer(
                Path(config.out_dir) / "checkpoints", config.keep_last, config.async_save
            )
        else:
            self.model = model
        self.main = distributed.is_main()
        resume = runs.claim(config.out_dir, config.resume, config.overwrite, self.run_files)
        self.train_data, self.eval_data = train_data, eval_data
        self.save_extra, self.tokenizer = save_extra, tokenizer
        self.optimizer = build_optimizer(unwrap(self.model), config)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.sampler = ResumableSampler(len(train_data), config.batch_size, config.seed)
        self.out_dir = Path(config.out_dir)
        self.step = 0
        self.tokens_seen = 0
        self.losses: dict[int, float] = {}  # step -> mean micro-batch loss
        self.last_checkpoint: Path | None = None
        self.lr = config.lr
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._peak = peak_flops(self.device, self.precision.mode)
        self.log = MetricsLog(self.out_dir, enabled=self.main)
        if resume is not None:
            self.resume(resume)

    # -- data --------------------------------------------------------------------------------

    def _next_batch(self) -> dict[str, Tensor]:
        if hasattr(self.train_data, "set_epoch"):
            self.train_data.set_epoch(self.sampler.epoch)
        indices = self.sampler.next_batch()
        if self.layout is not None:  # this replica's share of the global batch
            share = len(indices) // self.layout.dp
            indices = indices[self.layout.dp_rank * share : (self.layout.dp_rank + 1) * share]
        batch = collate([self.train_data[i] for i in indices])
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # -- one step ----------------------------------------------------------------------------

    def train_step(self) -> tuple[float, float, int, bool]:
        """One optimizer step: (mean loss, gradient norm before clipping, tokens, skipped)."""
        cfg, scaler = self.config, self.precision.scaler
        self.model.train()
        total, tokens = torch.zeros((), device=self.device), 0
        ddp = getattr(self.model, "no_sync", None)
        for i in range(cfg.grad_accum):
            batch = self._next_batch()
            tokens += batch["input_ids"].numel() * (self.layout.dp if self.layout else 1)
            # DDP averages the gradients once, in the last micro-batch's backward.
            last = i == cfg.grad_accum - 1
            with ddp() if ddp and not last else nullcontext():
                with self.precision.autocast():
                    loss = self.model(**batch).loss
                total += loss.detach().float()
                scaler.scale(loss / cfg.grad_accum).backward()
        if self.layout is not None:  # the mean over replicas (tensor-parallel ranks agree)
            dist.all_reduce(total)
            total /= dist.get_world_size()
        scaler.unscale_(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        if self.layout is not None:
            norm = clip_grad_norm_(self.model, max_norm)  # of the unsharded gradients
        else:
            norm = torch.nn.utils.clip_grad_norm_(self._params, max_norm, foreach=True)
        loss_value, norm_value = (total / cfg.grad_accum).item(), norm.item()
        self.lr = self.optimizer.param_groups[0]["lr"]  # this step's, before the schedule moves
        skipped = False
        if scaler.is_enabled():  # fp16: overflowing steps are skipped, the scale backs off
            scale = scaler.get_scale()
            scaler.step(self.optimizer)
            scaler.update()
            skipped = scaler.get_scale() < scale
        else:
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                self.optimizer.zero_grad(set_to_none=True)
                raise TrainingDiverged(
                    f"step {self.step + 1}: non-finite loss ({loss_value}) or gradient norm "
                    f"({norm_value}) in {self.precision.mode}; stopped without updating the "
                    f"weights; {self._last_good()}"
                )
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not skipped:
            self.scheduler.step()
        return loss_value, norm_value, tokens, skipped

    # -- evaluation --------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (mean over predicted tokens) and perplexity on the first
        ``eval_batches`` batches of ``eval_data``, in order."""
        if self.eval_data is None:
            raise ValueError("evaluate() needs eval_data")
        data, bs = self.eval_data, self.config.batch_size
        if hasattr(data, "set_epoch"):
            data.set_epoch(0)  # the same masks at every validation
        n = len(data)
        starts = range(0, n, bs)[: self.config.eval_batches]
        was_training = self.model.training
        self.model.eval()
        total, count = torch.zeros((), dtype=torch.float64, device=self.device), 0
        for start in starts:
            batch = collate([data[i] for i in range(start, min(start + bs, n))])
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self.precision.autocast():
                loss = self.model(**batch).loss
            # Means over batches weighted by their predicted tokens (masked LM varies).
            weight = int((batch["labels"] != -100).sum())
            total += loss.double() * weight
            count += weight
        self.model.train(was_training)
        val_loss = (total / count).item()
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0))}

    # -- checkpoints -------------------------------------------------------------------------

    def _last_good(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint was saved yet"
        return f"the last good checkpoint is {self.last_checkpoint}"

    def _check_finite_weights(self) -> None:
        """Raise TrainingDiverged (on every rank) if any weight is NaN or infinite: such a
        checkpoint would pass for a good one."""
        params = list(unwrap(self.model).named_parameters())
        finite = torch.stack([torch.isfinite(local(p)).all() for _, p in params]).float()
        if self.layout is not None:  # each rank holds shards: all must agree to save
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if bool(finite.all()):
            return
        bad = [name for (name, _), ok in zip(params, finite.tolist(), strict=True) if not ok]
        if not bad:
            where = "on another rank"
        else:
            where = bad[0] + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
        raise TrainingDiverged(
            f"step {self.step}: non-finite weights ({where}) after a finite loss and gradient "
            f"(is the learning rate too high?); not saved as a checkpoint; {self._last_good()}"
        )

    def save(self) -> Path:
        """Write checkpoint ``self.step`` (refused, as TrainingDiverged, when a weight is not
        finite)."""
        self._check_finite_weights()
        rng = {"cpu": torch.get_rng_state(), "cuda": []}
        if torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = {
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.precision.scaler.state_dict(),
            "rng": rng,
        }
        meta: dict[str, Any] = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "sampler": self.sampler.state_dict(),
            "precision": self.precision.mode,
            "config": self.config.to_dict(),
            "model": model_config_dict(unwrap(self.model)),
        }

        def extra(directory: Path) -> None:
            if self.tokenizer is not None:
                self.tokenizer.save(directory / "tokenizer.json")
            if self.save_extra is not None:
                self.save_extra(directory)

        root, keep = self.out_dir / "checkpoints", self.config.keep_last
        if self.checkpointer is not None:  # the optimizer state sharded as the model, by name
            groups = [
                {k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups
            ]
            state["optimizer_groups"] = groups
            self.last_checkpoint = self.checkpointer.save(
                self.step, self.model, self.optimizer, state, meta, self.layout, extra
            )
        else:
            state["optimizer"] = self.optimizer.state_dict()
            # Its state is by position; the names let a run at another layout place it.
            names = {id(p): n for n, p in self.model.named_parameters()}
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            state["optimizer_names"] = [names[id(p)] for p in params]
            self.last_checkpoint = ckpt.save_checkpoint(
                root, self.step, self.model, state, meta, extra, keep
            )
        return self.last_checkpoint

    def resume(self, where: str | Path) -> Path:
        """Continue from a checkpoint: ``"latest"`` (the newest under ``out_dir``) or a
        path. Restores weights, optimizer, schedule, loss scale, RNG and data position,
        after checking that the checkpoint is whole and of this run: its trainer.json's
        fields, the model config, the tokenizer (``fastlm.train.runs``)."""
        path = runs.resume_path(self.out_dir, where)
        meta = runs.read_run_meta(path)
        inner = unwrap(self.model)
        config = getattr(inner, "config", None)  # a fastlm model's dataclass, else unchecked
        runs.check_same_run(path, meta, config, model_class(inner).__name__, self.tokenizer)
        if meta["precision"] != self.precision.mode:
            raise ValueError(
                f"checkpoint {path} was trained in {meta['precision']}; resuming "
                f"in {self.precision.mode} would not continue the same run"
            )
        if self.layout is None and not distributed.is_sharded(path):  # as it was saved
            state, _ = ckpt.load_checkpoint(path, self.model, self.device)
            self._restore(path, state)
        else:  # resharded to this run's layout (the same: exactly the saved values)
            self._restore(path, distributed.load(path, self.model, self.optimizer, self.layout))
        try:
            self.sampler.load_state_dict(meta["sampler"])
        except ValueError as e:
            raise ValueError(
                f"--resume {path}: the data position does not fit this run's data ({e})"
            ) from None
        self.step, self.tokens_seen = meta["step"], meta["tokens_seen"]
        self.log.truncate_after(self.step)
        self.last_checkpoint = path
        return path

    def _restore(self, path: Path, state: Any) -> None:
        """Optimizer (its whole state, or the settings of its groups when its tensors were
        loaded resharded), schedule, loss scale and RNG states from ``state``, checked
        first. An RNG state of None (a rank the saving run did not have) keeps this rank's
        own seed."""
        rng = state.get("rng", False) if isinstance(state, dict) else False
        parts = ("scheduler", "scaler")
        optimizer = state.get("optimizer") if isinstance(state, dict) else None
        groups = state.get("optimizer_groups") if isinstance(state, dict) else None
        if (
            not all(isinstance(state.get(k), dict) for k in parts)
            or not (isinstance(optimizer, dict) or isinstance(groups, list))
            or not (rng is None or isinstance(rng, dict))
            or rng is not None
            and (
                not isinstance(rng.get("cpu"), Tensor)
                or rng["cpu"].dtype != torch.uint8
                or not isinstance(rng.get("cuda"), list)
            )
        ):
            problem = "not the optimizer, schedule, loss-scale and RNG states fastlm saves"
            raise loading.unusable(path, "state.pt", problem)
        if rng is not None and rng["cuda"] and len(rng["cuda"]) != torch.cuda.device_count():
            raise ValueError(
                f"checkpoint {path} holds RNG states of {len(rng['cuda'])} CUDA devices, "
                f"{torch.cuda.device_count()} are visible"
            )
        try:
            if optimizer is not None:
                self.optimizer.load_state_dict(optimizer)
            else:
                if len(groups) != len(self.optimizer.param_groups):
                    raise ValueError(
                        f"{len(groups)} parameter groups saved, the optimizer has "
                        f"{len(self.optimizer.param_groups)}"
                    )
                for mine, saved in zip(self.optimizer.param_groups, groups, strict=True):
                    mine.update({k: v for k, v in saved.items() if k != "params"})
            self.scheduler.load_state_dict(state["scheduler"])
            if state["scaler"]:
                self.precision.scaler.load_state_dict(state["scaler"])
            if rng is not None:
                torch.set_rng_state(rng["cpu"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise loading.unusable(path, "state.pt", f"does not fit this run ({e})") from None
        if rng is not None and rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])

    # -- the loop ----------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train to ``config.max_steps``; returns the last training and validation metrics."""
        cfg = self.config
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        interval_loss, interval_tokens, interval_time = 0.0, 0, 0.0
        interval_steps, skipped_steps = 0, 0
        last: dict[str, Any] = {}
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            disable=not (cfg.progress and self.main),
            desc="train",
            unit="step",
            mininterval=1.0,
            dynamic_ncols=True,
        )
        try:
            while self.step < cfg.max_steps:
                start = time.perf_counter()
                loss, norm, tokens, skipped = self.train_step()
                interval_time += time.perf_counter() - start
                self.step += 1
                self.tokens_seen += tokens
                self.losses[self.step] = loss
                skipped_steps += skipped
                if not skipped:
                    interval_loss += loss
                    interval_steps += 1
                interval_tokens += tokens
                bar.update(1)
                done = self.step == cfg.max_steps
                if self.step % cfg.log_every == 0 or done:
                    last = self._log_train(
                        interval_loss / max(interval_steps, 1),
                        norm,
                        interval_tokens / interval_time,
                        skipped_steps,
                    )
                    bar.set_postfix(
                        loss=f"{last['loss']:.3f}",
                        lr=f"{last['lr']:.2e}",
                        tok_s=f"{last['tokens_per_s']:.0f}",
                    )
                    interval_loss, interval_tokens, interval_time = 0.0, 0, 0.0
                    interval_steps = skipped_steps = 0
                if self.eval_data is not None and (self.step % cfg.eval_every == 0 or done):
                    metrics = self.evaluate()
                    self.log.write({"step": self.step, **metrics})
                    last.update(metrics)
                    if self.main:
                        bar.write(f"step {self.step}: {self.validation_line(metrics)}")
                if self.step % cfg.save_every == 0 or done:
                    self.save()
            if self.checkpointer is not None:
                self.checkpointer.wait()  # the last checkpoint is on disk before fit returns
        finally:
            bar.close()
            self.log.close()
        if self.main and plot_losses(self.log.records, self.out_dir / "loss.png"):
            last["plot"] = str(self.out_dir / "loss.png")
        return last

    def validation_line(self, metrics: dict[str, float]) -> str:
        """How a validation pass is reported in the log (a subclass names its own metrics)."""
        return f"validation loss {metrics['val_loss']:.4f}, perplexity {metrics['val_ppl']:.2f}"

    def _log_train(
        self, loss: float, grad_norm: float, tokens_per_s: float, skipped: int
    ) -> dict[str, Any]:
        record: dict[str, Any] = {
            "step": self.step,
            "loss": loss,
            "lr": self.lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "peak_memory_mb": peak_memory_mb(self.device),
        }
        if self._peak is not None:
            record["mfu"] = tokens_per_s * self._flops_per_token / self._peak
        if self.precision.scaler.is_enabled():
            record["loss_scale"] = self.precision.scaler.get_scale()
            record["skipped_steps"] = skipped
        self.log.write(record)
        return record
