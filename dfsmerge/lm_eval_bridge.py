"""EleutherAI's lm-evaluation-harness (lm-eval) as a source of documents, prompts and metrics for dfsmerge.

lm-eval's own ``simple_evaluate`` loads the tasks, builds every document's requests (its prompt, with few-shot
examples drawn by a generator seeded once per task), runs them on a model, filters the answers and computes a
metric per document. :class:`HarnessTasks` does the same steps with the same lm-eval code, split in two:

- once per search: load the tasks and build all their requests, as ``simple_evaluate`` does (``num_fewshot``
  overrides a task's default unless the task fixes 0; few-shot seed 1234), so the few-shot prompts are fixed;
- per candidate and chunk of documents: run those documents' requests on the in-memory model wrapped in lm-eval's
  ``HFLM`` (``pretrained=`` a model object: nothing is written to disk), apply the task's filters and compute
  each document's metric (``Task.process_results``), as lm-eval's ``evaluate`` does for all documents at once.

So the mean of a metric over all documents is the score ``lm_eval --model hf --model_args pretrained=FOLDER``
reports for the same model saved in ``FOLDER`` (tests/test_lm_eval_bridge.py checks it). lm-eval is an optional
dependency (``pip install dfsmerge[lm_eval]``), imported only here and only when an ``lm_eval`` evaluator is used.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from typing import Any, Sequence

from .recipe import RecipeError

__all__ = ["HarnessTasks", "harness_tasks", "FEWSHOT_SEED"]

FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed (simple_evaluate and the command line)


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise RecipeError("type: lm_eval needs lm-evaluation-harness: pip install 'dfsmerge[lm_eval]'") \
            from None
    return lm_eval


class HarnessTasks:
    """lm-eval tasks with their requests built once. ``docs`` lists every document to score as
    ``{"task": name, "doc_id": i}`` (the first ``limit`` of each task: a count, or a fraction when < 1, lm-eval's
    ``--limit``). Errors (lm-eval missing, an unknown task, a bad metric) are :class:`RecipeError` starting with
    the evaluator's key at fault (``type``, ``tasks``, ``metric``)."""

    def __init__(self, tasks: Sequence[str], include_path: str | None = None, num_fewshot: int | None = None,
                 limit: int | float | None = None):
        _lm_eval()
        from lm_eval.evaluator_utils import get_sample_size
        from lm_eval.tasks import TaskManager

        # a folder of the user's alone indexes in milliseconds; lm-eval's own ~12,000 task files take ~20 s
        loaded = None
        if include_path is not None:
            try:
                loaded = TaskManager(include_path=include_path, include_defaults=False).load(list(tasks))["tasks"]
            except KeyError:  # a task of lm-eval's own among them
                pass
        if loaded is None:
            try:
                loaded = TaskManager(include_path=include_path).load(list(tasks))["tasks"]
            except KeyError as exc:
                raise RecipeError(f"tasks: {exc.args[0]}") from None
        self.tasks: dict[str, Any] = loaded
        self.docs: list[dict] = []
        self._requests: dict[tuple[str, int], list[Any]] = {}  # (task, doc_id) -> its instances, in lm-eval's order
        self._documents: dict[tuple[str, int], dict] = {}
        for name, task in self.tasks.items():
            if num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=FEWSHOT_SEED)
            task_limit = get_sample_size(task, limit)
            task.build_all_requests(limit=task_limit, rank=0, world_size=1)
            by_doc = defaultdict(list)
            for instance in task.instances:
                by_doc[instance.doc_id].append(instance)
            for doc_id, doc in task.doc_iterator(rank=0, limit=task_limit, world_size=1):
                self._requests[name, doc_id] = sorted(by_doc[doc_id], key=lambda instance: instance.idx)
                self._documents[name, doc_id] = doc
                self.docs.append({"task": name, "doc_id": doc_id})

    def requests(self, doc: dict) -> list[Any]:
        """The lm-eval ``Instance`` objects of a document (``args``: its prompt and continuation or generation
        settings; ``resps``: the responses of the last :meth:`score`)."""
        return self._requests[doc["task"], doc["doc_id"]]

    def metric(self, spec: str) -> tuple[str, str, float]:
        """``"acc"`` or ``"exact_match,strict-match"`` (lm-eval's ``metric,filter`` names; the filter defaults to
        ``none``) -> (metric, filter, sign): sign -1 where lm-eval says lower is better, so that higher is better.
        Every task must compute the metric per document and aggregate it by the mean."""
        from lm_eval.api.metrics import mean

        name, _, filter_key = str(spec).partition(",")
        filter_key = filter_key or "none"
        signs = set()
        for task_name, task in self.tasks.items():
            aggregation = task.aggregation().get(name)
            if aggregation is None:
                raise RecipeError(f"metric: task {task_name} has no metric {name!r}; it has "
                                  f"{sorted(task.aggregation())}")
            if aggregation is not mean:
                raise RecipeError(f"metric: {name!r} of task {task_name} is aggregated over the whole task "
                                  f"({getattr(aggregation, '__name__', aggregation)}), not averaged over documents; "
                                  "choose a per-document metric such as acc, acc_norm or exact_match")
            filters = [f["name"] for f in task.config.filter_list or []] or ["none"]
            if filter_key not in filters:
                raise RecipeError(f"metric: task {task_name} has no filter {filter_key!r}; it has {filters}")
            signs.add(1.0 if task.higher_is_better().get(name, True) else -1.0)
        return name, filter_key, signs.pop()

    def score(self, lm: Any, docs: Sequence[dict], metric: tuple[str, str, float]) -> list[float]:
        """Each document's metric (times its sign) for the model wrapped in ``lm`` (:func:`harness_model`)."""
        name, filter_key, sign = metric
        keys = [(d["task"], d["doc_id"]) for d in docs]
        by_type: dict[str, list[Any]] = defaultdict(list)
        for key in keys:
            for instance in self._requests[key]:
                instance.resps = []
                by_type[instance.request_type].extend([instance] * instance.repeats)
        for request_type, requests in by_type.items():
            for instance, response in zip(requests, getattr(lm, request_type)(requests, disable_tqdm=True),
                                          strict=True):
                instance.resps.append(response)
        for task_name in {key[0] for key in keys}:
            instances = [i for key in keys if key[0] == task_name for i in self._requests[key]]
            # Task.apply_filters() filters all of a task's instances; these are only the chunk's
            for ensemble in self.tasks[task_name]._filters:
                ensemble.apply(instances)
        return [sign * float(self.tasks[key[0]].process_results(
            self._documents[key], [i.filtered_resps[filter_key] for i in self._requests[key]])[name])
            for key in keys]


@functools.lru_cache(maxsize=8)
def harness_tasks(tasks: tuple[str, ...], include_path: str | None, num_fewshot: int | None,
                  limit: int | float | None) -> HarnessTasks:
    """:class:`HarnessTasks`, built once per process for the same arguments (a search file is checked when it is
    read and used again by the worker)."""
    return HarnessTasks(tasks, include_path, num_fewshot, limit)


def harness_model(model: Any, tokenizer: Any, batch_size: int, max_length: int | None) -> Any:
    """lm-eval's ``HFLM`` around an in-memory causal LM (``max_length`` None: lm-eval's rule, from the config).
    HFLM gives the tokenizer a pad token when it has none (its unknown or end-of-text token)."""
    from lm_eval.models.huggingface import HFLM

    log = logging.getLogger("lm_eval.models.huggingface")  # warns on every model object passed as `pretrained`
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                    max_length=max_length)
    finally:
        log.setLevel(level)
