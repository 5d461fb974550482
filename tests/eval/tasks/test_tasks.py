"""Task files and n-shot prompts: format detection and its errors, the exact prompt text at
0, 1 and 3 shots, the seeded dev split and demonstrations, accuracy on tasks labelled here
from a naive scoring loop, and BBH exact match against naive greedy decoding."""

from __future__ import annotations

import json

import pytest

from fastlm.eval import tasks
from fastlm.eval.scoring import encode_pair

MMLU_DEV = [
    {"question": "What is 1 + 1?", "choices": ["1", "2", "3", "4"], "answer": 1},
    {"question": "Which is a colour?", "choices": ["red", "dog", "run", "six"], "answer": "A"},
    {"question": "  The sky is  ", "choices": ["green", "loud", "blue", "square"], "answer": 2},
]
MMLU_TEST = [
    {"question": "What is 2 + 2?", "choices": ["3", "4", "5", "22"], "answer": "B"},
    {"question": "Which one barks?", "choices": ["cat", "fish", "bird", "dog"], "answer": 3},
    {"question": "What is the answer?", "choices": ["one", "two", "three", "four"], "answer": 0},
    {
        "question": "Return the number of items",
        "choices": ["len", "sum", "max", "min"],
        "answer": 0,
    },
    {"question": "Is the sky blue?", "choices": ["yes", "no", "maybe", "never"], "answer": 0},
    {
        "question": "Which is a container?",
        "choices": ["box", "idea", "song", "walk"],
        "answer": "A",
    },
]
WINO_DEV = [
    {
        "sentence": "The cup fell off the table because _ was wobbly.",
        "option1": "the cup",
        "option2": "the table",
        "answer": "2",
    },
    {
        "sentence": "Anna thanked Beth because _ had helped her.",
        "option1": "Anna",
        "option2": "Beth",
        "answer": "2",
    },
]
WINO_TEST = [
    {
        "sentence": "The trophy did not fit in the suitcase because the _ was too big.",
        "option1": "trophy",
        "option2": "suitcase",
        "answer": "1",
    },
    {
        "sentence": "The trophy did not fit in the suitcase because the _ was too small.",
        "option1": "trophy",
        "option2": "suitcase",
        "answer": "2",
    },
    {
        "sentence": "Sam gave Kim the book because _ had finished reading it.",
        "option1": "Sam",
        "option2": "Kim",
        "answer": "1",
    },
    {
        "sentence": "The container held the items until _ broke.",
        "option1": "the container",
        "option2": "the items",
        "answer": "1",
    },
]
BBH_DEV = [
    {"input": "not ( True ) and False is", "target": "False"},
    {"input": "Sort: b a", "target": "a b"},
]
BBH_TEST = [
    {"input": text, "target": "unused"}
    for text in (
        "Is the sky blue?",
        "True and not False is",
        "Sort: trophy suitcase",
        "Return the items",
        "What is the answer?",
        "Which one barks?",
        "Q: A: Q:",
        "the container is",
    )
]


def example(record, line=1):
    return tasks.Example(line, record)


# -- files and formats -------------------------------------------------------------------


def test_formats_are_detected_and_answers_read(write_jsonl):
    mmlu = tasks.load_task(write_jsonl("m.jsonl", MMLU_DEV))
    assert mmlu.format == "mmlu" and [e.line for e in mmlu.examples] == [1, 2, 3]
    assert [tasks.FORMATS["mmlu"].gold(e.record) for e in mmlu.examples] == [1, 0, 2]
    wino = tasks.load_task(write_jsonl("w.jsonl", WINO_TEST))
    assert wino.format == "winogrande"
    assert [tasks.FORMATS["winogrande"].gold(e.record) for e in wino.examples] == [0, 1, 0, 0]
    assert tasks.load_task(write_jsonl("b.jsonl", BBH_DEV)).format == "bbh"
    # Blank lines are skipped; line numbers stay those of the file.
    path = write_jsonl("gaps.jsonl", BBH_DEV)
    path.write_text(path.read_text().replace("\n", "\n\n"))
    assert [e.line for e in tasks.load_task(path).examples] == [1, 3]
    # A named format reads records that have more fields than it needs.
    both = [{**r, "question": "q", "choices": ["a", "b"], "answer": 0} for r in BBH_DEV]
    assert tasks.load_task(write_jsonl("both.jsonl", both), "bbh").format == "bbh"
    assert tasks.load_task(write_jsonl("both.jsonl", both), "mmlu").format == "mmlu"


MMLU = {"question": "q?", "choices": ["a", "b", "c", "d"], "answer": 0}
WINO = {"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "1"}


@pytest.mark.parametrize(
    "lines, fmt, message",
    [
        (['{"input": "x", "target": "y"}', "{not json"], None, r"line 2: not valid JSON"),
        (["[1, 2]"], None, r"line 1: expected a JSON object, got list"),
        (
            ['{"text": "x"}'],
            None,
            r"cannot tell the task format: the first example has no known "
            r"set of fields \(keys \['text'\]\)",
        ),
        (
            ['{"input": "x", "target": "y", "question": "q", "choices": ["a", "b"], "answer": 0}'],
            None,
            "fields of mmlu and bbh",
        ),
        (
            ['{"input": "x", "target": "y"}'],
            "mmlu",
            r"line 1: missing 'question', 'choices', 'answer' for the mmlu format",
        ),
        (
            [MMLU, {**MMLU, "answer": 4}],
            None,
            r"line 2: field 'answer' must be a choice index 0..3 or a letter A..D, got 4",
        ),
        ([{**MMLU, "answer": "E"}], None, "got 'E'"),
        ([{**MMLU, "answer": True}], None, "got True"),
        ([{**MMLU, "choices": "abcd"}], None, "field 'choices' must be a list of 2 to 26 strings"),
        ([{**MMLU, "choices": ["a", 2]}], None, "field 'choices' must hold strings"),
        ([{**MMLU, "question": 3}], None, "field 'question' must be a string, got int"),
        ([{**WINO, "sentence": "A _ b _."}], None, "field 'sentence' must hold one '_' blank"),
        ([{**WINO, "sentence": "It was _  "}], None, "has nothing after its blank to score"),
        ([{**WINO, "answer": "3"}], None, "field 'answer' must be \"1\" or \"2\", got '3'"),
        ([{"input": "x", "target": " "}], None, "field 'target' is empty"),
        ([], None, "holds no examples"),
        ([MMLU], "squad", "format must be one of mmlu, winogrande, bbh, got 'squad'"),
    ],
)
def test_bad_task_files_name_the_line_and_field(lines, fmt, message, tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    with pytest.raises(ValueError, match=message):
        tasks.load_task(path, fmt)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=f"no such file: {tmp_path / 'nope.jsonl'}"):
        tasks.load_task(tmp_path / "nope.jsonl")


# -- prompts -----------------------------------------------------------------------------

Q_2PLUS2 = "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"
DEMO_1PLUS1 = "What is 1 + 1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B"
DEMO_COLOUR = "Which is a colour?\nA. red\nB. dog\nC. run\nD. six\nAnswer: A"
DEMO_SKY = "The sky is\nA. green\nB. loud\nC. blue\nD. square\nAnswer: C"


def test_mmlu_prompts_at_0_1_and_3_shots():
    scored = example(MMLU_TEST[0])
    letters = [" A", " B", " C", " D"]
    assert tasks.requests("mmlu", scored, []) == [(Q_2PLUS2, k) for k in letters]
    one = tasks.requests("mmlu", scored, [example(MMLU_DEV[0])])
    assert one == [(DEMO_1PLUS1 + "\n\n" + Q_2PLUS2, k) for k in letters]
    three = tasks.requests("mmlu", scored, [example(MMLU_DEV[i]) for i in (2, 0, 1)])
    context = "\n\n".join([DEMO_SKY, DEMO_1PLUS1, DEMO_COLOUR, Q_2PLUS2])
    assert three == [(context, k) for k in letters]
    # A subject adds MMLU's header, once, before the demonstrations.
    subject = tasks.requests(
        "mmlu", example({**MMLU_TEST[0], "subject": "high_school_math"}), [example(MMLU_DEV[0])]
    )
    header = "The following are multiple choice questions (with answers) about high school math."
    assert subject[1] == (header + "\n\n" + DEMO_1PLUS1 + "\n\n" + Q_2PLUS2, " B")
    two = tasks.requests(
        "mmlu", example({"question": "Q?", "choices": ["x", "y"], "answer": 1}), []
    )
    assert two == [("Q?\nA. x\nB. y\nAnswer:", " A"), ("Q?\nA. x\nB. y\nAnswer:", " B")]


def test_winogrande_partial_scoring_prompts():
    scored = example(WINO_TEST[0])
    assert tasks.requests("winogrande", scored, []) == [
        ("The trophy did not fit in the suitcase because the trophy", " was too big."),
        ("The trophy did not fit in the suitcase because the suitcase", " was too big."),
    ]
    demos = [example(WINO_DEV[1]), example(WINO_DEV[0])]
    prefix = (
        "Anna thanked Beth because Beth had helped her.\n\n"
        "The cup fell off the table because the table was wobbly.\n\n"
    )
    assert tasks.requests("winogrande", scored, demos) == [
        (prefix + "The trophy did not fit in the suitcase because the trophy", " was too big."),
        (prefix + "The trophy did not fit in the suitcase because the suitcase", " was too big."),
    ]


def test_bbh_prompts():
    scored = example({"input": "True and False is", "target": "False"})
    assert tasks.requests("bbh", scored, []) == [("Q: True and False is\nA:", " False")]
    demos = [example(BBH_DEV[1]), example(BBH_DEV[0])]
    assert tasks.requests("bbh", scored, demos) == [
        (
            "Q: Sort: b a\nA: a b\n\nQ: not ( True ) and False is\nA: False\n\n"
            "Q: True and False is\nA:",
            " False",
        )
    ]


# -- dev split and demonstrations --------------------------------------------------------


def test_held_out_dev_split_is_fixed_by_the_seed(write_jsonl):
    records = [{"input": f"question {i}", "target": str(i)} for i in range(12)]
    task = tasks.load_task(write_jsonl("t.jsonl", records))
    scored, pool = tasks.split_dev(task, None, 3, seed=0)
    assert len(pool) == 3 and len(scored) == 9
    assert {e.line for e in scored}.isdisjoint(e.line for e in pool)
    assert {e.line for e in scored} | {e.line for e in pool} == set(range(1, 13))
    assert tasks.split_dev(task, None, 3, seed=0) == (scored, pool)
    held = {tuple(e.line for e in tasks.split_dev(task, None, 3, seed)[1]) for seed in range(8)}
    assert len(held) > 1  # other seeds hold out other examples
    assert tasks.split_dev(task, None, 0, seed=0) == (task.examples, [])
    # Every example draws all of the held-out ones, each in an order of its own.
    demos = [tasks.draw_demos(e, pool, 3, seed=0) for e in scored]
    assert all(sorted(d, key=lambda e: e.line) == pool for d in demos)
    assert len({tuple(e.line for e in d) for d in demos}) > 1


def test_demonstrations_are_seeded_and_never_the_scored_example(write_jsonl):
    dev = tasks.load_task(write_jsonl("dev.jsonl", MMLU_DEV + MMLU_TEST))
    task = tasks.load_task(write_jsonl("task.jsonl", MMLU_TEST))
    scored, pool = tasks.split_dev(task, dev, 5, seed=1)
    assert scored == task.examples and pool == dev.examples
    for e in scored:
        drawn = tasks.draw_demos(e, pool, 5, seed=1)
        assert drawn == tasks.draw_demos(e, pool, 5, seed=1)
        assert len({d.line for d in drawn}) == 5
        assert e.record not in [d.record for d in drawn]  # its copy in dev is skipped
    draws = {tuple(d.line for d in tasks.draw_demos(scored[0], pool, 5, seed)) for seed in range(8)}
    assert len(draws) > 1
    with pytest.raises(
        ValueError, match="9 shots, but only 8 dev examples differ from the one on line 1"
    ):
        tasks.draw_demos(scored[0], pool, 9, seed=0)


def test_split_errors(write_jsonl):
    task = tasks.load_task(write_jsonl("t.jsonl", MMLU_TEST))
    dev = tasks.load_task(write_jsonl("d.jsonl", MMLU_DEV))
    with pytest.raises(ValueError, match="4 shots exceed the 3 examples of the dev split"):
        tasks.split_dev(task, dev, 4, 0)
    with pytest.raises(
        ValueError, match="6 shots held out of the 6 examples .* leave none to score"
    ):
        tasks.split_dev(task, None, 6, 0)
    with pytest.raises(ValueError, match="shots must be a non-negative int, got -1"):
        tasks.split_dev(task, None, -1, 0)
    bbh = tasks.load_task(write_jsonl("b.jsonl", BBH_DEV))
    with pytest.raises(ValueError, match="is bbh but the task is mmlu"):
        tasks.split_dev(task, bbh, 1, 0)


# -- evaluation --------------------------------------------------------------------------


def label(fmt, record, index):
    return {**record, "answer": index if fmt == "mmlu" else str(index + 1)}


@pytest.mark.parametrize("shots", [0, 2])
@pytest.mark.parametrize(
    "fmt, dev_records, records",
    [("mmlu", MMLU_DEV, MMLU_TEST), ("winogrande", WINO_DEV, WINO_TEST)],
)
@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_accuracy_on_a_task_labelled_by_the_naive_loop(
    family,
    fmt,
    dev_records,
    records,
    shots,
    models,
    tokenizer,
    naive_logprob,
    assert_logprob,
    write_jsonl,
):
    """Each example's choices are scored here one unpadded forward at a time; even examples
    are labelled with the model's favourite (right), odd ones with its least favourite
    (wrong), so the expected accuracy is known before the evaluation runs."""
    model = models[family]
    dev = tasks.load_task(write_jsonl("dev.jsonl", dev_records))
    unlabelled = tasks.load_task(write_jsonl("unlabelled.jsonl", records))
    naive, lengths, encoded = [], [], []
    for e in unlabelled.examples:
        pairs = tasks.requests(fmt, e, tasks.draw_demos(e, dev.examples, shots, seed=3))
        encoded.append([encode_pair(tokenizer, c, k) for c, k in pairs])
        naive.append([naive_logprob(model, *pair) for pair in encoded[-1]])
        lengths.append([len(k.lstrip()) for _, k in pairs])
    for lls in naive:  # clear preferences: rounding cannot flip them
        top, second = sorted(lls, reverse=True)[:2]
        assert top - second > 1e-3
    best = [max(range(len(lls)), key=lls.__getitem__) for lls in naive]
    worst = [min(range(len(lls)), key=lls.__getitem__) for lls in naive]
    gold = [b if i % 2 == 0 else w for i, (b, w) in enumerate(zip(best, worst, strict=True))]
    labelled = [label(fmt, r, g) for r, g in zip(records, gold, strict=True)]
    task = tasks.load_task(write_jsonl("task.jsonl", labelled))
    results, out = tasks.evaluate(model, tokenizer, task, dev, shots, seed=3, batch_size=3)
    n = len(records)
    assert results == {
        "format": fmt,
        "n": n,
        "shots": shots,
        "seed": 3,
        "accuracy": pytest.approx((n + 1) // 2 / n),
        "acc_norm": results["acc_norm"],
    }
    norm = [
        max(range(len(lls)), key=lambda i, lls=lls, c=c: lls[i] / c[i])
        for lls, c in zip(naive, lengths, strict=True)
    ]
    assert results["acc_norm"] == pytest.approx(
        sum(p == g for p, g in zip(norm, gold, strict=True)) / n
    )
    for record, pairs, b, g in zip(out, encoded, best, gold, strict=True):
        for ll, pair in zip(record["loglikelihoods"], pairs, strict=True):
            assert_logprob(ll, model, [pair])
        assert record["prediction"] == b and record["gold"] == g
        assert record["correct"] == (b == g)
        assert len(record["demos"]) == shots


def test_held_out_demonstrations_and_limit(models, tokenizer, write_jsonl):
    task = tasks.load_task(write_jsonl("task.jsonl", MMLU_TEST))
    scored, pool = tasks.split_dev(task, None, 2, seed=5)
    results, records = tasks.evaluate(models["gpt"], tokenizer, task, shots=2, seed=5, limit=3)
    assert results["n"] == 3 and len(records) == 3
    assert [r["line"] for r in records] == [e.line for e in scored[:3]]
    for r in records:
        assert sorted(r["demos"]) == sorted(e.line for e in pool)
        assert r["line"] not in r["demos"]
    with pytest.raises(ValueError, match="limit must be a positive int or None, got 0"):
        tasks.evaluate(models["gpt"], tokenizer, task, limit=0)
    with pytest.raises(ValueError, match="model must be a fastlm GPT or T5"):
        tasks.evaluate(models["bert"], tokenizer, task)


@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_bbh_exact_match_against_naive_greedy_decoding(
    family, models, tokenizer, naive_greedy, write_jsonl
):
    """Targets are the naive greedy answers for even examples and something else for odd
    ones: exact match is the share of even examples with a non-empty answer."""
    model = models[family]
    dev = tasks.load_task(write_jsonl("dev.jsonl", BBH_DEV))
    unlabelled = tasks.load_task(write_jsonl("unlabelled.jsonl", BBH_TEST))
    answers = []
    for e in unlabelled.examples:
        ((prompt, _),) = tasks.requests("bbh", e, tasks.draw_demos(e, dev.examples, 1, seed=0))
        answers.append(naive_greedy(model, tokenizer, tokenizer.encode(prompt), 8).strip())
    hits = [i % 2 == 0 and bool(a) for i, a in enumerate(answers)]
    assert sum(hits) >= 2
    labelled = [
        {**r, "target": a if hit else a + "#"}
        for r, a, hit in zip(BBH_TEST, answers, hits, strict=True)
    ]
    task = tasks.load_task(write_jsonl("task.jsonl", labelled))
    results, out = tasks.evaluate(
        model, tokenizer, task, dev, shots=1, batch_size=3, max_new_tokens=8
    )
    assert results == {
        "format": "bbh",
        "n": len(BBH_TEST),
        "shots": 1,
        "seed": 0,
        "exact_match": pytest.approx(sum(hits) / len(BBH_TEST)),
    }
    assert [r["prediction"] for r in out] == answers
    assert [r["correct"] for r in out] == hits
