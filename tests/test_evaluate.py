"""Evaluators against answers computed here by hand: a bigram model whose logits the test sets, and a tiny
Llama scored one example at a time without padding."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import VOCAB, make_tiny_source, make_tiny_tokenizer

from dfsmerge.evaluate import (Choice, Generate, Loglik, load_jsonl, make_evaluators, make_objective, perplexity,
                               speed_defaults, split_examples)
from dfsmerge.recipe import RecipeError

WORDS = [w for w in VOCAB if not w.startswith("<")]


class Bigram(torch.nn.Module):
    """logits[b, t] = table[ids[b, t]]: the next-token distribution depends on the current token only."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.table = torch.nn.Parameter(3 * torch.randn(len(VOCAB), len(VOCAB), generator=torch.Generator()
                                                        .manual_seed(seed)))
        self.calls: list[tuple[int, ...]] = []

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        self.calls.append(tuple(input_ids.shape))
        return SimpleNamespace(logits=self.table[input_ids])

    def logprob(self, prev: int, nxt: int) -> float:
        return float(torch.log_softmax(self.table.detach()[prev].double(), -1)[nxt])


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def _texts(n: int, seed: int = 0) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 12, (n,), generator=gen)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(k),), generator=gen))
            for k in lengths]


def test_loglik_equals_the_bigram_log_likelihood(tokenizer):
    texts = _texts(11)
    model = Bigram()
    total, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        total += sum(model.logprob(a, b) for a, b in zip(ids, ids[1:]))
        count += len(ids) - 1
    evaluator = Loglik([{"text": t} for t in texts], batch_size=4)
    assert evaluator(model, tokenizer) == pytest.approx(total / count, abs=1e-5)
    assert len(model.calls) == 3  # 11 texts in batches of 4
    assert perplexity(model, tokenizer, texts, batch_size=4) == pytest.approx(math.exp(-total / count), rel=1e-5)


def test_loglik_of_a_padded_batch_matches_one_text_at_a_time(tmp_path, tokenizer):
    """A real (tiny) Llama: right padding and the attention mask change nothing."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_tiny_source(tmp_path / "m", seed=3), dtype=torch.float32)
    texts = _texts(6, seed=1)
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            total += float(logp.gather(1, ids[0, 1:, None]).sum())
            count += ids.shape[1] - 1
    assert Loglik([{"text": t} for t in texts], batch_size=3)(model, tokenizer) == pytest.approx(total / count,
                                                                                               abs=1e-4)


def test_choice_picks_the_choice_with_the_highest_log_likelihood(tokenizer):
    model = Bigram(seed=1)
    gen = torch.Generator().manual_seed(2)
    examples, expected = [], []
    for i in range(9):
        prompt = " ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (3,), generator=gen))
        choices = [" ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (1 + k % 3,), generator=gen))
                   for k in range(2 + i % 3)]  # 2 to 4 choices of 1 to 3 words
        sums = []
        for choice in choices:
            ids = tokenizer(prompt + " " + choice)["input_ids"]
            sums.append(sum(model.logprob(a, b) for a, b in list(zip(ids, ids[1:]))[2:]))
        best = max(range(len(choices)), key=sums.__getitem__)
        right = i % 3 != 0  # every third answer is wrong on purpose
        answer = best if right else (best + 1) % len(choices)
        examples.append({"prompt": prompt, "choices": [" " + c for c in choices],
                         "answer": answer if i % 2 else " " + choices[answer]})  # an index or the choice text
        expected.append(right)
    assert Choice(examples, batch_size=5)(model, tokenizer) == pytest.approx(sum(expected) / len(expected))


def test_generate_exact_match_with_batches_and_left_padding(tmp_path, tokenizer):
    """Answers are what greedy generation of each prompt alone (no padding) ends with; half are made wrong."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_tiny_source(tmp_path / "g", seed=4), dtype=torch.float32)
    prompts = _texts(6, seed=5)
    examples = []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
        last = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split()[-1]
        examples.append({"prompt": prompt, "answer": last if i % 2 else "nothing"})
    evaluator = Generate(examples, batch_size=4, max_new_tokens=5, answer_regex=r"\w+")
    tokenizer_no_eos = make_tiny_tokenizer()
    tokenizer_no_eos.eos_token = None  # generate exactly max_new_tokens, as the reference did
    assert evaluator(model, tokenizer_no_eos) == pytest.approx(0.5)
    assert len(evaluator.last_outputs) == 6


def test_answer_extraction():
    default = Generate([{"prompt": "", "answer": 0}])
    assert default.extract("so 12 apples cost 1,234.") == "1234"
    assert default.extract("-3.5 then -7") == "-7"
    assert default.extract("no number here") is None
    grouped = Generate([{"prompt": "", "answer": 0}], answer_regex=r"answer: (\w+)")
    assert grouped.extract("answer: cat ... answer: dog.") == "dog"


def test_python_evaluator_and_split(tmp_path):
    (tmp_path / "mine.py").write_text("def score(model, tokenizer, examples):\n    return len(examples) + 0.5\n")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"x": i}) + "\n" for i in range(10)) + "\n")
    search, held_out = make_evaluators({"python": "mine:score", "data": "d.jsonl", "validation": 0.3}, tmp_path)
    model = torch.nn.Linear(1, 1)
    assert search(model, None) == 7.5 and held_out(model, None) == 3.5
    a, b = split_examples(load_jsonl(data), 0.3)
    assert (a, b) == split_examples(load_jsonl(data), 0.3)  # fixed
    assert sorted(e["x"] for e in a + b) == list(range(10)) and len(b) == 3
    assert split_examples(load_jsonl(data), 0) == (load_jsonl(data), [])
    assert len(load_jsonl(data, max_examples=4)) == 4


@pytest.mark.parametrize("spec, message", [
    ({"type": "loglik"}, "evaluator.data: the loglik evaluator needs a JSONL file"),
    ({"type": "bleu", "data": "d.jsonl"}, "evaluator.type: expected one of"),
    ({"type": "loglik", "data": "d.jsonl", "batch": 3}, "evaluator: unknown keys ['batch']"),
    ({"type": "loglik", "data": "d.jsonl", "batch_size": 0}, "evaluator.batch_size: expected an integer >= 1"),
    ({"type": "choice", "data": "d.jsonl"}, "d.jsonl:1: expected keys ['prompt', 'choices', 'answer']"),
    ({"type": "loglik", "data": "missing.jsonl"}, "evaluator.data: cannot read"),
    ({"type": "loglik", "data": "d.jsonl", "validation": 5}, "evaluator.validation: holding out 5 of 2"),
    ({"type": "loglik", "data": "d.jsonl", "validation": 1.5}, "evaluator.validation: expected a fraction in [0, 1) "
                                                              "or a whole count, got 1.5"),
    ({"python": "nomodule:f", "data": "d.jsonl"}, "evaluator.python: cannot import 'nomodule'"),
    ({"type": "generate", "data": "g.jsonl", "answer_regex": "("}, "evaluator.answer_regex"),
])
def test_evaluator_errors_name_the_field(tmp_path, spec, message):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    (tmp_path / "g.jsonl").write_text('{"prompt": "a", "answer": 1}\n')
    with pytest.raises(RecipeError) as err:
        make_evaluators(spec, tmp_path)
    assert message in str(err.value)


@pytest.mark.parametrize("score, expected", [
    (0.5, 0.5), (3, 3.0), (pytest.importorskip("numpy").float32(0.25), 0.25), (torch.tensor(1.5), 1.5),
    (float("nan"), None), (float("-inf"), None), (10 ** 400, None), ("0.5", None), (True, None),
    (torch.tensor([1.0, 2.0]), None), (None, None), (pytest.importorskip("numpy").True_, None),
    (torch.tensor(True), None), (bytearray(b"2.5"), None), (torch.tensor(1 + 0j), None), (1 + 0j, None),
    (torch.tensor([-2.0]), None),
], ids=["float", "int", "numpy", "0-d tensor", "nan", "-inf", "huge int", "text", "bool", "vector", "none",
        "numpy bool", "tensor bool", "bytearray", "complex tensor", "complex", "1-element vector"])
def test_a_python_evaluator_score_is_any_finite_number(tmp_path, score, expected):
    """Found by the fourth hostile pass: NumPy and 0-d torch numbers were refused; NaN, -inf were accepted and
    10**400 was an OverflowError traceback."""
    (tmp_path / "d.jsonl").write_text('{"x": 1}\n')
    (tmp_path / "scorer.py").write_text("SCORE = None\ndef score(model, tokenizer, examples):\n    return SCORE\n")
    evaluator, _ = make_evaluators({"python": "scorer:score", "data": "d.jsonl", "validation": 0}, tmp_path)
    evaluator.function.__globals__["SCORE"] = score
    if expected is None:
        with pytest.raises(RecipeError, match="python: scorer:score returned .*; expected a finite number"):
            evaluator(torch.nn.Linear(1, 1), None)
    else:
        assert evaluator(torch.nn.Linear(1, 1), None) == expected


def test_bad_json_line_is_named(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(RecipeError, match=r"d.jsonl:2: not valid JSON"):
        load_jsonl(tmp_path / "d.jsonl")


def test_eval_command_compares_models(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from dfsmerge.cli import main

    folders = [make_tiny_source(tmp_path / f"m{s}", seed=s) for s in (6, 7)]
    data = tmp_path / "t.jsonl"
    texts = _texts(5, seed=8)
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    identity = tmp_path / "identity.yml"  # model 6 as a recipe, assembled in memory: the same score
    identity.write_text(f"models: [{folders[0]}]\nhops: [{{layer: 0}}, {{layer: 1}}, {{layer: 2}}, {{layer: 3}}]\n")
    assert main(["eval", *map(str, folders), str(identity), "--data", str(data), "--batch-size", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[3].split()[1:] == lines[1].split()[1:]
    assert "loglik" in lines[0] and "perplexity" in lines[0] and "(5 examples)" in lines[0]
    tokenizer = make_tiny_tokenizer()
    for folder, line in zip(folders, lines[1:]):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        expected = Loglik([{"text": t} for t in texts])(model, tokenizer)
        name, score, ppl = line.split()
        assert name == str(folder) and float(score) == pytest.approx(expected, rel=1e-4)
        assert float(ppl) == pytest.approx(math.exp(-expected), rel=1e-3)


# ------------------------------------------------------------------------------------ chunks, head, objective


def _choice_examples(n: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    pick = lambda k: " ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (k,), generator=gen))  # noqa: E731
    return [{"prompt": pick(3 + i % 3), "choices": [" " + pick(1 + (i + k) % 3) for k in range(2 + i % 3)],
             "answer": i % 2} for i in range(n)]


def _full_logits_logprobs(model, ids: list[int]) -> torch.Tensor:
    """``log p(ids[t+1] | ids[:t+1])`` from the whole model's logits on one unpadded row, float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.fixture(scope="module")
def plain_and_dfs(tmp_path_factory):
    """A tiny Llama as transformers loads it, and a DFS model of two of them assembled in memory (a repeated
    layer, a scale)."""
    from transformers import AutoModelForCausalLM

    from dfsmerge.assemble import Sources, assemble
    from dfsmerge.recipe import Hop, Recipe, Source, Transform

    folder = tmp_path_factory.mktemp("head")
    a, b = (make_tiny_source(folder / name, seed=seed) for name, seed in (("a", 12), ("b", 13)))
    plain = AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32).eval()
    recipe = Recipe([Source(str(a)), Source(str(b))], [Hop(0, 0), Hop(1, 1), Hop(1, 1, Transform(0.7)), Hop(0, 3)],
                    output_model=1)
    return {"plain": plain, "dfs": assemble(recipe, Sources(dtype="float32"))[0]}


@pytest.mark.parametrize("kind", ["plain", "dfs"])
def test_the_head_runs_only_where_scored_and_scores_are_unchanged(plain_and_dfs, tokenizer, kind):
    """Per-example log-likelihoods (loglik) and per-choice sums (choice) equal those of the whole model's logits
    on each example alone, to 1e-5; the head sees exactly the scored positions."""
    model = plain_and_dfs[kind]
    texts, examples = _texts(9, seed=21), _choice_examples(7, seed=22)
    expected_ll = [float(_full_logits_logprobs(model, tokenizer(t)["input_ids"]).mean()) for t in texts]
    expected_sums, right = [], []
    for example in examples:
        prompt = tokenizer(example["prompt"])["input_ids"]
        sums = []
        for text in example["choices"]:
            cont = tokenizer(text, add_special_tokens=False)["input_ids"]
            sums.append(float(_full_logits_logprobs(model, prompt + cont)[-len(cont):].sum()))
        expected_sums.append(sums + [-math.inf] * (4 - len(sums)))
        right.append(max(range(len(sums)), key=sums.__getitem__) == example["answer"])

    rows: list[int] = []  # positions the head is applied to, per call
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    try:
        chunks = list(Loglik([{"text": t} for t in texts], batch_size=4, chunk_size=5).chunks(model, tokenizer))
        assert sum(rows) == sum(len(tokenizer(t)["input_ids"]) - 1 for t in texts)  # every token but the last
        rows.clear()
        choice = Choice(examples, batch_size=3, chunk_size=3)
        accuracy = choice(model, tokenizer)
        assert sum(rows) == sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for e in examples
                                for c in e["choices"])  # the choices' tokens only
    finally:
        hook.remove()
    for index, values in chunks:
        assert values.tolist() == pytest.approx([expected_ll[i] for i in index], abs=1e-5)
    torch.testing.assert_close(choice.last_logliks, torch.tensor(expected_sums, dtype=torch.float64), atol=1e-5, rtol=0)
    assert accuracy == pytest.approx(sum(right) / len(right))


def test_chunks_cover_every_example_once_and_aggregate_to_the_score(tokenizer):
    model = Bigram(seed=5)
    texts = _texts(23, seed=6)
    evaluator = Loglik([{"text": t} for t in texts], batch_size=4, chunk_size=5)
    chunks = list(evaluator.chunks(model, tokenizer))
    assert [len(index) for index, _ in chunks] == [5, 5, 5, 5, 3]
    assert sorted(i for index, _ in chunks for i in index) == list(range(23))
    assert [index for index, _ in chunks] == [index for index, _ in evaluator.chunks(model, tokenizer)]  # fixed
    assert [index for index, _ in chunks][0] != [0, 1, 2, 3, 4]  # a random sample, not the file's first lines
    total, count = 0.0, 0
    for index, values in chunks:
        for i, value in zip(index, values.tolist()):
            ids = tokenizer(texts[i])["input_ids"]
            logprobs = [model.logprob(a, b) for a, b in zip(ids, ids[1:])]
            assert value == pytest.approx(sum(logprobs) / len(logprobs), abs=1e-5)
            total, count = total + sum(logprobs), count + len(logprobs)
    assert evaluator(model, tokenizer) == pytest.approx(total / count, abs=1e-6)
    shuffled = [index for index, _ in evaluator.chunks(model, tokenizer, order=1)]  # a search's order per trial
    assert shuffled != [index for index, _ in chunks] and sorted(shuffled) == sorted(index for index, _ in chunks)
    assert evaluator(model, tokenizer, order=1) == pytest.approx(total / count, abs=1e-6)
    model.train()
    stopped = evaluator.chunks(model, tokenizer)
    next(stopped)
    assert not model.training
    stopped.close()  # a pruned candidate: the rest is never scored, the mode comes back
    assert model.training


def test_weighted_objective_normalises_the_weights(tmp_path, tokenizer):
    texts = _texts(6, seed=7)
    (tmp_path / "wiki.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "quiz.jsonl").write_text('{"prompt": "the cat", "choices": [" is", " red"], "answer": 0}\n')
    objective = make_objective([{"type": "loglik", "data": "wiki.jsonl", "weight": 3, "validation": 0},
                                {"type": "choice", "data": "quiz.jsonl", "name": "q", "validation": 0}], tmp_path)
    assert objective.names == ["wiki", "q"]
    assert [p.weight for p in objective.parts] == [0.75, 0.25]
    model = Bigram(seed=8)
    ll = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        ll += [model.logprob(a, b) for a, b in zip(ids, ids[1:])]
    is_red = model.logprob(VOCAB["cat"], VOCAB["red"]) > model.logprob(VOCAB["cat"], VOCAB["is"])
    expected = [sum(ll) / len(ll), 0.0 if is_red else 1.0]
    scores = [p.search(model, tokenizer) for p in objective.parts]
    assert scores == pytest.approx(expected, abs=1e-6)
    assert objective.value(scores) == pytest.approx(0.75 * expected[0] + 0.25 * expected[1], abs=1e-6)
    single = make_objective({"type": "loglik", "data": "wiki.jsonl"}, tmp_path)
    assert single.names == ["wiki"] and single.parts[0].weight == 1.0 and len(single.parts[0].held_out) == 1


@pytest.mark.parametrize("spec, message", [
    ([], "evaluators: expected a list of evaluator mappings"),
    ([{"type": "loglik", "data": "d.jsonl", "weight": 0}], "evaluators[0].weight: expected a finite number > 0"),
    ([{"type": "loglik", "data": "d.jsonl"}, {"type": "loglik", "data": "d.jsonl"}],
     "evaluators[1].name: expected a name no other evaluator has, got 'd'"),
    ([{"type": "loglik", "data": "d.jsonl"}, {"type": "bleu"}], "evaluators[1].type: expected one of"),
    ([{"type": "loglik", "data": "d.jsonl", "chunk_size": 0}], "evaluators[0].chunk_size: expected an integer"),
])
def test_objective_errors_name_the_evaluator(tmp_path, spec, message):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(RecipeError) as err:
        make_objective(spec, tmp_path)
    assert message in str(err.value)


def test_weights_near_the_float_limit_are_normalised_without_overflow(tmp_path):
    """Two weights of 1e308 sum beyond float's range; each is half of the objective."""
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    objective = make_objective([{"type": "loglik", "data": "d.jsonl", "weight": 1e308, "validation": 0},
                                {"type": "loglik", "data": "d.jsonl", "weight": 1e308, "validation": 0, "name": "e"}],
                               tmp_path)
    assert [p.weight for p in objective.parts] == [0.5, 0.5]


def test_speed_defaults_follow_the_device(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    cpu, _ = make_evaluators({"type": "loglik", "data": "d.jsonl"}, tmp_path, device="cpu")
    gpu, _ = make_evaluators({"type": "loglik", "data": "d.jsonl"}, tmp_path, device="cuda:0")
    assert (cpu.batch_size, cpu.chunk_size, cpu.max_length) == (8, 32, 1024)
    assert (gpu.batch_size, gpu.chunk_size, gpu.max_length) == (32, 128, 1024)
    assert speed_defaults("cpu")["dtype"] == "float32" and speed_defaults("cuda")["dtype"] == "bfloat16"
