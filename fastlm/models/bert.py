"""BERT: the bidirectional encoder, with masked-LM and sequence-classification heads.

Post-LN blocks as in the original: ``h = norm1(h + attn(h)); h = norm2(h + mlp(h))``, each
norm fused with its residual add. Padding is masked through the attention kernel's additive
bias.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastlm import ops
from fastlm.models.layers import (
    Attention,
    ModelOutput,
    VocabProjection,
    check_positive,
    check_probability,
    init_weights,
    lm_loss,
    make_mlp,
    padding_bias,
)
from fastlm.nn import LayerNorm
from fastlm.nn.mlp import dense_act
from fastlm.ops.activation import check_activation


@dataclasses.dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    activation: str = "gelu"
    norm_eps: float = 1e-12
    dropout: float = 0.1  # embeddings and residual branches
    attention_dropout: float = 0.1
    num_labels: int = 2  # sequence classification; 1 is regression (MSE)
    pad_token_id: int = 0
    initializer_range: float = 0.02
    head_dim: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
            "num_labels",
        ):
            check_positive(name, getattr(self, name))
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        check_activation(self.activation)
        check_probability("dropout", self.dropout)
        check_probability("attention_dropout", self.attention_dropout)
        self.head_dim = self.hidden_size // self.num_heads


class BertBlock(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.attn = Attention(
            c.hidden_size,
            c.num_heads,
            c.head_dim,
            num_kv_heads=c.num_heads,
            bias=True,
            dropout=c.attention_dropout,
        )
        self.norm1 = LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.mlp = make_mlp(
            c.hidden_size, c.intermediate_size, c.activation, gated=False, bias=True, dropout=0.0
        )
        self.norm2 = LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.dropout = c.dropout

    def forward(self, h: Tensor, bias: Tensor | None) -> Tensor:
        p = self.dropout if self.training else 0.0
        h, _ = self.norm1(F.dropout(self.attn(h, bias=bias), p, self.training), residual=h)
        h, _ = self.norm2(F.dropout(self.mlp(h), p, self.training), residual=h)
        return h


class BertModel(nn.Module):
    """The encoder. ``forward(input_ids, attention_mask=None, token_type_ids=None,
    position_ids=None)`` returns ``(hidden_states (B, S, hidden), pooled (B, hidden))``;
    attention_mask (B, S) is 1 for tokens and 0 for padding."""

    # How fastlm.parallel may cut it (module names, "*" one part of a name; anything not
    # named stays whole on every rank), and the stacks of blocks (sequence parallelism and
    # activation checkpointing act on them).
    tp_plan = {
        "blocks.*.attn": "attention",
        "blocks.*.mlp": "mlp",
        "word_emb": "vocab_embedding",
        "pooler": "replicate",
    }
    block_stacks = ("blocks",)

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        c = self.config = config
        self.word_emb = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.pos_emb = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.type_emb = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.emb_norm = LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.blocks = nn.ModuleList(BertBlock(c) for _ in range(c.num_layers))
        self.pooler = nn.Linear(c.hidden_size, c.hidden_size)
        init_weights(self, c.initializer_range)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        h = self.word_emb(input_ids) + self.type_emb(token_type_ids) + self.pos_emb(position_ids)
        h = F.dropout(
            self.emb_norm(h), self.config.dropout if self.training else 0.0, self.training
        )
        bias = padding_bias(attention_mask, h.dtype)
        for block in self.blocks:
            h = block(h, bias=bias)
        return h, torch.tanh(self.pooler(h[:, 0]))


def _encoder_plan(**heads: str) -> dict[str, str]:
    """The encoder's plan seen from a model holding it as ``bert``, with the ``heads``'
    entries."""
    return {f"bert.{name}": kind for name, kind in BertModel.tp_plan.items()} | heads


class BertForMaskedLM(nn.Module):
    """BERT with the masked-LM head (dense, activation, LayerNorm, then the decoder tied to
    the word embeddings, plus a bias). With ``labels`` (B, S; -100 where not masked) the loss
    is computed on the masked positions only, by the fused linear cross-entropy."""

    tp_plan = _encoder_plan(
        head_dense="replicate",
        head_norm="replicate",
        head_bias="vocab_bias",
        to_vocab="vocab_projection",
    )
    block_stacks = ("bert.blocks",)

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        c = self.config = config
        self.bert = BertModel(c)
        self.head_dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.head_norm = LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.head_bias = nn.Parameter(torch.zeros(c.vocab_size))
        self.to_vocab = VocabProjection()
        for head in (self.head_dense, self.head_norm):  # the encoder initialized itself
            init_weights(head, c.initializer_range)

    @property
    def decoder_weight(self) -> Tensor:
        return self.bert.word_emb.weight

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
        position_ids: Tensor | None = None,
        return_logits: bool | None = None,
    ) -> ModelOutput:
        h, _ = self.bert(input_ids, attention_mask, token_type_ids, position_ids)
        h = self.head_norm(dense_act(self.head_dense, h, self.config.activation))
        loss = None
        if labels is not None:
            loss = lm_loss(self.to_vocab, h, labels, self.decoder_weight, self.head_bias)
        want_logits = labels is None if return_logits is None else return_logits
        logits = (
            self.to_vocab.logits(h, self.decoder_weight, self.head_bias) if want_logits else None
        )
        return ModelOutput(logits=logits, loss=loss, hidden_states=h)


class BertForSequenceClassification(nn.Module):
    """BERT with a classifier on the pooled [CLS] state: cross-entropy for ``num_labels`` >
    1, mean squared error for 1 (regression), as Hugging Face's."""

    tp_plan = _encoder_plan(classifier="replicate")
    block_stacks = ("bert.blocks",)

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        c = self.config = config
        self.bert = BertModel(c)
        self.classifier = nn.Linear(c.hidden_size, c.num_labels)
        init_weights(self.classifier, c.initializer_range)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> ModelOutput:
        _, pooled = self.bert(input_ids, attention_mask, token_type_ids, position_ids)
        p = self.config.dropout if self.training else 0.0
        logits = self.classifier(F.dropout(pooled, p, self.training))
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = ops.cross_entropy(logits.float(), labels)
        return ModelOutput(logits=logits, loss=loss, hidden_states=pooled)
