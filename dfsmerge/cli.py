"""The ``dfsmerge`` command line: a thin shell over the Python API. Errors print one line, not a traceback
(``--debug`` shows it). Each command imports what it needs when it runs, so ``--help`` imports no torch."""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Callable, NoReturn

__all__ = ["main"]


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return ""


def cmd_merge(args: argparse.Namespace) -> None:
    from .merge import merge

    out = merge(args.recipe, args.output, dtype=args.dtype, device=args.device, max_shard_size=args.max_shard_size,
                force=args.force, quiet=args.quiet, cache_dir=args.cache_dir, format=args.format,
                allow_overflow=args.allow_overflow)
    if not args.quiet:
        print(f"wrote {out}")


def cmd_flatten(args: argparse.Namespace) -> None:
    from .flatten import flatten

    out = flatten(args.input, args.output, dtype=args.dtype, max_shard_size=args.max_shard_size, force=args.force,
                  quiet=args.quiet, cache_dir=args.cache_dir, allow_overflow=args.allow_overflow)
    if not args.quiet:
        print(f"wrote {out}")


def cmd_plan(args: argparse.Namespace) -> None:
    from .merge import plan_recipe
    from .plan import DTYPE_BYTES
    from .recipe import RecipeError

    plan = plan_recipe(args.recipe, args.dtype, args.cache_dir)
    recipe = plan.recipe
    print(recipe.hop_table())
    print()
    for i, src in enumerate(recipe.sources):
        print(f"models[{i}]: {src} ({plan.configs[i].get('model_type')}, "
              f"{plan.configs[i]['num_hidden_layers']} layers)")
    print(f"output: {plan.config['architectures'][0]}, {len(recipe.hops)} layers "
          f"({len(recipe.used_layers())} distinct source layers)")
    print(f"parameters: {plan.num_params():,}")
    try:
        compact = _size(plan.compact_params() * DTYPE_BYTES[args.dtype])
    except RecipeError as exc:
        compact = f"not available ({exc})"
    print(f"size on disk ({args.dtype}): flat {_size(plan.nbytes(args.dtype))}, compact {compact}")


SEARCH_EXAMPLE = """example search.yml:
  models: [path_or_hub_id_A, path_or_hub_id_B]   # or {path, revision}
  num_r: 3                  # repetitions of the layer sequence: the slots are (repetition, model, layer)
  input_layer_model: 0
  output_layer_model: 0
  device: cpu               # or cuda
  dtype: float32            # of the candidates; default: float32 on a CPU, bfloat16 on a GPU
  search:
    population: 16          # CMA-ES population per generation
    generations: 25         # the budget: population x generations searched trials (pruned ones count),
                            # after the baselines
    seed: 0
    scales: [0.5, 1.5]      # the range of every scale; false keeps all scales at 1
    scale_by: slot          # slot: S_k = s[n, m, l], one scale per slot
                            # pair: S_k = W[i_(k-1), i_k], the paper's matrix over the M = models x layers
                            #   layers (i = m * layers + l; the embeddings are the row before hop 0):
                            #   every hop from layer a to layer b has the scale W[a, b]
    sampler: cmaes          # cmaes (full covariance: the default up to 100 parameters), sep-cmaes
                            # (diagonal covariance, cost linear in the parameters: the default above), random
    keep_ends: true         # input model's first layer starts the path, output model's last layer ends it
    init: own_order         # the first searched candidate and CMA-ES's mean: the input model's own order
    baselines: true         # first score each source as it is (its own layers, embeddings and head)
    max_hops: 64            # optional bound on the path length
    sigma0: 0.17            # optional initial step, as a fraction of each parameter's range
    prune: false            # true: stop a candidate clearly worse than the best of the last generation scored in
                            # full (Optuna's WilcoxonPruner on the per-example scores, p < 0.1; a number in (0, 1)
                            # sets p). A pruned candidate costs a chunk or two, so give the search about 2.5x the
                            # generations for the same evaluation cost (bench_pruning.py: see the README)
  evaluator:
    type: loglik            # or choice, generate, lm_eval, or `python: module:function`
    data: data.jsonl
    validation: 0.2         # held-out share that chooses the reported best
    batch_size: 8           # rows per forward pass; default: 8 on a CPU, 32 on a GPU
    max_length: 1024        # tokens per example (longer ones are cut); default 1024
    chunk_size: 32          # examples scored between two pruning checks; default: 4 x batch_size

  # lm-evaluation-harness tasks (pip install 'dfsmerge[lm_eval]'), scored on the in-memory candidate:
  # evaluator: {type: lm_eval, tasks: [arc_easy], num_fewshot: 0, limit: 200, metric: acc_norm}
  #   include_path: my_tasks/ adds a folder of your own task YAML files; metric: a per-document metric,
  #   `name,filter` as lm-eval prints it (exact_match,strict-match); max_length default: lm-eval's rule.

  # several evaluators, one objective: the weighted sum of their scores, each as its evaluator reports it
  # (higher is better; no rescaling, so mind the scales when mixing kinds), weights normalised to sum to 1;
  # each score is a column of trials.csv, named by `name` (default: the data file's stem, the tasks)
  # evaluators:
  #   - {type: loglik, data: wiki.jsonl, weight: 1}
  #   - {type: lm_eval, tasks: [mine], include_path: my_tasks/, metric: acc, weight: 2}

  test:                     # optional, reported only (for the best and the baselines): keep it apart;
    type: loglik            # one evaluator section or a list (as evaluators:), without validation
    data: test.jsonl

The scale S_k multiplies what flows into hop k (the previous hop's MLP output; the embeddings for hop 0).
Every parameter is sampled without bounds and mirrored into its range, so CMA-ES never redraws a sample.
The run folder gets trials.csv, best_recipe.yml, best_recipe_native.yml, progress.png and best_recipe.png,
rewritten after every trial. Rerun the same command to resume; generations may grow (and seed, heartbeat,
prune, device and speed settings may change), the rest of the search may not.
"""


def cmd_evolve(args: argparse.Namespace) -> None:
    from transformers.utils import logging as hf_logging

    from .evolve import evolve
    from .space import load_search
    from .recipe import RecipeError
    from .writer import check_target

    hf_logging.disable_progress_bar()  # the log is one line per trial, also in a file
    search = load_search(args.search)
    if args.merge_best:  # checked now, not after the search; a folder inside the run folder is fine
        check_target(args.merge_best, False, [s.path for s in search.sources])
        best, run = (Path(os.path.abspath(p)) for p in (args.merge_best, args.out))
        if best == run or best in run.parents:
            raise RecipeError(f"--merge-best: {args.merge_best} would replace the run folder {args.out}; name "
                              "another folder (one inside the run folder is fine)")
    result = evolve(search, args.out, storage=args.storage, study_name=args.study,
                    merge_best=args.merge_best, quiet=args.quiet)
    held_out = "" if result.best_validation is None else f", held-out {result.best_validation:.5g}"
    print(f"{result.done} trials; best score {result.best_score:.5g}{held_out}: {result.best_recipe}")
    if args.merge_best:
        print(f"merged the best recipe into {args.merge_best}")


def cmd_eval(args: argparse.Namespace) -> None:
    from .evaluate import Loglik, load_model, make_evaluators, speed_defaults
    from .plan import check_device

    check_device(args.device)  # before any data or weight is read
    if args.search:
        return _eval_search(args)
    defaults = speed_defaults(args.device)
    spec: dict = {"validation": 0, "batch_size": defaults["batch_size"] if args.batch_size is None else args.batch_size}
    if args.evaluator.startswith("python:"):
        spec["python"] = args.evaluator[len("python:"):]
    else:
        spec["type"] = args.evaluator
    options = {"data": args.data, "max_examples": args.max_examples, "max_length": args.max_length,
               "max_new_tokens": args.max_new_tokens, "answer_regex": args.answer_regex,
               "tasks": args.tasks.split(",") if args.tasks else None, "include_path": args.include_path,
               "num_fewshot": args.num_fewshot, "limit": args.limit, "metric": args.metric}
    spec.update({key: value for key, value in options.items() if value is not None})
    evaluator, _ = make_evaluators(spec, device=args.device)
    width = max(len(t) for t in args.models)
    extra = "  perplexity" if isinstance(evaluator, Loglik) else ""
    for target in args.models:  # every target, and the data with its tokenizer, checked before the first is scored
        evaluator.prepared(load_model(target, args.dtype or defaults["dtype"], args.device, args.cache_dir,
                                      check_only=True))
    print(f"{'model':<{width}}  {evaluator.metric:>12}{extra}  ({len(evaluator.examples)} examples)")
    for target in args.models:
        model, tokenizer = load_model(target, args.dtype or defaults["dtype"], args.device, args.cache_dir)
        score = evaluator(model, tokenizer)
        print(f"{target:<{width}}  {score:>12.5g}" + (f"  {math.exp(-score):>10.4g}" if extra else ""), flush=True)


def _eval_search(args: argparse.Namespace) -> None:
    """Score models on a search's splits (search, validation, test), with its evaluators, settings and dtype."""
    from .evaluate import load_model
    from .space import read_search, search_evaluators
    from .recipe import RecipeError

    if args.data or args.evaluator != "loglik":
        raise RecipeError("eval: --search takes the evaluators and their data from the search file; drop --data "
                          "and --evaluator")
    config = read_search(args.search)
    config.device = args.device
    splits = search_evaluators(config)
    sizes = splits.sizes()
    dtype = args.dtype or config.dtype
    width = max(len(t) for t in args.models + ["model"])
    for target in args.models:  # every target, and the data with its tokenizer, checked before the first is scored
        tokenizer = load_model(target, dtype, args.device, args.cache_dir, check_only=True)
        for evaluator in splits.evaluators():
            evaluator.prepared(tokenizer)
    print(f"{args.search}: {dtype}; examples " + ", ".join(f"{name} {n}" for name, n in sizes.items()))
    print(f"{'model':<{width}}" + "".join(f"  {name:>12}" for name in sizes))
    for target in args.models:
        model, tokenizer = load_model(target, dtype, args.device, args.cache_dir)
        scores = [p.search(model, tokenizer) for p in splits.objective.parts]
        row = [splits.objective.value(scores)]
        if "validation" in sizes:
            row.append(splits.validation(model, tokenizer, scores))
        if splits.test is not None:
            row.append(splits.tested(model, tokenizer))
        print(f"{target:<{width}}" + "".join(f"  {score:>12.5g}" for score in row), flush=True)


class ArgumentProblem(Exception):
    """A command-line argument argparse refused, as one line ``<option>: <what was expected>``."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the option first (the usage block is for ``--help``)."""

    def error(self, message: str) -> NoReturn:
        raise ArgumentProblem(_argument_problem(message, self.prog))


_MAX_LINE = 1000  # as RecipeError's bound on a message


def _argument_problem(message: str, prog: str) -> str:
    """argparse's message reworded field first: ``--dtype: expected one of a, b, got 'x'``."""
    named = re.fullmatch(r"argument (\S+): (.*)", message, re.S)
    if named is None:
        required = re.fullmatch(r"the following arguments are required: (.*)", message, re.S)
        unknown = re.fullmatch(r"unrecognized arguments: (.*)", message, re.S)
        line = (f"{required[1]}: missing (see `{prog} --help`)" if required else
                f"{unknown[1]}: unknown argument (see `{prog} --help`)" if unknown else f"{prog}: {message}")
    else:
        name, problem = named[1].split("/")[-1], named[2]
        choice = re.fullmatch(r"invalid choice: (.*) \(choose from (.*)\)", problem, re.S)
        kind = re.fullmatch(r"invalid (int|float) value: (.*)", problem, re.S)
        if choice:
            problem = f"expected one of {choice[2].replace(chr(39), '')}, got {choice[1]}"
        elif kind:
            problem = f"expected {'an integer' if kind[1] == 'int' else 'a number'}, got {kind[2]}"
        elif problem == "expected one argument":
            problem = f"expected a value (one that starts with '-' is written {name}=VALUE)"
        line = f"{name}: {problem}"
    return line if len(line) <= _MAX_LINE else f"{line[:_MAX_LINE // 2]} [... cut ...] {line[-_MAX_LINE // 2:]}"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="output dtype (the folding math runs in float32 first)")
    p.add_argument("--cache-dir", default=None, help="Hugging Face cache folder for hub sources")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dfsmerge", description="Data-flow-space merging of language models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("merge", help="execute a recipe into a Hugging Face model folder")
    p.add_argument("recipe", help="recipe YAML (legacy or native format)")
    p.add_argument("output", help="output folder (must not exist unless --force)")
    _common(p)
    p.add_argument("--device", default="cpu", help="device for the folding math (cpu, cuda)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--force", action="store_true", help="replace a previous output folder (never a source)")
    p.add_argument("--allow-overflow", action="store_true", help="write values beyond the output dtype's range "
                   "as +-inf instead of stopping")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--format", default="flat", choices=["flat", "compact"],
                   help="flat (default): a plain model, one layer per hop; compact: each source layer stored once, "
                   "run by the modeling file the folder carries")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("flatten", help="turn a compact DFS checkpoint (ours, Sakana's EvoLLM layout, the affine "
                       "layout) into a plain model folder")
    p.add_argument("input", help="compact DFS checkpoint folder or hub ID")
    p.add_argument("output", help="output folder (must not exist unless --force)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="output dtype (default: the input's)")
    p.add_argument("--cache-dir", default=None, help="Hugging Face cache folder for a hub input")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--force", action="store_true", help="replace a previous output folder (never the input)")
    p.add_argument("--allow-overflow", action="store_true", help="write values beyond the output dtype's range "
                   "as +-inf instead of stopping")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_flatten)

    p = sub.add_parser("plan", help="show the hop table and output size, reading no weights")
    p.add_argument("recipe")
    _common(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("evolve", help="search DFS recipes by evolution (CMA-ES), resumable and distributed",
                       epilog=SEARCH_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("search", help="search YAML")
    p.add_argument("--out", required=True, help="run folder; an existing one is resumed")
    p.add_argument("--storage", default=None, help="Optuna storage URL shared by all workers, e.g. "
                   "postgresql://user@host/db (default: sqlite in the run folder)")
    p.add_argument("--study", default=None, help="study name in the storage (default: the run folder's name)")
    p.add_argument("--merge-best", default=None, metavar="OUT", help="merge the best recipe into OUT at the end")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_evolve)

    p = sub.add_parser("eval", help="score models, recipes or sources on a JSONL task or lm-eval tasks")
    p.add_argument("models", nargs="+", metavar="MODEL_OR_RECIPE",
                   help="a model folder, a recipe YAML (assembled in memory), a .gguf file or a hub ID")
    p.add_argument("--evaluator", default="loglik", help="loglik (default), choice, generate, lm_eval, or "
                   "python:module:function")
    p.add_argument("--data", default=None, help="JSONL examples (all evaluators but lm_eval)")
    p.add_argument("--search", default=None, metavar="SEARCH_YML", help="score on a search's splits (search, "
                   "validation, test) with its evaluators, their settings and its dtype, instead of --data and "
                   "--evaluator")
    p.add_argument("--max-examples", type=int, default=None, help="use only the first N examples")
    p.add_argument("--batch-size", type=int, default=None, help="rows per forward pass (default: 8 on a CPU, "
                   "32 on a GPU)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per example, longer ones are cut "
                   "(default 1024; lm_eval: lm-eval's rule)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generate: the cap on new tokens (64)")
    p.add_argument("--answer-regex", default=None, help="generate: the answer is the last match (default: the "
                   "last number)")
    p.add_argument("--tasks", default=None, help="lm_eval: task names, comma-separated")
    p.add_argument("--include-path", default=None, help="lm_eval: a folder of your own task YAML files")
    p.add_argument("--num-fewshot", type=int, default=None, help="lm_eval: few-shot examples per prompt")
    p.add_argument("--limit", type=float, default=None, help="lm_eval: documents per task (a count, or a "
                   "fraction when < 1)")
    p.add_argument("--metric", default=None, help="lm_eval: the per-document metric (default acc)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default: float32 on a CPU, bfloat16 on a GPU (with --search: the search's dtype)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dir", default=None, help="Hugging Face cache folder for hub sources")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status. An input problem prints one line
    ``error: <where>: <what was expected>`` and returns 2 (``--debug`` raises it instead, with its traceback);
    Ctrl-C returns 130 and SIGTERM 143, after the same cleanup. A refused command-line argument is such a line
    too (:class:`ArgumentProblem`)."""
    try:
        args = build_parser().parse_args(argv)
    except ArgumentProblem as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    func: Callable[[argparse.Namespace], None] = args.func
    from .recipe import RecipeError
    from .writer import Terminated, sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():
            func(args)
    except (RecipeError, OSError) as exc:
        if args.debug:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except BaseException as exc:  # Ctrl-C or SIGTERM, also when a library failed while handling it (Optuna's
        interrupt = _interrupt_behind(exc)  # storage raises UnboundLocalError from its own except path then)
        if interrupt is None or (args.debug and interrupt is not exc):
            raise
        print("terminated" if isinstance(interrupt, Terminated) else "interrupted", file=sys.stderr)
        return 143 if isinstance(interrupt, Terminated) else 130
    return 0


def _interrupt_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM (a ``KeyboardInterrupt``) that ``exc`` was raised while handling, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__context__
    return None


def _one_line(exc: Exception) -> str:
    """A :class:`RecipeError`'s message (already one line), or ``<file>: <reason>`` for a system error."""
    from .recipe import RecipeError

    if isinstance(exc, OSError) and not isinstance(exc, RecipeError):
        return str(RecipeError(f"{exc.filename or 'I/O'}: {exc.strerror or exc}"))
    return str(exc)
