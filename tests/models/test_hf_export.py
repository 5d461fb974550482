"""``to_hf(model, tokenizer)`` exports the tokenizer's special-token ids, so Hugging Face
``generate`` on the export stops at fastlm's end of text with fastlm's tokens; and
``hf_tokenizer`` encodes and decodes as fastlm's tokenizer does for each family."""

from __future__ import annotations

import json

import pytest
import torch

from fastlm.data import Tokenizer
from fastlm.models import create
from fastlm.models.hf import hf_tokenizer, to_hf

T = pytest.importorskip("transformers")

TEXTS = [
    "Question: what is the answer?\nA. one\nB. two\nC. three\nD. four\nAnswer: B",
    "The trophy did not fit in the suitcase because the trophy was too big.",
    "Return the number of items in the container; raise an error when it is closed.",
]
NEW = 12


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(TEXTS * 5, 420)


def fastlm_model(name: str, tok: Tokenizer):
    sizes = dict(vocab_size=tok.vocab_size, hidden_size=48, num_layers=2)
    if name == "t5":
        ids = dict(
            pad_token_id=tok.pad_id, eos_token_id=tok.eos_id, decoder_start_token_id=tok.pad_id
        )
        return create("t5-tiny", **sizes, head_dim=12, num_heads=4, dropout=0.0, **ids).eval()
    if name == "bert":
        return create("bert-tiny", **sizes, pad_token_id=tok.pad_id).eval()
    return create(f"{name}-tiny", **sizes, num_heads=4, max_position_embeddings=64).eval()


def prompts(tok: Tokenizer, batch: int = 3, seqlen: int = 7):
    """Left-padded prompts of ordinary (not special) tokens."""
    first = max(tok.special_ids) + 1
    ids = torch.randint(first, tok.vocab_size, (batch, seqlen))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids.masked_fill(mask == 0, tok.pad_id), mask


def fastlm_generate(model, ids, mask, tok):
    return model.generate(
        ids, NEW, attention_mask=mask, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id
    )


@torch.no_grad()
def make_eos_likely(model, ids, mask, tok) -> None:
    """Give EOS the output embedding of the token row 0 generates fourth, scaled up: row 0's
    greedy decoding then ends there (or earlier), well before NEW tokens. (That token's logit
    is the largest of the vocabulary's, so positive: scaling it up makes EOS win.)"""
    out = fastlm_generate(model, ids[:1], mask[:1], tok)
    start = ids.shape[1] if not hasattr(model, "encoder") else 1
    generated = out[0, start:]
    if (generated == tok.eos_id).any():  # this seed's model already stops early
        return
    token = int(generated[3])
    model.lm_head.weight[tok.eos_id] = 1.5 * model.lm_head.weight[token]


def hf_generate(hf, ids, mask):
    # No generation settings passed: transformers reads the export's generation_config.
    return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5"])
def test_hf_generate_on_the_export_stops_at_fastlms_end_of_text(name, tokenizer, tmp_path):
    tok = tokenizer
    model = fastlm_model(name, tok)
    ids, mask = prompts(tok)
    make_eos_likely(model, ids, mask, tok)
    start = ids.shape[1] if name != "t5" else 1
    alone = ids[:1, mask[0].bool()]
    ours_alone = fastlm_generate(model, alone, torch.ones_like(alone), tok)
    assert ours_alone[0, -1] == tok.eos_id and ours_alone.shape[1] - start < NEW, ours_alone
    ours = fastlm_generate(model, ids, mask, tok)
    hf = to_hf(model, tok)
    # Row 0 stops alone; in the batch it is padded with <pad> while the others go on.
    assert hf_generate(hf, alone, torch.ones_like(alone)).tolist() == ours_alone.tolist()
    assert hf_generate(hf, ids, mask).tolist() == ours.tolist()
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    expected = {"eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    extra = {"decoder_start_token_id": tok.pad_id} if name == "t5" else {"bos_token_id": tok.eos_id}
    for field, value in (expected | extra).items():
        assert (config[field], generation[field]) == (value, value), field
    auto = T.AutoModelForSeq2SeqLM if name == "t5" else T.AutoModelForCausalLM
    again = auto.from_pretrained(tmp_path).eval()
    assert hf_generate(again, ids, mask).tolist() == ours.tolist()


def test_without_a_tokenizer_a_gpt_export_claims_no_ids(tokenizer):
    for name in ("gpt2", "llama"):
        config = to_hf(fastlm_model(name, tokenizer)).config
        assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (None,) * 3


def test_a_tokenizer_that_is_not_the_models_is_refused(tokenizer):
    t5 = create("t5-tiny", vocab_size=tokenizer.vocab_size, eos_token_id=1, pad_token_id=2)
    with pytest.raises(
        ValueError, match="the tokenizer's <pad> is 1, the model's pad_token_id is 2"
    ):
        to_hf(t5, tokenizer)
    t5.config.pad_token_id = tokenizer.pad_id
    with pytest.raises(ValueError, match="the tokenizer's <\\|endoftext\\|> is 0, the model's eos"):
        to_hf(t5, tokenizer)
    small = create("gpt2-tiny", vocab_size=300)
    with pytest.raises(ValueError, match="tokenizer has 420 tokens, more than the model's"):
        to_hf(small, tokenizer)
    with pytest.raises(TypeError, match="tokenizer must be a fastlm Tokenizer"):
        to_hf(small, "gpt2")


@pytest.mark.parametrize("name", ["gpt2", "t5", "bert"])
def test_hf_tokenizer_reads_texts_as_fastlms_models_do(name, tokenizer):
    tok = tokenizer
    model = fastlm_model(name, tok)
    theirs = hf_tokenizer(tok, model)
    a, b = "Return the number of items.", "Q: is it <extra_id_3> blue?"
    ids_a, ids_b = tok.encode(a), tok.encode(b)
    single, pair = theirs(a), theirs(a, b)
    if name == "gpt2":
        assert single["input_ids"] == ids_a
    elif name == "t5":
        assert single["input_ids"] == [*ids_a, tok.eos_id]
        assert pair["input_ids"] == [*ids_a, tok.eos_id, *ids_b, tok.eos_id]
    else:
        assert single["input_ids"] == [tok.cls_id, *ids_a, tok.sep_id]
        assert pair["input_ids"] == [tok.cls_id, *ids_a, tok.sep_id, *ids_b, tok.sep_id]
        assert pair["token_type_ids"] == [0] * (len(ids_a) + 2) + [1] * (len(ids_b) + 1)
        assert (theirs.cls_token_id, theirs.mask_token_id) == (tok.cls_id, tok.mask_id)
    assert (theirs.eos_token_id, theirs.pad_token_id) == (tok.eos_id, tok.pad_id)
    assert theirs.decode(ids_b) == tok.decode(ids_b) == b
    # Special tokens drop out as in fastlm's evaluation (and lm-eval's hf models).
    assert theirs.decode(ids_b, skip_special_tokens=True) == "Q: is it  blue?"
