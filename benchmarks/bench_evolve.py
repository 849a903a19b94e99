"""Evolutionary-search benchmark: throughput, time outside evaluation, and two workers on one machine.

Two tasks over the same search space (2 sources x 4 layers, num_r 2: 15 free slots, 30 parameters):

- ``planted``: the test's task: tiny sources (hidden 64), 80 texts of 20 tokens sampled from a teacher recipe.
- ``medium``: sources with hidden 512 (intermediate 1024) and 256 texts of 64 tokens: an evaluation of ~1.7 s
  per candidate on two CPU cores, still far cheaper than scoring a real model on a real task.

For each: one worker in-process (trials/s; evaluation = assembly + scoring, against wall time), then through
the CLI one worker with torch's default threads against two workers with one thread each on one SQLite study
(rates from the study's own timestamps, so process start-up is not counted).

    python benchmarks/bench_evolve.py [--tasks planted medium] [--workdir /tmp/dfsbench-evolve]   # ~5 min
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from conftest import make_tiny_source  # noqa: E402  (the tests' tiny Llama sources with a tokenizer)
from test_evolve import _sample, _write_texts  # noqa: E402

from dfsmerge import Hop, Recipe, Source, Sources, Transform, assemble  # noqa: E402
from dfsmerge.evolve import done_trials, evolve, load_search  # noqa: E402

TASKS = {  # name: (sources and data, generations of POPULATION trials per run)
    "planted": (dict(hidden=64, intermediate=128, texts=80, tokens=20), 8),
    "medium": (dict(hidden=512, intermediate=1024, texts=256, tokens=64), 4),
}
POPULATION = 12


def make_task(folder: Path, generations: int, hidden: int, intermediate: int, texts: int, tokens: int) -> Path:
    """Sources, teacher text and a search file in ``folder``; returns the search file."""
    pair = [make_tiny_source(folder / name, seed=seed, hidden=hidden, intermediate=intermediate)
            for name, seed in (("A", 0), ("B", 1))]
    sources = Sources([Source(str(p)) for p in pair], dtype="float32")
    teacher = Recipe([Source(str(p)) for p in pair], [Hop(0, 0), Hop(1, 1), Hop(1, 2, Transform(1.3)), Hop(0, 2),
                                                      Hop(0, 3)])
    _write_texts(folder / "data.jsonl", _sample(assemble(teacher, sources)[0], texts, tokens, seed=0))
    doc = {"models": [str(p) for p in pair], "num_r": 2, "dtype": "float32",
           "search": {"population": POPULATION, "generations": generations, "seed": 0},
           "evaluator": {"type": "loglik", "data": "data.jsonl", "validation": 0.25, "batch_size": 32}}
    (folder / "search.yml").write_text(yaml.safe_dump(doc))
    return folder / "search.yml"


def study_rate(run: Path) -> tuple[int, float]:
    """(finished trials, trials per second between the first start and the last completion)."""
    import optuna

    study = optuna.load_study(study_name=run.name, storage=f"sqlite:///{run / 'study.db'}")
    done = done_trials(study.get_trials(deepcopy=False))
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return len(done), len(done) / span


def cli_workers(search: Path, run: Path, workers: int, threads: int | None) -> tuple[int, float, float]:
    """Run ``workers`` CLI processes on one study; (trials, trials/s from the study, wall seconds)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    processes = [subprocess.Popen([sys.executable, "-m", "dfsmerge", "evolve", str(search), "--out", str(run),
                                   "--quiet"], env=env, stdout=subprocess.DEVNULL) for _ in range(workers)]
    for process in processes:
        if process.wait() != 0:
            raise SystemExit(f"a worker failed with status {process.returncode}")
    return (*study_rate(run), time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/dfsbench-evolve")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    import torch

    print(f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; population {POPULATION}; "
          "30 search parameters\n")
    for name in args.tasks:
        folder = work / name
        folder.mkdir(parents=True)
        task, generations = TASKS[name]
        search = make_task(folder, generations, **task)
        result = evolve(load_search(search), folder / "inprocess", quiet=True)
        t = result.timing
        outside = t.wall - t.evaluation
        print(f"[{name}] one worker in-process: {t.trials} trials in {t.wall:.1f} s = {t.trials / t.wall:.2f} "
              f"trials/s; evaluation {1000 * t.evaluation / t.trials:.0f} ms/trial, outside it "
              f"{1000 * outside / t.trials:.0f} ms/trial = {outside / t.wall:.1%} of wall time")
        one = cli_workers(search, folder / "one", 1, None)
        two = cli_workers(search, folder / "two", 2, 1)
        print(f"[{name}] CLI, 1 worker ({torch.get_num_threads()} threads): {one[0]} trials, {one[1]:.2f} trials/s "
              f"(wall {one[2]:.1f} s with start-up)")
        print(f"[{name}] CLI, 2 workers (1 thread each):  {two[0]} trials, {two[1]:.2f} trials/s "
              f"(wall {two[2]:.1f} s); speed-up {two[1] / one[1]:.2f}x\n")


if __name__ == "__main__":
    main()
