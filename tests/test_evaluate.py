"""Evaluators against answers computed here by hand: a bigram model whose logits the test sets, and a tiny
Llama scored one example at a time without padding."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import VOCAB, make_tiny_source, make_tiny_tokenizer

from dfsmerge.evaluate import Choice, Generate, Loglik, load_jsonl, make_evaluators, perplexity, split_examples
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
    ({"python": "nomodule:f", "data": "d.jsonl"}, "evaluator.python: cannot import 'nomodule'"),
    ({"type": "generate", "data": "g.jsonl", "answer_regex": "("}, "evaluator.answer_regex"),
])
def test_evaluator_errors_name_the_field(tmp_path, spec, message):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    (tmp_path / "g.jsonl").write_text('{"prompt": "a", "answer": 1}\n')
    with pytest.raises(RecipeError) as err:
        make_evaluators(spec, tmp_path)
    assert message in str(err.value)


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
