"""fastlm.data.corpus: the standard-library corpus, reading files, the held-out split."""

from __future__ import annotations

import ast
import inspect
import itertools
import json
import os
import random
import sysconfig
import warnings
import zlib
from pathlib import Path

import pytest

from fastlm.data import default_corpus, read_corpus, split_documents
from fastlm.data.corpus import MIN_DOC_CHARS, _default_corpus

# ---------------------------------------------------------------------------------------------
# default_corpus


def test_default_corpus_is_large_and_filtered(corpus):
    assert len(corpus) > 1000
    assert sum(len(d) for d in corpus) > 1_000_000
    assert all(isinstance(d, str) and len(d) >= MIN_DOC_CHARS for d in corpus)
    assert all(d == d.lstrip() for d in corpus)  # cleaned


def test_default_corpus_is_deterministic_quiet_and_a_copy(corpus, capfd):
    again = default_corpus()
    assert again == corpus and again is not corpus
    again.clear()
    assert default_corpus() == corpus
    # Rebuilt from the files, bypassing the cache: same list, and nothing printed or warned.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rebuilt = _default_corpus.__wrapped__()
    assert list(rebuilt) == corpus
    assert capfd.readouterr() == ("", "") and caught == []


def test_default_corpus_holds_stdlib_docstrings(corpus):
    # Read through their own (already imported) modules, not through the corpus code.
    for module in (json, inspect, random):
        assert inspect.cleandoc(module.__doc__) in corpus, module.__name__
    assert len(inspect.isclass.__doc__) < MIN_DOC_CHARS
    assert inspect.isclass.__doc__ not in corpus
    assert inspect.cleandoc(json.dumps.__doc__) in corpus  # a function's docstring


def _long_docstrings(path: Path) -> set[str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old files
            tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
        return set()
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = (ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, nodes))
    return {d for d in docs if d is not None and len(d) >= MIN_DOC_CHARS}


def test_default_corpus_skips_tests_and_installed_packages(corpus):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"}
    kept = set()
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for f in filenames:
            if f.endswith(".py"):
                kept |= _long_docstrings(Path(dirpath, f))
    assert set(corpus) <= kept
    # The check above only means something if the skipped directories hold docstrings that
    # no kept file has; a sample of each (all of site-packages can take minutes to parse).
    skipped = set()
    for d in skip:
        for path in itertools.islice((stdlib / d).rglob("*.py"), 20):
            skipped |= _long_docstrings(path)
    if not skipped - kept:
        pytest.skip("this Python ships no skipped directory with docstrings of its own")


# ---------------------------------------------------------------------------------------------
# read_corpus


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_txt_and_jsonl(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first line\nsecond line é 🙂\n", encoding="utf-8")
    jsonl = _write_jsonl(
        tmp_path / "b.jsonl",
        [
            json.dumps({"text": "doc one", "id": 1}),
            "",
            "   ",
            json.dumps({"text": "doc \u4e16\u754c two"}),
            json.dumps({"text": ""}),  # empty documents are dropped
            json.dumps({"text": "doc three"}),
        ],
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    docs = read_corpus([txt, str(jsonl), empty])
    assert docs == ["first line\nsecond line é 🙂\n", "doc one", "doc 世界 two", "doc three"]


def test_read_jsonl_custom_field(tmp_path):
    jsonl = _write_jsonl(tmp_path / "c.jsonl", [json.dumps({"body": "x y", "text": 3})])
    assert read_corpus([jsonl], text_field="body") == ["x y"]


def test_read_directory_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "b" / "1.txt").write_text("b1", encoding="utf-8")
    (tmp_path / "a" / "z.txt").write_text("az", encoding="utf-8")
    (tmp_path / "a" / "deep" / "x.txt").write_text("adx", encoding="utf-8")
    _write_jsonl(tmp_path / "a" / "m.jsonl", [json.dumps({"text": "am1"}), '{"text": "am2"}'])
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert read_corpus([tmp_path]) == ["adx", "am1", "am2", "az", "b1"]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"body": "x"}', "no field 'text'"),
        ('{"text": 5}', "must be a string"),
    ],
)
def test_read_jsonl_errors_name_file_and_line(tmp_path, line, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", ['{"text": "ok"}', "", line])
    with pytest.raises(ValueError, match=message) as info:
        read_corpus([path])
    assert f"{path}, line 3" in str(info.value)


def test_read_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist") as info:
        read_corpus([tmp_path / "missing.txt"])
    assert "missing.txt" in str(info.value)
    other = tmp_path / "data.csv"
    other.write_text("a,b", encoding="utf-8")
    with pytest.raises(ValueError, match="data.csv"):
        read_corpus([other])
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin.txt.*UTF-8"):
        read_corpus([latin])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="empty_dir"):
        read_corpus([tmp_path / "empty_dir"])
    with pytest.raises(TypeError, match="paths"):
        read_corpus(str(other))


# ---------------------------------------------------------------------------------------------
# split_documents


def _docs(n: int) -> list[str]:
    return [f"document number {i}: " + "word " * (i % 7) for i in range(n)]


def test_split_follows_the_content_hash_and_ignores_order():
    docs = _docs(2000)
    train, val = split_documents(docs, 0.1)
    expected_val = [d for d in docs if zlib.crc32(d.encode()) < 0.1 * 2**32]
    assert val == expected_val
    assert train == [d for d in docs if d not in set(expected_val)]
    assert 0.1 * 2000 - 4 * 13.5 < len(val) < 0.1 * 2000 + 4 * 13.5  # binomial, 4 sigma
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    train2, val2 = split_documents(shuffled, 0.1)
    assert sorted(train2) == sorted(train) and sorted(val2) == sorted(val)
    # A document's side does not depend on the other documents either.
    _, val_half = split_documents(docs[:1000], 0.1)
    assert val_half == [d for d in val if d in set(docs[:1000])]


@pytest.mark.parametrize("fraction", [1e-9, 0.999999])
def test_split_never_leaves_a_side_empty(fraction):
    for n in (2, 3, 10):
        docs = _docs(n)
        train, val = split_documents(docs, fraction)
        assert train and val
        assert sorted(train + val) == sorted(docs)
        # The moved document is chosen by hash, so order does not change it either.
        train_r, val_r = split_documents(docs[::-1], fraction)
        assert sorted(val_r) == sorted(val)


def test_split_edge_cases():
    docs = _docs(10)
    assert split_documents(docs, 0.0) == (docs, [])
    assert split_documents(docs[:1], 0.5) in ((docs[:1], []), ([], docs[:1]))
    assert split_documents([], 0.5) == ([], [])


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan")])
def test_split_rejects_bad_fractions(fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(_docs(4), fraction)


def test_split_rejects_bad_types():
    with pytest.raises(TypeError, match="val_fraction"):
        split_documents(_docs(4), "0.1")
    with pytest.raises(TypeError, match=r"docs\[1\]"):
        split_documents(["a", 3], 0.1)
