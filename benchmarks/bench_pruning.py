"""Pruning benchmark: evaluation cost (examples scored) to reach the same gap closed, with and without Optuna's
Wilcoxon pruner, on the planted-recipe task of tests/test_evolve.py and bench_evolve.py.

Task: two tiny Llama sources (hidden 64, 4 layers), 80 texts of 20 tokens sampled from a teacher recipe (60 to
search on, 20 held out), population 12, loglik evaluator in chunks of ``--chunk-size`` examples. For each seed,
one search without pruning (``--trials`` trials) and one with (``--pruned-trials``; a pruned trial costs the
examples it scored and counts as a trial). After every finished trial the run's best recipe (the search's own
rule: the best held-out score; pruned trials never) is scored on 160 fresh teacher texts; its *gap closed* is
``(found - best source) / (teacher - best source)``. Cost: examples scored, search and held-out. Target per seed:
the gap the unpruned run ends with; printed: the cost at which each run first reaches it, and the ratio
(pruned / unpruned; the issue's target is at most 0.6).

    OMP_NUM_THREADS=1 python benchmarks/bench_pruning.py [--seeds 0 1 2] [--trials 300] [--pruned-trials 600]
        [--chunk-size 8]                                                      # ~1 h on two shared CPU cores
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
from dfsmerge.evolve import done_trials, evolve, score_of, state_of  # noqa: E402
from dfsmerge.space import SearchSpace, load_search  # noqa: E402

TEACHER = [Hop(0, 0), Hop(1, 1), Hop(1, 2, Transform(1.3)), Hop(0, 2), Hop(0, 3)]


def trajectory(run: Path, search: Path, quality: callable) -> list[tuple[int, float]]:
    """(cumulative examples scored, gap closed of the best recipe so far) after every finished trial."""
    import optuna

    config = load_search(search)
    space = SearchSpace(config)
    held_out = int(0.25 * 80)
    study = optuna.load_study(study_name=run.name, storage=f"sqlite:///{run / 'study.db'}")
    cost, best, points = 0, None, []
    for trial in done_trials(study.get_trials(deepcopy=False)):
        cost += trial.user_attrs.get("examples", 0) + (held_out if "validation" in trial.user_attrs else 0)
        searched = score_of(trial) is not None and "baseline" not in trial.user_attrs  # baselines: the sources
        if searched and (best is None or (trial.user_attrs.get("validation", -1e9),
                                                                    trial.value) > (best.user_attrs.get(
                                                                        "validation", -1e9), best.value)):
            best = trial
        points.append((cost, quality(space.recipe(space.decode(best.params))) if best else -1.0))
    return points


def first_reaching(points: list[tuple[int, float]], target: float) -> int | None:
    return next((cost for cost, gap in points if gap >= target - 1e-9), None)


def main() -> None:
    import optuna

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/dfsbench-pruning")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--pruned-trials", type=int, default=600)
    parser.add_argument("--chunk-size", type=int, default=8)
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

    print(f"planted task; population 12; chunk size {args.chunk_size}; Wilcoxon pruner p < 0.1\n")
    print(f"{'seed':>4s} {'gap (no pruning)':>17s} {'cost to reach it':>17s} {'with pruning':>13s} {'ratio':>6s}  "
          f"{'pruned trials':>13s} {'final gap (pruning)':>19s}")
    ratios = []
    for seed in args.seeds:
        points = {}
        for prune, trials in ((False, args.trials), (True, args.pruned_trials)):
            doc["search"].update(seed=seed, generations=trials // 12, prune=prune)
            doc["evaluator"]["chunk_size"] = args.chunk_size
            path = work / f"search_{seed}_{prune}.yml"
            path.write_text(yaml.safe_dump(doc))
            run = work / f"run_{seed}_{'pruned' if prune else 'full'}"
            result = evolve(load_search(path), run, quiet=True)
            points[prune] = trajectory(run, path, quality)
            if prune:
                pruned = sum(state_of(t) == "pruned" for t in done_trials(optuna.load_study(
                    study_name=run.name, storage=f"sqlite:///{run / 'study.db'}").get_trials(deepcopy=False)))
        target = points[False][-1][1]
        full, cut = first_reaching(points[False], target), first_reaching(points[True], target)
        ratio = cut / full if cut else float("nan")
        ratios.append(ratio)
        print(f"{seed:4d} {target:17.3f} {full:17d} {cut if cut else 'not reached':>13} {ratio:6.2f}  "
              f"{pruned:6d}/{result.done:<6d} {points[True][-1][1]:19.3f}", flush=True)
    print(f"\nmean cost ratio (pruned / unpruned, same gap closed): {sum(ratios) / len(ratios):.2f}")


if __name__ == "__main__":
    main()
