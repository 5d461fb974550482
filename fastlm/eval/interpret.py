"""Looking inside fastlm models: attention maps of any layer and head (captured through the
materializing attention path, since the fused kernel never forms them), saved as heatmaps;
and per-token losses of a text under a causal model.

    with capture_attention(model, layers=["blocks.1.attn"]) as maps:
        model(input_ids)
    save_attention_png(maps, "attn.png", "blocks.1.attn", head=0, tokens=tokens)
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence

from torch import Tensor, nn

from fastlm.data.tokenizer import Tokenizer
from fastlm.eval.perplexity import causal_token_nlls
from fastlm.models.gpt import GPT
from fastlm.models.layers import Attention


def attention_layers(model: nn.Module) -> list[str]:
    """Names of ``model``'s attention modules, in registration order (e.g. GPT's
    ``blocks.0.attn``; T5's ``encoder.blocks.0.attn``, ``decoder.blocks.0.attn`` and
    ``decoder.blocks.0.cross``)."""
    return [name for name, m in model.named_modules() if isinstance(m, Attention)]


@contextlib.contextmanager
def capture_attention(
    model: nn.Module,
    layers: Iterable[str | int] | None = None,
) -> Iterator[dict[str, list[Tensor]]]:
    """Record attention probabilities while the block runs.

    ``layers``: names from :func:`attention_layers`, or indices into that list; None for
    every attention module. Yields a dict from layer name to a list that each forward call
    of that layer extends with its (B, H, S_q, S_k) float32 probabilities (detached; rows
    of padding-only queries are zeros). The captured layers run the materializing path, so
    outputs match the kernel's to rounding; they are restored on exit, even on error.
    (Activation checkpointing in training would record a recomputed block twice.)
    """
    modules = {n: m for n, m in model.named_modules() if isinstance(m, Attention)}
    if not modules:
        raise ValueError(f"model: {type(model).__name__} has no fastlm attention layers")
    names = list(modules)
    if layers is None:
        chosen = names
    else:
        if isinstance(layers, (str, int)):
            layers = [layers]
        chosen = []
        for layer in layers:
            if isinstance(layer, int) and not isinstance(layer, bool):
                if not -len(names) <= layer < len(names):
                    raise ValueError(
                        f"layers: index {layer} out of range for {len(names)} attention layers"
                    )
                layer = names[layer]
            if layer not in modules:
                raise ValueError(
                    f"layers: {layer!r} is not an attention layer; the model has {', '.join(names)}"
                )
            if layer not in chosen:
                chosen.append(layer)
    for name in chosen:
        if modules[name].capture is not None:
            raise ValueError(f"layers: {name} is already being captured")
    maps: dict[str, list[Tensor]] = {name: [] for name in chosen}
    for name in chosen:
        modules[name].capture = maps[name]
    try:
        yield maps
    finally:
        for name in chosen:
            modules[name].capture = None


def save_attention_png(
    maps: Mapping[str, Tensor | Sequence[Tensor]],
    path: str | os.PathLike,
    layer: str,
    head: int,
    tokens: Sequence[str] | None = None,
    query_tokens: Sequence[str] | None = None,
    row: int = 0,
    call: int = -1,
) -> None:
    """Write one head's attention map as a PNG heatmap (queries down, keys across).

    ``maps``: as :func:`capture_attention` yields (or layer name to one (B, H, S_q, S_k)
    tensor); ``call`` picks which forward call's map (default the last), ``row`` the
    batch row. ``tokens`` label the keys and, unless ``query_tokens`` is given (e.g.
    cross-attention), the queries. Needs matplotlib.
    """
    if layer not in maps:
        raise ValueError(f"layer: {layer!r} was not captured; captured: {', '.join(maps)}")
    probs = maps[layer]
    if not isinstance(probs, Tensor):
        if not probs:
            raise ValueError(f"layer: {layer!r} has no captured call (run the model first)")
        if not -len(probs) <= call < len(probs):
            raise ValueError(f"call: {call} out of range for {len(probs)} captured calls")
        probs = probs[call]
    if probs.dim() != 4:
        raise ValueError(f"maps[{layer!r}] must be (B, H, S_q, S_k), got {tuple(probs.shape)}")
    b, h, sq, sk = probs.shape
    if not -b <= row < b:
        raise ValueError(f"row: {row} out of range for batch size {b}")
    if not isinstance(head, int) or not -h <= head < h:
        raise ValueError(f"head: {head!r} out of range for {h} heads")
    query_tokens = tokens if query_tokens is None else query_tokens
    for name, labels, size in (("tokens", tokens, sk), ("query_tokens", query_tokens, sq)):
        if labels is not None and len(labels) != size:
            raise ValueError(f"{name} has {len(labels)} labels for {size} positions")
    try:
        # The Figure API, not pyplot: no global backend switch, no figure left registered.
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "saving attention maps needs matplotlib: pip install 'fastlm[eval]' (or matplotlib)"
        ) from e
    side = max(4.0, 0.3 * max(sq, sk))
    fig = Figure(figsize=(side * sk / max(sq, sk) + 1.5, side * sq / max(sq, sk)))
    ax = fig.subplots()
    image = ax.imshow(
        probs[row, head].detach().float().cpu().numpy(),
        cmap="viridis",
        vmin=0.0,
        vmax=1.0,
        aspect="auto",
    )
    fig.colorbar(image, ax=ax)
    if tokens is not None:
        ax.set_xticks(range(sk), labels=list(tokens), rotation=90, fontsize=8)
    if query_tokens is not None:
        ax.set_yticks(range(sq), labels=list(query_tokens), fontsize=8)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(f"{layer}, head {head % h}")
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")


def token_losses(
    model: GPT,
    tokenizer: Tokenizer,
    text: str,
    max_length: int | None = None,
    stride: int | None = None,
) -> list[tuple[str, float | None]]:
    """Per-token loss attribution: each token of ``text`` with its NLL (nats) under a causal
    model given the tokens before it, None for the first (it has no context). Texts longer
    than the model's positions are scored in sliding windows as :func:`perplexity` does.
    Their mean over the scored tokens is the model's loss on the text."""
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer must be a fastlm Tokenizer, got {type(tokenizer).__name__}")
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError("text encodes to no tokens")
    (nll,) = causal_token_nlls(model, [ids], max_length, stride)
    return [
        (tokenizer.decode([i]), None if math.isnan(v) else v)
        for i, v in zip(ids, nll.tolist(), strict=True)
    ]
