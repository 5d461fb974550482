"""fastlm under lm-evaluation-harness: local tasks (MMLU, WinoGrande and BBH shapes, defined by
YAML files in a temporary directory, read from local JSONL) give the results of fastlm's own
evaluation; each request type against a naive computation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="the adapter needs lm-eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from fastlm.eval import lm_eval_adapter, tasks  # noqa: E402
from fastlm.eval.scoring import encode_pair  # noqa: E402
from fastlm.train.run import load_model  # noqa: E402

MMLU = [{"question": q, "choices": c, "answer": a} for q, c, a in [
    ("What is 2 + 2?", ["3", "4", "5", "22"], 1),
    ("Which one barks?", ["cat", "fish", "bird", "dog"], 3),
    ("What is the answer?", ["one", "two", "three", "four"], 0),
    ("Is the sky blue?", ["yes", "no", "maybe", "never"], 0),
    ("Which is a container?", ["box", "idea", "song", "walk"], 2),
]]  # fmt: skip
WINO = [{"sentence": s, "option1": a, "option2": b, "answer": n} for s, a, b, n in [
    ("The trophy did not fit in the suitcase because the _ was too big.", "trophy", "suitcase",
     "1"),
    ("Sam gave Kim the book because _ had finished reading it.", "Sam", "Kim", "1"),
    ("The container held the items until _ broke.", "the container", "the items", "2"),
]]  # fmt: skip
BBH_INPUTS = ["Is the sky blue?", "Sort: b a", "Return the items", "Which one barks?"]

MMLU_YAML = """\
task: local_mmlu
output_type: multiple_choice
doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\nD. {{choices[3]}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""  # noqa: E501
WINO_YAML = """\
task: local_wino
output_type: multiple_choice
target_delimiter: ""
doc_to_text: !function wino.gold
doc_to_choice: !function wino.contexts
doc_to_target: !function wino.rest
metric_list:
  - metric: acc
"""
WINO_PY = """\
def gold(doc):
    return int(doc["answer"]) - 1


def contexts(doc):
    before = doc["sentence"][: doc["sentence"].index("_")]
    return [before + doc["option1"], before + doc["option2"]]


def rest(doc):
    return doc["sentence"][doc["sentence"].index("_") + 1 :]
"""
BBH_YAML = """\
task: local_bbh
output_type: generate_until
doc_to_text: "Q: {{input}}\\nA:"
doc_to_target: target
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    regexes_to_ignore: ["^\\\\s+", "\\\\s+$"]
"""


def local_task(directory, yaml: str, data) -> None:
    """A task YAML reading the JSONL file ``data`` (offline: a local file, a local cache)."""
    name = yaml.split("\n", 1)[0].split(": ")[1]
    (directory / f"{name}.yaml").write_text(
        yaml
        + textwrap.dedent(f"""\
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
          cache_dir: {directory / "cache"}
        test_split: test
        """)
    )


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_local_tasks_give_fastlms_own_results(checkpoints, tokenizer, models, naive_greedy,
                                              write_jsonl, tmp_path, offline):  # fmt: skip
    gpt = models["gpt"]
    # BBH targets: the model's own greedy answer (computed here) for every other example.
    answers = [naive_greedy(gpt, tokenizer, tokenizer.encode(f"Q: {x}\nA:"), 8).strip()
               for x in BBH_INPUTS]  # fmt: skip
    bbh = [{"input": x, "target": a if i % 2 == 0 and a else a + "#"}
           for i, (x, a) in enumerate(zip(BBH_INPUTS, answers, strict=True))]  # fmt: skip
    assert any(r["target"] == a for r, a in zip(bbh, answers, strict=True))
    files = {"mmlu": write_jsonl("mmlu.jsonl", MMLU), "winogrande": write_jsonl("wino.jsonl", WINO),
             "bbh": write_jsonl("bbh.jsonl", bbh)}  # fmt: skip
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    local_task(task_dir, MMLU_YAML, files["mmlu"])
    local_task(task_dir, WINO_YAML, files["winogrande"])
    (task_dir / "wino.py").write_text(WINO_PY)
    local_task(task_dir, BBH_YAML, files["bbh"])

    out = lm_eval.simple_evaluate(
        model="fastlm", model_args=f"checkpoint={checkpoints['gpt']},batch_size=3",
        tasks=["local_mmlu", "local_wino", "local_bbh"], num_fewshot=0, bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True)  # fmt: skip

    model, tok = load_model(checkpoints["gpt"])
    ours = {fmt: tasks.evaluate(model, tok, tasks.load_task(path), batch_size=2, max_new_tokens=8)
            for fmt, path in files.items()}  # fmt: skip
    results = out["results"]
    assert results["local_mmlu"]["acc,none"] == pytest.approx(ours["mmlu"][0]["accuracy"])
    assert results["local_mmlu"]["acc_norm,none"] == pytest.approx(ours["mmlu"][0]["acc_norm"])
    assert results["local_wino"]["acc,none"] == pytest.approx(ours["winogrande"][0]["accuracy"])
    assert results["local_bbh"]["exact_match,none"] == pytest.approx(ours["bbh"][0]["exact_match"])
    assert ours["bbh"][0]["exact_match"] > 0
    # The same requests, example by example.
    for name, fmt in (("local_mmlu", "mmlu"), ("local_wino", "winogrande")):
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        for sample, record in zip(samples, ours[fmt][1], strict=True):
            lls = [resp[0][0] for resp in sample["resps"]]
            assert lls == pytest.approx(record["loglikelihoods"], rel=1e-5, abs=1e-4)
    samples = sorted(out["samples"]["local_bbh"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0].strip() for s in samples] == [r["prediction"] for r in ours["bbh"][1]]


def requests(kind: str, *args) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_loglikelihood(family, checkpoints, models, tokenizer, naive_logprob):
    lm = lm_eval_adapter.FastLM(checkpoint=str(checkpoints[family]), batch_size=2)
    pairs = [("Q: Is the sky blue?\nA:", " yes"), ("The trophy did not fit", " in the suitcase"),
             ("", "Return the items"), ("Answer: ", "B")]  # fmt: skip
    got = lm.loglikelihood(requests("loglikelihood", *pairs))
    eos = tokenizer.eos_id
    expected = [naive_logprob(models[family], *encode_pair(tokenizer, c, k)) if c
                else naive_logprob(models[family], [eos], tokenizer.encode(k))
                for c, k in pairs]  # fmt: skip
    assert [ll for ll, _ in got] == pytest.approx(expected, rel=1e-5, abs=1e-4)
    assert all(isinstance(g, bool) for _, g in got)


@pytest.mark.parametrize("family, max_length", [("gpt", 7), ("gpt", None), ("t5", 5)])
def test_loglikelihood_rolling_matches_lm_evals_windows(family, max_length, checkpoints, models,
                                                       tokenizer, naive_logprob):  # fmt: skip
    """lm-eval's own window functions, each window scored by an unpadded forward."""
    lm = lm_eval_adapter.FastLM(checkpoint=str(checkpoints[family]), batch_size=3,
                                max_length=max_length)  # fmt: skip
    assert lm.max_length == (max_length or models[family].config.max_position_embeddings)
    texts = ["The trophy did not fit in the suitcase because the trophy was too big.",
             "Return the number of items in the container.", "Q", ""]  # fmt: skip
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", *[(t,) for t in texts]))
    expected = []
    for text in texts:
        windows = get_rolling_token_windows(tokenizer.encode(text), tokenizer.eos_id,
                                            lm.max_length, 1)  # fmt: skip
        expected.append(sum(naive_logprob(models[family], *make_disjoint_window(w))
                            for w in windows))  # fmt: skip
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-4)
    assert got[-1] == 0.0


def test_generate_until(checkpoints, models, tokenizer, naive_greedy):
    lm = lm_eval_adapter.FastLM(checkpoint=str(checkpoints["llama"]), batch_size=2)
    prompts = ["Q: Is the sky blue?\nA:", "Return the", "Which one barks?"]
    settings = [{"until": ["\n"], "max_gen_toks": 6, "do_sample": False, "temperature": 0.0},
                {"until": "e", "max_gen_toks": 4},
                {"until": ["\n"], "max_gen_toks": 6}]  # fmt: skip
    got = lm.generate_until(requests("generate_until", *zip(prompts, settings, strict=True)))
    model = models["llama"]
    expected = [naive_greedy(model, tokenizer, tokenizer.encode(p), s["max_gen_toks"],
                             stop=s["until"] if isinstance(s["until"], str) else s["until"][0])
                for p, s in zip(prompts, settings, strict=True)]  # fmt: skip
    assert got == expected
    with pytest.raises(ValueError, match=r"gen_kwargs \['top_p'\] are not supported"):
        lm.generate_until(requests("generate_until", ("Q:", {"top_p": 0.9})))


def test_model_args_errors(checkpoints):
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 'auto'"):
        lm_eval_adapter.FastLM(checkpoint=str(checkpoints["gpt"]), batch_size="auto")
    with pytest.raises(ValueError, match="max_length 500 exceeds the model's 192-token context"):
        lm_eval_adapter.FastLM(checkpoint=str(checkpoints["gpt"]), max_length=500)
    with pytest.raises(ValueError, match="model must be a fastlm GPT or T5"):
        lm_eval_adapter.FastLM(checkpoint=str(checkpoints["bert"]))
    lm = lm_eval.api.registry.get_model("fastlm").create_from_arg_string(
        f"checkpoint={checkpoints['t5']},batch_size=4,max_gen_toks=9"
    )
    assert (lm.batch_size, lm.max_gen_toks, lm.max_length) == (4, 9, 512)


def test_lm_evals_command_line_with_the_model_registered(checkpoints, write_jsonl, tmp_path):
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    local_task(task_dir, MMLU_YAML, write_jsonl("mmlu.jsonl", MMLU))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "fastlm.eval.lm_eval_adapter", "run", "--model",
                           "fastlm", "--model_args", f"checkpoint={checkpoints['gpt']}",
                           "--tasks", "local_mmlu", "--include_path", str(task_dir),
                           "--output_path", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "local_mmlu" in proc.stdout
    (result_file,) = (tmp_path / "out").rglob("results_*.json")
    acc = json.loads(result_file.read_text())["results"]["local_mmlu"]["acc,none"]
    model, tok = load_model(checkpoints["gpt"])
    (expected, _) = tasks.evaluate(model, tok, tasks.load_task(write_jsonl("m.jsonl", MMLU)))
    assert acc == pytest.approx(expected["accuracy"])
