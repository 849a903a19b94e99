"""Scoring a model on a task: the evaluators of ``dfsmerge evolve`` and ``dfsmerge eval``.

An evaluator maps ``(model, tokenizer)`` to one number, higher is better:

- ``loglik``   mean log-likelihood per token of ``{"text": ...}`` lines (``perplexity = exp(-loglik)``)
- ``choice``   accuracy of multiple choice by log-likelihood: ``{"prompt", "choices", "answer"}`` (the answer is
               an index or one of the choices; each choice is appended to the prompt as written)
- ``generate`` exact-match accuracy of greedy generation: ``{"prompt", "answer"}``; the answer is taken from the
               generated text by a regular expression (default: the last number)
- ``python``   ``module:function`` called as ``function(model, tokenizer, examples) -> float``

Data are JSONL files. Examples are tokenized once per tokenizer, sorted by length and padded into batches with
attention masks, so scoring a new candidate is only forward passes.
"""

from __future__ import annotations

import importlib
import json
import math
import random
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .plan import DTYPES, dtype_name
from .recipe import RecipeError

__all__ = ["Evaluator", "Loglik", "Choice", "Generate", "PythonEvaluator", "EVALUATOR_KEYS", "load_jsonl",
           "split_examples", "make_evaluators", "perplexity", "load_model"]

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input ids, attention mask, per-row extra


def load_jsonl(path: str | Path, max_examples: int | None = None, required: Sequence[str] = ()) -> list[dict]:
    """The first ``max_examples`` JSON objects of a JSONL file (blank lines skipped); each must have the
    ``required`` keys."""
    examples: list[dict] = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise RecipeError(f"evaluator.data: cannot read {path}: {exc.strerror}") from None
    for number, line in enumerate(lines, 1):
        if max_examples is not None and len(examples) >= max_examples:
            break
        if not line.strip():
            continue
        try:
            example = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RecipeError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        missing = [k for k in required if not isinstance(example, dict) or k not in example]
        if missing:
            raise RecipeError(f"{path}:{number}: expected keys {list(required)}, missing {missing}")
        examples.append(example)
    if not examples:
        raise RecipeError(f"evaluator.data: {path} holds no examples")
    return examples


def split_examples(examples: list[dict], validation: float | int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """A fixed split into (search, held-out): ``validation`` is a fraction (< 1) or a count of examples, chosen
    by a seeded shuffle so every worker and every resumed run holds out the same ones."""
    n_val = int(validation * len(examples)) if validation < 1 else int(validation)
    if n_val <= 0:
        return examples, []
    if n_val >= len(examples):
        raise RecipeError(f"evaluator.validation: holding out {n_val} of {len(examples)} examples leaves none "
                          "to search on")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def _pad(rows: Sequence[Sequence[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _pad_id(tokenizer: Any) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _token_logliks(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log p(ids[:, t+1] | ids[:, :t+1])`` for every position, shape ``(B, T-1)``, zero at padding."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    ll = -F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")
    return ll * mask[:, 1:]


class Evaluator:
    """Scores ``(model, tokenizer)`` on fixed examples; higher is better. Subclasses turn examples into padded
    batches (:meth:`prepare`, run once per tokenizer) and batches into a score (:meth:`score`)."""

    metric = "score"

    def __init__(self, examples: list[dict], batch_size: int = 8, max_length: int = 1024):
        self.examples = examples
        self.batch_size = batch_size
        self.max_length = max_length
        self._tokenizer: Any = None
        self._batches: list[Batch] = []

    def __len__(self) -> int:
        return len(self.examples)

    def prepare(self, tokenizer: Any) -> list[Batch]:
        raise NotImplementedError

    def score(self, model: torch.nn.Module, tokenizer: Any, batches: list[Batch]) -> float:
        raise NotImplementedError

    def _batched(self, rows: list[list[int]], extra: list[Any], pad_id: int, left: bool = False) -> list[Batch]:
        """Sort rows by length (less padding), cut into batches, pad; ``extra`` travels with each row."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        batches = []
        for start in range(0, len(order), self.batch_size):
            part = order[start:start + self.batch_size]
            ids, mask = _pad([rows[i] for i in part], pad_id, left)
            batches.append((ids, mask, torch.as_tensor([extra[i] for i in part])))
        return batches

    @torch.inference_mode()
    def __call__(self, model: torch.nn.Module, tokenizer: Any) -> float:
        if tokenizer is not self._tokenizer:  # keeps a reference, so an identity check is safe
            self._batches, self._tokenizer = self.prepare(tokenizer), tokenizer
        was_training = model.training
        model.eval()
        try:
            return self.score(model, tokenizer, self._batches)
        finally:
            model.train(was_training)


class Loglik(Evaluator):
    """Mean log-likelihood per predicted token over all ``{"text"}`` lines (each truncated to ``max_length``)."""

    metric = "loglik"

    def prepare(self, tokenizer: Any) -> list[Batch]:
        rows = [ids[:self.max_length] for ids in tokenizer([e["text"] for e in self.examples])["input_ids"]]
        return self._batched(rows, [0] * len(rows), _pad_id(tokenizer))

    def score(self, model: torch.nn.Module, tokenizer: Any, batches: list[Batch]) -> float:
        device = _device(model)
        total = torch.zeros((), dtype=torch.float64)
        count = sum(int(mask[:, 1:].sum()) for _, mask, _ in batches)
        for ids, mask, _ in batches:
            total += _token_logliks(model, ids.to(device), mask.to(device)).sum().double().cpu()
        return float(total / max(count, 1))


class Choice(Evaluator):
    """Accuracy: the choice with the highest summed log-likelihood after the prompt must be the answer."""

    metric = "accuracy"

    def prepare(self, tokenizer: Any) -> list[Batch]:
        rows, starts, self._pairs, self._answers = [], [], [], []
        for i, example in enumerate(self.examples):
            choices, answer = example["choices"], example["answer"]
            index = answer if isinstance(answer, int) and not isinstance(answer, bool) else (
                choices.index(answer) if answer in choices else -1)
            if not 0 <= index < len(choices):
                raise RecipeError(f"evaluator.data: example {i}: answer {answer!r} is neither an index nor one "
                                  f"of the {len(choices)} choices")
            self._answers.append(index)
            prompt = tokenizer(example["prompt"])["input_ids"]
            for j, choice in enumerate(choices):
                cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
                row = (prompt + cont)[-self.max_length:]
                rows.append(row)
                starts.append(len(row) - len(cont))  # first continuation position
                self._pairs.append((i, j))
        # the row index travels with each row, so scores land in the right (example, choice) cell
        batches = self._batched(rows, list(range(len(rows))), _pad_id(tokenizer))
        self._starts = torch.tensor(starts)
        return batches

    def score(self, model: torch.nn.Module, tokenizer: Any, batches: list[Batch]) -> float:
        device = _device(model)
        n_choices = max(j for _, j in self._pairs) + 1
        table = torch.full((len(self.examples), n_choices), -math.inf, dtype=torch.float64)
        pairs = torch.tensor(self._pairs)
        for ids, mask, rows in batches:
            ll = _token_logliks(model, ids.to(device), mask.to(device)).double().cpu()
            targets = torch.arange(1, ids.shape[1])  # position of the token each log-likelihood predicts
            in_choice = targets[None, :] >= self._starts[rows][:, None]
            sums = (ll * in_choice).sum(1)
            table[pairs[rows, 0], pairs[rows, 1]] = sums
        predicted = table.argmax(1)
        return float((predicted == torch.tensor(self._answers)).double().mean())


def normalize_answer(text: str) -> str:
    """Answers compare after dropping thousands separators, surrounding space and a trailing period."""
    return str(text).replace(",", "").strip().rstrip(".")


class Generate(Evaluator):
    """Exact-match accuracy of greedy generation (left-padded batches, at most ``max_new_tokens``); the answer
    is the last match of ``answer_regex`` (its first group, if it has one) in the generated text."""

    metric = "exact_match"

    def __init__(self, examples: list[dict], batch_size: int = 8, max_length: int = 1024,
                 max_new_tokens: int = 64, answer_regex: str = r"-?\d[\d,]*(?:\.\d+)?"):
        super().__init__(examples, batch_size, max_length)
        self.max_new_tokens = max_new_tokens
        self.last_outputs: dict[int, str] = {}  # example index -> text generated by the last call
        try:
            self.pattern = re.compile(answer_regex)
        except re.error as exc:
            raise RecipeError(f"evaluator.answer_regex: {answer_regex!r} is not a regular expression ({exc})") \
                from None

    def extract(self, text: str) -> str | None:
        """The answer in a generated text, or None."""
        matches = list(self.pattern.finditer(text))
        if not matches:
            return None
        last = matches[-1]
        return normalize_answer(last.group(1) if self.pattern.groups else last.group(0))

    def prepare(self, tokenizer: Any) -> list[Batch]:
        rows = [ids[-self.max_length:] for ids in tokenizer([e["prompt"] for e in self.examples])["input_ids"]]
        return self._batched(rows, list(range(len(rows))), _pad_id(tokenizer), left=True)

    def score(self, model: torch.nn.Module, tokenizer: Any, batches: list[Batch]) -> float:
        from transformers import GenerationConfig

        config = GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False,
                                  pad_token_id=_pad_id(tokenizer), eos_token_id=tokenizer.eos_token_id)
        device, correct = _device(model), 0
        for ids, mask, rows in batches:
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
            texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
            for row, text in zip(rows.tolist(), texts):
                self.last_outputs[row] = text
                correct += self.extract(text) == normalize_answer(self.examples[row]["answer"])
        return correct / len(self.examples)


class PythonEvaluator(Evaluator):
    """A user's ``function(model, tokenizer, examples) -> float``, higher is better."""

    metric = "score"

    def __init__(self, function: Callable[[Any, Any, list[dict]], float], examples: list[dict]):
        super().__init__(examples)
        self.function = function

    def prepare(self, tokenizer: Any) -> list[Batch]:
        return []

    def score(self, model: torch.nn.Module, tokenizer: Any, batches: list[Batch]) -> float:
        return float(self.function(model, tokenizer, self.examples))


def _import_function(spec: Any, base: Path) -> Callable:
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise RecipeError(f"evaluator.python: expected 'module:function', got {spec!r}")
    module_name, name = spec.split(":")
    sys.path[:0] = [str(base), "."]  # a module beside the search file, or in the working folder
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RecipeError(f"evaluator.python: cannot import {module_name!r}: {exc}") from None
    finally:
        del sys.path[:2]
    function = getattr(module, name, None)
    if not callable(function):
        raise RecipeError(f"evaluator.python: {module_name} has no function {name!r}")
    return function


_REQUIRED = {"loglik": ("text",), "choice": ("prompt", "choices", "answer"), "generate": ("prompt", "answer"),
             "python": ()}
EVALUATOR_KEYS = ("type", "python", "data", "max_examples", "validation", "batch_size", "max_length",
                  "max_new_tokens", "answer_regex")


def make_evaluators(spec: dict, base: Path = Path(".")) -> tuple[Evaluator, Evaluator | None]:
    """The ``evaluator:`` section of a search file -> (search evaluator, held-out evaluator or None).

    Keys: ``type`` (loglik, choice, generate) or ``python: module:function``; ``data`` (JSONL, relative to
    ``base``); ``max_examples``; ``validation`` (fraction or count held out, default 0.2); ``batch_size``
    (8); ``max_length`` (1024 tokens); for ``generate``: ``max_new_tokens`` (64) and ``answer_regex``.
    """
    if not isinstance(spec, dict):
        raise RecipeError(f"evaluator: expected a mapping with `type` and `data`, got {spec!r}")
    unknown = sorted(set(spec) - set(EVALUATOR_KEYS))
    if unknown:
        raise RecipeError(f"evaluator: unknown keys {unknown}; expected some of {list(EVALUATOR_KEYS)}")
    kind = "python" if "python" in spec else spec.get("type")
    if kind not in _REQUIRED:
        raise RecipeError(f"evaluator.type: expected one of loglik, choice, generate (or `python: "
                          f"module:function`), got {kind!r}")
    for key, low in (("max_examples", 1), ("batch_size", 1), ("max_length", 2), ("max_new_tokens", 1)):
        if key in spec and (not isinstance(spec[key], int) or isinstance(spec[key], bool) or spec[key] < low):
            raise RecipeError(f"evaluator.{key}: expected an integer >= {low}, got {spec[key]!r}")
    validation = spec.get("validation", 0.2)
    if isinstance(validation, bool) or not isinstance(validation, (int, float)) or validation < 0:
        raise RecipeError(f"evaluator.validation: expected a fraction in [0, 1) or a count, got {validation!r}")
    if "data" not in spec and kind != "python":
        raise RecipeError(f"evaluator.data: the {kind} evaluator needs a JSONL file")
    examples = load_jsonl(base / spec["data"], spec.get("max_examples"), _REQUIRED[kind]) if "data" in spec else []
    search, held_out = split_examples(examples, validation) if examples else ([], [])

    def build(part: list[dict]) -> Evaluator:
        if kind == "python":
            return PythonEvaluator(_import_function(spec["python"], base), part)
        sizes = {k: spec[k] for k in ("batch_size", "max_length") if k in spec}
        if kind == "generate":
            extra = {k: spec[k] for k in ("max_new_tokens", "answer_regex") if k in spec}
            return Generate(part, **sizes, **extra)
        return {"loglik": Loglik, "choice": Choice}[kind](part, **sizes)

    return build(search), (build(held_out) if held_out else None)


def perplexity(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 8,
               max_length: int = 1024) -> float:
    """``exp`` of the mean negative log-likelihood per token of ``texts``."""
    return math.exp(-Loglik([{"text": t} for t in texts], batch_size, max_length)(model, tokenizer))


def load_model(target: str, dtype: str | torch.dtype = "float32", device: str = "cpu", cache_dir: str | None = None
               ) -> tuple[torch.nn.Module, Any]:
    """What ``dfsmerge eval`` scores: a model folder (``from_pretrained``), a recipe file (assembled in memory)
    or any other source a recipe may name (a ``.gguf`` file, a hub ID: run as the identity recipe)."""
    dtype = dtype_name(dtype)
    path = Path(target)
    if (path / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(device)
        return model, AutoTokenizer.from_pretrained(path)
    from .assemble import assemble
    from .recipe import Hop, Recipe, Source, load_recipe
    from .sources import read_config

    if path.suffix in (".yml", ".yaml"):
        recipe = load_recipe(path)
    else:
        layers = int(read_config(Source(target), cache_dir)["num_hidden_layers"])
        recipe = Recipe([Source(target)], [Hop(0, layer) for layer in range(layers)]).check()
    return assemble(recipe, dtype=dtype, device=device, cache_dir=cache_dir)
