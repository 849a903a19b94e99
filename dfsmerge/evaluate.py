"""Scoring a model on a task: the evaluators of ``dfsmerge evolve`` and ``dfsmerge eval``.

An evaluator maps ``(model, tokenizer)`` to one number, higher is better:

- ``loglik``   mean log-likelihood per token of ``{"text": ...}`` lines (``perplexity = exp(-loglik)``)
- ``choice``   accuracy of multiple choice by log-likelihood: ``{"prompt", "choices", "answer"}`` (the answer is
               an index or one of the choices; each choice is appended to the prompt as written)
- ``generate`` exact-match accuracy of greedy generation: ``{"prompt", "answer"}``; the answer is taken from the
               generated text by a regular expression (default: the last number)
- ``lm_eval``  tasks of EleutherAI's lm-evaluation-harness: the mean of a per-document metric (``acc``, ...)
- ``python``   ``module:function`` called as ``function(model, tokenizer, examples) -> float``

Data are JSONL files (``lm_eval``: the tasks' own). Every evaluator scores its examples in *chunks* of
``chunk_size`` examples (:meth:`Evaluator.chunks`), yielding one score per example, so that a search can stop a
weak candidate after a few chunks; the score is the aggregate of all the per-example scores, whatever the chunks.
Each chunk is a seeded random sample of the examples, the same for every candidate. Examples are tokenized once per
tokenizer, sorted by length inside a chunk and padded into batches, so scoring a new candidate is only forward
passes; ``loglik`` and ``choice`` apply the LM head only at the positions they score.

Several evaluators make one objective (:class:`Objective`): the weighted sum of their scores.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import math
import random
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from .families import FAMILIES
from .lm_eval_bridge import HarnessTasks, harness_model, harness_tasks
from .plan import check_device, dtype_name, torch_dtype
from .recipe import RecipeError, brief, check_integer, check_number, read_file

__all__ = ["Evaluator", "Chunk", "Loglik", "Choice", "Generate", "LmEval", "PythonEvaluator", "Objective",
           "WeightedEvaluator", "Text", "load_jsonl", "read_jsonl", "split_examples", "make_evaluators",
           "make_objective", "speed_defaults", "perplexity", "load_model"]

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input ids, attention mask, per-row index


def speed_defaults(device: str) -> dict[str, Any]:
    """The evaluation settings that decide its speed, by device: ``batch_size`` 8 on a CPU, 32 on an accelerator
    (rows per forward pass; no effect on scores beyond rounding); ``dtype`` float32 on a CPU (most CPUs run
    bfloat16 matrix products slower), bfloat16 on an accelerator; ``max_length`` 1024 tokens on both, since it
    cuts examples and so changes scores."""
    cpu = str(device).startswith("cpu")
    return {"batch_size": 8 if cpu else 32, "dtype": "float32" if cpu else "bfloat16", "max_length": 1024}


class Text(str):
    """The type of a field that must hold a string with more than white space (a text to score or a prompt)."""


def load_jsonl(path: str | Path, max_examples: int | None = None,
               required: Sequence[str] | Mapping[str, Any] = (), where: str = "evaluator") -> list[dict]:
    """The first ``max_examples`` JSON objects of a UTF-8 JSONL file (blank lines skipped). ``required`` names
    the keys each must have, or maps them to their types (``str``, :class:`Text`, ``int | str``, ``list[str]``:
    a non-empty list). Every problem is a :class:`RecipeError` at ``file:line`` (``where`` names the evaluator
    otherwise), found when the file is read, before any candidate runs."""
    return [example for _, example in read_jsonl(path, max_examples, required, where)]


def read_jsonl(path: str | Path, max_examples: int | None = None,
               required: Sequence[str] | Mapping[str, Any] = (), where: str = "evaluator") -> list[tuple[str, Any]]:
    """:func:`load_jsonl`'s examples with where each comes from, ``(file:line, example)``."""
    examples: list[tuple[str, Any]] = []
    try:
        lines = read_file(path).split(b"\n")
    except OSError as exc:
        raise RecipeError(f"{where}.data: cannot read {path}: {exc.strerror}") from None
    kinds = dict(required) if isinstance(required, Mapping) else dict.fromkeys(required, object)
    for number, raw in enumerate(lines, 1):
        if max_examples is not None and len(examples) >= max_examples:
            break
        if not raw.strip():
            continue
        try:
            example = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise RecipeError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                              f"{exc.start + 1})") from None
        except json.JSONDecodeError as exc:
            raise RecipeError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        except (RecursionError, ValueError) as exc:  # deep nesting; integers beyond the str conversion limit
            raise RecipeError(f"{path}:{number}: not a JSON line dfsmerge can read ({type(exc).__name__})") from None
        if kinds and not isinstance(example, dict):  # a python evaluator takes any JSON value
            raise RecipeError(f"{path}:{number}: expected a JSON object with keys {list(kinds)}, got "
                              f"{type(example).__name__}")
        missing = [k for k in kinds if k not in example]
        if missing:
            raise RecipeError(f"{path}:{number}: expected keys {list(kinds)}, missing {missing}")
        for key, kind in kinds.items():
            if not _fits(example[key], kind):
                raise RecipeError(f"{path}:{number}: {key}: expected {_type_name(kind, example[key])}, got "
                                  f"{brief(example[key])}")
        examples.append((f"{path}:{number}", example))
    if not examples:
        raise RecipeError(f"{where}.data: {path} holds no examples")
    return examples


def _fits(value: Any, kind: Any) -> bool:
    """``isinstance`` for ``str``, ``int | str``, ``list[str]`` (non-empty); a bool is not a number here;
    :class:`Text` is a string with more than white space."""
    if kind is Text:
        return isinstance(value, str) and bool(value.strip())
    if typing.get_origin(kind) is list:
        item = typing.get_args(kind)[0]
        return isinstance(value, list) and bool(value) and all(_fits(v, item) for v in value)
    kinds = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    return isinstance(value, kinds) and (bool in kinds or object in kinds or not isinstance(value, bool))


def _type_name(kind: Any, value: Any) -> str:
    """What ``kind`` expects, said of ``value``: a blank string where :class:`Text` is expected is told apart."""
    if kind is Text or typing.get_args(kind) == (Text,):
        plain = str if kind is Text else list[str]
        return _type_name(plain, value) if not _fits(value, plain) else (
            "text that is not empty or white space" if kind is Text else "texts that are not empty or white space")
    return getattr(kind, "__name__", None) if typing.get_origin(kind) is None and not isinstance(
        kind, types.UnionType) else str(kind)


def split_examples(examples: list, validation: float | int, seed: int = 0, where: str = "evaluator"
                   ) -> tuple[list, list]:
    """A fixed split into (search, held-out): ``validation`` is a fraction (< 1) or a count of examples, chosen
    by a seeded shuffle so every worker and every resumed run holds out the same ones."""
    n_val = int(validation * len(examples)) if validation < 1 else int(validation)
    if n_val <= 0:
        return examples, []
    if n_val >= len(examples):
        raise RecipeError(f"{where}.validation: holding out {n_val} of {len(examples)} examples leaves none "
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


_HEAD_BLOCK = 4096  # positions per application of the head: bounds the (positions x vocabulary) logits in memory
_PLAIN_HEADS = {family.causal_lm for family in FAMILIES.values()}


def _plain_head(model: torch.nn.Module) -> bool:
    """Whether the model's logits are its output embeddings applied to its decoder's last hidden state, nothing
    more: a causal LM of a family in ``families.FAMILIES`` or a subclass of one (DFS models are). Other models
    (a final logit soft-cap, a logit scale, ...) are run whole."""
    return any(cls.__name__ in _PLAIN_HEADS for cls in type(model).__mro__)


def _token_logliks(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, scored: torch.Tensor
                   ) -> torch.Tensor:
    """``log p(ids[b, t+1] | ids[b, :t+1])`` where ``scored[b, t]`` (bool, ``(B, T-1)``), 0 elsewhere; shape
    ``(B, T-1)``, float32. For a model with a plain head (:func:`_plain_head`) the decoder
    (``get_decoder()``) runs to hidden states and the head (``get_output_embeddings()``) only at the scored
    positions, ``_HEAD_BLOCK`` at a time; a 49k-token head at every position is about a fifth of SmolLM2-135M's
    forward. Any other model runs whole and its logits are gathered."""
    targets = ids[:, 1:][scored]
    if _plain_head(model):
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        head = model.get_output_embeddings()
        ll = torch.cat([-F.cross_entropy(head(h).float(), t, reduction="none") for h, t in
                        zip(hidden[:, :-1][scored].split(_HEAD_BLOCK), targets.split(_HEAD_BLOCK))])
    else:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1][scored]
        ll = -F.cross_entropy(logits.float(), targets, reduction="none")
    out = torch.zeros(scored.shape, dtype=torch.float32, device=ids.device)
    out[scored] = ll
    return out


_UNPREPARED = object()  # the tokenizer an evaluator has prepared its chunks for, before the first call


@dataclass
class Chunk:
    """Some of an evaluator's examples (indices into its ``examples``) and their padded batches."""

    examples: list[int]
    batches: list[Batch] = field(default_factory=list)


class Evaluator:
    """Scores ``(model, tokenizer)`` on fixed examples; higher is better. Subclasses turn examples into chunks of
    padded batches (:meth:`prepare`, run once per tokenizer) and a chunk into per-example scores
    (:meth:`score_chunk`); the score is the mean of the examples' :meth:`contributions`."""

    metric = "score"

    def __init__(self, examples: list, batch_size: int = 8, max_length: int | None = 1024,
                 chunk_size: int | None = None, seed: int = 0, origins: list[str] | None = None):
        self.examples = examples
        self.origins = origins  # where each example comes from, "file:line", for errors
        self.batch_size = batch_size
        self.max_length = max_length
        self.chunk_size = chunk_size or 4 * batch_size
        self.seed = seed
        self._tokenizer: Any = _UNPREPARED
        self._chunks: list[Chunk] = []

    def __len__(self) -> int:
        """The number of per-example scores :meth:`chunks` yields."""
        return len(self.examples)

    def parts(self) -> list[list[int]]:
        """The examples' indices in a seeded random order, cut into chunks of ``chunk_size``: each chunk is a
        random sample of the data, and the same for every candidate."""
        order = list(range(len(self.examples)))
        random.Random(self.seed).shuffle(order)
        return [order[start:start + self.chunk_size] for start in range(0, len(order), self.chunk_size)]

    def prepare(self, tokenizer: Any) -> list[Chunk]:
        """The chunks of padded batches for ``tokenizer``; raises :class:`RecipeError` on an example that has
        nothing to score (:meth:`tokens`)."""
        raise NotImplementedError

    def prepared(self, tokenizer: Any) -> list[Chunk]:
        """:meth:`prepare`'s chunks, kept for the last tokenizer (a search checks its data with it up front)."""
        if tokenizer is not self._tokenizer:  # keeps a reference, so an identity check is safe
            self._chunks, self._tokenizer = self.prepare(tokenizer), tokenizer
        return self._chunks

    def origin(self, i: int, field: str) -> str:
        """``file:line: field`` of example ``i`` (``evaluator.data: example i: field`` without its file)."""
        return f"{self.origins[i] if self.origins else f'evaluator.data: example {i}'}: {field}"

    @staticmethod
    def tokens(tokenizer: Any, texts: list[str], least: int, where: Callable[[int], str], **options: Any
               ) -> list[list[int]]:
        """The token ids of ``texts``, each checked to have at least ``least`` tokens: an example with nothing
        to score would score 0 or a tie, and pass for a perfect candidate. Raises :class:`RecipeError` at
        ``where(i)`` (:meth:`origin`). ``options`` go to the tokenizer."""
        rows = tokenizer(texts, **options)["input_ids"] if texts else []
        for i, row in enumerate(rows):
            if len(row) < least:
                raise RecipeError(f"{where(i)}: expected text with at least {least} token{'s' * (least > 1)}, "
                                  f"got {brief(texts[i])} ({len(row)})")
        return rows

    def score_chunk(self, model: torch.nn.Module, tokenizer: Any, chunk: Chunk) -> torch.Tensor:
        """The scores of ``chunk.examples``, in that order: float64, shape ``(len(chunk.examples),)``."""
        raise NotImplementedError

    def contributions(self, index: list[int], scores: torch.Tensor) -> torch.Tensor:
        """The examples' shares of the score, scaled so that the score is the mean of all of them: each score
        times its example's weight (1 here; ``loglik`` weighs a text by its token count over the mean count)."""
        return scores

    def aggregate(self, scores: torch.Tensor) -> float:
        """The score from all per-example scores (float64, indexed like ``examples``)."""
        return float(self.contributions(list(range(len(self))), scores).mean())

    def _batched(self, rows: list[list[int]], index: list[int], pad_id: int, left: bool = False) -> list[Batch]:
        """Sort rows by length (less padding), cut into batches, pad; ``index`` travels with each row."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        batches = []
        for start in range(0, len(order), self.batch_size):
            part = order[start:start + self.batch_size]
            ids, mask = _pad([rows[i] for i in part], pad_id, left)
            batches.append((ids, mask, torch.as_tensor([index[i] for i in part])))
        return batches

    @torch.inference_mode()
    def chunks(self, model: torch.nn.Module, tokenizer: Any, order: int | None = None
               ) -> Iterator[tuple[list[int], torch.Tensor]]:
        """``(example indices, their scores)`` chunk by chunk (:meth:`parts`), the model in eval mode meanwhile;
        ``order``: a seed that shuffles the order of the chunks (their content stays). Stopping early is allowed:
        the model gets its mode back when the generator is closed."""
        chunks = list(self.prepared(tokenizer))
        if order is not None:
            random.Random(order).shuffle(chunks)
        was_training = model.training
        model.eval()
        try:
            for chunk in chunks:
                yield chunk.examples, self.score_chunk(model, tokenizer, chunk)
        finally:
            model.train(was_training)

    def __call__(self, model: torch.nn.Module, tokenizer: Any,
                 on_chunk: Callable[[list[int], torch.Tensor], None] | None = None, order: int | None = None) -> float:
        """The score. ``on_chunk(example indices, their scores)`` runs after each chunk: a search reports them to
        its pruner there, and stops the scoring by raising (the rest is never scored). ``order``: see
        :meth:`chunks` (a search shuffles per generation: Optuna's ``WilcoxonPruner`` advises a new order per
        trial, so that the search does not fit the first examples; one per generation does that too, and lets
        CMA-ES rank the candidates it stopped on the same examples)."""
        scores = torch.full((len(self),), math.nan, dtype=torch.float64)
        with contextlib.closing(self.chunks(model, tokenizer, order)) as chunks:
            for index, values in chunks:
                scores[index] = values
                if on_chunk is not None:
                    on_chunk(index, values)
        return self.aggregate(scores)


class Loglik(Evaluator):
    """Mean log-likelihood per predicted token over all ``{"text"}`` lines (each truncated to ``max_length``).
    An example's score is its own mean per token; the score weighs them by their token counts."""

    metric = "loglik"

    def prepare(self, tokenizer: Any) -> list[Chunk]:
        rows = [ids[:self.max_length] for ids in self.tokens(
            tokenizer, [e["text"] for e in self.examples], 2, lambda i: self.origin(i, "text"))]
        tokens = torch.tensor([max(len(row) - 1, 0) for row in rows], dtype=torch.float64)
        self._tokens = tokens
        self._weights = tokens / tokens.mean() if tokens.sum() > 0 else torch.ones_like(tokens)
        return [Chunk(part, self._batched([rows[i] for i in part], part, _pad_id(tokenizer))) for part in self.parts()]

    def score_chunk(self, model: torch.nn.Module, tokenizer: Any, chunk: Chunk) -> torch.Tensor:
        device, sums = _device(model), {}
        for ids, mask, rows in chunk.batches:
            mask = mask.to(device)
            ll = _token_logliks(model, ids.to(device), mask, mask[:, 1:].bool())
            sums.update(zip(rows.tolist(), ll.double().sum(1).cpu()))
        index = torch.tensor(chunk.examples)
        return torch.stack([sums[i] for i in chunk.examples]) / self._tokens[index].clamp(min=1)

    def contributions(self, index: list[int], scores: torch.Tensor) -> torch.Tensor:
        return scores * self._weights[index]


class Choice(Evaluator):
    """Accuracy: the choice with the highest summed log-likelihood after the prompt must be the answer. An
    example's score is 1 or 0. ``last_logliks`` holds the summed log-likelihoods of the last call, shape
    ``(examples, most choices)``, float64, -inf where an example has fewer choices."""

    metric = "accuracy"

    def prepare(self, tokenizer: Any) -> list[Chunk]:
        rows, starts, pairs, answers = [], [], [], []
        rows_of: list[list[int]] = []  # example -> its rows, one per choice
        for i, example in enumerate(self.examples):
            choices, answer = example["choices"], example["answer"]
            if len(choices) < 2:
                raise RecipeError(f"{self.origin(i, 'choices')}: expected at least 2 choices (one is always right), "
                                  f"got {len(choices)}")
            index = answer if isinstance(answer, int) and not isinstance(answer, bool) else (
                choices.index(answer) if answer in choices else -1)
            if not 0 <= index < len(choices):
                raise RecipeError(f"{self.origin(i, 'answer')}: expected an index or one of the {len(choices)} "
                                  f"choices, got {brief(answer)}")
            answers.append(index)
            prompt = self.tokens(tokenizer, [example["prompt"]], 1, lambda _: self.origin(i, "prompt"))[0]
            conts = self.tokens(tokenizer, choices, 1, lambda j: self.origin(i, f"choices[{j}]"),
                                add_special_tokens=False)
            rows_of.append([])
            for j, cont in enumerate(conts):
                row = (prompt + cont)[-self.max_length:]
                rows_of[-1].append(len(rows))
                rows.append(row)
                starts.append(len(row) - len(cont))  # first continuation position
                pairs.append((i, j))
        self._starts, self._pairs, self._answers = torch.tensor(starts), torch.tensor(pairs), torch.tensor(answers)
        self.last_logliks = torch.full((len(self.examples), max(j for _, j in pairs) + 1), -math.inf,
                                       dtype=torch.float64)
        pad, chunks = _pad_id(tokenizer), []
        for part in self.parts():  # the row index travels with each row: (example, choice) = self._pairs[row]
            part_rows = [r for i in part for r in rows_of[i]]
            chunks.append(Chunk(part, self._batched([rows[r] for r in part_rows], part_rows, pad)))
        return chunks

    def score_chunk(self, model: torch.nn.Module, tokenizer: Any, chunk: Chunk) -> torch.Tensor:
        device, table = _device(model), self.last_logliks
        for ids, mask, rows in chunk.batches:
            predicted = torch.arange(1, ids.shape[1])  # the position of the token each log-likelihood predicts
            scored = (predicted[None, :] >= self._starts[rows][:, None]) & mask[:, 1:].bool()
            ll = _token_logliks(model, ids.to(device), mask.to(device), scored.to(device))
            table[self._pairs[rows, 0], self._pairs[rows, 1]] = ll.double().sum(1).cpu()
        index = torch.tensor(chunk.examples)
        return (table[index].argmax(1) == self._answers[index]).double()


def normalize_answer(text: str) -> str:
    """Answers compare after dropping thousands separators, surrounding space and a trailing period."""
    return str(text).replace(",", "").strip().rstrip(".")


class Generate(Evaluator):
    """Exact-match accuracy of greedy generation (left-padded batches, at most ``max_new_tokens``); the answer
    is the last match of ``answer_regex`` (its first group, if it has one) in the generated text. An example's
    score is 1 or 0."""

    metric = "exact_match"

    def __init__(self, examples: list[dict], batch_size: int = 8, max_length: int = 1024,
                 chunk_size: int | None = None, max_new_tokens: int = 64,
                 answer_regex: str = r"-?\d[\d,]*(?:\.\d+)?", origins: list[str] | None = None):
        super().__init__(examples, batch_size, max_length, chunk_size, origins=origins)
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

    def prepare(self, tokenizer: Any) -> list[Chunk]:
        rows = [ids[-self.max_length:] for ids in self.tokens(
            tokenizer, [e["prompt"] for e in self.examples], 1, lambda i: self.origin(i, "prompt"))]
        pad = _pad_id(tokenizer)
        return [Chunk(part, self._batched([rows[i] for i in part], part, pad, left=True)) for part in self.parts()]

    def score_chunk(self, model: torch.nn.Module, tokenizer: Any, chunk: Chunk) -> torch.Tensor:
        from transformers import GenerationConfig

        config = GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False,
                                  pad_token_id=_pad_id(tokenizer), eos_token_id=tokenizer.eos_token_id)
        device, correct = _device(model), {}
        for ids, mask, rows in chunk.batches:
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
            texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
            for row, text in zip(rows.tolist(), texts):
                self.last_outputs[row] = text
                correct[row] = float(self.extract(text) == normalize_answer(self.examples[row]["answer"]))
        return torch.tensor([correct[i] for i in chunk.examples], dtype=torch.float64)


class LmEval(Evaluator):
    """Tasks of lm-evaluation-harness (``lm_eval_bridge.py``): the examples are their documents,
    ``{"task", "doc_id"}``; an example's score is the per-document ``metric`` lm-eval computes for it (negated
    where lm-eval says lower is better), the score their mean (for one task, what lm-eval reports for it).
    ``max_length`` None: lm-eval's own rule (the model config's context length)."""

    def __init__(self, harness: HarnessTasks, examples: list[dict], metric: str = "acc", batch_size: int = 8,
                 max_length: int | None = None, chunk_size: int | None = None):
        super().__init__(examples, batch_size, max_length, chunk_size)
        self.harness = harness
        self.metric = metric
        self._metric = harness.metric(metric)

    def prepare(self, tokenizer: Any) -> list[Chunk]:
        return [Chunk(part) for part in self.parts()]

    def score_chunk(self, model: torch.nn.Module, tokenizer: Any, chunk: Chunk) -> torch.Tensor:
        lm = harness_model(model, tokenizer, self.batch_size, self.max_length)
        docs = [self.examples[i] for i in chunk.examples]
        return torch.tensor(self.harness.score(lm, docs, self._metric), dtype=torch.float64)


class PythonEvaluator(Evaluator):
    """A user's ``function(model, tokenizer, examples) -> float``, higher is better. It scores all examples at
    once, so it yields one chunk of one score."""

    metric = "score"

    def __init__(self, function: Callable[[Any, Any, list[dict]], float], examples: list[dict]):
        super().__init__(examples)
        self.function = function

    def __len__(self) -> int:
        return 1

    def prepare(self, tokenizer: Any) -> list[Chunk]:
        return [Chunk([0])]

    def score_chunk(self, model: torch.nn.Module, tokenizer: Any, chunk: Chunk) -> torch.Tensor:
        where = f"python: {self.function.__module__}:{self.function.__name__}"
        try:
            score = self.function(model, tokenizer, self.examples)
        except Exception as exc:  # the user's own error: one line (with --debug, its traceback)
            raise RecipeError(f"{where} raised {type(exc).__name__}: {exc}") from exc
        value = _real_number(score)
        if value is None:
            raise RecipeError(f"{where} returned {brief(score)}; expected a finite number (higher is better)")
        return torch.tensor([value], dtype=torch.float64)


def _real_number(score: Any) -> float | None:
    """``score`` as a finite float when it is a real number: Python's, NumPy's or a 0-d torch tensor; None for
    truth values, complex numbers, text (``float("1")`` works), arrays and non-finite values."""
    kind = str(getattr(score, "dtype", type(score).__name__))
    if isinstance(score, (str, bytes, bytearray)) or getattr(score, "ndim", 0) != 0 or "bool" in kind or \
            "complex" in kind:
        return None
    try:
        value = float(score)
    except Exception:  # TypeError, ValueError, OverflowError, or whatever a __float__ raises
        return None
    return value if math.isfinite(value) else None


def _import_function(spec: Any, base: Path, where: str) -> Callable:
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise RecipeError(f"{where}.python: expected 'module:function', got {spec!r}")
    module_name, name = spec.split(":")
    sys.path[:0] = [str(base), "."]  # a module beside the search file, or in the working folder
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises (SyntaxError, ...) as it runs
        raise RecipeError(f"{where}.python: cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    finally:
        del sys.path[:2]
    function = getattr(module, name, None)
    if not callable(function):
        raise RecipeError(f"{where}.python: {module_name} (imported from {getattr(module, '__file__', None)}) has "
                          f"no function {name!r}; a module named like an installed one is not imported")
    try:
        inspect.signature(function).bind(None, None, None)
    except TypeError:
        raise RecipeError(f"{where}.python: {spec} must take (model, tokenizer, examples); its signature is "
                          f"{inspect.signature(function)}") from None
    except ValueError:  # no signature to inspect (some builtins): it is called as it is
        pass
    return function


_REQUIRED = {"loglik": {"text": Text}, "choice": {"prompt": str, "choices": list[Text], "answer": int | str},
             "generate": {"prompt": Text, "answer": str | int | float}}
_COMMON_KEYS = ("type", "name", "weight", "validation", "batch_size", "max_length", "chunk_size")
_KEYS = {
    "loglik": ("data", "max_examples"),
    "choice": ("data", "max_examples"),
    "generate": ("data", "max_examples", "max_new_tokens", "answer_regex"),
    "lm_eval": ("tasks", "include_path", "num_fewshot", "limit", "metric"),
    "python": ("python", "data", "max_examples"),
}


def _check_integers(spec: dict, where: str) -> None:
    for key, low in (("max_examples", 1), ("batch_size", 1), ("max_length", 2), ("max_new_tokens", 1),
                     ("chunk_size", 1), ("num_fewshot", 0)):
        if key in spec:
            check_integer(spec[key], f"{where}.{key}", low)


def _harness(spec: dict, base: Path, where: str) -> HarnessTasks:
    tasks = spec.get("tasks")
    tasks = [tasks] if isinstance(tasks, str) else tasks
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise RecipeError(f"{where}.tasks: expected a task name or a list of them, got {spec.get('tasks')!r}")
    include_path = spec.get("include_path")
    if include_path is not None:
        if not isinstance(include_path, str) or not (base / include_path).is_dir():
            raise RecipeError(f"{where}.include_path: expected a folder of task YAML files, got {include_path!r}")
        include_path = str((base / include_path).resolve())
    limit = spec.get("limit")
    if limit is not None:
        check_number(limit, f"{where}.limit", "a count of documents per task or a fraction < 1", lambda x: x > 0)
    try:
        return harness_tasks(tuple(tasks), include_path, spec.get("num_fewshot"), limit)
    except RecipeError as exc:  # it names the key at fault
        raise RecipeError(f"{where}.{exc}") from None


def make_evaluators(spec: dict, base: Path = Path("."), device: str = "cpu", where: str = "evaluator"
                    ) -> tuple[Evaluator, Evaluator | None]:
    """One evaluator's section of a search file -> (search evaluator, held-out evaluator or None).

    Keys: ``type`` (loglik, choice, generate, lm_eval) or ``python: module:function``; ``validation``
    (fraction or count of the examples held out, default 0.2); ``batch_size`` and ``max_length`` (defaults by
    ``device``: :func:`speed_defaults`); ``chunk_size`` (examples scored between two chances to stop a weak
    candidate; default 4 x ``batch_size``); ``name`` and ``weight`` (read by :func:`make_objective`).
    JSONL evaluators: ``data`` (relative to ``base``) and ``max_examples``; ``generate``: ``max_new_tokens``
    (64) and ``answer_regex``. ``lm_eval``: ``tasks`` (names, lm-eval's or from ``include_path``, a folder of
    task YAML files relative to ``base``), ``num_fewshot``, ``limit`` (documents per task: lm-eval's
    ``--limit``), ``metric`` (default ``acc``; ``metric,filter`` as lm-eval names them), and ``max_length``
    (default: lm-eval's rule). ``where`` names the section in errors.
    """
    if not isinstance(spec, dict):
        raise RecipeError(f"{where}: expected a mapping with `type` and `data`, got {spec!r}")
    kind = "python" if "python" in spec else spec.get("type")
    if kind not in _KEYS:
        raise RecipeError(f"{where}.type: expected one of loglik, choice, generate, lm_eval (or `python: "
                          f"module:function`), got {kind!r}")
    unknown = sorted(set(spec) - set(_COMMON_KEYS) - set(_KEYS[kind]))
    if unknown:
        raise RecipeError(f"{where}: unknown keys {unknown}; expected some of {list(_COMMON_KEYS + _KEYS[kind])}")
    _check_integers(spec, where)
    validation = spec.get("validation", 0.2)
    check_number(validation, f"{where}.validation", "a fraction in [0, 1) or a whole count",
                 lambda x: 0 <= x < 1 or x == int(x) >= 1)
    sizes = {"batch_size": spec.get("batch_size", speed_defaults(device)["batch_size"]),
             "chunk_size": spec.get("chunk_size")}
    if kind == "lm_eval":
        harness = _harness(spec, base, where)
        metric = spec.get("metric", "acc")
        try:
            harness.metric(metric)
        except RecipeError as exc:
            raise RecipeError(f"{where}.{exc}") from None
        search, held_out = split_examples(harness.docs, validation, where=where)
        build: Callable[[list], Evaluator] = lambda part: LmEval(  # noqa: E731
            harness, part, metric, max_length=spec.get("max_length"), **sizes)
    else:
        if "data" not in spec and kind != "python":
            raise RecipeError(f"{where}.data: the {kind} evaluator needs a JSONL file")
        lines = read_jsonl(base / spec["data"], spec.get("max_examples"), _REQUIRED.get(kind, ()), where) \
            if "data" in spec else []
        search, held_out = split_examples(lines, validation, where=where) if lines else ([], [])
        sizes["max_length"] = spec.get("max_length", speed_defaults(device)["max_length"])

        def build(part: list) -> Evaluator:  # part: (file:line, example) pairs
            examples, origins = [e for _, e in part], [o for o, _ in part]
            if kind == "python":
                return PythonEvaluator(_import_function(spec["python"], base, where), examples)
            if kind == "generate":
                extra = {k: spec[k] for k in ("max_new_tokens", "answer_regex") if k in spec}
                return Generate(examples, **sizes, **extra, origins=origins)
            return {"loglik": Loglik, "choice": Choice}[kind](examples, **sizes, origins=origins)

    return build(search), (build(held_out) if held_out else None)


@dataclass
class WeightedEvaluator:
    """One evaluator of an :class:`Objective`: its name (a column of ``trials.csv``), its weight (normalised)
    and its search and held-out parts."""

    name: str
    weight: float
    search: Evaluator
    held_out: Evaluator | None


class Objective:
    """Several evaluators, one number to maximise: ``sum_i w_i * score_i``, where ``score_i`` is evaluator
    ``i``'s score as it reports it (higher is better: a log-likelihood per token, an accuracy, ...; no rescaling,
    so mind the scales when mixing kinds) and the weights ``w_i`` are the ``weight:`` values divided by their sum
    (they sum to 1). With one evaluator the objective is its score."""

    def __init__(self, parts: list[WeightedEvaluator]):
        self.parts = parts

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.parts]

    def value(self, scores: Sequence[float]) -> float:
        """The weighted sum of the evaluators' scores, given in the order of :attr:`parts`."""
        return sum(p.weight * score for p, score in zip(self.parts, scores))


def _default_name(spec: dict) -> str:
    if "python" in spec:
        return str(spec["python"]).rpartition(":")[2]
    if spec.get("type") == "lm_eval":
        tasks = spec.get("tasks")
        return "+".join(tasks) if isinstance(tasks, list) else str(tasks)
    return Path(str(spec.get("data", spec.get("type")))).stem


def make_objective(spec: dict | list, base: Path = Path("."), device: str = "cpu") -> Objective:
    """A search file's ``evaluator:`` (one mapping) or ``evaluators:`` (a list of them) -> :class:`Objective`.
    Each list item is an evaluator's section (:func:`make_evaluators`) plus ``weight`` (a number > 0, default
    1) and ``name`` (default: its data file's stem, its lm-eval tasks or its Python function; names must differ).
    """
    where = "evaluator" if isinstance(spec, dict) else "evaluators"
    items = [spec] if isinstance(spec, dict) else spec
    if not isinstance(items, list) or not items:
        raise RecipeError(f"{where}: expected a list of evaluator mappings, got {spec!r}")
    parts = []
    for i, item in enumerate(items):
        here = where if isinstance(spec, dict) else f"{where}[{i}]"
        search, held_out = make_evaluators(item, base, device, here)
        weight = check_number(item.get("weight", 1), f"{here}.weight", "a finite number > 0", lambda x: x > 0)
        name = item.get("name", _default_name(item))
        if not isinstance(name, str) or not name or name in [p.name for p in parts]:
            raise RecipeError(f"{here}.name: expected a name no other evaluator has, got {name!r}")
        parts.append(WeightedEvaluator(name, weight, search, held_out))
    top = max(p.weight for p in parts)  # divided by the largest first: a sum of weights near 1e308 stays finite
    total = sum(p.weight / top for p in parts)
    for part in parts:
        part.weight = part.weight / top / total
    return Objective(parts)


def perplexity(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 8,
               max_length: int = 1024) -> float:
    """``exp`` of the mean negative log-likelihood per token of ``texts``."""
    return math.exp(-Loglik([{"text": t} for t in texts], batch_size, max_length)(model, tokenizer))


def load_model(target: str, dtype: str | torch.dtype = "float32", device: str = "cpu", cache_dir: str | None = None,
               check_only: bool = False) -> tuple[torch.nn.Module, Any] | Any:
    """What ``dfsmerge eval`` scores: a model folder (a plain one read as every source is, by :class:`Sources`:
    shapes checked against config.json, tokenizer before weights; a compact one by ``from_pretrained``), a recipe
    file (assembled in memory) or any other source a recipe may name (a ``.gguf`` file, a hub ID: run as the
    identity recipe). A folder whose tokenizer or model cannot be loaded is a :class:`RecipeError` naming it.
    ``check_only``: read all but the weights (configs, tokenizer, recipe, weight files' headers; the model is
    placed on the meta device) and return the tokenizer alone, so that ``eval`` finds a broken target (or data
    that its tokenizer leaves nothing to score in) before scoring any."""
    dtype, device = dtype_name(dtype), check_device(device)
    device = "meta" if check_only else device
    path = Path(target)
    if (path / "config.json").is_file() and _plain_causal_lm(path):
        from .assemble import Sources

        sources = Sources([target], dtype=dtype, device=device, cache_dir=cache_dir)
        model, tokenizer = sources.model(target), sources.tokenizer(target)
        if tokenizer is None:
            raise RecipeError(f"{target}: has no tokenizer files; the evaluators score text with it")
        return tokenizer if check_only else (model, tokenizer)
    if (path / "config.json").is_file():  # a compact DFS folder: its own classes, through transformers
        from transformers import AutoModelForCausalLM

        from .assemble import load_tokenizer
        from .flatten import read_dfs_checkpoint

        read_dfs_checkpoint(path)  # its hop table, weight files and transform tensors, as flatten reads them
        tokenizer = load_tokenizer(path)  # before the weights
        _check_compact_weights(path)  # transformers would score a missing tensor as fresh random weights
        if check_only:
            return tokenizer
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
        except (OSError, ValueError, KeyError, RuntimeError) as exc:  # no weights, a config transformers cannot
            # read, ...
            raise RecipeError(f"{path}: cannot load the model (config.json and its weights): "
                              f"{type(exc).__name__}: {exc}") from None
        return model.to(device), tokenizer
    from .assemble import assemble
    from .recipe import Hop, Recipe, Source, load_recipe
    from .sources import read_config

    if path.suffix in (".yml", ".yaml"):
        recipe = load_recipe(path)
    else:
        layers = int(read_config(Source(target), cache_dir)["num_hidden_layers"])
        recipe = Recipe([Source(target)], [Hop(0, layer) for layer in range(layers)]).check()
    model, tokenizer = assemble(recipe, dtype=dtype, device=device, cache_dir=cache_dir)
    if tokenizer is None:
        raise RecipeError(f"{target}: its input model {recipe.sources[recipe.input_model]} has no tokenizer files; "
                          "the evaluators score text with it")
    return tokenizer if check_only else (model, tokenizer)


def _check_compact_weights(folder: Path) -> None:
    """Raise RecipeError when the weight files of a compact folder lack a tensor its model has (built on the meta
    device from its config: no weight read) or hold one of another shape, by the files' headers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .recipe import Source
    from .sources import open_checkpoint, read_config

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    checkpoint = open_checkpoint(Source(str(folder)), read_config(Source(str(folder))))
    expected = [(name, tuple(t.shape)) for name, t in model.state_dict().items()
                if not (config.tie_word_embeddings and name.startswith("lm_head."))]
    missing = [name for name, _ in expected if name not in checkpoint]
    if missing:
        raise RecipeError(f"{folder}: {len(missing)} tensor(s) the config describes are missing from the weights, "
                          f"e.g. {missing[0]!r}")
    checkpoint.check_shapes(expected, str(folder))


def _plain_causal_lm(folder: Path) -> bool:
    """Whether ``folder`` holds a causal LM of a family dfsmerge knows (not a DFS or classifier checkpoint)."""
    from .families import family_of
    from .plan import is_classifier
    from .recipe import Source
    from .sources import read_config

    config = read_config(Source(str(folder)))
    if "dfs_hops" in config or "num_hops" in config or is_classifier(config):
        return False
    try:
        family_of(config, str(folder))
    except RecipeError:
        return False
    return True

