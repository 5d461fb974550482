"""fastlm under lm-evaluation-harness: local tasks (MMLU, WinoGrande and BBH shapes, defined by
YAML files in a temporary directory, read from local JSONL) give the results of fastlm's own
evaluation; each request type against a naive computation; and lm-eval's own ``hf`` backend on
the ``to_hf`` export of the same weights gives the same answers (importing the adapter keeps
lm-eval's own model types)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="the adapter needs lm-eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from fastlm.eval import lm_eval_adapter, tasks  # noqa: E402
from fastlm.eval.scoring import encode_pair  # noqa: E402
from fastlm.models.hf import hf_tokenizer, to_hf  # noqa: E402
from fastlm.train.checkpoint import save_checkpoint  # noqa: E402
from fastlm.train.run import load_model  # noqa: E402
from fastlm.train.trainer import model_config_dict  # noqa: E402

MMLU = [
    {"question": q, "choices": c, "answer": a}
    for q, c, a in [
        ("What is 2 + 2?", ["3", "4", "5", "22"], 1),
        ("Which one barks?", ["cat", "fish", "bird", "dog"], 3),
        ("What is the answer?", ["one", "two", "three", "four"], 0),
        ("Is the sky blue?", ["yes", "no", "maybe", "never"], 0),
        ("Which is a container?", ["box", "idea", "song", "walk"], 2),
    ]
]
WINO = [
    {"sentence": s, "option1": a, "option2": b, "answer": n}
    for s, a, b, n in [
        (
            "The trophy did not fit in the suitcase because the _ was too big.",
            "trophy",
            "suitcase",
            "1",
        ),
        ("Sam gave Kim the book because _ had finished reading it.", "Sam", "Kim", "1"),
        ("The container held the items until _ broke.", "the container", "the items", "2"),
    ]
]
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


def test_local_tasks_give_fastlms_own_results(
    checkpoints, tokenizer, models, naive_greedy, assert_logprob, write_jsonl, tmp_path, offline
):
    gpt = models["gpt"]
    # BBH targets: the model's own greedy answer (computed here) for every other example.
    answers = [
        naive_greedy(gpt, tokenizer, tokenizer.encode(f"Q: {x}\nA:"), 8).strip() for x in BBH_INPUTS
    ]
    bbh = [
        {"input": x, "target": a if i % 2 == 0 and a else a + "#"}
        for i, (x, a) in enumerate(zip(BBH_INPUTS, answers, strict=True))
    ]
    assert any(r["target"] == a for r, a in zip(bbh, answers, strict=True))
    files = {
        "mmlu": write_jsonl("mmlu.jsonl", MMLU),
        "winogrande": write_jsonl("wino.jsonl", WINO),
        "bbh": write_jsonl("bbh.jsonl", bbh),
    }
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    local_task(task_dir, MMLU_YAML, files["mmlu"])
    local_task(task_dir, WINO_YAML, files["winogrande"])
    (task_dir / "wino.py").write_text(WINO_PY)
    local_task(task_dir, BBH_YAML, files["bbh"])

    out = lm_eval.simple_evaluate(
        model="fastlm",
        model_args=f"checkpoint={checkpoints['gpt']},batch_size=3",
        tasks=["local_mmlu", "local_wino", "local_bbh"],
        num_fewshot=0,
        bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True,
    )

    model, tok = load_model(checkpoints["gpt"])
    ours = {
        fmt: tasks.evaluate(model, tok, tasks.load_task(path), batch_size=2, max_new_tokens=8)
        for fmt, path in files.items()
    }
    results = out["results"]
    assert results["local_mmlu"]["acc,none"] == pytest.approx(ours["mmlu"][0]["accuracy"])
    assert results["local_mmlu"]["acc_norm,none"] == pytest.approx(ours["mmlu"][0]["acc_norm"])
    assert results["local_wino"]["acc,none"] == pytest.approx(ours["winogrande"][0]["accuracy"])
    assert results["local_bbh"]["exact_match,none"] == pytest.approx(ours["bbh"][0]["exact_match"])
    assert ours["bbh"][0]["exact_match"] > 0
    # The same requests, example by example.
    # Both against the float64 model's naive scores of lm-eval's requests.
    for name, fmt in (("local_mmlu", "mmlu"), ("local_wino", "winogrande")):
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        for sample, record in zip(samples, ours[fmt][1], strict=True):
            lls = [resp[0][0] for resp in sample["resps"]]
            pairs = [
                encode_pair(tok, c, k) if c else ([tok.eos_id], tok.encode(k))
                for c, k in sample["arguments"]
            ]  # as FastLM.loglikelihood encodes them
            for ll, our_ll, pair in zip(lls, record["loglikelihoods"], pairs, strict=True):
                assert_logprob(ll, model, [pair], "lm-eval's")
                assert_logprob(our_ll, model, [pair], "fastlm.eval's")
    samples = sorted(out["samples"]["local_bbh"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0].strip() for s in samples] == [r["prediction"] for r in ours["bbh"][1]]


def requests(kind: str, *args) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_loglikelihood(family, checkpoints, models, tokenizer, assert_logprob):
    lm = lm_eval_adapter.FastLM(checkpoint=str(checkpoints[family]), batch_size=2)
    pairs = [
        ("Q: Is the sky blue?\nA:", " yes"),
        ("The trophy did not fit", " in the suitcase"),
        ("", "Return the items"),
        ("Answer: ", "B"),
    ]
    got = lm.loglikelihood(requests("loglikelihood", *pairs))
    eos = tokenizer.eos_id
    for (ll, _), (c, k) in zip(got, pairs, strict=True):
        pair = encode_pair(tokenizer, c, k) if c else ([eos], tokenizer.encode(k))
        assert_logprob(ll, models[family], [pair])
    assert all(isinstance(g, bool) for _, g in got)


@pytest.mark.parametrize("family, max_length", [("gpt", 7), ("gpt", None), ("t5", 5)])
def test_loglikelihood_rolling_matches_lm_evals_windows(
    family, max_length, checkpoints, models, tokenizer, assert_logprob
):
    """lm-eval's own window functions, each window scored by an unpadded forward."""
    lm = lm_eval_adapter.FastLM(
        checkpoint=str(checkpoints[family]), batch_size=3, max_length=max_length
    )
    assert lm.max_length == (max_length or models[family].config.max_position_embeddings)
    texts = [
        "The trophy did not fit in the suitcase because the trophy was too big.",
        "Return the number of items in the container.",
        "Q",
        "",
    ]
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", *[(t,) for t in texts]))
    for text, ll in zip(texts[:-1], got, strict=False):
        windows = get_rolling_token_windows(
            tokenizer.encode(text), tokenizer.eos_id, lm.max_length, 1
        )
        assert_logprob(ll, models[family], [make_disjoint_window(w) for w in windows])
    assert got[-1] == 0.0  # no tokens


def test_generate_until(checkpoints, models, tokenizer, naive_greedy):
    lm = lm_eval_adapter.FastLM(checkpoint=str(checkpoints["llama"]), batch_size=2)
    prompts = ["Q: Is the sky blue?\nA:", "Return the", "Which one barks?"]
    settings = [
        {"until": ["\n"], "max_gen_toks": 6, "do_sample": False, "temperature": 0.0},
        {"until": "e", "max_gen_toks": 4},
        {"until": ["\n"], "max_gen_toks": 6},
    ]
    got = lm.generate_until(requests("generate_until", *zip(prompts, settings, strict=True)))
    model = models["llama"]
    expected = [
        naive_greedy(
            model,
            tokenizer,
            tokenizer.encode(p),
            s["max_gen_toks"],
            stop=s["until"] if isinstance(s["until"], str) else s["until"][0],
        )
        for p, s in zip(prompts, settings, strict=True)
    ]
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


def export(model, tokenizer, root):
    """``model`` saved as ``fastlm train`` saves it, and as its Hugging Face export (weights,
    a config with the tokenizer's special-token ids, the tokenizer): (checkpoint, directory)."""
    checkpoint = save_checkpoint(
        root / "fastlm",
        1,
        model,
        {},
        {"model": model_config_dict(model)},
        extra=lambda d: tokenizer.save(d / "tokenizer.json"),
    )
    to_hf(model, tokenizer).save_pretrained(root / "hf")
    hf_tokenizer(tokenizer, model).save_pretrained(root / "hf")
    return checkpoint, root / "hf"


@pytest.fixture(scope="session")
def exports(models, tokenizer, tmp_path_factory) -> dict:
    return {
        name: export(models[name], tokenizer, tmp_path_factory.mktemp(f"export-{name}"))
        for name in ("gpt", "llama")
    }


def hf_backend(directory, batch_size: int = 3):
    """lm-eval's own Hugging Face model type on an exported directory."""
    return lm_eval.api.registry.get_model("hf").create_from_arg_string(
        f"pretrained={directory},device=cpu,batch_size={batch_size}"
    )


def test_importing_the_adapter_keeps_lm_evals_own_models(tmp_path):
    """lm-eval registers its built-in model types only while its registry is empty: the
    adapter's registration must not come first. A fresh interpreter, as a user's."""
    code = (
        "import fastlm.eval.lm_eval_adapter\n"
        "from lm_eval.api.registry import get_model, model_registry\n"
        "print(get_model('fastlm').__name__, get_model('hf').__name__, "
        "'vllm' in model_registry)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["FastLM", "HFLM", "True"]


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_lm_evals_hf_backend_on_the_export_gives_the_same_results(
    family, exports, models, tokenizer, naive_greedy, write_jsonl, tmp_path, offline
):
    """The same tasks through the adapter and through lm-eval's ``hf`` model type on the
    ``to_hf`` export: equal accuracies, log-likelihoods within fp32 rounding, equal
    generated strings (these untrained models emit special tokens, which both leave out)."""
    model = models[family]
    answers = [
        naive_greedy(model, tokenizer, tokenizer.encode(f"Q: {x}\nA:"), 8).strip()
        for x in BBH_INPUTS
    ]
    bbh = [
        {"input": x, "target": a if i % 2 == 0 else a + "#"}
        for i, (x, a) in enumerate(zip(BBH_INPUTS, answers, strict=True))
    ]
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    local_task(task_dir, MMLU_YAML, write_jsonl("mmlu.jsonl", MMLU))
    local_task(task_dir, WINO_YAML, write_jsonl("wino.jsonl", WINO))
    (task_dir / "wino.py").write_text(WINO_PY)
    local_task(task_dir, BBH_YAML, write_jsonl("bbh.jsonl", bbh))
    checkpoint, directory = exports[family]
    names = ["local_mmlu", "local_wino", "local_bbh"]
    out = {}
    for backend, lm in (
        ("fastlm", lm_eval_adapter.FastLM(str(checkpoint), batch_size=3)),
        ("hf", hf_backend(directory)),
    ):
        out[backend] = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=0,
            bootstrap_iters=0,
            log_samples=True,
            task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        )
    ours, theirs = out["fastlm"], out["hf"]
    for name in names:
        assert ours["results"][name] == theirs["results"][name], name
    assert ours["results"]["local_bbh"]["exact_match,none"] > 0
    # A log-likelihood sums log-softmax terms over the continuation's tokens; each logit
    # comes through num_layers blocks of hidden_size-term dot products: fp32 epsilon times
    # that reduction length, relative to the log-likelihood.
    c = model.config
    rel = torch.finfo(torch.float32).eps * c.hidden_size * c.num_layers
    worst = 0.0
    for name in ("local_mmlu", "local_wino"):
        for a, b in zip(
            *(sorted(o["samples"][name], key=lambda s: s["doc_id"]) for o in (ours, theirs)),
            strict=True,
        ):
            for (ll_a, greedy_a), (ll_b, greedy_b) in zip(
                (r[0] for r in a["resps"]), (r[0] for r in b["resps"]), strict=True
            ):
                assert abs(ll_a - ll_b) <= rel * max(abs(ll_b), 1.0), (name, ll_a, ll_b)
                assert greedy_a == greedy_b
                worst = max(worst, abs(ll_a - ll_b))
    generated = [
        [s["resps"][0][0] for s in sorted(o["samples"]["local_bbh"], key=lambda s: s["doc_id"])]
        for o in (ours, theirs)
    ]
    assert generated[0] == generated[1]
    print(f"{family}: log-likelihoods differ by at most {worst:.3g}")


@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_generate_until_strings_equal_lm_evals_hf_backend(
    family, models, tokenizer, tmp_path, offline
):
    """Generated text leaves special tokens out, as lm-eval's ``hf`` model type does: the
    same tokens give the same strings. (These untrained models answer with sentinels, and
    this T5 with <pad> tokens.)"""
    model = models[family]
    prompts = [
        "Q: Is the sky blue?\nA:",
        "Return the",
        "Which one barks?",
        "The trophy did not fit",
    ]
    eos, special, new = tokenizer.eos_id, tokenizer.special_ids, 8
    settings, answers = [], []
    for p in prompts:
        ids = tokenizer.encode(p) + ([eos] if family == "t5" else [])
        # lm-eval lets an encoder-decoder run to len(prompt) + max_gen_toks tokens (< 64 here)
        # and stops it at EOS only: a T5 answer is cut at its first ordinary token, so both
        # sides' strings hold exactly the tokens before it.
        out = model.generate(torch.tensor([ids]), 64 if family == "t5" else new, eos_token_id=eos)[
            0
        ].tolist()
        answer = out[1:] if family == "t5" else out[len(ids) :]
        answers.append(answer[:new])
        ordinary = [t for t in answer if t not in special]
        until = tokenizer.decode(ordinary[:1]) if family == "t5" and ordinary else "\n"
        settings.append({"until": [until], "max_gen_toks": new, "do_sample": False})
    assert any(t in special - {eos} for a in answers for t in a), answers
    checkpoint, directory = export(model, tokenizer, tmp_path)
    reqs = requests("generate_until", *zip(prompts, settings, strict=True))
    ours = lm_eval_adapter.FastLM(str(checkpoint), batch_size=2).generate_until(reqs)
    theirs = hf_backend(directory, batch_size=2).generate_until(reqs)
    assert ours == theirs
    assert not any("<pad>" in t or "<extra_id_" in t for t in ours)


@pytest.mark.parametrize("backend, family", [("fastlm", "gpt"), ("hf", "llama")])
def test_lm_evals_command_line_with_the_model_registered(
    backend, family, checkpoints, exports, write_jsonl, tmp_path
):
    """``python -m fastlm.eval.lm_eval_adapter`` is lm-eval's command line with fastlm's
    model type added, and lm-eval's own (``hf`` on the export) still there."""
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    local_task(task_dir, MMLU_YAML, write_jsonl("mmlu.jsonl", MMLU))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = (
        f"checkpoint={checkpoints[family]}"
        if backend == "fastlm"
        else f"pretrained={exports[family][1]}"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastlm.eval.lm_eval_adapter",
            "run",
            "--model",
            backend,
            "--model_args",
            args,
            "--tasks",
            "local_mmlu",
            "--include_path",
            str(task_dir),
            "--output_path",
            str(tmp_path / "out"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "local_mmlu" in proc.stdout
    (result_file,) = (tmp_path / "out").rglob("results_*.json")
    acc = json.loads(result_file.read_text())["results"]["local_mmlu"]["acc,none"]
    model, tok = load_model(checkpoints[family])
    (expected, _) = tasks.evaluate(model, tok, tasks.load_task(write_jsonl("m.jsonl", MMLU)))
    assert acc == pytest.approx(expected["accuracy"])
