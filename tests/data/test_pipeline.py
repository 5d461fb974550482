"""fastlm.data.pipeline: the composed cleaning run, its report, streaming, the ``fastlm data
clean`` command end to end, and the cleaning step of ``fastlm train``."""

from __future__ import annotations

import json
import re
import unicodedata
import zlib

import pytest

from fastlm.data import CleanConfig, Cleaner, clean_corpus
from fastlm.data.pipeline import main

LONG = " ".join(f"word{i}" for i in range(100))  # 100 distinct words: passes every filter

# (raw document, what the pipeline keeps or why it removes it), with min_chars=20.
DOCS = [
    (
        "Hello  world,\u00a0this is a normal document about cats and dogs.\r\n",
        "Hello world, this is a normal document about cats and dogs.",
    ),
    (
        "Contact me at jane@example.com or +1 (555) 123-4567 for the cat pictures.",
        "Contact me at <EMAIL> or <PHONE> for the cat pictures.",
    ),
    ("too short", "min_chars"),  # 9 characters
    ("== 3.14 + 2.72 = 5.86 ==, 10 / 2 = 5 ==", "alpha_fraction"),  # no letters
    ("spam line\nspam line\nspam line\neggs", "repeated_lines"),  # 2 of 4 lines repeat
    # "the cat sat on the" and "cat sat on the mat" twice: 34 of 42 characters (> 0.15).
    ("the cat sat on the mat and the cat sat on the mat again", "dup_ngrams"),
    ("Hello world, this is a normal document about cats and dogs.", "exact_duplicate"),
    (LONG, LONG),
    # The last word changed: 95 of 97 shingles shared, J = 0.98.
    (LONG.replace("word99", "changed"), "near_duplicate"),
]
KEPT = [out for _, out in DOCS if " " in out]
REMOVED = {
    "min_chars": 1,
    "max_chars": 0,
    "alpha_fraction": 1,
    "repeated_lines": 1,
    "dup_ngrams": 1,
    "exact_duplicate": 1,
    "near_duplicate": 1,
}


def test_clean_corpus_by_hand():
    raw = [d for d, _ in DOCS]
    kept, report = clean_corpus(raw, CleanConfig(min_chars=20))
    assert kept == KEPT == [DOCS[0][1], DOCS[1][1], LONG]
    assert report.removed == REMOVED
    assert report.pii == {"EMAIL": 1, "PHONE": 1, "IP": 0, "CREDIT_CARD": 0}
    assert report.normalized == 1  # only the first document changes
    assert report.unicode_normalized == int(not unicodedata.is_normalized("NFC", raw[0]))
    assert (report.docs_in, report.docs_out) == (9, 3)
    assert report.docs_in - report.docs_out == sum(report.removed.values())
    assert report.bytes_in == sum(len(d.encode()) for d in raw)
    assert report.bytes_out == sum(len(d.encode()) for d in KEPT)
    assert all(s >= 0 for s in report.seconds.values())


def test_each_step_can_be_switched_off():
    raw = [d for d, _ in DOCS]
    kept, report = clean_corpus(
        raw,
        CleanConfig(
            min_chars=20, scrub_pii=False, filters=False, exact_dedup=False, near_dedup=False
        ),
    )
    assert kept == [raw[0].replace("  ", " ").replace("\u00a0", " ").strip(), *raw[1:]]
    assert sum(report.removed.values()) == 0 and sum(report.pii.values()) == 0


def test_report_table_and_summary():
    _, report = clean_corpus([d for d, _ in DOCS], CleanConfig(min_chars=20))
    table = report.table()
    for name, count in REMOVED.items():
        label = name.replace("_", " ") if "duplicate" in name else f"filter {name}"
        assert re.search(rf"^{label} +{count} ", table, re.M), (label, table)
    assert re.search(r"^total +6 .*9 -> 3 documents", table, re.M)
    assert "1 <EMAIL>, 1 <PHONE>, 0 <IP>, 0 <CREDIT_CARD>" in table
    summary = report.summary()
    assert summary.startswith("9 -> 3 documents") and "\n" not in summary
    assert "dup_ngrams 1" in summary and "max_chars" not in summary  # zero counts left out


def _letters(n: int) -> str:
    """``n`` spelled with letters (digit d -> the d-th letter): distinct words that the
    letter-fraction filter keeps."""
    return "".join(chr(ord("a") + int(d)) for d in str(n))


def test_cleaner_streams_and_remembers():
    pulled = []

    def docs():
        for i in range(10):
            pulled.append(i)
            words = (f"{_letters(i)}q{_letters(j)}" for j in range(6000))
            yield f"document {i}: " + " ".join(words)  # ~50K characters

    cleaner = Cleaner()
    out = cleaner(docs())
    first = next(out)
    assert first.startswith("document 0:")
    assert len(pulled) == 2  # one batch of 64K characters, not the corpus
    assert len(list(out)) == 9 and cleaner.report.docs_out == 10
    # Deduplication state carries over to the next call.
    assert list(cleaner([first])) == []
    assert cleaner.report.removed["exact_duplicate"] == 1


def test_cleaner_rejects_non_strings():
    with pytest.raises(TypeError, match="docs"):
        list(Cleaner()("a single string"))
    with pytest.raises(TypeError, match=r"docs\[1\]"):
        clean_corpus(["fine", 42])


# ---------------------------------------------------------------------------------------------
# fastlm data clean


@pytest.fixture
def corpus_dir(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    (root / "a.txt").write_text(DOCS[0][0], encoding="utf-8", newline="")
    with (root / "b.jsonl").open("w", encoding="utf-8") as f:
        for text, _ in DOCS[1:]:
            f.write(json.dumps({"text": text, "id": 1}) + "\n\n")
    return root


def _lines(path):
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_cli_end_to_end(corpus_dir, tmp_path, capsys):
    out = tmp_path / "out" / "clean.jsonl"
    assert main([str(corpus_dir), str(out), "--min-chars", "20", "--no-progress"]) == 0
    assert _lines(out) == KEPT
    printed = capsys.readouterr().out
    assert re.search(r"^filter alpha_fraction +1 ", printed, re.M)
    assert re.search(r"^total +6 .*9 -> 3 documents", printed, re.M)
    assert "wrote 3 documents to" in printed
    assert not (out.parent / "clean.jsonl.partial").exists()


def test_cli_switches(corpus_dir, tmp_path):
    out = tmp_path / "o.jsonl"
    args = [str(corpus_dir / "b.jsonl"), str(out), "--min-chars", "20", "--no-progress"]
    assert main([*args, "--no-scrub", "--no-near-dedup", "--max-dup-ngram-fraction"]) == 0
    assert _lines(out) == [DOCS[1][0], DOCS[5][0], DOCS[6][0], LONG, DOCS[8][0]]
    assert main([*args, "--no-filters", "--no-exact-dedup", "--no-near-dedup"]) == 0
    assert len(_lines(out)) == 8


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--threshold", "1.5"], "argument --threshold: threshold must be in"),
        (["--min-chars", "-1"], "argument --min-chars: min_chars must be >= 0"),
        (["--num-perm", "0"], "argument --num-perm"),
        (["--max-dup-ngram-fraction", "5:0.1"], "argument --max-dup-ngram-fraction: expected N="),
        (["--max-dup-ngram-fraction", "0=0.1"], "argument --max-dup-ngram-fraction"),
        (["--normalization", "NFD"], "argument --normalization: invalid choice"),
        (["--shingle", "line"], "argument --shingle: invalid choice"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_cli_bad_arguments_exit_2_naming_the_flag(corpus_dir, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main([str(corpus_dir), str(tmp_path / "o.jsonl"), "--no-progress", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_bad_paths(corpus_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(corpus_dir), str(tmp_path / "o.txt")])
    assert (
        exit_info.value.code == 2 and "argument OUT: must end in .jsonl" in capsys.readouterr().err
    )
    with pytest.raises(SystemExit) as exit_info:
        main([str(corpus_dir), str(corpus_dir / "b.jsonl")])
    assert exit_info.value.code == 2 and "is also an input" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), str(tmp_path / "o.jsonl")]) == 1
    assert "missing does not exist" in capsys.readouterr().err
    (corpus_dir / "c.jsonl").write_text('{"text": "fine"}\nnot json\n', encoding="utf-8")
    assert main([str(corpus_dir), str(tmp_path / "o.jsonl"), "--no-progress"]) == 1
    assert "c.jsonl, line 2: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.jsonl.partial").exists()


def test_cli_unwritable_output_is_one_line(corpus_dir, tmp_path, capsys):
    """OUT under a file (no directory can be made there): exit 1 and one line naming OUT,
    not a traceback; nothing is left behind."""
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "o.jsonl"
    assert main([str(corpus_dir), str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith(f"fastlm data clean: OUT {out} cannot be written (") and err.count("\n") == 1
    )
    assert (tmp_path / "a_file").read_text() == ""


# ---------------------------------------------------------------------------------------------
# fastlm train


def _split_side(text: str, val_fraction: float) -> str:
    """The side ``split_documents`` puts a document on (its documented rule)."""
    return "val" if zlib.crc32(text.encode()) / 2**32 < val_fraction else "train"


def test_train_cleans_and_reports_contamination(tmp_path, capsys):
    from fastlm.train import TrainConfig
    from fastlm.train.run import build_trainer

    def window(prefix: str, n: int) -> str:
        return " ".join(f"{prefix}w{i}" for i in range(n))

    docs = [window(f"doc{i}", 60) for i in range(40)]
    # A near-duplicate pair (J = 96/97) with the original in training, the copy in validation.
    k = next(
        k
        for k in range(1000)
        if _split_side(window(f"p{k}", 100), 0.1) == "train"
        and _split_side(window(f"p{k}", 100) + " extra", 0.1) == "val"
    )
    docs += [window(f"p{k}", 100), window(f"p{k}", 100) + " extra"]
    docs += [docs[0], "Write to someone@example.org about " + window("mail", 30)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    config = TrainConfig(
        data=[str(tmp_path / "data.jsonl")],
        model_overrides={"hidden_size": 32, "num_layers": 1, "num_heads": 2},
        vocab_size=400,
        seq_len=32,
        val_fraction=0.1,
        near_dedup=False,
        progress=False,
        out_dir=str(tmp_path / "run"),
    )
    trainer = build_trainer(config)
    (line,) = [x for x in capsys.readouterr().out.splitlines() if "cleaned:" in x]
    assert "44 -> 43 documents" in line and "exact_duplicate 1" in line and "1 <EMAIL>" in line
    assert re.search(r"; 1 of \d+ validation documents duplicate a training document", line)
    assert trainer.train_data is not None
    with pytest.raises(ValueError, match="clean_data"):
        TrainConfig(clean_data=1)
    assert TrainConfig().clean_data and TrainConfig().scrub_pii and TrainConfig().near_dedup
    assert not TrainConfig().filter_data


def test_pure_ascii_whitespace_changes_are_not_reported_as_unicode_normalization():
    _, report = clean_corpus(["a  b\n\n\n\nc   ", "plain"], CleanConfig(near_dedup=False))
    assert (report.normalized, report.unicode_normalized) == (1, 0)
    assert "changed 1 documents; 0 of them by NFC" in report.table()
    _, report = clean_corpus(["cafe\u0301"], CleanConfig(near_dedup=False))
    assert (report.normalized, report.unicode_normalized) == (1, 1)
