"""The lm_eval evaluator against lm-eval's own command line: two offline tasks of ours (a task YAML over a local
JSONL file through the `json` dataset builder), a merged folder scored by `lm_eval --model hf`, and the same
recipe assembled in memory scored by dfsmerge."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_source, make_tiny_tokenizer

from dfsmerge.recipe import Hop, Recipe, RecipeError, Source, Transform

pytest.importorskip("lm_eval")

WORDS = "the a cat dog bird fish tree river stone cloud rain sun moon star red blue green".split()
RECIPE = [Hop(0, 0), Hop(1, 1), Hop(1, 1, Transform(0.8)), Hop(0, 2), Hop(0, 3)]
CHOICE_TASK = """task: dfs_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
GENERATE_TASK = """task: dfs_tiny_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
num_fewshot: 0  # fixed: --num_fewshot does not change it
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["</s>"]
  max_gen_toks: 3
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
filter_list:
  - name: last-word
    filter:
      - function: regex
        regex_pattern: "(\\\\w+)\\\\s*$"
      - function: take_first
"""


def _words(r: random.Random, low: int, high: int) -> str:
    return " ".join(r.choice(WORDS) for _ in range(r.randint(low, high)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two sources, the recipe merged into a folder, and the task folder. The generation answers are, for every
    other document, the last word greedy decoding of the merged model (transformers' generate) ends with."""
    from transformers import AutoModelForCausalLM

    from dfsmerge.merge import merge

    root = tmp_path_factory.mktemp("lm_eval")
    sources = [make_tiny_source(root / name, seed=seed) for name, seed in (("A", 0), ("B", 1))]
    recipe = Recipe([Source(str(s)) for s in sources], RECIPE)
    folder = merge(recipe, root / "merged", dtype="float32", quiet=True)
    r = random.Random(0)
    tasks = root / "tasks"
    tasks.mkdir()
    choice = [{"prompt": _words(r, 3, 5), "choices": [_words(r, 1, 3) for _ in range(r.randint(2, 4))]}
              for _ in range(20)]
    for doc in choice:
        doc["answer"] = r.randrange(len(doc["choices"]))
    (tasks / "choice.jsonl").write_text("".join(json.dumps(d) + "\n" for d in choice))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = make_tiny_tokenizer()
    generate = []
    for i in range(12):
        prompt = _words(r, 3, 5)
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=3)
        words = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split()
        generate.append({"prompt": prompt, "answer": words[-1] if i % 2 == 0 and words else "nothing"})
    (tasks / "generate.jsonl").write_text("".join(json.dumps(d) + "\n" for d in generate))
    (tasks / "choice.yaml").write_text(CHOICE_TASK.format(data=tasks / "choice.jsonl"))
    (tasks / "generate.yaml").write_text(GENERATE_TASK.format(data=tasks / "generate.jsonl"))
    return root, recipe, folder, tasks


def _lm_eval_cli(folder: Path, tasks: Path, out: Path) -> tuple[dict, dict]:
    """(results, {task: {doc_id: sample}}) as `lm_eval` writes them with --output_path and --log_samples."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={folder},dtype=float32",
               "--tasks", "dfs_tiny_choice,dfs_tiny_generate", "--include_path", str(tasks), "--num_fewshot", "1",
               "--limit", "15", "--device", "cpu", "--batch_size", "4", "--output_path", str(out), "--log_samples"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    samples = {}
    for name in ("dfs_tiny_choice", "dfs_tiny_generate"):
        lines = next(out.rglob(f"samples_{name}_*.jsonl")).read_text().splitlines()
        samples[name] = {s["doc_id"]: s for s in map(json.loads, lines)}
    return results, samples


def test_scores_equal_lm_evals_command_line_on_the_merged_folder(setup):
    """Scores, per-document metrics, few-shot prompts and responses (log-likelihoods, generated text) of the
    recipe assembled in memory equal those lm-eval logs for the merged folder."""
    from dfsmerge.assemble import Sources, assemble
    from dfsmerge.evaluate import LmEval, make_evaluators

    root, recipe, folder, tasks = setup
    results, samples = _lm_eval_cli(folder, tasks, root / "cli")
    model, tokenizer = assemble(recipe, Sources(recipe.sources, dtype="float32"))  # in memory, nothing written
    for task, metric, key in (("dfs_tiny_choice", "acc", "acc,none"), ("dfs_tiny_choice", "acc_norm", "acc_norm,none"),
                              ("dfs_tiny_generate", "exact_match,last-word", "exact_match,last-word")):
        spec = {"type": "lm_eval", "tasks": [task], "include_path": str(tasks), "num_fewshot": 1, "limit": 15,
                "metric": metric, "validation": 0, "batch_size": 3, "chunk_size": 4}
        evaluator, held_out = make_evaluators(spec, root)
        documents = 15 if task.endswith("choice") else 12  # --limit 15 of 20 and of 12
        assert isinstance(evaluator, LmEval) and held_out is None and len(evaluator) == documents
        per_doc = {evaluator.examples[i]["doc_id"]: float(v) for index, values in evaluator.chunks(model, tokenizer)
                   for i, v in zip(index, values)}
        score = evaluator(model, tokenizer)
        print(f"\n{task} {metric}: lm_eval {results[task][key]:.6f}, dfsmerge {score:.6f}")
        assert score == pytest.approx(results[task][key], abs=1e-12)
        assert per_doc == {d: float(s[key.split(",")[0]]) for d, s in samples[task].items()}
        for doc in evaluator.examples:  # the requests as lm-eval built them, the responses as it computed them
            logged, requests = samples[task][doc["doc_id"]], evaluator.harness.requests(doc)
            assert [r.args[0] for r in requests] == [g["arg_0"] for g in logged["arguments"].values()]
            if task.endswith("choice"):
                assert [r.args[1] for r in requests] == [g["arg_1"] for g in logged["arguments"].values()]
                assert [r.resps[0][0] for r in requests] == pytest.approx(
                    [float(resp[0][0]) for resp in logged["resps"]], abs=1e-4)
            else:
                assert [r.resps[0] for r in requests] == [resp[0] for resp in logged["resps"]]
    assert 0 < results["dfs_tiny_generate"]["exact_match,last-word"] < 1  # some right, some wrong: a real check
    assert 0 < results["dfs_tiny_choice"]["acc,none"] < 1


@pytest.mark.parametrize("change, message", [
    ({"metric": "f1"}, "evaluator.metric: task dfs_tiny_choice has no metric 'f1'"),
    ({"metric": "acc,strict"}, "evaluator.metric: task dfs_tiny_choice has no filter 'strict'"),
    ({"include_path": "nowhere"}, "evaluator.include_path: expected a folder of task YAML files"),
    ({"tasks": []}, "evaluator.tasks: expected a task name or a list of them"),
    ({"limit": 0}, "evaluator.limit: expected a count"),
    ({"data": "x.jsonl"}, "evaluator: unknown keys ['data']"),
])
def test_lm_eval_errors_name_the_field(setup, change, message):
    from dfsmerge.evaluate import make_evaluators

    root, _, _, tasks = setup
    spec = {"type": "lm_eval", "tasks": "dfs_tiny_choice", "include_path": str(tasks), **change}
    with pytest.raises(RecipeError) as err:
        make_evaluators(spec, root)
    assert message in str(err.value)
