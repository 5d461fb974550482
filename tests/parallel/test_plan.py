"""Reading the tensor-parallel plans the models declare (no process group needed): every
model's plan names what it means to cut, and a model with no plan or a wrong one is refused
with the reason."""

from __future__ import annotations

import pytest
from torch import nn

from fastlm.models import create
from fastlm.parallel.parallelize import read_plan


def test_each_model_plan_names_its_cuts():
    cuts = read_plan(create("llama-tiny", vocab_size=64, num_layers=2))
    assert cuts == {
        "tok_emb": "vocab_embedding",
        "blocks.0.attn": "attention",
        "blocks.0.mlp": "mlp",
        "blocks.1.attn": "attention",
        "blocks.1.mlp": "mlp",
        "lm_head": "vocab_head",
        "to_vocab": "vocab_projection",
    }
    t5 = read_plan(create("t5-tiny", vocab_size=64, num_layers=1))
    assert t5["decoder.blocks.0.cross"] == "attention"
    assert t5["encoder.position_bias.embedding"] == "position_bias_heads"
    assert "encoder.blocks.0.cross" not in t5
    bert = read_plan(create("bert-tiny", vocab_size=64))
    assert bert["head_bias"] == "vocab_bias" and bert["bert.word_emb"] == "vocab_embedding"


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(2, 2)])


def test_a_model_without_a_plan_or_with_a_wrong_one_is_refused():
    with pytest.raises(TypeError, match="declares no tensor-parallel plan"):
        read_plan(_Tiny())
    for plan, message in (
        ({"blocks.*": "diagonal"}, "unknown kind 'diagonal'"),
        ({"block.*": "mlp"}, r"\['block.\*'\] names nothing"),
        ({"blocks.*": "mlp", "blocks.0": "replicate"}, "blocks.0 is both"),
    ):
        planned = type("Planned", (_Tiny,), {"tp_plan": plan})()
        with pytest.raises(ValueError, match=message):
            read_plan(planned)
