"""Evolutionary search of DFS recipes: the paper's data-flow-space search, with CMA-ES through Optuna.

The search space is the paper's. The *slots* are ``num_r`` repetitions of all layers of all models, in the order
of the legacy layout (repetition, model, layer). Each slot has an indicator (the slot is used when it is > 0)
and, unless ``scales: false``, a scale. A candidate is therefore a legacy recipe: ``layer_mask`` = indicators
> 0, ``scaling_factors`` = scales. Optional constraints: ``keep_ends`` (the input model's first layer starts the
path and the output model's last layer ends it), ``init: own_order`` (CMA-ES starts at the input model's own
layer order) and ``max_hops`` (only the slots with the largest indicators are kept).

Persistence and distribution are Optuna's: every trial lives in an Optuna storage (an SQLite file in the run
folder by default, or a PostgreSQL URL shared by many workers running the same command). Each worker loads the
sources once, assembles every candidate in memory and evaluates it. A worker that dies leaves its trial RUNNING;
Optuna's heartbeat marks it failed after ``heartbeat`` seconds and it is re-enqueued once, so no finished trial
is lost or repeated.

The objective is the weighted sum of one or more evaluators' scores (``evaluate.Objective``). Every candidate is
scored chunk by chunk; each example's share of the objective is reported to Optuna's ``WilcoxonPruner`` (step: the
example's index; the values are scaled so that their mean is the objective), and a candidate clearly worse than the
best so far on the examples scored (one-sided Wilcoxon signed-rank test, ``p < prune``) is stopped there. A
*pruned* trial returns the mean of what it reported, an estimate of its objective, as the pruner's documentation
advises: CMA-ES ranks it in its generation (a raised ``TrialPruned`` gives CMA-ES no value, and a generation in
which most candidates are pruned never completes). It is marked ``pruned``, counts in the budget and is never the
best.

Outputs in the run folder, rewritten as the search goes: ``best_recipe.yml`` (legacy format, for
``dfsmerge merge``), ``best_recipe_native.yml``, ``trials.csv``, ``progress.png`` and ``best_recipe.png``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import random
import socket
import statistics
import sys
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .evaluate import make_objective, speed_defaults
from .plan import dtype_name
from .recipe import (Recipe, RecipeError, Source, load_yaml, parse_source, dump_legacy, dump_native,
                     recipe_from_legacy)

__all__ = ["SearchConfig", "SearchSpace", "load_search", "parse_search", "evolve", "done_trials"]

log = logging.getLogger("dfsmerge")

_TOP_KEYS = ("models", "num_r", "input_layer_model", "output_layer_model", "search", "evaluator", "evaluators",
             "dtype", "device", "cache_dir")
_SEARCH_KEYS = ("population", "generations", "seed", "sigma0", "scales", "keep_ends", "init", "max_hops",
                "heartbeat", "prune")
_PLOT_EVERY_S = 30.0


# ---------------------------------------------------------------------------------------------------- config


@dataclass
class SearchConfig:
    """A parsed ``search.yml``. ``layers`` (the depth every model shares) is filled from the sources'
    configs by :func:`load_search`."""

    sources: list[Source]
    evaluator: dict | list  # one evaluator's mapping, or a list of them with weights (`evaluators:`)
    num_r: int = 3
    input_model: int = 0
    output_model: int = 0
    population: int = 16
    generations: int = 25
    seed: int = 0
    sigma0: float | None = None  # initial CMA-ES step, as a fraction of each parameter's range (Optuna: 1/6)
    scales: tuple[float, float] | None = (0.5, 1.5)
    keep_ends: bool = True
    init: str = "own_order"
    max_hops: int | None = None
    heartbeat: int = 30  # seconds of silence after which a worker's running trial counts as lost
    prune: float | None = 0.1  # p-value threshold of the Wilcoxon pruner; None: every candidate scored in full
    dtype: str = "float32"  # parse_search: by the device (evaluate.speed_defaults)
    device: str = "cpu"
    cache_dir: str | None = None
    base: Path = field(default=Path("."), repr=False)  # the search file's folder: data paths are relative to it
    layers: int = 0

    @property
    def trials(self) -> int:
        """The budget: ``population x generations`` finished trials."""
        return self.population * self.generations


def _integer(value: Any, where: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RecipeError(f"{where}: expected an integer >= {low}, got {value!r}")
    return value


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise RecipeError(f"{where}: expected true or false, got {value!r}")
    return value


def parse_search(doc: dict, base: Path = Path(".")) -> SearchConfig:
    """A ``search.yml`` document -> :class:`SearchConfig`. Errors name the field."""
    unknown = sorted(set(doc) - set(_TOP_KEYS))
    if unknown:
        raise RecipeError(f"search file: unknown keys {unknown}; expected some of {list(_TOP_KEYS)}")
    if "models" not in doc:
        raise RecipeError("models: missing (see `dfsmerge evolve --help` for an example)")
    if ("evaluator" in doc) == ("evaluators" in doc):
        raise RecipeError("evaluator: expected either `evaluator:` (one) or `evaluators:` (a list with weights)")
    if not isinstance(doc["models"], list) or not doc["models"]:
        raise RecipeError(f"models: expected a list of paths or hub IDs, got {doc['models']!r}")
    sources = [parse_source(m, f"models[{i}]") for i, m in enumerate(doc["models"])]
    search = doc.get("search") or {}
    if not isinstance(search, dict):
        raise RecipeError(f"search: expected a mapping of search settings, got {search!r}")
    unknown = sorted(set(search) - set(_SEARCH_KEYS))
    if unknown:
        raise RecipeError(f"search: unknown keys {unknown}; expected some of {list(_SEARCH_KEYS)}")
    config = SearchConfig(sources=sources, evaluator=doc.get("evaluator", doc.get("evaluators")), base=base)
    config.num_r = _integer(doc.get("num_r", config.num_r), "num_r", 1)
    for key, attr in (("input_layer_model", "input_model"), ("output_layer_model", "output_model")):
        value = doc.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(sources):
            raise RecipeError(f"{key}: expected a model index in 0..{len(sources) - 1}, got {value!r}")
        setattr(config, attr, value)
    config.population = _integer(search.get("population", config.population), "search.population", 4)
    config.generations = _integer(search.get("generations", config.generations), "search.generations", 1)
    config.seed = _integer(search.get("seed", config.seed), "search.seed", 0)
    config.heartbeat = _integer(search.get("heartbeat", config.heartbeat), "search.heartbeat", 1)
    if search.get("max_hops") is not None:
        config.max_hops = _integer(search["max_hops"], "search.max_hops", 1)
    sigma0 = search.get("sigma0")
    if sigma0 is not None:
        if isinstance(sigma0, bool) or not isinstance(sigma0, (int, float)) or not 0 < sigma0 <= 1:
            raise RecipeError(f"search.sigma0: expected a number in (0, 1] (a fraction of each parameter's "
                              f"range), got {sigma0!r}")
        config.sigma0 = float(sigma0)
    scales = search.get("scales", list(config.scales))
    if scales is False:
        config.scales = None
    elif (isinstance(scales, list) and len(scales) == 2 and all(isinstance(s, (int, float)) and
                                                               not isinstance(s, bool) for s in scales)
          and 0 <= scales[0] < scales[1]):
        config.scales = (float(scales[0]), float(scales[1]))
    else:
        raise RecipeError(f"search.scales: expected [low, high] with 0 <= low < high, or false, got {scales!r}")
    prune = search.get("prune", True)
    if prune is True or prune is False:
        config.prune = config.prune if prune else None
    elif isinstance(prune, float) and 0 < prune < 1:
        config.prune = prune
    else:
        raise RecipeError(f"search.prune: expected true, false or a p-value threshold in (0, 1), got {prune!r}")
    config.keep_ends = _flag(search.get("keep_ends", config.keep_ends), "search.keep_ends")
    config.init = search.get("init", config.init)
    if config.init not in ("own_order", "center"):
        raise RecipeError(f"search.init: expected own_order or center, got {config.init!r}")
    for key in ("dtype", "device", "cache_dir"):
        if key in doc:
            if not isinstance(doc[key], str):
                raise RecipeError(f"{key}: expected a string, got {doc[key]!r}")
            setattr(config, key, doc[key])
    config.dtype = dtype_name(doc.get("dtype", speed_defaults(config.device)["dtype"]))
    make_objective(config.evaluator, base, config.device)  # fail now on a bad evaluator or data, not per trial
    return config


def load_search(path: str | os.PathLike) -> SearchConfig:
    """Read a search file (same safe YAML loader as recipes) and the depth of its sources (configs only)."""
    from .sources import read_config

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError(f"cannot read search file {path}: {exc.strerror}") from None
    base = path.resolve().parent
    config = parse_search(load_yaml(text, str(path)), base)
    config.sources = [Source(str(base / s.path), s.revision) if (base / s.path).exists()
                      and not Path(s.path).is_absolute() else s for s in config.sources]
    depths = [int(read_config(s, config.cache_dir)["num_hidden_layers"]) for s in config.sources]
    if len(set(depths)) > 1:
        raise RecipeError(f"models: the search's layout needs one depth for all models, got {depths} layers")
    config.layers = depths[0]
    return config


# ---------------------------------------------------------------------------------------------------- space


class SearchSpace:
    """The paper's search space over slots ``(repetition, model, layer)``; candidates are legacy recipes."""

    def __init__(self, config: SearchConfig):
        self.config = config
        c = config
        self.shape = (c.num_r, len(c.sources), c.layers)
        self.slots = [(n, m, layer) for n in range(c.num_r) for m in range(len(c.sources))
                      for layer in range(c.layers)]
        first = (0, c.input_model, 0)
        # keep_ends: the input model's first layer is forced on and nothing may come before it; the output
        # model's last layer is appended by add_last_layer.
        self.forced = {first: True, **{s: False for s in self.slots if s < first}} if c.keep_ends else {}
        self.free = [s for s in self.slots if s not in self.forced]

    @staticmethod
    def name(kind: str, slot: tuple[int, int, int]) -> str:
        return f"{kind}_{slot[0]}_{slot[1]}_{slot[2]}"

    def suggest(self, trial: Any) -> dict[str, float]:
        """Draw every parameter of a candidate through ``trial.suggest_float``."""
        params = {}
        for slot in self.free:
            params[self.name("use", slot)] = trial.suggest_float(self.name("use", slot), -1.0, 1.0)
            if self.config.scales:
                params[self.name("scale", slot)] = trial.suggest_float(self.name("scale", slot), *self.config.scales)
        return params

    def x0(self) -> dict[str, float] | None:
        """The CMA-ES start: the input model's own layer order, unit scales (None: the centre of the space)."""
        c = self.config
        if c.init != "own_order":
            return None
        own = {(0, c.input_model, layer) for layer in range(c.layers - (1 if c.keep_ends else 0))}
        x0 = {}
        for slot in self.free:
            x0[self.name("use", slot)] = 0.5 if slot in own else -0.5
            if c.scales:
                x0[self.name("scale", slot)] = min(max(1.0, c.scales[0]), c.scales[1])
        return x0

    def decode(self, params: dict[str, float]) -> tuple[list, list]:
        """Parameters -> (``layer_mask``, ``scaling_factors``) grids, with the constraints applied."""
        n_r, n_m, n_l = self.shape
        mask = [[[False] * n_l for _ in range(n_m)] for _ in range(n_r)]
        scales = [[[1.0] * n_l for _ in range(n_m)] for _ in range(n_r)]
        used = [s for s in self.free if params[self.name("use", s)] > 0]
        budget = None if self.config.max_hops is None else (
            self.config.max_hops - sum(self.forced.values()) - int(self.config.keep_ends))
        if budget is not None and len(used) > budget:
            keep = set(sorted(used, key=lambda s: -params[self.name("use", s)])[:max(budget, 0)])
            used = [s for s in used if s in keep]
        for (n, m, layer) in used:
            mask[n][m][layer] = True
            if self.config.scales:
                scales[n][m][layer] = round(params[self.name("scale", (n, m, layer))], 6)
        for (n, m, layer), on in self.forced.items():
            mask[n][m][layer] = on
        return mask, scales

    def recipe(self, mask: list, scales: list) -> Recipe:
        """The candidate as a checked :class:`Recipe` (raises :class:`RecipeError` when no slot is used)."""
        c = self.config
        return recipe_from_legacy([[s.path, s.revision] for s in c.sources], c.num_r, mask, scales,
                                  input_layer_model=c.input_model, output_layer_model=c.output_model,
                                  add_last_layer=c.keep_ends)

    def dump(self, mask: list, scales: list) -> tuple[str, str]:
        """(legacy YAML, native YAML) of a candidate."""
        c = self.config
        legacy = dump_legacy(c.sources, mask, scales, c.input_model, c.output_model, add_last_layer=c.keep_ends)
        return legacy, dump_native(self.recipe(mask, scales))

    def signature(self) -> dict:
        """What must not change when a study is resumed: the parameters and what they mean."""
        c = self.config
        return {"models": [str(s) for s in c.sources], "layers": c.layers, "num_r": c.num_r,
                "input_model": c.input_model, "output_model": c.output_model, "keep_ends": c.keep_ends,
                "scales": list(c.scales) if c.scales else None, "max_hops": c.max_hops}


def summary(recipe: Recipe) -> str:
    """A one-line hop list: ``model.layer`` with ``xscale`` when the scale is not 1."""
    parts = []
    for hop in recipe.hops:
        scale = hop.transform.scale
        parts.append(f"{hop.model}.{hop.layer}" + (f"x{scale:.2f}" if scale != 1.0 else ""))
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------------- study


def done_trials(trials: Iterable[Any]) -> list[Any]:
    """Finished trials in order of completion: completed ones (pruned ones among them) and those that failed in
    evaluation (a trial failed because its worker died is not finished; it is retried)."""
    from optuna.trial import TrialState

    done = [t for t in trials if t.state == TrialState.COMPLETE
            or (t.state == TrialState.FAIL and "error" in t.user_attrs)]
    return sorted(done, key=lambda t: (t.datetime_complete, t.number))


def _retry_once(study: Any, trial: Any) -> None:
    """Re-enqueue a trial whose worker died (params only: the sampler's bookkeeping is not copied)."""
    if "retry_of" not in trial.user_attrs and trial.params:
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def _sqlite_engine(url: str) -> dict:
    """SQLite in write-ahead-log mode without an fsync per commit: Optuna commits once per parameter, and
    a killed process still loses nothing committed (only a crash of the machine could)."""
    import sqlite3

    path = url[len("sqlite:///"):]

    def connect() -> sqlite3.Connection:
        connection = sqlite3.connect(path, timeout=60, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    return {"creator": connect}


def _trial_seeded_random(seed: int) -> Any:
    """The sampler of the first trials (before CMA-ES knows the space): uniform draws seeded by the seed and
    the trial number, so one worker is reproducible and workers that start together draw different ones."""
    import numpy as np
    import optuna

    class TrialSeededRandom(optuna.samplers.RandomSampler):
        def sample_independent(self, study: Any, trial: Any, name: str, distribution: Any) -> float:
            rng = np.random.RandomState([seed, trial.number, zlib.crc32(name.encode())])
            return float(rng.uniform(distribution.low, distribution.high))

    return TrialSeededRandom(seed)


def open_study(config: SearchConfig, space: SearchSpace, storage: str, study_name: str) -> Any:
    """Create or load the study (``load_if_exists``) with a heartbeat, and check it is the same search."""
    import optuna
    import sqlalchemy

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # progress and failures are reported by this module
    if storage.startswith("postgresql://"):  # one driver whatever SQLAlchemy's default: psycopg 3
        storage = "postgresql+psycopg://" + storage[len("postgresql://"):]
    engine_kwargs = _sqlite_engine(storage) if storage.startswith("sqlite:///") else {"pool_pre_ping": True}
    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # the heartbeat is marked experimental since Optuna 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                rdb = optuna.storages.RDBStorage(
                    storage, engine_kwargs=engine_kwargs, heartbeat_interval=max(1, config.heartbeat // 5),
                    grace_period=config.heartbeat, heartbeat_stale_trial_callback=_retry_once)
            break
        except ImportError as exc:  # the URL's database driver is not installed (Optuna re-raises SQLAlchemy's)
            driver = exc.name or getattr(exc.__cause__, "name", None) or "module"
            extra = "pip install 'dfsmerge[postgres]'" if storage.startswith("postgresql") else f"install {driver}"
            raise RecipeError(f"storage {storage}: its database driver {driver} is not installed ({extra})") from None
        except sqlalchemy.exc.SQLAlchemyError as exc:  # also: workers creating a new database's tables at once
            if attempt == 4:
                raise RecipeError(f"storage {storage}: cannot open it: {exc}") from None
            time.sleep(0.2 + random.random())
    with warnings.catch_warnings():  # x0 and sigma0 are deprecated in Optuna 4.9, to be removed in 6.0
        warnings.simplefilter("ignore", FutureWarning)
        sampler = optuna.samplers.CmaEsSampler(x0=space.x0(), sigma0=config.sigma0, seed=config.seed,
                                               popsize=config.population,
                                               independent_sampler=_trial_seeded_random(config.seed))
    with warnings.catch_warnings():  # the Wilcoxon pruner is marked experimental since Optuna 3.6
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        pruner = optuna.pruners.WilcoxonPruner(p_threshold=config.prune) if config.prune else \
            optuna.pruners.NopPruner()
    study = optuna.create_study(storage=rdb, study_name=study_name, direction="maximize", sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    signature = space.signature()
    stored = study.user_attrs.get("dfsmerge_search")
    if stored is None:
        study.set_user_attr("dfsmerge_search", signature)
    elif stored != signature:
        diff = sorted(k for k in signature if stored.get(k) != signature[k])
        raise RecipeError(f"study {study_name!r} in {storage} was made by a different search ({', '.join(diff)} "
                          "differ); use another --out or --study")
    return study


def state_of(trial: Any) -> str:
    """``complete``, ``pruned`` (stopped by the pruner: its value is an estimate) or ``fail``."""
    return "pruned" if "pruned" in trial.user_attrs else trial.state.name.lower()


def score_of(trial: Any) -> float | None:
    """A trial's objective over all examples, or None (failed, or pruned)."""
    return trial.value if state_of(trial) == "complete" else None


def best_trial(trials: list[Any]) -> Any | None:
    """The reported best: the highest held-out score among trials that have one, else the highest score (pruned
    trials never)."""
    complete = [t for t in trials if score_of(t) is not None]
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


def write_trials_csv(path: Path, done: list[Any], population: int, space: SearchSpace,
                     evaluators: list[str] = ()) -> None:
    """``trials.csv``: trial, generation, state (complete, pruned, fail), score (the objective; for a pruned trial
    the estimate from its examples), one column per evaluator when there are several (its score), validation,
    hops, recipe, worker, error, examples (how many were scored: fewer for a pruned trial)."""
    out = io.StringIO()
    writer = csv.writer(out)
    names = list(evaluators) if len(evaluators) > 1 else []
    writer.writerow(["trial", "generation", "state", "score", *names, "validation", "hops", "recipe", "worker",
                     "error", "examples"])
    for i, t in enumerate(done):
        try:
            recipe = space.recipe(*space.decode(t.params))
            hops, text = len(recipe.hops), summary(recipe)
        except RecipeError:  # a candidate without any hop
            hops, text = 0, ""
        scores = t.user_attrs.get("scores", {})
        writer.writerow([t.number, i // population, state_of(t), "" if t.value is None else f"{t.value:.6g}",
                         *(f"{scores[n]:.6g}" if n in scores else "" for n in names),
                         f"{t.user_attrs['validation']:.6g}" if "validation" in t.user_attrs else "",
                         hops, text, t.user_attrs.get("worker", ""), t.user_attrs.get("error", ""),
                         t.user_attrs.get("examples", "")])
    _write(path, out.getvalue())


def generation_stats(done: list[Any], population: int) -> list[tuple[int, float, float]]:
    """(generation, best score so far, median score of the generation's complete trials) for every full
    generation."""
    rows, best = [], -math.inf
    for g in range(len(done) // population):
        values = [t.value for t in done[g * population:(g + 1) * population] if score_of(t) is not None]
        if values:
            best = max(best, max(values))
            rows.append((g, best, statistics.median(values)))
    return rows


def write_plots(folder: Path, done: list[Any], population: int, space: SearchSpace, best: Any | None) -> None:
    """``progress.png`` (best so far and median per generation) and ``best_recipe.png`` (the best recipe's
    slots: scale where used, blank where unused)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    stats = generation_stats(done, population)
    fig, ax = plt.subplots(figsize=(7, 4))
    if stats:
        g, top, median = zip(*stats)
        ax.plot(g, top, marker="o", label="best so far")
        ax.plot(g, median, marker=".", label="median of generation")
        ax.legend(loc="lower right")
    ax.set_xlabel("generation")
    ax.set_ylabel("score (higher is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    _write(folder / "progress.png", buffer.getvalue())
    if best is None:
        return
    mask, scales = space.decode(best.params)
    n_r, n_m, n_l = space.shape
    grid = np.full((n_m, n_r * n_l), np.nan)
    for n in range(n_r):
        for m in range(n_m):
            for layer in range(n_l):
                if mask[n][m][layer]:
                    grid[m, n * n_l + layer] = scales[n][m][layer]
    fig, ax = plt.subplots(figsize=(min(16, max(6, 0.25 * n_r * n_l + 2)), 1.4 + 0.6 * n_m))
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(n_m), [f"model {m}" for m in range(n_m)])
    step = max(1, n_l // 8)
    ticks = [n * n_l + layer for n in range(n_r) for layer in range(0, n_l, step)]
    ax.set_xticks(ticks, [str(t % n_l) for t in ticks], fontsize=7)
    ax.set_xlabel("layer, in repetitions 0.." + str(n_r - 1) + " (separated by lines)"
                  + (f"; model {space.config.output_model}'s last layer is appended" if space.config.keep_ends else ""))
    for n in range(1, n_r):
        ax.axvline(n * n_l - 0.5, color="black", linewidth=0.8)
    held_out = f", held-out {best.user_attrs['validation']:.4g}" if "validation" in best.user_attrs else ""
    ax.set_title(f"best recipe: trial {best.number}, score {best.value:.4g}{held_out}; used slots coloured by scale",
                 fontsize=9)
    fig.colorbar(image, ax=ax, label="scale")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    _write(folder / "best_recipe.png", buffer.getvalue())


# ---------------------------------------------------------------------------------------------------- worker


class _Pruned(Exception):
    """A candidate the pruner stopped; ``estimate``: the mean of the shares of the objective it reported."""

    def __init__(self, estimate: float):
        super().__init__(f"pruned, estimate {estimate:.6g}")
        self.estimate = estimate


@dataclass
class Timing:
    """Where a worker's time went (seconds): evaluation (assembly + scoring) against the whole run."""

    trials: int = 0
    evaluation: float = 0.0
    wall: float = 0.0


class _Worker:
    """One worker: sources loaded once, candidates assembled in memory, scores and outputs recorded."""

    def __init__(self, config: SearchConfig, space: SearchSpace, study: Any, out: Path, quiet: bool):
        from .assemble import Sources

        self.config, self.space, self.study, self.out, self.quiet = config, space, study, out, quiet
        self.evaluators = make_objective(config.evaluator, config.base, config.device)
        self.sources = Sources(config.sources, dtype=config.dtype, device=config.device, cache_dir=config.cache_dir)
        self.timing = Timing()
        self.failures: list[str] = []  # this worker's errors while it has had no success
        self.succeeded = False
        self.start_done = len(done_trials(study.get_trials(deepcopy=False)))
        self.printed = self.start_done // config.population  # generations already reported
        self.start = time.perf_counter()
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.best_number: int | None = None
        self.last_plot = self.start  # plots cost ~0.5 s: drawn every _PLOT_EVERY_S and at the end
        self.bar = None if quiet else _bar(config.trials, self.start_done)

    def objective(self, trial: Any) -> float:
        from .assemble import assemble

        mask, scales = self.space.decode(self.space.suggest(trial))
        trial.set_user_attr("worker", self.name)
        started = time.perf_counter()
        try:
            recipe = self.space.recipe(mask, scales)
            model, tokenizer = assemble(recipe, sources=self.sources, dtype=self.config.dtype,
                                        device=self.config.device, cache_dir=self.config.cache_dir)
            scores = self.score(trial, model, tokenizer)
            score = self.evaluators.value(scores)
            if not math.isfinite(score):
                raise FloatingPointError(f"the score is {score}")
            parts = self.evaluators.parts
            if any(p.held_out is not None for p in parts) and score > self._best_value():
                held_out = [s if p.held_out is None else p.held_out(model, tokenizer) for p, s in zip(parts, scores)]
                trial.set_user_attr("validation", self.evaluators.value(held_out))
        except _Pruned as pruned:
            trial.set_user_attr("pruned", True)
            return pruned.estimate
        except Exception as exc:  # a failing candidate is recorded as failed, never fatal to the search
            message = f"{type(exc).__name__}: {exc}"[:500]
            trial.set_user_attr("error", message)
            log.warning("trial %d failed: %s", trial.number, message)
            if not self.succeeded:
                self.failures.append(message)
                if len(self.failures) >= self.config.population:
                    self.study.stop()  # a broken set-up, not a bad candidate: stop and say why
            return math.nan
        finally:
            self.timing.evaluation += time.perf_counter() - started
            self.timing.trials += 1
        self.succeeded = True
        return score

    def score(self, trial: Any, model: Any, tokenizer: Any) -> list[float]:
        """Each evaluator's score, its chunks in an order shuffled per trial. With a pruner, every example's share
        of the objective is reported (step: its index, counted across evaluators; value: its contribution times
        its evaluator's weight and ``total / examples of the evaluator``, so that the mean of all is the
        objective) and, after each chunk but the last, :class:`_Pruned` stops a candidate the pruner finds
        clearly worse than the best."""
        parts = self.evaluators.parts
        total, reported, scores = sum(len(p.search) for p in parts), [], []
        for part in parts:
            offset, scale = len(reported), part.weight * total / len(part.search)

            def report(index: list[int], values: Any, part: Any = part, offset: int = offset, scale: float = scale
                       ) -> None:
                shares = (scale * part.search.contributions(index, values)).tolist()
                reported.extend(shares)
                if self.config.prune is None:
                    return
                for i, share in zip(index, shares):
                    trial.report(share, offset + i)
                if len(reported) < total and trial.should_prune():
                    trial.set_user_attr("examples", len(reported))
                    raise _Pruned(statistics.fmean(reported))

            scores.append(part.search(model, tokenizer, on_chunk=report, order=trial.number))
        trial.set_user_attr("examples", total)
        trial.set_user_attr("scores", dict(zip(self.evaluators.names, scores)))
        return scores

    def _best_value(self) -> float:
        from optuna.trial import TrialState

        values = [score_of(t) for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        return max((v for v in values if v is not None), default=-math.inf)

    def after_trial(self, study: Any, trial: Any) -> None:
        trials = study.get_trials(deepcopy=False)
        done = done_trials(trials)
        self.write_best(trials)
        if self.bar is not None:
            self.bar.update(len(done) - self.bar.n)
        while len(done) >= (self.printed + 1) * self.config.population:
            self.report_generation(done, self.printed)
            self.printed += 1
            self.write_outputs(done, trials, plots=time.perf_counter() - self.last_plot > _PLOT_EVERY_S)
        if len(done) >= self.config.trials:
            study.stop()

    def report_generation(self, done: list[Any], g: int) -> None:
        if self.quiet:
            return
        population = self.config.population
        values = [t.value for t in done[g * population:(g + 1) * population] if score_of(t) is not None]
        best = max((t.value for t in done[:(g + 1) * population] if score_of(t) is not None), default=math.nan)
        elapsed = time.perf_counter() - self.start
        rate = (len(done) - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = (self.config.trials - len(done)) / rate if rate > 0 else math.inf
        states = [state_of(t) for t in done[g * population:(g + 1) * population]]
        line = (f"generation {g + 1}/{self.config.generations}: best {best:.5g}  median "
                f"{statistics.median(values) if values else math.nan:.5g}  {rate:.2f} trials/s  ETA {_duration(eta)}"
                + "".join(f"  ({states.count(s)} {s})" for s in ("pruned", "fail") if s in states))
        _print(line, self.bar)

    def write_best(self, trials: list[Any]) -> None:
        best = best_trial(trials)
        if best is None or best.number == self.best_number:
            return
        legacy, native = self.space.dump(*self.space.decode(best.params))
        _write(self.out / "best_recipe.yml", legacy)
        _write(self.out / "best_recipe_native.yml", native)
        self.best_number = best.number

    def write_outputs(self, done: list[Any], trials: list[Any], plots: bool = True) -> None:
        write_trials_csv(self.out / "trials.csv", done, self.config.population, self.space, self.evaluators.names)
        if plots:
            write_plots(self.out, done, self.config.population, self.space, best_trial(trials))
            self.last_plot = time.perf_counter()


def _bar(total: int, initial: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="trial", desc="evolving", dynamic_ncols=True, disable=None)


def _print(line: str, bar: Any) -> None:
    if bar is not None:
        bar.write(line, file=sys.stdout)
    else:
        print(line, flush=True)


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
    done: int
    timing: Timing


def evolve(config: SearchConfig, out: str | os.PathLike, storage: str | None = None, study_name: str | None = None,
           merge_best: str | os.PathLike | None = None, quiet: bool = False) -> EvolveResult:
    """Run (or resume, or join) the search of ``config`` until the study holds ``population x generations``
    finished trials; outputs go to ``out``. Run the same call on many machines with one ``storage`` URL
    (PostgreSQL) and ``study_name`` to share the work."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    study_name = study_name or out.resolve().name
    space = SearchSpace(config)
    study = open_study(config, space, storage, study_name)
    worker = _Worker(config, space, study, out, quiet)
    started = time.perf_counter()
    if worker.start_done < config.trials:
        study.optimize(worker.objective, callbacks=[worker.after_trial], gc_after_trial=False)
    worker.timing.wall = time.perf_counter() - started
    if worker.bar is not None:
        worker.bar.close()
    trials = study.get_trials(deepcopy=False)
    done = done_trials(trials)
    worker.write_best(trials)
    worker.write_outputs(done, trials)
    if len(worker.failures) >= config.population:
        raise RecipeError(f"evolve: the first {len(worker.failures)} candidates all failed; the first error: "
                          f"{worker.failures[0]}")
    best = best_trial(trials)
    if best is None:
        raise RecipeError("evolve: no candidate could be evaluated")
    if merge_best is not None:
        from .merge import merge

        merge(out / "best_recipe.yml", merge_best, dtype=config.dtype, quiet=quiet, cache_dir=config.cache_dir)
    return EvolveResult(out / "best_recipe.yml", best.value, best.user_attrs.get("validation"), len(done),
                        worker.timing)
