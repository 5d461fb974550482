"""Prompt tuning (Lester et al. 2021): a trainable soft prompt of ``num_virtual_tokens``
embeddings prepended to the input embeddings of a frozen decoder-only or encoder model.

fastlm's models take token ids, not embeddings, so the prompt goes in through the token
embedding itself, with no change to any model: :class:`PromptTuning` prepends
``num_virtual_tokens`` placeholder ids to ``input_ids`` (so positions, masks and sequence
lengths all see the longer sequence) and, for the duration of that one forward, a forward
hook on the token-embedding module replaces the placeholders' embedding rows by the prompt.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

INITS = ("random", "vocab")


def _find_embedding(model: nn.Module) -> nn.Embedding:
    """The token embedding of fastlm's GPT (``tok_emb``) or BERT (``bert.word_emb``), or a
    Hugging Face model's ``get_input_embeddings()``."""
    if isinstance(getattr(model, "tok_emb", None), nn.Embedding):
        return model.tok_emb
    bert = getattr(model, "bert", None)
    if isinstance(getattr(bert, "word_emb", None), nn.Embedding):
        return bert.word_emb
    if callable(getattr(model, "get_input_embeddings", None)):
        embedding = model.get_input_embeddings()
        if isinstance(embedding, nn.Embedding):
            return embedding
    raise ValueError(
        f"{type(model).__name__} is not supported: no token embedding found "
        f"(tok_emb, bert.word_emb or get_input_embeddings()); "
        f"pass embedding="
    )


class PromptTuning(nn.Module):
    """``model`` (frozen) with a trainable soft prompt ``prompt`` (num_virtual_tokens,
    hidden) before every sequence.

    Args:
        model: a decoder-only or encoder model whose ``forward`` takes ``input_ids``,
            ``attention_mask`` and ``labels``: fastlm's :class:`~fastlm.models.GPT` and
            BERT models, Hugging Face causal/masked LMs. Encoder-decoder models (a forward
            with ``decoder_input_ids``) are rejected. Its parameters are frozen.
        num_virtual_tokens: P, the prompt length.
        init: ``"random"``: N(0, std of the embedding's weights), the embedding's own
            scale; ``"vocab"``: rows of the embedding drawn uniformly at random (with
            replacement), PEFT's ``PromptTuningInit.SAMPLE_VOCAB``.
        embedding: the model's token embedding (an ``nn.Embedding`` inside ``model``);
            None finds it (see :func:`_find_embedding`).

    The sequence the model sees is P + S long; where the model has learned positions
    (``config.max_position_embeddings``), P + S must fit.
    """

    def __init__(
        self,
        model: nn.Module,
        num_virtual_tokens: int,
        init: str = "random",
        embedding: nn.Embedding | None = None,
    ) -> None:
        super().__init__()
        if (
            isinstance(num_virtual_tokens, bool)
            or not isinstance(num_virtual_tokens, int)
            or num_virtual_tokens < 1
        ):
            raise ValueError(
                f"num_virtual_tokens must be a positive int, got {num_virtual_tokens!r}"
            )
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        params = inspect.signature(model.forward).parameters
        missing = [n for n in ("input_ids", "attention_mask", "labels") if n not in params]
        if missing:
            raise ValueError(
                f"{type(model).__name__} is not supported: its forward takes no "
                f"{', '.join(missing)}"
            )
        if "decoder_input_ids" in params:
            raise ValueError(
                f"{type(model).__name__} is not supported: encoder-decoder models "
                f"embed their decoder inputs with the same table"
            )
        if embedding is None:
            embedding = _find_embedding(model)
        elif not isinstance(embedding, nn.Embedding):
            raise TypeError(f"embedding must be an nn.Embedding, got {type(embedding).__name__}")
        # Kept by name, not as a child: as a child its weight would appear twice in the
        # state dict.
        self.embedding_name = next((n for n, m in model.named_modules() if m is embedding), None)
        if self.embedding_name is None:
            raise ValueError(f"embedding is not a submodule of {type(model).__name__}")
        self.max_positions = getattr(
            getattr(model, "config", None), "max_position_embeddings", None
        )
        if self.max_positions is not None and num_virtual_tokens >= self.max_positions:
            raise ValueError(
                f"num_virtual_tokens {num_virtual_tokens} leaves no room in the "
                f"model's {self.max_positions} positions"
            )
        self.model = model.requires_grad_(False)
        self.num_virtual_tokens = num_virtual_tokens
        weight = embedding.weight.detach()
        if init == "vocab":
            rows = torch.randint(0, weight.shape[0], (num_virtual_tokens,), device=weight.device)
            prompt = weight[rows].clone()
        else:
            prompt = torch.randn(num_virtual_tokens, weight.shape[1], device=weight.device)
            prompt = (prompt * weight.float().std()).to(weight.dtype)
        self.prompt = nn.Parameter(prompt)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        **kwargs,
    ) -> object:
        """input_ids (B, S); attention_mask (B, S), 1 for tokens and 0 for padding (the
        virtual tokens are always attended); labels as the model takes them: (B, S) labels
        get -100 (ignored) on the virtual tokens, other shapes (a classifier's (B,)) pass
        unchanged. ``token_type_ids`` (B, S) get 0 and ``position_ids`` (B, S) are shifted
        by P after positions 0..P-1; other ``kwargs`` go to the model unchanged.

        A causal LM shifts its labels inside, so the first real token, which the model
        alone never predicts, is predicted from the prompt (as in PEFT). Returns the
        model's output with the virtual positions removed from ``logits`` and
        ``hidden_states`` (B, S, ...): only the real tokens' rows.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seqlen), got {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        p = self.num_virtual_tokens
        if self.max_positions is not None and p + s > self.max_positions:
            raise ValueError(
                f"{p} virtual + {s} input tokens exceed the model's {self.max_positions} positions"
            )

        def prepend(name: str, fill: int, x: Tensor) -> Tensor:
            if tuple(x.shape) != (b, s):
                raise ValueError(f"{name} must be ({b}, {s}) like input_ids, got {tuple(x.shape)}")
            return torch.cat([x.new_full((b, p), fill), x], dim=1)

        ids = prepend("input_ids", 0, input_ids)  # placeholders: their embeddings are replaced
        if attention_mask is not None:
            attention_mask = prepend("attention_mask", 1, attention_mask)
        if labels is not None and labels.shape == input_ids.shape:
            labels = prepend("labels", -100, labels)
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = prepend("token_type_ids", 0, kwargs["token_type_ids"])
        if kwargs.get("position_ids") is not None:
            positions = prepend("position_ids", 0, kwargs["position_ids"]) + p
            positions[:, :p] = torch.arange(p, device=positions.device)
            kwargs["position_ids"] = positions
        calls = []

        def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            # A second call would embed something else (a decoder's inputs, say) and get the
            # prompt too: refuse rather than compute silently wrong numbers.
            if calls or tuple(out.shape[:2]) != (b, p + s):
                raise ValueError(
                    f"the embedding {self.embedding_name} was called on other "
                    f"inputs in the same forward: unsupported model"
                )
            calls.append(True)
            return torch.cat([self.prompt.to(out.dtype).expand(b, p, -1), out[:, p:]], dim=1)

        handle = self.model.get_submodule(self.embedding_name).register_forward_hook(hook)
        try:
            out = self.model(ids, attention_mask=attention_mask, labels=labels, **kwargs)
        finally:
            handle.remove()
        return self._strip(out, p + s)

    def _strip(self, out: object, length: int) -> object:
        """``out`` with the virtual positions cut from its (B, P + S, ...) ``logits`` and
        ``hidden_states`` (fastlm's ModelOutput or Hugging Face's; a tuple of per-layer
        states too); other fields, and 2-D logits (a classifier's), stay as they are."""

        def strip(x):
            if isinstance(x, Tensor) and x.dim() == 3 and x.shape[1] == length:
                return x[:, self.num_virtual_tokens :]
            if isinstance(x, tuple):
                return tuple(strip(t) for t in x)
            return x

        for field in ("logits", "hidden_states"):
            if getattr(out, field, None) is not None:
                setattr(out, field, strip(getattr(out, field)))
        return out

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, embedding={self.embedding_name!r}"


__all__ = ["PromptTuning"]
