"""``fastlm finetune``: GLUE-style fine-tuning on synthetic, separable tasks (a keyword in a
sentence; which sentence of a pair holds it; how often it occurs, for regression), the
reported scores recomputed here from the saved predictions, encoders taken from fastlm and
Hugging Face checkpoints, pair encoding against Hugging Face's tokenizers, and bad input.

Validation labels are corrupted on purpose (a tenth of them replaced by a wrong label), so
even a perfect model scores about 0.9 and the recomputed accuracy, F1 and Matthews
correlation are not all trivially 1.
"""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import safetensors.torch
import tokenizers
import torch

from fastlm import cli
from fastlm.data import glue
from fastlm.eval import metrics
from fastlm.testing import assert_policy
from fastlm.train import finetune as ft
from fastlm.train import latest_checkpoint

# Common English words: every sentence is made of them, plus the keyword.
_COMMON = """the a of to and in is it for on with as was at by an be this from or have not are
but had they his her she he you we one all there their what so up out if about who get which go
me when make can like time no just him know take people into year your good some could them see
other than then now look only come its over think also back after use two how our work first
well way even new want because any these give day most us"""
FILLER = _COMMON.split()
KEY = "excellent"
NOISE = 0.1  # share of validation labels replaced by a wrong one
# Seeded by the test, not the autouse fresh seed: the data, and so the thresholds' margins,
# are the same on every run.
SEED = 1234


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on matrices this small a second one mostly waits, and on a
    busy machine it multiplies the run time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _words(rng: random.Random, lo: int = 4, hi: int = 8) -> list[str]:
    return [rng.choice(FILLER) for _ in range(rng.randint(lo, hi))]


def _with_key(rng: random.Random, words: list[str], times: int = 1) -> list[str]:
    for _ in range(times):
        words.insert(rng.randrange(len(words) + 1), KEY)
    return words


def keyword_task(rng: random.Random, n: int) -> list[tuple[str, int]]:
    """Single sentences; label 1 when the keyword occurs (half of them)."""
    rows = []
    for _ in range(n):
        label = rng.random() < 0.5
        words = _words(rng)
        rows.append((" ".join(_with_key(rng, words) if label else words), int(label)))
    return rows


def segment_task(rng: random.Random, n: int) -> list[tuple[str, str, str]]:
    """Pairs; the label says which sentence holds the keyword ("first", "second", "none"):
    only token types and the separator tell the two sentences apart."""
    rows = []
    for _ in range(n):
        where = rng.choice(["first", "second", "none"])
        a, b = _words(rng), _words(rng)
        if where != "none":
            _with_key(rng, a if where == "first" else b)
        rows.append((" ".join(a), " ".join(b), where))
    return rows


def corrupt(rng: random.Random, labels: list, names: list) -> list:
    return [rng.choice([n for n in names if n != y]) if rng.random() < NOISE else y for y in labels]


def write_tsv(path, header, rows):
    path.write_text("\n".join("\t".join(map(str, r)) for r in [header, *rows]) + "\n")
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- scores recomputed here, from their definitions ------------------------------------------


def f1_of(gold, predicted, cls):
    tp = sum(g == cls and p == cls for g, p in zip(gold, predicted, strict=True))
    fp = sum(g != cls and p == cls for g, p in zip(gold, predicted, strict=True))
    fn = sum(g == cls and p != cls for g, p in zip(gold, predicted, strict=True))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def mcc_of(gold, predicted, classes):
    """Matthews correlation as the correlation of the one-hot gold and predicted label
    vectors (Gorodkin's R_K); for two classes (TP*TN - FP*FN) / sqrt(...)."""
    x = torch.tensor([[float(p == c) for c in classes] for p in predicted], dtype=torch.float64)
    y = torch.tensor([[float(g == c) for c in classes] for g in gold], dtype=torch.float64)
    x, y = x - x.mean(0), y - y.mean(0)
    return float((x * y).sum() / ((x * x).sum() * (y * y).sum()).sqrt())


def pearson_of(x, y):
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def ranks_of(x):
    """1-based ranks, ties given the mean of the positions they span."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks, i = [0.0] * len(x), 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


# -- pieces ----------------------------------------------------------------------------------


def test_pair_truncation_matches_the_tokenizers_library():
    """Every (a, b, budget) up to 13 tokens, against ``tokenizers``' own longest-first
    truncation of a pair (one word, one token)."""
    vocab = {"[UNK]": 0, "a": 1, "b": 2}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    for budget in range(1, 14):
        tok.enable_truncation(budget, strategy="longest_first")
        for a in range(14):
            for b in range(14):
                ids = tok.encode(" ".join("a" * a), " ".join("b" * b)).ids
                assert glue.truncated_lengths(a, b, budget) == (ids.count(1), ids.count(2))


def test_labels_are_numbered_in_a_stable_order(tmp_path):
    def task(labels):
        return glue.GlueTask.from_examples(
            [glue.GlueExample(i, ("x",), y) for i, y in enumerate(labels)], regression=False
        )

    assert task(["10", "2", "-1", "2"]).labels == ("-1", "2", "10")  # numbers by value
    assert task(["neutral", "entailment", "contradiction"]).labels == (
        "contradiction",
        "entailment",
        "neutral",
    )
    t = task(["b", "a"])
    t.save(tmp_path / "labels.json")
    assert glue.GlueTask.load(tmp_path / "labels.json") == t
    assert glue.GlueTask.from_examples([], regression=True).num_labels == 1


def test_correlations_against_their_definitions():
    x = [1.0, 2.0, 2.0, 3.0, 7.5, -1.0]
    y = [0.5, 3.0, 2.0, 4.0, 4.0, 0.0]
    assert metrics.pearson(x, y) == pytest.approx(pearson_of(x, y), abs=1e-12)
    assert metrics.spearman(x, y) == pytest.approx(pearson_of(ranks_of(x), ranks_of(y)), abs=1e-12)
    assert metrics.spearman(x, [v**3 for v in x]) == pytest.approx(1.0)
    assert math.isnan(metrics.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))  # undefined, not 0


def test_glue_columns_by_name(tmp_path):
    """MRPC's layout (a byte-order mark, columns named with spaces and '#', quotes that are
    text) and CoLA's header-less one, by column number."""
    mrpc = tmp_path / "mrpc.tsv"
    mrpc.write_text(
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        '1\t702876\t702977\tHe said "yes".\tHe said yes.\n'
        "\n"
        "0\t2108705\t2108831\tOne\tTwo\n",
        encoding="utf-8",
    )
    examples = glue.read_examples(mrpc, ["#1 String", "#2 String"], "Quality")
    assert [(e.line, e.texts, e.label) for e in examples] == [
        (2, ('He said "yes".', "He said yes."), "1"),
        (4, ("One", "Two"), "0"),
    ]
    cola = write_tsv(
        tmp_path / "cola.tsv",
        ["gj04", "1", "", "Our friends won't buy this."],
        [["gj04", "0", "*", "They drank the pub."]],
    )
    examples = glue.read_examples(cola, ["3"], "1", header=False)
    assert [(e.texts, e.label) for e in examples] == [
        (("Our friends won't buy this.",), "1"),
        (("They drank the pub.",), "0"),
    ]


# -- fine-tuning from scratch ----------------------------------------------------------------


def finetune(capsys, *args):
    code = cli.main(["finetune", *args, "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_single_sentences_from_a_tsv(tmp_path, capsys):
    """Keyword detection, fine-tuned from scratch for 60 steps. A model that learned
    nothing scores about 0.5 on the 200 validation examples (standard deviation 0.035); a
    perfect one about 0.9 (the corrupted tenth): 0.75 is 7 deviations above chance and 0.15
    below what the task allows."""
    rng = random.Random(SEED)
    train, val = keyword_task(rng, 480), keyword_task(rng, 200)
    gold = corrupt(rng, [y for _, y in val], [0, 1])
    write_tsv(tmp_path / "train.tsv", ["sentence", "label"], train)
    write_tsv(
        tmp_path / "dev.tsv",
        ["sentence", "label"],
        [(s, y) for (s, _), y in zip(val, gold, strict=True)],
    )
    out_dir = tmp_path / "run"
    printed = finetune(
        capsys,
        "--train",
        str(tmp_path / "train.tsv"),
        "--validation",
        str(tmp_path / "dev.tsv"),
        "--model",
        "bert-tiny",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--vocab-size",
        "1000",
        "--out-dir",
        str(out_dir),
    )
    results = json.loads((out_dir / "results.json").read_text())
    predictions = read_jsonl(out_dir / "predictions.jsonl")
    assert [p["line"] for p in predictions] == list(range(2, 202))
    assert [p["label"] for p in predictions] == [str(y) for y in gold]
    labels, predicted = [p["label"] for p in predictions], [p["prediction"] for p in predictions]
    m = results["metrics"]
    assert results["labels"] == ["0", "1"] and results["positive_label"] == "1"
    assert m["accuracy"] > 0.75
    assert m["accuracy"] == pytest.approx(
        sum(a == b for a, b in zip(labels, predicted, strict=True)) / 200, abs=1e-12
    )
    assert m["f1"] == pytest.approx(f1_of(labels, predicted, "1"), abs=1e-12)
    assert m["matthews_corrcoef"] == pytest.approx(mcc_of(labels, predicted, ["0", "1"]), abs=1e-12)
    assert "f1 (binary, positive '1')" in printed and f"{m['accuracy']:.4f}" in printed
    # A classifier's validation lines give its scores; perplexity means nothing here.
    assert "step 30: validation accuracy " in printed and "perplexity" not in printed
    # A validation pass after each epoch of 30 steps, logged with the training metrics.
    logged = [r for r in read_jsonl(out_dir / "metrics.jsonl") if "val_accuracy" in r]
    assert [r["step"] for r in logged] == [30, 60]
    assert logged[-1]["val_accuracy"] == m["accuracy"]
    # The checkpoint predicts the same, loaded afresh; its encoder can start another task.
    model, tokenizer, task = ft.load_classifier(out_dir)
    assert task.labels == ("0", "1")
    data = glue.ClassificationDataset(
        glue.encode(tokenizer, [(s,) for s, _ in val], 128), torch.zeros(200)
    )
    again = [task.labels[i] for i in ft.predict(model, data).argmax(-1).tolist()]
    assert again == predicted
    encoder, _ = ft.pretrained_encoder(out_dir)
    for key, t in model.bert.state_dict().items():
        assert torch.equal(encoder.state_dict()[key], t), key


def test_sentence_pairs_from_a_jsonl_file(tmp_path, capsys):
    """Three string labels that only the segments tell apart; macro F1. Chance is 1/3; a
    perfect model scores about 0.9: the threshold 0.75 leaves both margins wide."""
    rng = random.Random(SEED)
    names = ["first", "none", "second"]
    train, val = segment_task(rng, 480), segment_task(rng, 200)
    gold = corrupt(rng, [y for *_, y in val], names)
    write_jsonl(tmp_path / "train.jsonl", [{"s1": a, "s2": b, "where": y} for a, b, y in train])
    dev = [(a, b, y) for (a, b, _), y in zip(val, gold, strict=True)]
    write_jsonl(tmp_path / "dev.jsonl", [{"s1": a, "s2": b, "where": y} for a, b, y in dev])
    out_dir = tmp_path / "run"
    printed = finetune(
        capsys,
        "--train",
        str(tmp_path / "train.jsonl"),
        "--validation",
        str(tmp_path / "dev.jsonl"),
        "--text-fields",
        "s1,s2",
        "--label-field",
        "where",
        "--model",
        "bert-tiny",
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--vocab-size",
        "1000",
        "--out-dir",
        str(out_dir),
    )
    results = json.loads((out_dir / "results.json").read_text())
    assert results["labels"] == names and results["f1_average"] == "macro"
    predictions = read_jsonl(out_dir / "predictions.jsonl")
    labels, predicted = [p["label"] for p in predictions], [p["prediction"] for p in predictions]
    assert labels == gold
    m = results["metrics"]
    assert m["accuracy"] > 0.75
    assert m["f1"] == pytest.approx(sum(f1_of(labels, predicted, c) for c in names) / 3, abs=1e-12)
    assert m["matthews_corrcoef"] == pytest.approx(mcc_of(labels, predicted, names), abs=1e-12)
    assert "f1 (macro)" in printed


def test_regression(tmp_path, capsys):
    """STS-B style: the label is 2.5 x how often the keyword occurs (0, 1 or 2); scored by
    Pearson and Spearman correlation, recomputed here. A model that learned nothing
    correlates about 0 (+-0.07 on 200 examples); 0.5 is 7 deviations above that (and
    ~0.35 below what these 60 steps reach)."""
    rng = random.Random(SEED)

    def rows(n):
        out = []
        for _ in range(n):
            k = rng.randint(0, 2)
            out.append((" ".join(_with_key(rng, _words(rng), k)), f"{2.5 * k:.3f}"))
        return out

    write_tsv(tmp_path / "train.tsv", ["sentence", "score"], rows(480))
    write_tsv(tmp_path / "dev.tsv", ["sentence", "score"], rows(200))
    out_dir = tmp_path / "run"
    printed = finetune(
        capsys,
        "--train",
        str(tmp_path / "train.tsv"),
        "--validation",
        str(tmp_path / "dev.tsv"),
        "--label-field",
        "score",
        "--regression",
        "--model",
        "bert-tiny",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--lr",
        "2e-3",
        "--vocab-size",
        "1000",
        "--out-dir",
        str(out_dir),
    )
    results = json.loads((out_dir / "results.json").read_text())
    predictions = read_jsonl(out_dir / "predictions.jsonl")
    labels, predicted = [p["label"] for p in predictions], [p["prediction"] for p in predictions]
    assert results["task"] == "regression" and set(labels) == {0.0, 2.5, 5.0}
    m = results["metrics"]
    assert m["pearson"] > 0.5
    assert m["pearson"] == pytest.approx(pearson_of(predicted, labels), abs=1e-9)
    assert m["spearman"] == pytest.approx(
        pearson_of(ranks_of(predicted), ranks_of(labels)), abs=1e-9
    )
    assert "pearson" in printed and "accuracy" not in printed
    model, _, task = ft.load_classifier(out_dir)
    assert task.regression and model.config.num_labels == 1


# -- pretrained encoders ---------------------------------------------------------------------


def small_pair_files(tmp_path, n_train=64):
    rng = random.Random(SEED)
    for name, n in (("train", n_train), ("dev", 24)):
        write_tsv(
            tmp_path / f"{name}.tsv", ["sentence1", "sentence2", "label"], segment_task(rng, n)
        )
    return [
        "--train",
        str(tmp_path / "train.tsv"),
        "--validation",
        str(tmp_path / "dev.tsv"),
        "--text-fields",
        "sentence1,sentence2",
        "--batch-size",
        "16",
        "--epochs",
        "1",
        "--max-length",
        "32",
    ]


def assert_fresh_classifier(model, num_labels):
    """Initialized as BERT's: normal(0, initializer_range) weights, zero bias."""
    w, b = model.classifier.weight, model.classifier.bias
    assert w.shape == (num_labels, model.config.hidden_size)
    assert torch.all(b == 0) and 0.5 < w.std().item() / model.config.initializer_range < 1.5


def test_from_a_fastlm_bert_checkpoint(tmp_path, capsys):
    rng = random.Random(SEED)
    docs = [" ".join(" ".join(_words(rng)) + "." for _ in range(4)) for _ in range(120)]
    write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    tiny = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
    assert (
        cli.main(
            [
                "train",
                "--model",
                "bert",
                "--model-overrides",
                json.dumps(tiny),
                "--data",
                str(tmp_path / "docs.jsonl"),
                "--vocab-size",
                "400",
                "--seq-len",
                "32",
                "--batch-size",
                "4",
                "--max-steps",
                "2",
                "--warmup-steps",
                "1",
                "--eval-batches",
                "1",
                "--no-progress",
                "--out-dir",
                str(tmp_path / "mlm"),
            ]
        )
        == 0
    )
    saved = safetensors.torch.load_file(
        latest_checkpoint(tmp_path / "mlm" / "checkpoints") / "model.safetensors"
    )
    encoder, tokenizer = ft.pretrained_encoder(tmp_path / "mlm")
    model = ft.classifier_from(encoder, 3)
    copied = model.bert.state_dict()
    assert copied.keys() == {k[len("bert.") :] for k in saved if k.startswith("bert.")}
    for key, t in copied.items():
        assert torch.equal(t, saved[f"bert.{key}"]), key
    assert_fresh_classifier(model, 3)
    capsys.readouterr()
    out_dir = tmp_path / "ft"
    finetune(
        capsys,
        *small_pair_files(tmp_path),
        "--init",
        str(tmp_path / "mlm"),
        "--out-dir",
        str(out_dir),
    )
    tuned, tuned_tokenizer, task = ft.load_classifier(out_dir)
    assert task.labels == ("first", "none", "second")
    assert tuned.config.hidden_size == 32 and tuned_tokenizer.vocab_size == tokenizer.vocab_size


@pytest.fixture
def hf_bert_dir(tmp_path):
    """A tiny transformers ``BertModel`` saved as Hugging Face does (safetensors, bare
    encoder keys) with a WordPiece ``tokenizer.json`` (and ``vocab.txt``) of the task's
    words."""
    T = pytest.importorskip("transformers")
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *dict.fromkeys(FILLER),
        KEY,
        "##s",
        ".",
        ",",
    ]
    config = T.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    hf = T.BertModel(config).eval()
    path = tmp_path / "hf"
    hf.save_pretrained(path)
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]")
    )
    tok.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    tok.add_special_tokens(vocab[:5])
    tok.save(str(path / "tokenizer.json"))
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return path, hf, T


def test_from_a_hugging_face_bert_directory(hf_bert_dir, tmp_path, capsys):
    path, hf, _ = hf_bert_dir
    encoder, _ = ft.pretrained_encoder(path)
    model = ft.classifier_from(encoder, 2).eval()
    ids = torch.randint(5, hf.config.vocab_size, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    types = (torch.arange(9) >= 5).long().expand(3, 9)
    hidden, pooled = model.bert(ids, mask, types)
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    theirs, ref = hf(**inputs), copy.deepcopy(hf).double()(**inputs)
    # Against transformers in float64, with transformers in float32 as PyTorch's own result.
    valid = mask.bool()
    states = (t.last_hidden_state[valid] for t in (ref, theirs))
    assert_policy(hidden[valid], *states, "hidden states")
    assert_policy(pooled, ref.pooler_output, theirs.pooler_output, "pooled")
    assert_fresh_classifier(model, 2)
    out_dir = tmp_path / "ft"
    finetune(capsys, *small_pair_files(tmp_path), "--init", str(path), "--out-dir", str(out_dir))
    assert (
        cli.main(
            ["finetune", *small_pair_files(tmp_path), "--init", str(path), "--max-length", "65"]
        )
        == 1
    )
    assert "max_length 65 exceeds the model's 64 positions" in capsys.readouterr().err
    _, tokenizer, _ = ft.load_classifier(out_dir)
    assert tokenizer.token_id("[CLS]") == 2


def test_a_bert_pre_training_checkpoint_gives_its_encoder_and_pooler(hf_bert_dir, tmp_path):
    """How BERT checkpoints are published (``BertForPreTraining``): the encoder and its
    trained pooler load; the next-sentence head, which fine-tuning does not use, is left
    out with a warning naming it."""
    path, hf, T = hf_bert_dir
    pre = T.BertForPreTraining(hf.config).eval()
    pre.save_pretrained(tmp_path / "pre")
    (tmp_path / "pre" / "tokenizer.json").write_bytes((path / "tokenizer.json").read_bytes())
    with pytest.warns(UserWarning, match=r"ignored 2 tensors \(cls\.seq_relationship"):
        encoder, _ = ft.pretrained_encoder(tmp_path / "pre")
    ids = torch.randint(5, hf.config.vocab_size, (3, 9))
    hidden, pooled = encoder(ids)
    theirs = pre.bert(ids)
    for got, want in ((hidden, theirs.last_hidden_state), (pooled, theirs.pooler_output)):
        # fp32 epsilon times the longest reduction (the 64-wide intermediate layer).
        bound = torch.finfo(torch.float32).eps * 64 * want.abs().max().item()
        err = (got - want).abs().max().item()
        assert err <= bound, f"max |fastlm - transformers| = {err:.3g} > {bound:.3g}"


def test_pairs_encode_as_hugging_faces_bert_tokenizer(hf_bert_dir, tmp_path):
    """``[CLS] a [SEP] b [SEP]``, token types and longest-first truncation, through the
    directory's ``tokenizer.json`` and through its ``vocab.txt`` alone, against
    transformers' ``BertTokenizer`` (lowercasing, punctuation split, unknown words)."""
    path, _, T = hf_bert_dir
    reference = T.BertTokenizer(str(path / "vocab.txt"))
    rng = random.Random(SEED)
    pairs = [
        (" ".join(_words(rng, 1, 12)).capitalize() + ", Zebras.", " ".join(_words(rng, 1, 12)))
        for _ in range(40)
    ]
    vocab_only = tmp_path / "vocab_only"  # as the slow tokenizer saves a model directory
    vocab_only.mkdir()
    for name in ("config.json", "model.safetensors", "vocab.txt"):
        (vocab_only / name).write_bytes((path / name).read_bytes())
    (vocab_only / "tokenizer_config.json").write_text('{"do_lower_case": true}')
    for tokenizer in (ft.pretrained_encoder(path)[1], ft.pretrained_encoder(vocab_only)[1]):
        for max_length in (8, 13, 64):
            got = glue.encode(tokenizer, pairs, max_length)
            for i, (a, b) in enumerate(pairs):
                want = reference(a, b, truncation="longest_first", max_length=max_length)
                n = int(got["attention_mask"][i].sum())
                assert got["input_ids"][i, :n].tolist() == want["input_ids"]
                assert got["token_type_ids"][i, :n].tolist() == want["token_type_ids"]
                assert torch.all(got["input_ids"][i, n:] == 0)  # [PAD]


# -- bad input -------------------------------------------------------------------------------


def test_a_training_file_smaller_than_a_batch_trains_on_what_there_is(tmp_path, capsys):
    rows = [("good film", "pos"), ("bad film", "neg")] * 8
    train = write_tsv(tmp_path / "train.tsv", ["sentence", "label"], rows)
    printed = finetune(
        capsys,
        "--train",
        str(train),
        "--validation",
        str(train),
        "--model",
        "bert-tiny",
        "--vocab-size",
        "400",
        "--out-dir",
        str(tmp_path / "out"),
    )
    assert "holds 16 examples, fewer than --batch-size 32: batches of 16" in printed
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["steps"] == 3 and results["num_train"] == 16  # 3 epochs of one batch


def test_bad_input_fails_with_a_message(tmp_path, capsys):
    train = write_tsv(
        tmp_path / "train.tsv",
        ["sentence", "label"],
        [("good film", "pos"), ("bad film", "neg")] * 8,
    )
    dev = write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], [("fine film", "meh")])
    csv = tmp_path / "train.csv"
    csv.write_text(train.read_text())
    empty = tmp_path / "empty.tsv"
    empty.write_text("sentence\tlabel\n")
    records = [{"sentence": "ok", "label": "pos"}, {"text": "no sentence", "label": "neg"}]
    jsonl = write_jsonl(tmp_path / "dev.jsonl", records)
    base = [
        "--model",
        "bert-tiny",
        "--batch-size",
        "4",
        "--vocab-size",
        "400",
        "--out-dir",
        str(tmp_path / "out"),
        "--no-progress",
    ]
    cases = [
        (
            [str(train), str(dev), "--text-fields", "sentence1,sentence2"],
            "has no column 'sentence1', 'sentence2'; its columns: 'sentence', 'label'",
        ),
        ([str(train), str(dev), "--label-field", "gold"], "has no column 'gold'"),
        ([str(train), str(empty)], "empty.tsv holds no examples"),
        (
            [str(train), str(dev)],
            "dev.tsv:2: label 'meh' does not occur in the training file (its labels: 'neg', 'pos')",
        ),
        ([str(train), str(jsonl)], "dev.jsonl:2: no field 'sentence'"),
        ([str(train), str(tmp_path / "missing.tsv")], "missing.tsv does not exist"),
        ([str(train), str(csv)], "train.csv: the data format is told by the suffix"),
        ([str(train), str(train), "--regression"], "label 'pos' is not a finite number"),
        (
            [str(train), str(train), "--positive-label", "maybe"],
            "positive_label 'maybe' is not a training label",
        ),
        ([str(train), str(train), "--model", "gpt2-tiny"], "'gpt2-tiny' is not a BERT preset"),
    ]
    for (train_file, dev_file, *extra), message in cases:
        code = cli.main(
            ["finetune", "--train", train_file, "--validation", dev_file, *base, *extra]
        )
        err = capsys.readouterr().err
        assert code == 1 and message in err, (extra, err)
        assert err.startswith("fastlm finetune: ")
    for init, message in (
        (tmp_path, "neither a fastlm checkpoint"),
        (tmp_path / "nowhere", "nowhere is not a directory"),
    ):
        code = cli.main(
            [
                "finetune",
                "--train",
                str(train),
                "--validation",
                str(train),
                "--init",
                str(init),
                "--batch-size",
                "4",
            ]
        )
        assert code == 1 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --init and --model together: argparse's usage error
        cli.main(
            [
                "finetune",
                "--train",
                str(train),
                "--validation",
                str(dev),
                "--init",
                "x",
                "--model",
                "y",
            ]
        )
    assert not (tmp_path / "out").exists()  # everything rejected before any work
