"""What a search file asks for and the space it searches: the paper's data-flow space (Akiba et al. 2024,
Sec. 3.2), decoded into recipes. ``evolve`` runs the search over it.

**The space.** The *slots* are ``num_r`` repetitions of all layers of all models, in the order of the legacy
layout (repetition, model, layer). Each slot has an indicator: the slot is a hop when its indicator is > 0. The
scale of hop ``k`` (the ``S_k`` of ``dfs-semantics.md``: it multiplies what flows into hop ``k``) is, by
``scale_by``:

- ``slot``: one scale per slot, ``S_k = s[n_k, m_k, l_k]``;
- ``pair``: the paper's scaling matrix, ``S_k = W[i_(k-1), i_k]`` with ``i = m * L + l`` numbering the
  ``M = models * L`` layers of all models and ``i_(-1) = e``, the embeddings' row: every hop that goes from the
  same layer to the same layer has the same scale. Only the pairs the layout can produce are parameters (at most
  ``(M + 1) * M``; with ``keep_ends`` the embeddings' row has one entry).

``scales: false`` keeps every scale at 1. ``keep_ends``: the input model's first layer starts the path and the
output model's last layer is appended to end it (its scale is 1 per slot, ``W[last hop, it]`` per pair).
``max_hops``: only the slots with the largest indicators are kept.

**No rejected samples.** Every parameter is drawn in a box many times wider than its range and mirrored into
the range (:func:`mirror`, the boundary handling of CMA-ES by reflection): the identity inside the range, so the
start point is written as it is, and a box CMA-ES never leaves, so Optuna's bounded CMA-ES never redraws.

The search file (``parse_search``): ``models``, ``num_r``, the ``search:`` settings, the evaluators (``evaluator:``
or ``evaluators:``, and ``test:``) and their three splits (:class:`Splits`). Errors name the field.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .evaluate import Objective, make_objective, speed_defaults
from .plan import check_device, compact_plan, dtype_name
from .recipe import (Hop, Recipe, RecipeError, Source, check_integer, check_number, dump_legacy, dump_native,
                     load_yaml, parse_source, read_file, recipe_from_legacy)

__all__ = ["SearchConfig", "SearchSpace", "Candidate", "Splits", "load_search", "read_search", "parse_search",
           "search_evaluators", "mirror", "PERIODS"]

_TOP_KEYS = ("models", "num_r", "input_layer_model", "output_layer_model", "search", "evaluator", "evaluators",
             "test", "dtype", "device", "cache_dir")
_SEARCH_KEYS = ("population", "generations", "seed", "sampler", "sigma0", "scales", "scale_by", "keep_ends",
                "init", "max_hops", "baselines", "heartbeat", "prune")
SAMPLERS = ("cmaes", "sep-cmaes", "random")
PRUNE_P = 0.1  # the Wilcoxon pruner's p-value threshold of `prune: true` (off by default: bench_pruning.py)
PRUNE_STARTUP = 2  # examples a candidate scores before the pruner may stop it (Optuna's n_startup_steps and
#                    default; with the reference the best trial of the whole study, bench_pruning.py on seeds 10-13
#                    showed no clear gain from 16 or 30 of 60, or p 0.02 or 0.05)
MAX_SCALE = 1000.0  # the largest scale a search may draw (CMA-ES's arithmetic overflows on ranges near 1e308)
MAX_SLOTS = 100_000  # a search's bound on num_r x models x layers (_check_slots)
MAX_POPULATION = 100_000  # cmaes builds its recombination weights in a Python loop over the population (1e6: 1 s;
#                           1e30 never ended); CMA-ES's own default is 4 + 3 ln(parameters), a few dozen here
MAX_SEED = 2**32 - 1  # NumPy's and Optuna's samplers take seeds in 0..2**32 - 1
MAX_HEARTBEAT = 86_400  # seconds (a day): Optuna's heartbeat thread overflows on huge intervals
PERIODS = 25  # each parameter's box spans this many mirror periods beyond each end of its range


# ---------------------------------------------------------------------------------------------------- config


@dataclass
class SearchConfig:
    """A parsed ``search.yml``. ``layers`` (the depth every model shares) is filled from the sources'
    configs by :func:`load_search`."""

    sources: list[Source]
    evaluator: dict | list  # one evaluator's mapping, or a list of them with weights (`evaluators:`)
    test: dict | list | None = None  # evaluator sections scored whole, for the report only
    num_r: int = 3
    input_model: int = 0
    output_model: int = 0
    population: int = 16
    generations: int = 25
    seed: int = 0
    sampler: str | None = None  # cmaes, sep-cmaes, random; None: cmaes up to FULL_CMA_MAX parameters
    sigma0: float | None = None  # initial CMA-ES step, as a fraction of each parameter's range (default 1/6)
    scales: tuple[float, float] | None = (0.5, 1.5)
    scale_by: str = "slot"  # slot: one scale per slot; pair: W[from layer, to layer]
    keep_ends: bool = True
    init: str = "own_order"
    max_hops: int | None = None
    baselines: bool = True
    heartbeat: int = 30  # seconds of silence after which a worker's running trial counts as lost
    prune: float | None = None  # p-value threshold of the Wilcoxon pruner; None (the default): all scored in full
    prune_startup: int = PRUNE_STARTUP  # examples scored before the pruner may stop a candidate
    dtype: str = "float32"  # parse_search: by the device (evaluate.speed_defaults)
    device: str = "cpu"
    cache_dir: str | None = None
    base: Path = field(default=Path("."), repr=False)  # the search file's folder: data paths are relative to it
    layers: int = 0

    @property
    def trials(self) -> int:
        """The searched budget: ``population x generations`` finished trials."""
        return self.population * self.generations

    @property
    def budget(self) -> int:
        """All finished trials of a complete run: the baselines and the searched ones."""
        return (len(self.sources) if self.baselines else 0) + self.trials


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise RecipeError(f"{where}: expected true or false, got {value!r}")
    return value


def _choice(value: Any, where: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise RecipeError(f"{where}: expected {' or '.join(choices)}, got {value!r}")
    return value


def _scales(value: Any) -> tuple[float, float] | None:
    if value is False:
        return None
    if (isinstance(value, list) and len(value) == 2 and all(isinstance(s, (int, float)) and not isinstance(s, bool)
                                                            and math.isfinite(s) for s in value)
            and 0 <= value[0] < value[1] <= MAX_SCALE):
        return float(value[0]), float(value[1])
    raise RecipeError(f"search.scales: expected [low, high] with 0 <= low < high <= {MAX_SCALE:g}, or false, got "
                      f"{value!r}")


def _check_slots(num_r: int, models: int, layers: int | None = None) -> None:
    """At most ``MAX_SLOTS`` slots ``num_r x models x layers`` (the paper's largest space, two 32-layer models at
    ``num_r`` 3, has 192; a million took 9 s and 850 MB to build, and CMA-ES cannot learn that many parameters
    within any budget). ``layers`` None: not known yet (the sources' configs are not read), at least one."""
    if num_r * models * (layers or 1) > MAX_SLOTS:
        raise RecipeError(f"num_r: expected num_r x {models} models x {layers or 'their'} layers <= {MAX_SLOTS:,} "
                          f"slots (one indicator per slot), got num_r {num_r}")


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
    config = SearchConfig(sources=sources, evaluator=doc.get("evaluator", doc.get("evaluators")), test=doc.get("test"),
                          base=base)
    config.num_r = check_integer(doc.get("num_r", config.num_r), "num_r", 1)
    _check_slots(config.num_r, len(sources))
    for key, attr in (("input_layer_model", "input_model"), ("output_layer_model", "output_model")):
        value = doc.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(sources):
            raise RecipeError(f"{key}: expected a model index in 0..{len(sources) - 1}, got {value!r}")
        setattr(config, attr, value)
    config.population = check_integer(search.get("population", config.population), "search.population", 4,
                                      MAX_POPULATION)
    config.generations = check_integer(search.get("generations", config.generations), "search.generations", 1)
    config.seed = check_integer(search.get("seed", config.seed), "search.seed", 0, MAX_SEED)
    config.heartbeat = check_integer(search.get("heartbeat", config.heartbeat), "search.heartbeat", 1, MAX_HEARTBEAT)
    if search.get("max_hops") is not None:
        config.max_hops = check_integer(search["max_hops"], "search.max_hops", 1)
    sigma0 = search.get("sigma0")
    if sigma0 is not None:
        config.sigma0 = check_number(sigma0, "search.sigma0", "a number in (0, 1] (a fraction of each parameter's "
                                     "range)", lambda x: 0 < x <= 1)
    if search.get("sampler") is not None:
        config.sampler = _choice(search["sampler"], "search.sampler", SAMPLERS)
    config.scales = _scales(search.get("scales", list(config.scales)))
    prune = search.get("prune", False)
    if prune is True or prune is False:
        config.prune = PRUNE_P if prune else None
    elif isinstance(prune, float) and 0 < prune < 1:
        config.prune = prune
    else:
        raise RecipeError(f"search.prune: expected true, false or a p-value threshold in (0, 1), got {prune!r}")
    config.scale_by = _choice(search.get("scale_by", config.scale_by), "search.scale_by", ("slot", "pair"))
    config.keep_ends = _flag(search.get("keep_ends", config.keep_ends), "search.keep_ends")
    config.baselines = _flag(search.get("baselines", config.baselines), "search.baselines")
    config.init = _choice(search.get("init", config.init), "search.init", ("own_order", "center"))
    for key in ("dtype", "device", "cache_dir"):
        if key in doc:
            if not isinstance(doc[key], str):
                raise RecipeError(f"{key}: expected a string, got {doc[key]!r}")
            setattr(config, key, doc[key])
    config.dtype = dtype_name(doc.get("dtype", speed_defaults(config.device)["dtype"]))
    search_evaluators(config)  # fail now on a bad evaluator or data, not in every trial
    return config


def load_search(path: str | os.PathLike) -> SearchConfig:
    """Read a search file (same safe YAML loader as recipes) and check it against its sources' configs (no
    weights read): one depth for all models, and models that stack (width, family, vocabulary: the rules of
    ``plan``, applied to a recipe that uses every layer), on a device this machine has."""
    from .sources import read_config

    config = read_search(path)
    config.sources = [Source(str(config.base / s.path), s.revision) if (config.base / s.path).exists()
                      and not Path(s.path).is_absolute() else s for s in config.sources]
    configs = [read_config(s, config.cache_dir) for s in config.sources]
    depths = [int(c["num_hidden_layers"]) for c in configs]
    if len(set(depths)) > 1:
        raise RecipeError(f"models: the search's layout needs one depth for all models, got {depths} layers")
    config.layers = depths[0]
    _check_slots(config.num_r, len(config.sources), config.layers)
    every = Recipe(config.sources, [Hop(m, layer) for m in range(len(configs)) for layer in range(config.layers)],
                   input_model=config.input_model, output_model=config.output_model)
    compact_plan(every, configs, config.dtype)
    check_device(config.device)
    return config


def read_search(path: str | os.PathLike) -> SearchConfig:
    """A search file parsed and checked, its sources not opened (``dfsmerge eval --search`` needs no more)."""
    path = Path(path)
    try:
        text = read_file(path)  # load_yaml decodes it: a file that is not UTF-8 is an error at its line
    except OSError as exc:
        raise RecipeError(f"cannot read search file {path}: {exc.strerror}") from None
    return parse_search(load_yaml(text, str(path)), path.resolve().parent)


@dataclass
class Splits:
    """A search's three splits: ``objective`` (its evaluators: their search parts are optimised, their held-out
    parts, the *validation* split, choose the reported best) and ``test`` (the ``test:`` section's evaluators,
    scored whole; reported only, for the best and the baselines; None without one)."""

    objective: Objective
    test: Objective | None

    @property
    def validated(self) -> bool:
        return any(p.held_out is not None for p in self.objective.parts)

    def evaluators(self) -> list[Any]:
        """Every evaluator of the three splits (``evaluate.Evaluator``s)."""
        return [e for objective in (self.objective, self.test) if objective is not None
                for p in objective.parts for e in (p.search, p.held_out) if e is not None]

    def sizes(self) -> dict[str, int]:
        """Examples per split."""
        parts = self.objective.parts
        sizes = {"search": sum(len(p.search.examples) for p in parts)}
        if self.validated:
            sizes["validation"] = sum(len(p.held_out.examples) for p in parts if p.held_out is not None)
        if self.test is not None:
            sizes["test"] = sum(len(p.search.examples) for p in self.test.parts)
        return sizes

    def validation(self, model: Any, tokenizer: Any, scores: list[float]) -> float:
        """The objective on the held-out parts (an evaluator without one counts with its search ``scores``)."""
        parts = self.objective.parts
        return self.objective.value([s if p.held_out is None else p.held_out(model, tokenizer)
                                     for p, s in zip(parts, scores)])

    def tested(self, model: Any, tokenizer: Any) -> float:
        assert self.test is not None
        return self.test.value([p.search(model, tokenizer) for p in self.test.parts])


def search_evaluators(config: SearchConfig) -> Splits:
    """The search's splits (:class:`Splits`), from ``evaluator:`` or ``evaluators:`` and ``test:`` (one
    evaluator section or a list, as ``evaluators:``, without ``validation``: the test split is scored whole)."""
    objective = make_objective(config.evaluator, config.base, config.device)
    test = config.test
    if test is None:
        return Splits(objective, None)
    items = test if isinstance(test, list) else [test]
    if not items or not all(isinstance(item, dict) and "validation" not in item for item in items):
        raise RecipeError("test: expected an evaluator section (type, data, ...) or a list of them, without "
                          f"`validation`: the test split is scored whole, got {test!r}")
    whole = [{**item, "validation": 0} for item in items]
    try:
        return Splits(objective, make_objective(whole if isinstance(test, list) else whole[0], config.base,
                                                config.device))
    except RecipeError as exc:
        raise RecipeError(f"test: {exc}") from None


# ---------------------------------------------------------------------------------------------------- space


def mirror(u: float, low: float, high: float) -> float:
    """``u`` reflected into ``[low, high]``: the identity inside the range, a zig-zag of period
    ``2 (high - low)`` outside (CMA-ES boundary handling by mirroring; Hansen, *The CMA Evolution Strategy: A
    Tutorial*, on box constraints)."""
    width = high - low
    t = (u - low) % (2 * width)
    return low + (t if t <= width else 2 * width - t)


def _box(low: float, high: float) -> tuple[float, float]:
    """The box a parameter is drawn in: ``PERIODS`` whole mirror periods on each side of its range, so a
    uniform draw in the box is uniform in the range."""
    reach = 2 * PERIODS * (high - low)
    return low - reach, high + reach


Layer = tuple[int, int]  # (model, layer)
Slot = tuple[int, int, int]  # (repetition, model, layer)


@dataclass
class Candidate:
    """A point of the space as a legacy recipe: ``mask`` and ``scales`` grids of shape (num_r, models, layers)
    and the scale of the appended last hop (``keep_ends``)."""

    mask: list
    scales: list
    last_scale: float = 1.0


class SearchSpace:
    """The paper's search space over slots ``(repetition, model, layer)``; candidates are legacy recipes."""

    def __init__(self, config: SearchConfig):
        self.config = c = config
        self.shape = (c.num_r, len(c.sources), c.layers)
        self.slots = [(n, m, layer) for n in range(c.num_r) for m in range(len(c.sources))
                      for layer in range(c.layers)]
        first = (0, c.input_model, 0)
        # keep_ends: the input model's first layer is forced on and nothing may come before it; the output
        # model's last layer is appended by add_last_layer.
        self.forced = {first: True, **{s: False for s in self.slots if s < first}} if c.keep_ends else {}
        self.free = [s for s in self.slots if s not in self.forced]
        self.last = (c.output_model, c.layers - 1)
        self.pairs = self._pairs() if c.scales and c.scale_by == "pair" else []
        ranges = {self.name("use", s): (-1.0, 1.0) for s in self.free}
        if c.scales and c.scale_by == "slot":
            ranges |= {self.name("scale", s): c.scales for s in self.free}
        ranges |= {self.pair_name(a, b): c.scales for a, b in self.pairs}
        self.ranges: dict[str, tuple[float, float]] = ranges
        self.boxes = {name: _box(*r) for name, r in ranges.items()}

    @staticmethod
    def name(kind: str, slot: Slot) -> str:
        return f"{kind}_{slot[0]}_{slot[1]}_{slot[2]}"

    @staticmethod
    def pair_name(a: Layer | None, b: Layer) -> str:
        """``w_<from>_<to>``, a layer written ``model.layer`` and the embeddings ``e``."""
        return f"w_{'e' if a is None else f'{a[0]}.{a[1]}'}_{b[0]}.{b[1]}"

    def _pairs(self) -> list[tuple[Layer | None, Layer]]:
        """The (from, to) pairs a candidate can hold: ``a`` before ``b`` when a slot of ``a`` comes before a slot
        of ``b``; the embeddings before any layer that can be first; anything before the appended last layer."""
        possible = [s for s in self.slots if self.forced.get(s, True)]
        first_at: dict[Layer, int] = {}
        last_at: dict[Layer, int] = {}
        for position, (_, m, layer) in enumerate(possible):
            first_at.setdefault((m, layer), position)
            last_at[(m, layer)] = position
        starts = [possible[0][1:]] if self.config.keep_ends else list(first_at)
        pairs: list[tuple[Layer | None, Layer]] = [(None, b) for b in starts]
        pairs += [(a, b) for a in first_at for b in last_at if first_at[a] < last_at[b]]
        if self.config.keep_ends:
            pairs += [(a, self.last) for a in first_at]
        return list(dict.fromkeys(pairs))

    def distributions(self) -> dict[str, Any]:
        """Optuna's distribution of every parameter, in a fixed order."""
        from optuna.distributions import FloatDistribution

        return {name: FloatDistribution(*box) for name, box in self.boxes.items()}

    def suggest(self, trial: Any) -> dict[str, float]:
        """Draw every parameter of a candidate through ``trial.suggest_float``."""
        return {name: trial.suggest_float(name, *box) for name, box in self.boxes.items()}

    def x0(self) -> dict[str, float] | None:
        """The CMA-ES start: the input model's own layer order, unit scales (None: the centre of the space)."""
        c = self.config
        if c.init != "own_order":
            return None
        own = {(0, c.input_model, layer) for layer in range(c.layers - (1 if c.keep_ends else 0))}
        x0 = {self.name("use", s): 0.5 if s in own else -0.5 for s in self.free}
        one = min(max(1.0, c.scales[0]), c.scales[1]) if c.scales else 1.0
        return x0 | {name: one for name in self.boxes if name not in x0}

    def value(self, params: dict[str, float], name: str) -> float:
        """A parameter mirrored into its range."""
        return mirror(params[name], *self.ranges[name])

    def decode(self, params: dict[str, float]) -> Candidate:
        """Parameters -> the candidate, with the constraints applied."""
        n_r, n_m, n_l = self.shape
        mask = [[[False] * n_l for _ in range(n_m)] for _ in range(n_r)]
        scales = [[[1.0] * n_l for _ in range(n_m)] for _ in range(n_r)]
        use = {s: self.value(params, self.name("use", s)) for s in self.free}
        used = [s for s in self.free if use[s] > 0]
        budget = None if self.config.max_hops is None else (
            self.config.max_hops - sum(self.forced.values()) - int(self.config.keep_ends))
        if budget is not None and len(used) > budget:
            keep = set(sorted(used, key=lambda s: -use[s])[:max(budget, 0)])
            used = [s for s in used if s in keep]
        on = set(used) | {s for s, forced_on in self.forced.items() if forced_on}
        hops = [s for s in self.slots if s in on]
        previous: Layer | None = None
        for (n, m, layer) in hops:
            mask[n][m][layer] = True
            if self.pairs:
                scales[n][m][layer] = round(self.value(params, self.pair_name(previous, (m, layer))), 6)
            elif self.config.scales and (n, m, layer) in use:
                scales[n][m][layer] = round(self.value(params, self.name("scale", (n, m, layer))), 6)
            previous = (m, layer)
        last_scale = 1.0
        if self.pairs and self.config.keep_ends:
            last_scale = round(self.value(params, self.pair_name(previous, self.last)), 6)
        return Candidate(mask, scales, last_scale)

    def recipe(self, candidate: Candidate) -> Recipe:
        """The candidate as a checked :class:`Recipe` (raises :class:`RecipeError` when no slot is used)."""
        c = self.config
        return recipe_from_legacy([[s.path, s.revision] for s in c.sources], c.num_r, candidate.mask,
                                  candidate.scales, input_layer_model=c.input_model,
                                  output_layer_model=c.output_model, add_last_layer=c.keep_ends,
                                  last_layer_scale=candidate.last_scale)

    def dump(self, candidate: Candidate) -> tuple[str, str]:
        """(legacy YAML, native YAML) of a candidate."""
        c = self.config
        legacy = dump_legacy(c.sources, candidate.mask, candidate.scales, c.input_model, c.output_model,
                             add_last_layer=c.keep_ends, last_layer_scale=candidate.last_scale)
        return legacy, dump_native(self.recipe(candidate))

    def baseline(self, model: int) -> Recipe:
        """Source ``model`` as it is: its own layers in order, its embeddings and head, scale 1."""
        c = self.config
        hops = [Hop(model, layer) for layer in range(c.layers)]
        return Recipe(list(c.sources), hops, input_model=model, output_model=model).check()

    def describe(self) -> str:
        """One line: the number of parameters and what they are."""
        c = self.config
        n_use = len(self.free)
        scales = ("no scales" if not c.scales else
                  f"{n_use} slot scales in {list(c.scales)}" if c.scale_by == "slot" else
                  f"{len(self.pairs)} pair scales W[from, to] in {list(c.scales)}")
        return f"{len(self.boxes)} parameters: {n_use} slot indicators, {scales}"
