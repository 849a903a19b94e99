"""Evolutionary search of DFS recipes: the paper's data-flow-space search (Akiba et al. 2024, Sec. 3.2), with
CMA-ES through Optuna. What is searched (the search file, the space and its decoding into recipes) is
``space.py``'s; this module runs the search.

**The run.** The first trials are enqueued: the sources' own models (``baselines``: each model's own layer
order with its own embeddings and head, scale 1), then the start point of CMA-ES (``init: own_order``: the input
model's own order, unit scales), then CMA-ES's samples. The budget is ``population x generations`` searched
trials plus the baselines; generation ``g`` is the ``g``-th block of ``population`` finished searched trials in
order of completion (one worker: CMA-ES's own generations).

Persistence and distribution are Optuna's: every trial lives in an Optuna storage (an SQLite file in the run
folder by default, or a PostgreSQL URL shared by many workers running the same command). A worker starts a trial
only while the budget has room (a trial created beyond it by a race is dropped before it samples), and waits for
the trials other workers run before it stops, so every worker ends with the same table. A worker that dies
leaves its trial RUNNING; after ``heartbeat`` seconds without its heartbeat any worker (a restarted one too)
marks it failed and enqueues it again, once.

The objective is the weighted sum of one or more evaluators' scores (``evaluate.Objective``). Every candidate is
scored chunk by chunk; with ``prune`` (off by default), each example's share of the objective is reported to
Optuna's ``WilcoxonPruner`` (step: the example's index; the values are scaled so that their mean is the objective),
and a candidate clearly worse (one-sided Wilcoxon signed-rank test, ``p < prune``) on the examples scored than the
best of the last ``population`` trials scored in full (:func:`make_pruner`: CMA-ES ranks within a generation) is
stopped there. A *pruned* trial returns an estimate of its objective, as the pruner's documentation advises, so that
CMA-ES ranks it in its generation (a raised ``TrialPruned`` gives CMA-ES no value: it would wait for ``population``
candidates scored in full): the score of the trial it was compared with plus the mean difference on the examples
it scored, which the candidates of one generation score in the same order. It is marked ``pruned``, counts in the
budget and is never the best. Baselines are scored in full and report too, so that the pruner can compare a
candidate with a source.

Outputs in the run folder, rewritten after every trial: ``best_recipe.yml`` (legacy format, for ``dfsmerge merge``),
``best_recipe_native.yml``, ``trials.csv``, and (at most every 30 s and 1% of the time, and at the end)
``progress.png`` and ``best_recipe.png``. Three splits: the search split is optimised, the validation split chooses
the reported best, the test split (``test:``) is only reported, for the best and the baselines.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import random
import shutil
import socket
import statistics
import time
import types
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from .recipe import Recipe, RecipeError
from .writer import check_apart
from .space import PERIODS, SearchConfig, SearchSpace, search_evaluators

__all__ = ["evolve", "EvolveResult", "done_trials", "best_trial", "state_of", "score_of"]

FULL_CMA_MAX = 100  # parameters; above, the default sampler is sep-cmaes (see sampler_kind)
_PLOT_EVERY_S = 30.0
_POLL_S = 1.0  # how often a worker with nothing to start looks at the study again


def summary(recipe: Recipe) -> str:
    """A one-line hop list: ``model.layer`` with ``xscale`` when the scale is not 1."""
    parts = []
    for hop in recipe.hops:
        scale = hop.transform.scale
        parts.append(f"{hop.model}.{hop.layer}" + (f"x{scale:.2f}" if scale != 1.0 else ""))
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------------- study


def _finished(t: Any) -> bool:
    """A trial of the budget that is over: complete, or failed in evaluation. A trial failed because its worker
    died is not (it is retried), nor one dropped because the budget was full (``surplus``)."""
    from optuna.trial import TrialState

    return t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and "error" in t.user_attrs)


def done_trials(trials: Iterable[Any]) -> list[Any]:
    """Finished trials (:func:`_finished`) in order of completion."""
    return sorted((t for t in trials if _finished(t)), key=lambda t: (t.datetime_complete, t.number))


def _counted(t: Any) -> bool:
    """Finished, running or queued: a trial that holds a place in the budget."""
    from optuna.trial import TrialState

    return _finished(t) or t.state in (TrialState.RUNNING, TrialState.WAITING)


def _kind(t: Any) -> str:
    """baseline, init (the start point), retry (of a searched trial whose worker died) or search."""
    attrs = t.user_attrs
    return ("baseline" if "baseline" in attrs else "retry" if "retry_of" in attrs else
            "init" if "init" in attrs else "search")


def _retry_once(study: Any, trial: Any) -> None:
    """Re-enqueue a trial whose worker died: same parameters (or the same baseline), once."""
    marks = {k: v for k, v in trial.user_attrs.items() if k in ("baseline", "init")}
    if "retry_of" not in trial.user_attrs and (trial.params or marks):
        study.enqueue_trial(trial.params, user_attrs={**marks, "retry_of": trial.number})


def _sqlite_file(url: str) -> str | None:
    """The database file of an SQLite storage URL; None for another database. Only ``sqlite:///FILE`` is taken:
    another spelling (a driver, ``file:`` URIs, options, an in-memory database, which is lost with the process and
    whose heartbeat thread has no connection of its own) is a RecipeError, so the file is always known and kept
    apart from the sources."""
    if url.split(":", 1)[0].split("+", 1)[0] != "sqlite":
        return None
    path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
    if path in ("", ":memory:") or "?" in path or path.startswith("file:"):
        raise RecipeError(f"storage {url}: expected sqlite:///FILE (a file path: no driver name, options or "
                          "in-memory database)")
    return path


def _sqlite_engine(url: str) -> dict:
    """SQLite in write-ahead-log mode without an fsync per commit (Optuna commits once per parameter; a
    killed process still loses nothing committed), and no implicit transactions: :func:`_begin_immediate`
    opens each one."""
    import sqlite3

    path = url[len("sqlite:///"):]

    def connect() -> sqlite3.Connection:
        connection = sqlite3.connect(path, timeout=60, check_same_thread=False, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    return {"creator": connect}


def _begin_immediate(connection: Any) -> None:
    """Every SQLite transaction takes the write lock when it starts, so that Optuna's read-then-write steps
    (claiming a queued trial) are atomic between workers, as they are on PostgreSQL (``SELECT ... FOR
    UPDATE``). Without it two workers can claim the same queued trial (pysqlite starts a transaction only at
    the first write; SQLAlchemy's documented pysqlite recipe)."""
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _storage_class() -> type:
    """Optuna's RDB storage, able to write what a running trial records in one transaction."""
    import optuna
    from optuna.distributions import distribution_to_json
    from optuna.storages._rdb import models  # Optuna's tables (a private module: optuna is pinned below 6)
    from optuna.storages._rdb.storage import _create_scoped_session

    value_row = models.TrialIntermediateValueModel

    class SearchStorage(optuna.storages.RDBStorage):
        """Inside :meth:`at_once`, a trial's parameters and intermediate values are collected and inserted
        together when it ends. Optuna gives each its own transaction and queries: ~1.7 ms each on SQLite in WAL
        mode, 7 s per sample for the 4288 parameters of pairwise scales at the paper's size, and 0.25 s per trial
        for the reports of 150 examples to the pruner; together ~0.1 ms each (``benchmarks/bench_evolve.py``).
        Optuna's checks per row are not needed there: the trial is this worker's running one, the distributions
        are the search's fixed ones, and each example is reported once."""

        pending: list | None = None

        @contextmanager
        def at_once(self) -> Iterator[None]:
            self.pending = []
            try:
                yield
                with _create_scoped_session(self.scoped_session) as session:
                    session.add_all(self.pending)
            finally:
                self.pending = None

        def _set_trial_param(self, trial_id: int, name: str, value: float, distribution: Any,
                             previous: Any) -> None:  # what Optuna's cache calls for each parameter
            if self.pending is None:
                return super()._set_trial_param(trial_id, name, value, distribution, previous)
            self.pending.append(models.TrialParamModel(trial_id=trial_id, param_name=name, param_value=value,
                                                       distribution_json=distribution_to_json(distribution)))

        def set_trial_intermediate_value(self, trial_id: int, step: int, value: float) -> None:
            if self.pending is None:
                return super().set_trial_intermediate_value(trial_id, step, value)
            stored, kind = value_row.intermediate_value_to_stored_repr(value)
            self.pending.append(value_row(trial_id=trial_id, step=step, intermediate_value=stored,
                                          intermediate_value_type=kind))

    return SearchStorage


def _storage(url: str, heartbeat: int) -> Any:
    """The search's storage (:func:`_storage_class`) with a heartbeat: a trial silent for ``heartbeat`` seconds
    is failed and retried."""
    import optuna
    import sqlalchemy

    if url.startswith("postgresql://"):  # one driver whatever SQLAlchemy's default: psycopg 3
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    sqlite = _sqlite_file(url) is not None
    engine_kwargs = _sqlite_engine(url) if sqlite else {"pool_pre_ping": True}
    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # the heartbeat is marked experimental since Optuna 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                rdb = _storage_class()(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=max(1, heartbeat // 5),
                    grace_period=heartbeat, heartbeat_stale_trial_callback=_retry_once)
            break
        except ImportError as exc:  # the URL's database driver is not installed (Optuna re-raises SQLAlchemy's)
            driver = exc.name or getattr(exc.__cause__, "name", None) or "module"
            extra = "pip install 'dfsmerge[postgres]'" if url.startswith("postgresql") else f"install {driver}"
            raise RecipeError(f"storage {url}: its database driver {driver} is not installed ({extra})") from None
        except sqlalchemy.exc.SQLAlchemyError as exc:  # also: workers creating a new database's tables at once
            if attempt == 4:
                raise RecipeError(f"storage {url}: cannot open it: {exc}") from None
            time.sleep(0.2 + random.random())
    if sqlite:
        sqlalchemy.event.listen(rdb.engine, "begin", _begin_immediate)
    return rdb


def sampler_kind(config: SearchConfig, space: SearchSpace) -> str:
    """The sampler a search uses: the configured one, else full CMA-ES up to ``FULL_CMA_MAX`` parameters and
    separable (diagonal) CMA-ES above. Above ~100 parameters full CMA-ES cannot learn its covariance within a
    search's budget (its learning rates are ~2/n^2 per generation: under 0.5% in 25 generations at n = 238),
    while its cost grows as n^3 per sample and its state (n^2 floats, stored by Optuna after every
    generation: ~700 storage rows at n = 238) as n^2; separable CMA-ES learns the diagonal ~n/3 times faster
    at a cost linear in n (Ros & Hansen 2008)."""
    return config.sampler or ("cmaes" if len(space.boxes) <= FULL_CMA_MAX else "sep-cmaes")


def make_sampler(config: SearchConfig, space: SearchSpace) -> Any:
    """Optuna's ``CmaEsSampler`` over the fixed space (baselines skipped, the start point handed to the init
    trial), or a random sampler seeded per trial (search baseline of the benchmark)."""
    import numpy as np
    import optuna
    import threadpoolctl

    kind = sampler_kind(config, space)
    if kind == "random":
        class TrialSeededRandom(optuna.samplers.RandomSampler):
            """Uniform draws seeded by the seed, the trial number and the parameter: one worker is reproducible
            and workers with one seed draw different candidates."""

            def sample_independent(self, study: Any, trial: Any, name: str, distribution: Any) -> float:
                rng = np.random.RandomState([config.seed, trial.number, zlib.crc32(name.encode())])
                return float(rng.uniform(distribution.low, distribution.high))

        return TrialSeededRandom(config.seed)

    distributions, start = space.distributions(), space.x0()
    blas = threadpoolctl.ThreadpoolController()

    class SearchCmaEs(optuna.samplers.CmaEsSampler):
        """CMA-ES over the whole space from the first trial on (no intersection of past trials, which a
        baseline without parameters would empty); baseline trials take no sample; the init trial is the mean.
        NumPy's BLAS runs on one thread here: CMA-ES's eigendecompositions are small, and BLAS threads that
        fight torch's (or other processes) for the cores made them 15x slower on two busy cores."""

        def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
            return dict(distributions)

        def sample_relative(self, study: Any, trial: Any, search_space: dict[str, Any]) -> dict[str, Any]:
            if "baseline" in trial.user_attrs:
                return {}
            with blas.limit(limits=1, user_api="blas"):
                params = super().sample_relative(study, trial, search_space)  # also files it in a generation
            return dict(start) if "init" in trial.user_attrs and start is not None else params

    with warnings.catch_warnings():  # x0 and sigma0 are deprecated in Optuna 4.9, to be removed in 6.0
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # use_separable_cma
        # sigma0 is in Optuna's [0, 1] coordinates of each box, which is 4 * PERIODS + 1 ranges wide
        return SearchCmaEs(x0=start, sigma0=(config.sigma0 or 1 / 6) / (4 * PERIODS + 1), seed=config.seed,
                           popsize=config.population, n_startup_trials=0,
                           use_separable_cma=kind == "sep-cmaes")


def make_pruner(config: SearchConfig) -> Any:
    """Optuna's ``NopPruner`` when pruning is off; else Optuna's ``WilcoxonPruner`` (``p < config.prune``, from
    ``config.prune_startup`` examples on) comparing a candidate with :func:`reference_trial`, the best of the last
    ``population`` trials scored in full, instead of the best of the whole study. CMA-ES ranks a candidate within
    its generation, and the new mean is a weighted mean of the better half (Hansen, "The CMA Evolution Strategy: A
    Tutorial", 2016): once a generation is worse than an earlier best, comparing with that best stops nearly all
    of it, and CMA-ES ranks it on a few examples each (``benchmarks/bench_pruning.py``: the search then stalls).
    ``WilcoxonPruner.prune`` reads ``study.best_trial`` and ``study.direction`` only (Optuna 3.6 to 5.0)."""
    import optuna

    if not config.prune:
        return optuna.pruners.NopPruner()
    with warnings.catch_warnings():  # the Wilcoxon pruner is marked experimental since Optuna 3.6
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        wilcoxon = optuna.pruners.WilcoxonPruner(p_threshold=config.prune, n_startup_steps=config.prune_startup)

    class RecentBestPruner(optuna.pruners.BasePruner):
        def prune(self, study: Any, trial: Any) -> bool:
            reference = reference_trial(study.get_trials(deepcopy=False), config.population)
            compared = types.SimpleNamespace(best_trial=reference, direction=study.direction)
            return reference is not None and wilcoxon.prune(compared, trial)

    return RecentBestPruner()


def reference_trial(trials: Iterable[Any], window: int) -> Any | None:
    """What a candidate is compared with when pruning: the highest value among the last ``window`` finished
    trials (in order of completion) scored in full with their examples reported (baselines included, pruned
    trials not); None before the first."""
    from optuna.trial import TrialState

    full = [t for t in trials if t.state == TrialState.COMPLETE and "pruned" not in t.user_attrs
            and t.intermediate_values]
    full.sort(key=lambda t: (t.datetime_complete, t.number))
    return max(full[-window:], key=lambda t: t.value, default=None)


def _data_hashes(spec: Any, base: Path) -> dict[str, str]:
    """sha256 of every ``data`` file an evaluator section names (sections may nest)."""
    hashes: dict[str, str] = {}
    if isinstance(spec, dict):
        if isinstance(spec.get("data"), str) and (base / spec["data"]).is_file():
            hashes[spec["data"]] = hashlib.sha256((base / spec["data"]).read_bytes()).hexdigest()
        for value in spec.values():
            hashes |= _data_hashes(value, base)
    elif isinstance(spec, list):
        for value in spec:
            hashes |= _data_hashes(value, base)
    return hashes


def _settings(spec: Any) -> Any:
    """An evaluator section without the settings that change speed only."""
    if isinstance(spec, dict):
        return {k: _settings(v) for k, v in sorted(spec.items()) if k not in ("batch_size", "chunk_size")}
    return [_settings(v) for v in spec] if isinstance(spec, list) else spec


def fingerprint(config: SearchConfig, space: SearchSpace) -> dict[str, Any]:
    """What must not change when a study is resumed, by the search file's field names. ``search.generations``
    (the budget), the seed, the heartbeat, the pruner's threshold, the device and speed settings may change."""
    c = config
    return {
        "models": [str(s) for s in c.sources], "layers": c.layers, "num_r": c.num_r,
        "input_layer_model": c.input_model, "output_layer_model": c.output_model, "dtype": c.dtype,
        "search.population": c.population, "search.sampler": sampler_kind(c, space),
        "search.sigma0": c.sigma0, "search.scales": list(c.scales) if c.scales else None,
        "search.scale_by": c.scale_by, "search.keep_ends": c.keep_ends, "search.init": c.init,
        "search.max_hops": c.max_hops, "search.baselines": c.baselines,
        "evaluator": _settings(c.evaluator), "evaluator data contents": _data_hashes(c.evaluator, c.base),
        "test": _settings(c.test), "test data contents": _data_hashes(c.test, c.base),
    }


def _changes(stored: Any, now: Any, key: str = "") -> list[str]:
    """The fields that differ, nested settings by their path (``evaluator.validation``, ``models[1]``), with the
    old and new value where they are short."""
    if isinstance(stored, dict) and isinstance(now, dict):
        return [change for k in sorted(set(stored) | set(now))
                for change in _changes(stored.get(k), now.get(k), f"{key}.{k}" if key else k)]
    if isinstance(stored, list) and isinstance(now, list) and len(stored) == len(now):
        return [change for i, pair in enumerate(zip(stored, now)) for change in _changes(*pair, f"{key}[{i}]")]
    if stored == now:
        return []
    shown = f"{json.dumps(stored)} -> {json.dumps(now)}"
    return [key if "contents" in key or len(shown) > 80 else f"{key}: {shown}"]


def open_study(config: SearchConfig, space: SearchSpace, storage: str | Any, study_name: str) -> Any:
    """Create the study (enqueueing the baselines and the init trial) or load it and check it is the same
    search. Creation is atomic (the study name is unique in the storage); the worker that creates the study
    stores the search's fingerprint last, and the others wait for it. ``storage``: a URL or :func:`_storage`'s
    storage."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # progress and failures are reported by this module
    rdb = _storage(storage, config.heartbeat) if isinstance(storage, str) else storage
    sampler, pruner = make_sampler(config, space), make_pruner(config)
    now = fingerprint(config, space)
    try:
        study = optuna.create_study(storage=rdb, study_name=study_name, direction="maximize", sampler=sampler,
                                    pruner=pruner)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=study_name, storage=rdb, sampler=sampler, pruner=pruner)
        stored = _wait_for_fingerprint(study)
        if stored is None:
            raise RecipeError(f"study {study_name!r} in {rdb.url} was not made by `dfsmerge evolve` (or its "
                              "creation was interrupted); use another --out or --study") from None
        changes = _changes(stored, now)
        if changes:
            raise RecipeError(f"study {study_name!r} in {rdb.url} was made by a different search "
                              f"({'; '.join(changes)}); search.generations may grow when resuming (the seed "
                              "and speed settings may change): use another --out or --study") from None
        return study
    for m in range(len(config.sources)) if config.baselines else ():
        study.enqueue_trial({}, user_attrs={"baseline": m})
    if space.x0() is not None:  # CMA-ES hands the start point to this trial; other samplers take it as given
        cma = sampler_kind(config, space) != "random"
        study.enqueue_trial({} if cma else space.x0(), user_attrs={"init": True})
    study.set_user_attr("dfsmerge_search", now)
    return study


def _wait_for_fingerprint(study: Any, timeout: float = 60.0) -> dict | None:
    deadline = time.monotonic() + timeout
    while (stored := study.user_attrs.get("dfsmerge_search")) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return stored


def state_of(trial: Any) -> str:
    """``complete``, ``pruned`` (stopped by the pruner: its value is an estimate) or ``fail``."""
    return "pruned" if "pruned" in trial.user_attrs else trial.state.name.lower()


def score_of(trial: Any) -> float | None:
    """A trial's objective over all examples, or None (failed, or pruned)."""
    return trial.value if state_of(trial) == "complete" else None


def best_trial(trials: list[Any]) -> Any | None:
    """The reported best searched trial: the highest validation score among trials that have one (the leaders
    of the search split), else the highest search score; pruned trials never, nor baselines."""
    complete = [t for t in trials if score_of(t) is not None and "baseline" not in t.user_attrs]
    validated = [t for t in complete if "validation" in t.user_attrs]
    if validated:
        return max(validated, key=lambda t: (t.user_attrs["validation"], t.value))
    return max(complete, key=lambda t: t.value, default=None)


# ---------------------------------------------------------------------------------------------------- outputs


def _write(path: Path, text: str | bytes) -> None:
    """Atomic replace, so a reader (or a second worker) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(text if isinstance(text, bytes) else text.encode())
    os.replace(tmp, path)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def generations(done: list[Any], population: int) -> dict[int, int]:
    """Trial number -> generation (1-based) of every finished searched trial: the ``g``-th block of
    ``population`` of them in order of completion."""
    searched = [t for t in done if "baseline" not in t.user_attrs]
    return {t.number: i // population + 1 for i, t in enumerate(searched)}


def csv_columns(evaluators: list[str]) -> list[str]:
    """The columns of ``trials.csv``: one per evaluator (its search score) after ``score`` when there are
    several; ``examples``: how many were scored (fewer for a pruned trial)."""
    names = list(evaluators) if len(evaluators) > 1 else []
    return ["trial", "kind", "generation", "state", "score", *names, "validation", "test", "hops", "seconds",
            "recipe", "worker", "retry_of", "error", "examples"]


def generation_stats(done: list[Any], population: int) -> list[tuple[int, float, float]]:
    """(generation, best score so far, median score of the generation's complete trials) for every generation
    begun."""
    by_generation: dict[int, list[float]] = {}
    numbers = generations(done, population)
    for t in done:
        if t.number in numbers and score_of(t) is not None:
            by_generation.setdefault(numbers[t.number], []).append(t.value)
    rows, best = [], -math.inf
    for g in sorted(by_generation):
        best = max(best, *by_generation[g])
        rows.append((g, best, statistics.median(by_generation[g])))
    return rows


def _baseline_name(config: SearchConfig, model: int) -> str:
    return f"model {model} ({Path(config.sources[model].path).name or config.sources[model].path})"


def write_plots(folder: Path, done: list[Any], config: SearchConfig, space: SearchSpace, best: Any | None) -> None:
    """``progress.png`` (every searched score by generation, the best so far, the median of each generation, the
    baselines as reference lines) and ``best_recipe.png`` (the best recipe's slots: scale where used)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    numbers = generations(done, config.population)
    fig, ax = plt.subplots(figsize=(7, 4))
    points = [(numbers[t.number], t.value) for t in done if t.number in numbers and score_of(t) is not None]
    if points:
        ax.scatter(*zip(*points), s=8, color="0.6", label="a searched trial")
    stats = generation_stats(done, config.population)
    if stats:
        g, top, median = zip(*stats)
        ax.plot(g, top, marker="o", label="best so far")
        ax.plot(g, median, marker=".", label="median of generation")
    for i, t in enumerate(t for t in done if "baseline" in t.user_attrs and t.value is not None):
        ax.axhline(t.value, color=f"C{i + 2}", linestyle="--", linewidth=1,
                   label=f"baseline {_baseline_name(config, t.user_attrs['baseline'])}")
    if points or stats:
        ax.legend(loc="lower right", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"generation ({config.population} trials each)")
    ax.set_ylabel("search score (higher is better)")
    ax.grid(alpha=0.3)
    _save(fig, folder / "progress.png")
    if best is not None:
        _plot_recipe(folder / "best_recipe.png", space, best)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    _write(path, buffer.getvalue())


def _plot_recipe(path: Path, space: SearchSpace, best: Any) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    candidate = space.decode(best.params)
    n_r, n_m, n_l = space.shape
    grid = np.full((n_m, n_r * n_l), np.nan)
    for n in range(n_r):
        for m in range(n_m):
            for layer in range(n_l):
                if candidate.mask[n][m][layer]:
                    grid[m, n * n_l + layer] = candidate.scales[n][m][layer]
    fig, ax = plt.subplots(figsize=(min(16, max(6, 0.25 * n_r * n_l + 2)), 1.4 + 0.6 * n_m))
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(n_m), [f"model {m}" for m in range(n_m)])
    step = max(1, n_l // 8)
    ticks = [n * n_l + layer for n in range(n_r) for layer in range(0, n_l, step)]
    ax.set_xticks(ticks, [str(t % n_l) for t in ticks], fontsize=7)
    c = space.config
    ax.set_xlabel(f"layer, in repetitions 0..{n_r - 1} (separated by lines)"
                  + (f"; model {c.output_model}'s last layer is appended" if c.keep_ends else ""))
    for n in range(1, n_r):
        ax.axvline(n * n_l - 0.5, color="black", linewidth=0.8)
    held_out = f", validation {best.user_attrs['validation']:.4g}" if "validation" in best.user_attrs else ""
    ax.set_title(f"best recipe: trial {best.number}, score {best.value:.4g}{held_out}; used slots coloured by "
                 "the scale of their hop", fontsize=9)
    fig.colorbar(image, ax=ax, label="scale")
    _save(fig, path)


@dataclass
class Scores:
    """One row of the final table: a model's scores on the three splits (None: not computed)."""

    name: str
    search: float | None
    validation: float | None = None
    test: float | None = None


def format_table(rows: list[Scores], markdown: bool = False) -> str:
    """The final table, plain text or Markdown; a split no row has a score on is left out."""
    splits = [s for s in ("search", "validation", "test") if any(getattr(r, s) is not None for r in rows)]
    cells = [[r.name] + ["" if getattr(r, s) is None else f"{getattr(r, s):.5g}" for s in splits] for r in rows]
    if markdown:
        lines = ["| model | " + " | ".join(splits) + " |", "|---|" + "---:|" * len(splits)]
        return "\n".join(lines + [f"| {' | '.join(c)} |" for c in cells])
    header = ["", *splits]
    widths = [max(len(row[i]) for row in cells + [header]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in [header] + cells)


# ---------------------------------------------------------------------------------------------------- worker


class _Pruned(Exception):
    """A candidate the pruner stopped; ``estimate``: its estimated objective (see :meth:`_Worker.score`)."""

    def __init__(self, estimate: float):
        super().__init__(f"pruned, estimate {estimate:.6g}")
        self.estimate = estimate


@dataclass
class Timing:
    """Where one worker's search time went, in seconds: scoring (all splits), sampling (the sampler and the
    storage writes of the parameters), assembly (decoding and building the candidate), and the whole loop
    (``other`` = loop - the three: the study's bookkeeping and the outputs). ``waiting`` (for other workers'
    last trials) and ``loading`` (the sources, once) are outside the loop."""

    trials: int = 0
    evaluation: float = 0.0
    sampling: float = 0.0
    assembly: float = 0.0
    loop: float = 0.0
    waiting: float = 0.0
    loading: float = 0.0

    @property
    def other(self) -> float:
        return max(0.0, self.loop - self.evaluation - self.sampling - self.assembly)

    def line(self) -> str:
        loaded = f"sources loaded in {self.loading:.1f} s" + (f", waited {self.waiting:.1f} s for other workers"
                                                             if self.waiting >= 0.5 else "")
        if not self.trials:  # a finished run resumed, or other workers took every trial
            return f"time: no trial ran in this worker; {loaded}"
        total = max(self.loop, 1e-9)
        parts = ", ".join(f"{name} {getattr(self, name) / total:.1%}"
                          for name in ("evaluation", "sampling", "assembly", "other"))
        return (f"time: {self.trials} trials in {self.loop:.1f} s ({self.loop / self.trials:.2f} s per trial): "
                f"{parts}; {loaded}")


class _Worker:
    """One worker: sources loaded once, candidates assembled in memory, scores and outputs recorded."""

    def __init__(self, config: SearchConfig, space: SearchSpace, study: Any, storage: Any, out: Path, quiet: bool):
        from .assemble import Sources

        self.config, self.space, self.study, self.out, self.quiet = config, space, study, out, quiet
        self.storage = storage  # the study's storage (_storage)
        self.timing = Timing()
        with self.timed("loading"):
            self.splits = search_evaluators(config)
            self.sources = Sources(config.sources, dtype=config.dtype, device=config.device,
                                   cache_dir=config.cache_dir)
            for source in config.sources:
                self.sources.model(source)
            self.check_data()
        self.failures: list[str] = []  # this worker's errors while it has had no success
        self.succeeded = False
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.best_number: int | None = None
        self.rows: dict[int, tuple[int, str]] = {}  # trial number -> (hops, recipe summary): finished trials
        self.printed_generations = 0
        self.started = time.perf_counter()
        self.start_done = len(done_trials(study.get_trials(deepcopy=False)))
        self.last_plot, self.plot_cost = self.started, 0.0  # the first plots after _PLOT_EVERY_S

    def check_data(self) -> None:
        """Tokenize every evaluator's examples with each source's tokenizer, the input model's last (the one the
        candidates use, so its chunks stay prepared): an example with nothing to score is a :class:`RecipeError`
        that stops the search now, not a failure of every trial."""
        c = self.config
        for i in sorted({c.input_model} | (set(range(len(c.sources))) if c.baselines else set())):
            if self.sources.tokenizer(c.sources[i]) is None:
                raise RecipeError(f"models[{i}]: {c.sources[i].path} has no tokenizer files; a search scores text "
                                  "with the input model's tokenizer and each baseline with its own")
        evaluators = self.splits.evaluators()
        order = [s for i, s in enumerate(c.sources) if i != c.input_model] + [c.sources[c.input_model]]
        for tokenizer in {id(t): t for t in map(self.sources.tokenizer, order) if t is not None}.values():
            for evaluator in evaluators:
                evaluator.prepared(tokenizer)

    @contextmanager
    def timed(self, part: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            setattr(self.timing, part, getattr(self.timing, part) + time.perf_counter() - started)

    # --- the loop

    def run(self) -> None:
        """Start trials while the budget has room; then wait for the trials other workers run (or a killed
        worker left: failed after the heartbeat's grace period, then retried here) until all are finished."""
        import optuna
        from optuna.trial import TrialState

        announced = False
        while len(self.failures) < self.config.population or self.succeeded:
            trials = self.study.get_trials(deepcopy=False)
            done = [t for t in trials if _finished(t)]
            if len(done) >= self.config.budget:
                return
            states = [t.state for t in trials]
            if TrialState.WAITING not in states and len(done) + states.count(TrialState.RUNNING) >= self.config.budget:
                if not announced and not self.quiet:
                    print(f"waiting for {states.count(TrialState.RUNNING)} running trial(s): other workers', or left "
                          f"by a killed worker (retried after {self.config.heartbeat} s without a heartbeat)",
                          flush=True)
                announced = True
                with self.timed("waiting"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # since Optuna 2.9
                    optuna.storages.fail_stale_trials(self.study)
                    time.sleep(_POLL_S)
                continue
            with self.timed("loop"):
                self.study.optimize(self.objective, n_trials=1, callbacks=[self.after_trial],
                                    gc_after_trial=False)

    def within_budget(self, trial: Any) -> bool:
        """Whether ``trial`` holds a place in the budget: fewer than ``budget`` trials that hold one have a
        lower number (numbers are given in order of creation, so of two trials racing for the last place the
        later one yields)."""
        trials = self.study.get_trials(deepcopy=False)
        return sum(1 for t in trials if t.number < trial.number and _counted(t)) < self.config.budget

    def objective(self, trial: Any) -> float:
        from .assemble import assemble

        if not self.within_budget(trial):
            trial.set_user_attr("surplus", True)  # ends FAIL without an error: neither counted nor retried
            return math.nan
        trial.set_user_attr("worker", self.name)
        started = time.perf_counter()
        baseline = trial.user_attrs.get("baseline")
        try:
            if baseline is not None:
                recipe = self.space.baseline(baseline)
            else:
                with self.timed("sampling"), self.storage.at_once():
                    params = self.space.suggest(trial)
                with self.timed("assembly"):
                    recipe = self.space.recipe(self.space.decode(params))
            with self.timed("assembly"):
                model, tokenizer = assemble(recipe, sources=self.sources)
            with self.timed("evaluation"):
                score = self.score_candidate(trial, model, tokenizer)
        except _Pruned as pruned:
            trial.set_user_attr("pruned", True)
            return pruned.estimate
        except Exception as exc:  # a failing candidate is recorded as failed, never fatal to the search
            message = f"{type(exc).__name__}: {exc}"[:500]
            trial.set_user_attr("error", message)
            if not self.succeeded:
                self.failures.append(message)
            return math.nan
        finally:
            trial.set_user_attr("seconds", round(time.perf_counter() - started, 3))
            self.timing.trials += 1
        self.succeeded = True
        return score

    def score_candidate(self, trial: Any, model: Any, tokenizer: Any) -> float:
        """The one place a candidate is scored: the objective on the search split (the value the sampler sees;
        :meth:`score`, which may stop a weak candidate); the validation split for a baseline or a candidate that
        leads the search; the test split for a baseline. The extra scores become the trial's user attributes
        ``validation`` and ``test``."""
        baseline = "baseline" in trial.user_attrs
        scores = self.score(trial, model, tokenizer, prune=not baseline)
        score = self.splits.objective.value(scores)
        if not math.isfinite(score):
            raise FloatingPointError(f"the score is {score}")
        if self.splits.validated and (baseline or score > self._best_searched()):
            trial.set_user_attr("validation", self.splits.validation(model, tokenizer, scores))
        if self.splits.test is not None and baseline:
            trial.set_user_attr("test", self.splits.tested(model, tokenizer))
        return score

    def score(self, trial: Any, model: Any, tokenizer: Any, prune: bool = True) -> list[float]:
        """Each evaluator's search score, its chunks in an order shuffled per trial. With a pruner, every
        example's share of the objective is reported (step: its index, counted across evaluators; value: its
        contribution times its evaluator's weight and ``total / examples of the evaluator``, so that the mean of
        all is the objective) and, after each chunk but the last, :class:`_Pruned` stops a candidate the pruner
        finds clearly worse than :func:`reference_trial` (unless ``prune`` is false: baselines report, to be compared
        with, and are scored in full)."""
        parts = self.splits.objective.parts
        total, reported, scores = sum(len(p.search) for p in parts), {}, []
        for part in parts:
            offset, scale = len(reported), part.weight * total / len(part.search)

            def report(index: list[int], values: Any, part: Any = part, offset: int = offset, scale: float = scale
                       ) -> None:
                shares = (scale * part.search.contributions(index, values)).tolist()
                reported.update(zip((offset + i for i in index), shares))
                if self.config.prune is None:
                    return
                with self.storage.at_once():
                    for i, share in zip(index, shares):
                        trial.report(share, offset + i)
                if prune and len(reported) < total and trial.should_prune():
                    trial.set_user_attr("examples", len(reported))
                    raise _Pruned(self._estimate(reported))

            # one order of the chunks per generation: the candidates CMA-ES ranks together that stop after the same
            # chunk have scored the same examples
            scores.append(part.search(model, tokenizer, on_chunk=report, order=trial.number // self.config.population))
        trial.set_user_attr("examples", total)
        trial.set_user_attr("scores", dict(zip(self.splits.objective.names, scores)))
        return scores

    def _estimate(self, reported: dict[int, float]) -> float:
        """A pruned candidate's estimated objective: the reference it was compared with (:func:`reference_trial`)
        plus the mean difference from it on the examples the candidate scored (a paired estimate: the examples'
        own difficulty, which varies more than the candidates do, cancels)."""
        reference = reference_trial(self.study.get_trials(deepcopy=False), self.config.population)
        shares = reference.intermediate_values
        return reference.value + statistics.fmean(value - shares[step] for step, value in reported.items())

    def _best_searched(self) -> float:
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return max((t.value for t in trials if "baseline" not in t.user_attrs and score_of(t) is not None),
                   default=-math.inf)

    # --- after each trial

    def after_trial(self, study: Any, trial: Any) -> None:
        if trial.user_attrs.get("surplus"):
            return
        trials = study.get_trials(deepcopy=False)
        done = done_trials(trials)
        numbers = generations(done, self.config.population)
        self.report_trial(trial, numbers)
        self.write_outputs(done, trials, plots=self.plot_due())
        self.report_generations(done, numbers)

    def plot_due(self) -> bool:
        """Plots at most every ``_PLOT_EVERY_S`` seconds and at most 1% of the time."""
        return time.perf_counter() - self.last_plot >= max(_PLOT_EVERY_S, 100 * self.plot_cost)

    def report_trial(self, trial: Any, numbers: dict[int, int]) -> None:
        """One line per finished trial: number, generation or baseline, score, validation, test, hops, seconds."""
        if self.quiet:
            return
        attrs = trial.user_attrs
        if "baseline" in attrs:
            where = f"baseline {_baseline_name(self.config, attrs['baseline'])}"
        else:
            where = f"generation {numbers.get(trial.number, '?')}/{self.config.generations}"
        where += f" (retry of trial {attrs['retry_of']})" if "retry_of" in attrs else ""
        where += " (init)" if "init" in attrs and "retry_of" not in attrs else ""
        if "error" in attrs:
            print(f"trial {trial.number}  {where}  failed: {attrs['error']}", flush=True)
            return
        hops, _ = self.row(trial)
        extra = "".join(f"  {k} {attrs[k]:.5g}" for k in ("validation", "test") if k in attrs)
        score = (f"pruned after {attrs.get('examples')} examples, estimate {trial.value:.5g}" if "pruned" in attrs
                 else f"score {trial.value:.5g}")
        print(f"trial {trial.number}  {where}  {score}{extra}  {hops} hops  {attrs.get('seconds', 0):.2f} s",
              flush=True)

    def report_generations(self, done: list[Any], numbers: dict[int, int]) -> None:
        """A line for each generation that is complete, in every worker."""
        complete = len(numbers) // self.config.population
        while self.printed_generations < min(complete, self.config.generations):
            g = self.printed_generations + 1
            self.printed_generations = g
            if self.quiet or g <= (self.start_done - self._baselines(done)) // self.config.population:
                continue  # reported by an earlier run
            trials = [t for t in done if numbers.get(t.number) == g]
            values = [t.value for t in trials if score_of(t) is not None]
            best = max((t.value for t in done if numbers.get(t.number, math.inf) <= g and score_of(t) is not None),
                       default=math.nan)
            elapsed = time.perf_counter() - self.started
            rate = (len(done) - self.start_done) / elapsed if elapsed > 0 else 0.0
            eta = (self.config.budget - len(done)) / rate if rate > 0 else math.inf
            states = [state_of(t) for t in trials]
            median = f"median {statistics.median(values):.5g}" if values else "no trial scored in full"
            print(f"generation {g}/{self.config.generations} done: best so far {best:.5g}, {median}; {rate:.2f} "
                  f"trials/s, ETA "
                  f"{_duration(eta)}" + "".join(f" ({states.count(k)} {k})" for k in ("pruned", "fail") if k in states),
                  flush=True)

    @staticmethod
    def _baselines(done: list[Any]) -> int:
        return sum(1 for t in done if "baseline" in t.user_attrs)

    def row(self, t: Any) -> tuple[int, str]:
        """(hops, recipe summary) of a finished trial, decoded once."""
        if t.number not in self.rows:
            try:
                recipe = (self.space.baseline(t.user_attrs["baseline"]) if "baseline" in t.user_attrs
                          else self.space.recipe(self.space.decode(t.params)))
                self.rows[t.number] = (len(recipe.hops), summary(recipe))
            except (RecipeError, KeyError):  # a candidate without any hop; a trial killed before it sampled
                self.rows[t.number] = (0, "")
        return self.rows[t.number]

    def csv_row(self, t: Any, numbers: dict[int, int]) -> list[Any]:
        """The one place a ``trials.csv`` row is made (columns: :func:`csv_columns`)."""
        hops, text = self.row(t)
        attrs = t.user_attrs
        names = self.splits.objective.names
        scores = [_number(attrs.get("scores", {}).get(n)) for n in names] if len(names) > 1 else []
        return [t.number, _kind(t), numbers.get(t.number, ""), state_of(t), _number(t.value), *scores,
                _number(attrs.get("validation")), _number(attrs.get("test")), hops, attrs.get("seconds", ""), text,
                attrs.get("worker", ""), attrs.get("retry_of", ""), attrs.get("error", ""), attrs.get("examples", "")]

    def write_outputs(self, done: list[Any], trials: list[Any], plots: bool = True) -> None:
        """``trials.csv`` and the best recipe after every trial; the plots when asked."""
        numbers = generations(done, self.config.population)
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(csv_columns(self.splits.objective.names))
        writer.writerows(self.csv_row(t, numbers) for t in done)
        _write(self.out / "trials.csv", out.getvalue())
        best = best_trial(trials)
        if best is not None and best.number != self.best_number:
            legacy, native = self.space.dump(self.space.decode(best.params))
            _write(self.out / "best_recipe.yml", legacy)
            _write(self.out / "best_recipe_native.yml", native)
            self.best_number = best.number
        if plots:
            started = time.perf_counter()
            write_plots(self.out, done, self.config, self.space, best)
            self.last_plot, self.plot_cost = time.perf_counter(), time.perf_counter() - started

    # --- the end

    def test_score(self, best: Any) -> float | None:
        """The best trial's test score, computed once per study (kept in the study's user attributes)."""
        from .assemble import assemble

        if self.splits.test is None:
            return None
        key = f"test_of_trial_{best.number}"
        if key not in self.study.user_attrs:
            model, tokenizer = assemble(self.space.recipe(self.space.decode(best.params)), sources=self.sources)
            self.study.set_user_attr(key, self.splits.tested(model, tokenizer))
        return self.study.user_attrs[key]

    def table(self, done: list[Any], best: Any) -> list[Scores]:
        """Baselines and the best, on the search, validation and test splits."""
        rows = [Scores(_baseline_name(self.config, t.user_attrs["baseline"]), t.value,
                       t.user_attrs.get("validation"), t.user_attrs.get("test"))
                for t in done if "baseline" in t.user_attrs and t.value is not None]
        rows.sort(key=lambda r: r.name)
        rows.append(Scores(f"best: trial {best.number}", best.value, best.user_attrs.get("validation"),
                           self.test_score(best)))
        return rows

    def _metric(self) -> str:
        parts = self.splits.objective.parts
        if len(parts) == 1:
            return parts[0].search.metric
        return " + ".join(f"{p.weight:.3g} x {p.name} ({p.search.metric})" for p in parts)

    def notes(self, rows: list[Scores], done: list[Any], best: Any) -> str:
        """The search summary for the model card (Markdown)."""
        c = self.config
        sizes = ", ".join(f"{name} {n}" for name, n in self.splits.sizes().items())
        scales = ("no scales" if not c.scales else
                  f"scales {'per slot' if c.scale_by == 'slot' else 'per (from, to) layer pair'} in {list(c.scales)}")
        test = "; the test split was not used by the search" if self.splits.test is not None else ""
        rows = rows[:-1] + [Scores(f"this recipe (trial {best.number})", rows[-1].search, rows[-1].validation,
                                   rows[-1].test)]
        return "\n".join([
            "## Search", "",
            f"Found by `dfsmerge evolve` ({sampler_kind(c, self.space)}, Optuna) in the data-flow space of "
            f"{len(c.sources)} models: num_r {c.num_r}, {scales}, {self.space.describe().split(':')[0]}. "
            f"Budget: {c.budget} trials ({c.budget - c.trials} baselines + {c.population} x {c.generations} "
            f"searched); {len(done)} finished. Score: {self._metric()} (higher is better). "
            f"Examples per split: {sizes}. The validation split chose this recipe{test}.", "",
            format_table(rows, markdown=True), ""])


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


@dataclass
class EvolveResult:
    """What one worker leaves behind."""

    best_recipe: Path
    best_score: float
    best_validation: float | None  # the held-out score, when the evaluator holds examples out
    best_test: float | None  # the test split's score, when the search file has one
    done: int
    timing: Timing
    table: list[Scores]  # the baselines and the best on the three splits
    notes: str  # the same as Markdown, for a model card


def _run_folder(out: str | os.PathLike, config: SearchConfig) -> Path:
    """The run folder, absolute: a folder (new, or a run's to resume) apart from every source (``check_apart``).
    Raises :class:`RecipeError` naming ``out``."""
    real = check_apart(out, [s.path for s in config.sources], "out")
    existing = real if real.exists() else next(p for p in real.parents if p.exists())
    if not existing.is_dir():
        raise RecipeError(f"out: {existing} is a file; name a folder for the run (new, or a run to resume)")
    return real


def evolve(config: SearchConfig, out: str | os.PathLike, storage: str | None = None, study_name: str | None = None,
           merge_best: str | os.PathLike | None = None, quiet: bool = False) -> EvolveResult:
    """Run (or resume, or join) the search of ``config`` until the study holds ``config.budget`` finished
    trials; outputs go to ``out``. Run the same call on many machines with one ``storage`` URL (PostgreSQL) and
    ``study_name`` to share the work. Prints one line per trial and a final table unless ``quiet``."""
    out = _run_folder(out, config)
    storage = storage or f"sqlite:///{out / 'study.db'}"
    database = _sqlite_file(storage)
    if database is not None:
        check_apart(database, [s.path for s in config.sources], "storage")
    study_name = study_name or out.name
    space = SearchSpace(config)
    created = not out.exists()
    try:  # a run that cannot start leaves nothing behind
        out.mkdir(parents=True, exist_ok=True)
        rdb = _storage(storage, config.heartbeat)
        study = open_study(config, space, rdb, study_name)
        worker = _Worker(config, space, study, rdb, out, quiet)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    if not quiet:
        print(f"search: {space.describe()}; sampler {sampler_kind(config, space)}; budget {config.budget} trials "
              f"({config.budget - config.trials} baselines + {config.population} x {config.generations}); "
              f"{worker.start_done} finished before", flush=True)
    worker.run()
    trials = study.get_trials(deepcopy=False)
    done = done_trials(trials)
    worker.write_outputs(done, trials)
    if len(worker.failures) >= config.population and not worker.succeeded:
        raise RecipeError(f"evolve: the first {len(worker.failures)} candidates all failed; the first error: "
                          f"{worker.failures[0]}")
    best = best_trial(trials)
    if best is None:
        raise RecipeError("evolve: no candidate could be evaluated")
    rows = worker.table(done, best)
    notes = worker.notes(rows, done, best)
    if not quiet:
        print(f"\n{format_table(rows)}\n{worker.timing.line()}", flush=True)
    if merge_best is not None:
        from .merge import merge

        merge(out / "best_recipe.yml", merge_best, dtype=config.dtype, quiet=quiet, cache_dir=config.cache_dir,
              notes=notes)
    return EvolveResult(out / "best_recipe.yml", best.value, best.user_attrs.get("validation"), rows[-1].test,
                        len(done), worker.timing, rows, notes)
