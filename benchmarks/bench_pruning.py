"""Pruning benchmark: evaluation cost (examples scored) to reach the same gap closed, with and without Optuna's
Wilcoxon pruner, on the planted-recipe task of tests/test_evolve.py and bench_evolve.py.

Task: two tiny Llama sources (hidden 64, 4 layers), 80 texts of 20 tokens sampled from a teacher recipe (60 to
search on, 20 held out), population 12, loglik evaluator in chunks of ``--chunk-size`` examples.

Quality: after every finished trial, the run's best recipe (the search's own rule, ``evolve.best_trial``: the best
held-out score; pruned trials never) is scored on 160 fresh teacher texts; its *gap closed* is
``(found - best source) / (teacher - best source)``.

Cost: examples scored, summed over every finished trial of the run (baselines included): a trial scored in full
costs its 60 search examples, a pruned one the examples it scored before it was stopped, and a baseline or a trial
that led the search (so scored on the held-out split too) 20 more. A trial's other work is not counted (on this
tiny task its assembly costs about as much as its scoring; with a real model, scoring dominates).

Budget: per seed, the unpruned run has ``--trials`` searched trials; its cost is the budget. The pruned run (same
seed) is resumed ``--step`` generations at a time until it has cost at least the budget (so it is given at least as
many examples as the unpruned run, never fewer).

Printed per seed: for the gap levels 50/75/90/100% of the gap the unpruned run ends with, the cost at which each
run first reaches it and the ratio (pruned / unpruned). ``both``: the highest gap both runs reach within the
budget (the unpruned final gap, or the pruned run's best where that is lower), so a pruned run that ends lower is
compared at the quality it does reach.

Printed over the seeds: the mean gap closed of each run's best recipe at 10%, 20%, ... 100% of each seed's budget,
and the cost at equal quality: the fraction of the budget at which the pruned runs' mean gap first reaches the
unpruned runs' final mean gap, over the fraction at which the unpruned runs' mean first reaches it (the issue's
figure: target at most 0.6). A search's course is chaotic (a different candidate early on leads it elsewhere: the
unpruned search alone ends between 0.52 and 1.0 of the gap depending on the seed), so one run per seed compares two
draws; the mean over seeds is the figure, the per-seed lines show its spread.

    OMP_NUM_THREADS=1 python benchmarks/bench_pruning.py [--seeds 0 1 2] [--trials 300] [--chunk-size 8]
        [--p 0.1] [--startup 2] [--step 5]                             # ~15 min on two shared CPU cores
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks"), str(ROOT)]

from bench_evolve import make_task  # noqa: E402  (sources, teacher text and search file of the planted task)
from test_evolve import _sample  # noqa: E402

from dfsmerge import Hop, Recipe, Source, Sources, Transform, assemble  # noqa: E402
from dfsmerge.evaluate import Loglik  # noqa: E402
from dfsmerge.evolve import best_trial, done_trials, evolve, state_of  # noqa: E402
from dfsmerge.space import PRUNE_P, PRUNE_STARTUP, SearchSpace, load_search  # noqa: E402

TEACHER = [Hop(0, 0), Hop(1, 1), Hop(1, 2, Transform(1.3)), Hop(0, 2), Hop(0, 3)]
LEVELS = (0.5, 0.75, 0.9, 1.0)  # fractions of the unpruned run's final gap closed


def trajectory(run: Path, search: Path, quality: callable) -> list[tuple[int, float]]:
    """(cumulative examples scored, gap closed of the best recipe so far) after every finished trial."""
    import optuna

    config = load_search(search)
    space = SearchSpace(config)
    held_out = int(0.25 * 80)
    study = optuna.load_study(study_name=run.name, storage=f"sqlite:///{run / 'study.db'}")
    cost, done, points = 0, [], []
    for trial in done_trials(study.get_trials(deepcopy=False)):
        cost += trial.user_attrs.get("examples", 0) + (held_out if "validation" in trial.user_attrs else 0)
        done.append(trial)
        best = best_trial(done)
        points.append((cost, quality(space.recipe(space.decode(best.params))) if best else 0.0))  # none yet: a source
    return points


def first_reaching(points: list[tuple[int, float]], target: float) -> int | None:
    return next((cost for cost, gap in points if gap >= target - 1e-9), None)


def pruned_trials(run: Path) -> tuple[int, int]:
    """(pruned, finished) trials of the run."""
    import optuna

    done = done_trials(optuna.load_study(study_name=run.name, storage=f"sqlite:///{run / 'study.db'}"
                                         ).get_trials(deepcopy=False))
    return sum(state_of(t) == "pruned" for t in done), len(done)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/dfsbench-pruning")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=300, help="the unpruned run's searched trials")
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--p", type=float, default=PRUNE_P, help="the pruner's p-value threshold")
    parser.add_argument("--startup", type=int, default=PRUNE_STARTUP, help="examples scored before pruning")
    parser.add_argument("--step", type=int, default=5, help="generations the pruned run grows by at a time")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    search = make_task(work, 1, hidden=64, intermediate=128, texts=80, tokens=20)
    doc = yaml.safe_load(search.read_text())
    sources = Sources([Source(p) for p in doc["models"]], dtype="float32")
    teacher, tokenizer = assemble(Recipe([Source(p) for p in doc["models"]], TEACHER), sources)
    fresh = Loglik([{"text": t} for t in _sample(teacher, 160, 20, seed=1)], batch_size=32)
    scores: dict[str, float] = {}

    def score(recipe: Recipe) -> float:
        key = str(recipe.hops)
        if key not in scores:
            scores[key] = fresh(assemble(recipe, sources)[0], tokenizer)
        return scores[key]

    best_source = max(score(Recipe([Source(p)], [Hop(0, layer) for layer in range(4)])) for p in doc["models"])
    target_score = score(Recipe([Source(p) for p in doc["models"]], TEACHER))

    def quality(recipe: Recipe) -> float:
        return (score(recipe) - best_source) / (target_score - best_source)

    def run(seed: int, prune: bool, generations: int) -> tuple[Path, list[tuple[int, float]]]:
        doc["search"].update(seed=seed, generations=generations, prune=args.p if prune else False)
        doc["evaluator"]["chunk_size"] = args.chunk_size
        path = work / f"search_{seed}_{prune}.yml"
        path.write_text(yaml.safe_dump(doc))
        config = load_search(path)
        config.prune_startup = args.startup
        folder = work / f"run_{seed}_{'pruned' if prune else 'full'}"
        evolve(config, folder, quiet=True)
        return folder, trajectory(folder, path, quality)

    print(f"planted task; population 12; chunk size {args.chunk_size}; Wilcoxon pruner p < {args.p}, "
          f"startup {args.startup} examples; "
          f"unpruned: {args.trials} trials\n")
    print(f"{'seed':>4s} {'level':>5s} {'gap':>6s} {'cost, no pruning':>16s} {'with pruning':>12s} {'ratio':>6s}")
    ratios, notes, curves = [], [], []
    for seed in args.seeds:
        _, full = run(seed, False, args.trials // 12)
        final, budget = full[-1][1], full[-1][0]
        generations = 0
        while generations == 0 or points[-1][0] < budget:  # the pruned run grows until it has cost the budget
            generations += args.step
            folder, points = run(seed, True, generations)
        curves.append((budget, full, points))
        for level in LEVELS:
            target = level * final
            a, b = first_reaching(full, target), first_reaching(points, target)
            ratio = b / a if b else float("nan")
            if level == 1.0:
                ratios.append(ratio)
            print(f"{seed:4d} {level:5.0%} {target:6.3f} {a:16d} {b if b else 'not reached':>12} {ratio:6.2f}",
                  flush=True)
        within = [gap for cost, gap in points if cost <= budget]
        common = min(final, max(within, default=-1.0))  # the best gap both runs reach within the budget
        a, b = first_reaching(full, common), first_reaching(points, common)
        print(f"{seed:4d} {'both':>5s} {common:6.3f} {a:16d} {b:12d} {b / a:6.2f}", flush=True)
        pruned, done = pruned_trials(folder)
        notes.append(f"seed {seed}: unpruned {budget} examples, final gap {final:.3f}; pruned run {points[-1][0]} "
                     f"examples, {pruned} of {done} trials pruned, final gap {points[-1][1]:.3f}")
    print("\n" + "\n".join(notes))
    reached = [r for r in ratios if r == r]
    print(f"\nper seed, cost ratio at the unpruned final gap (pruned / unpruned): "
          f"{' '.join(f'{r:.2f}' for r in ratios)}"
          f"{'' if len(reached) == len(ratios) else ' (nan: not reached within the unpruned cost)'}")
    print_mean_curves(curves)


def gap_at(points: list[tuple[int, float]], cost: float) -> float:
    """The gap closed of a run's best recipe once it has spent ``cost`` examples (0: the best source)."""
    return next((gap for spent, gap in reversed(points) if spent <= cost), 0.0)


def print_mean_curves(curves: list[tuple[int, list, list]]) -> None:
    """The mean over seeds of both runs' gap closed at fractions of each seed's budget, and the cost at equal
    quality (see the module docstring). ``curves``: (budget, unpruned points, pruned points) per seed."""
    grid = [i / 100 for i in range(1, 101)]
    mean = {arm: [sum(gap_at(c[arm], f * c[0]) for c in curves) / len(curves) for f in grid] for arm in (1, 2)}
    print(f"\nmean over {len(curves)} seeds, gap closed at a fraction of the budget:")
    print("budget   " + " ".join(f"{f:5.0%}" for f in grid[9::10]))
    for arm, name in ((1, "full"), (2, "pruned")):
        print(f"{name:8s} " + " ".join(f"{g:5.3f}" for g in mean[arm][9::10]))
    final = mean[1][-1]
    a = next(f for f, g in zip(grid, mean[1]) if g >= final - 1e-9)
    b = next((f for f, g in zip(grid, mean[2]) if g >= final - 1e-9), None)
    print(f"cost at equal quality (mean gap {final:.3f}): unpruned {a:.0%} of the budget, pruned "
          + (f"{b:.0%}: ratio {b / a:.2f}" if b else "not within the budget"))


if __name__ == "__main__":
    main()
