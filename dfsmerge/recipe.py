"""Merge recipes: the legacy YAML format, the native hop-list format, and the hop list both become.

A recipe is parsed into a :class:`Recipe`: the sources, the ordered hops and where the embeddings and the head
come from. Everything downstream (the streaming writer, the in-memory model, the search) reads only this
object. The meaning of a hop is ``../shared/dfs-semantics.md``; this module only turns files into hops and
checks what can be checked without looking at the sources.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

__all__ = [
    "RecipeError",
    "Source",
    "Transform",
    "Hop",
    "Recipe",
    "load_recipe",
    "parse_recipe",
    "load_yaml",
    "parse_source",
    "recipe_from_legacy",
    "dump_legacy",
    "dump_native",
]


class RecipeError(ValueError):
    """A recipe (or a source it names) is not what it should be. The message names the field."""


# ---------------------------------------------------------------------------------------------------- YAML


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader plus the two Python tags real legacy recipes carry. Nothing else is ever constructed."""


def _construct_tuple(loader: yaml.SafeLoader, node: yaml.Node) -> list:
    return loader.construct_sequence(node, deep=True)


def _construct_ordered_dict(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict:
    if suffix != "collections.OrderedDict":
        raise yaml.constructor.ConstructorError(
            None, None, f"refusing Python tag !!python/object/apply:{suffix}", node.start_mark
        )
    if isinstance(node, yaml.SequenceNode):  # yaml.dump(OrderedDict) writes [[pairs]] as the args
        args = loader.construct_sequence(node, deep=True)
        pairs = args[0] if args else []
    else:
        spec = loader.construct_mapping(node, deep=True)
        pairs = (spec.get("args") or [[]])[0]
        pairs = list(pairs) + list((spec.get("dictitems") or {}).items())
    return {key: value for key, value in pairs}


def _refuse(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> None:
    raise yaml.constructor.ConstructorError(
        None, None, f"refusing Python tag {node.tag!r}: recipes may only use !!python/tuple and "
        "!!python/object/apply:collections.OrderedDict", node.start_mark,
    )


_RecipeLoader.add_constructor("tag:yaml.org,2002:python/tuple", _construct_tuple)
_RecipeLoader.add_multi_constructor("tag:yaml.org,2002:python/object/apply:", _construct_ordered_dict)
_RecipeLoader.add_multi_constructor("tag:yaml.org,2002:python/", _refuse)
_RecipeLoader.add_multi_constructor("!", _refuse)


def load_yaml(text: str, where: str) -> dict:
    """Parse recipe-style YAML safely (only the two legacy Python tags); ``where`` names the file in errors."""
    try:
        doc = yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise RecipeError(f"{where}: {exc}") from None
    if not isinstance(doc, dict):
        raise RecipeError(f"{where}: expected a mapping at the top level, got {type(doc).__name__}")
    return doc


# ---------------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Source:
    """One source checkpoint: a local folder, a ``.gguf`` file, or a hub ID with an optional revision."""

    path: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.path if self.revision is None else f"{self.path}@{self.revision}"


def _as_tensor(value: Any, field_name: str) -> float | torch.Tensor:
    if isinstance(value, bool) or value is None:
        raise RecipeError(f"{field_name}: expected a number, a vector or a matrix, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise RecipeError(f"{field_name}: contains NaN or infinity")
        return float(value)
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to(torch.float32)
    else:
        try:
            tensor = torch.tensor(value, dtype=torch.float32)
        except (TypeError, ValueError) as exc:
            raise RecipeError(f"{field_name}: expected a number, a vector or a matrix ({exc})") from None
    if tensor.ndim == 0:
        return float(tensor)
    if tensor.ndim > 2 or (tensor.ndim == 2 and tensor.shape[0] != tensor.shape[1]):
        raise RecipeError(f"{field_name}: expected a scalar, a length-H vector or an H x H matrix, "
                          f"got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise RecipeError(f"{field_name}: contains NaN or infinity")
    return tensor


@dataclass(frozen=True, eq=False)
class Transform:
    """``T(h) = S h + b`` with ``S`` a scalar, a length-H vector (diagonal) or an H x H matrix and ``b`` a
    scalar or a length-H vector. Applied to the last dimension of ``x``."""

    scale: float | torch.Tensor = 1.0
    bias: float | torch.Tensor = 0.0

    @property
    def is_identity(self) -> bool:
        return not self.has_bias and isinstance(self.scale, float) and self.scale == 1.0

    @property
    def has_bias(self) -> bool:
        return not (isinstance(self.bias, float) and self.bias == 0.0)

    @property
    def kind(self) -> str:
        """``"scalar"``, ``"vector"`` or ``"matrix"``: the shape of ``S``."""
        if isinstance(self.scale, float):
            return "scalar"
        return "vector" if self.scale.ndim == 1 else "matrix"

    def width(self) -> int | None:
        """The hidden size this transform is written for, or ``None`` when it fits any."""
        for part in (self.scale, self.bias):
            if isinstance(part, torch.Tensor):
                return int(part.shape[0])
        return None

    def apply(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        """``S x + b`` over the last dimension, computed in ``x``'s dtype."""
        scale = self.scale if isinstance(self.scale, float) else self.scale.to(x.device, x.dtype)
        if isinstance(scale, float) or scale.ndim == 1:
            y = x * scale
        else:
            y = x @ scale.T
        if with_bias and self.has_bias:
            bias = self.bias if isinstance(self.bias, float) else self.bias.to(x.device, x.dtype)
            y = y + bias
        return y

    def bias_vector(self, hidden_size: int) -> torch.Tensor:
        """``b`` as a float32 vector of length ``hidden_size``."""
        if isinstance(self.bias, float):
            return torch.full((hidden_size,), self.bias, dtype=torch.float32)
        return self.bias.to(torch.float32)

    def to_yaml(self) -> tuple[Any, Any]:
        """(scale, bias) as plain YAML values."""
        def plain(v: float | torch.Tensor) -> Any:
            return v if isinstance(v, float) else v.tolist()
        return plain(self.scale), plain(self.bias)


IDENTITY = Transform()


@dataclass(frozen=True)
class Hop:
    """Hop ``k`` runs source layer ``(model, layer)``; its transform acts on the data flowing into it."""

    model: int
    layer: int
    transform: Transform = IDENTITY
    origin: str = field(default="", compare=False)  # the recipe field it came from, for error messages

    @property
    def where(self) -> str:
        return self.origin or "hops"


@dataclass
class Recipe:
    """What a merge builds: see ``dfs-semantics.md``."""

    sources: list[Source]
    hops: list[Hop]
    input_model: int = 0
    output_model: int = 0
    classification: bool | None = None  # None: follow the output model's architecture
    raw: dict = field(default_factory=dict, repr=False, compare=False)  # the document it was read from

    def check(self) -> "Recipe":
        """Checks that need no source: indices in range, one hidden size among the transforms."""
        n = len(self.sources)
        if n == 0:
            raise RecipeError("models: expected at least one source model, got none")
        if not self.hops:
            raise RecipeError("hops: the recipe selects no layer (every layer_mask entry is false)")
        for key, value in (("input_model", self.input_model), ("output_model", self.output_model)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
                raise RecipeError(f"{key}: expected a model index in 0..{n - 1}, got {value!r}")
        widths = set()
        for k, hop in enumerate(self.hops):
            if not 0 <= hop.model < n:
                raise RecipeError(f"hops[{k}].model: expected a model index in 0..{n - 1}, got {hop.model}")
            if hop.layer < 0:
                raise RecipeError(f"hops[{k}].layer: expected a layer index >= 0, got {hop.layer}")
            if hop.transform.width() is not None:
                widths.add(hop.transform.width())
        if len(widths) > 1:
            raise RecipeError(f"hops: the transforms are written for different hidden sizes {sorted(widths)}")
        return self

    def used_layers(self) -> list[tuple[int, int]]:
        """The distinct ``(model, layer)`` pairs, in order of first use."""
        return list(dict.fromkeys((h.model, h.layer) for h in self.hops))

    def hop_table(self) -> str:
        """A plain-text table of the hops, for logs, ``plan`` and model cards."""
        lines = ["| hop | model | layer | scale | bias |", "|---:|---:|---:|---|---|"]
        for k, hop in enumerate(self.hops):
            lines.append(f"| {k} | {hop.model} | {hop.layer} | {_describe(hop.transform.scale)} "
                         f"| {_describe(hop.transform.bias)} |")
        return "\n".join(lines)


def _describe(value: float | torch.Tensor) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    kind = "vector" if value.ndim == 1 else "matrix"
    return f"{kind} {tuple(value.shape)} mean {value.float().mean():.3g}"


# ---------------------------------------------------------------------------------------------------- parsing


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read a recipe file (legacy or native format). Relative local model paths are taken relative to the
    recipe file when they exist there."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from None
    recipe = parse_recipe(load_yaml(text, str(path)))
    base = path.resolve().parent
    recipe.sources = [_relative_to(src, base) for src in recipe.sources]
    return recipe


def _relative_to(src: Source, base: Path) -> Source:
    candidate = base / src.path
    if not Path(src.path).is_absolute() and not Path(src.path).exists() and candidate.exists():
        return Source(str(candidate), src.revision)
    return src


def parse_recipe(doc: dict) -> Recipe:
    """Turn a parsed YAML document (legacy or native) into a checked :class:`Recipe`."""
    if "hops" in doc:
        return _parse_native(doc)
    if "layer_mask" in doc or "model_paths" in doc:
        return recipe_from_legacy(**{k: v for k, v in doc.items() if k in _LEGACY_KEYS}, _raw=doc,
                                  _unknown=[k for k in doc if k not in _LEGACY_KEYS])
    raise RecipeError("recipe: expected either `hops` (native format) or `model_paths` and `layer_mask` "
                      f"(legacy format); found keys {sorted(doc)}")


def parse_source(value: Any, where: str) -> Source:
    """A source written as a path or hub ID, ``[path, revision]`` or ``{path, revision}``."""
    if isinstance(value, str):
        return Source(value)
    if isinstance(value, (list, tuple)) and len(value) in (1, 2) and isinstance(value[0], str):
        revision = value[1] if len(value) == 2 else None
        if revision is not None and not isinstance(revision, str):
            raise RecipeError(f"{where}: revision must be a string or null, got {revision!r}")
        return Source(value[0], revision)
    if isinstance(value, dict) and isinstance(value.get("path"), str):
        return Source(value["path"], value.get("revision"))
    raise RecipeError(f"{where}: expected a path or hub ID, [path, revision] or {{path, revision}}, got {value!r}")


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecipeError(f"{where}: expected an integer, got {value!r}")
    return value


def _parse_native(doc: dict) -> Recipe:
    known = {"models", "hops", "input_model", "output_model", "classification"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise RecipeError(f"recipe: unknown keys {unknown}; the native format has {sorted(known)}")
    models = doc.get("models")
    if not isinstance(models, list):
        raise RecipeError(f"models: expected a list of sources, got {models!r}")
    sources = [parse_source(m, f"models[{i}]") for i, m in enumerate(models)]
    if not isinstance(doc["hops"], list):
        raise RecipeError(f"hops: expected a list of {{model, layer, scale, bias}}, got {doc['hops']!r}")
    hops = []
    for k, entry in enumerate(doc["hops"]):
        if not isinstance(entry, dict) or "layer" not in entry:
            raise RecipeError(f"hops[{k}]: expected {{model, layer, scale, bias}}, got {entry!r}")
        extra = sorted(set(entry) - {"model", "layer", "scale", "bias"})
        if extra:
            raise RecipeError(f"hops[{k}]: unknown keys {extra}")
        transform = Transform(_as_tensor(entry.get("scale", 1.0), f"hops[{k}].scale"),
                              _as_tensor(entry.get("bias", 0.0), f"hops[{k}].bias"))
        if transform.has_bias and not isinstance(transform.bias, float) and transform.bias.ndim != 1:
            raise RecipeError(f"hops[{k}].bias: expected a scalar or a length-H vector")
        hops.append(Hop(_int(entry.get("model", 0), f"hops[{k}].model"),
                        _int(entry["layer"], f"hops[{k}].layer"), transform, f"hops[{k}]"))
    classification = doc.get("classification")
    return Recipe(sources, hops, _int(doc.get("input_model", 0), "input_model"),
                  _int(doc.get("output_model", 0), "output_model"),
                  classification, raw=doc).check()


_LEGACY_KEYS = ("model_paths", "num_r", "layer_mask", "scaling_factors", "bias_factors", "input_layer_model",
                "output_layer_model", "add_last_layer", "last_layer_scale", "classification")


def _shape(value: Any, depth: int) -> tuple[int, ...] | None:
    """The shape of ``depth`` levels of nested lists, or None when ragged."""
    if depth == 0:
        return ()
    if isinstance(value, torch.Tensor):
        return tuple(value.shape[:depth]) if value.ndim >= depth else None
    if not isinstance(value, (list, tuple)) or not value:
        return (len(value),) if isinstance(value, (list, tuple)) and depth == 1 else None
    inner = {_shape(v, depth - 1) for v in value}
    if len(inner) != 1 or None in inner:
        return None
    return (len(value), *inner.pop())


def _check_grid(name: str, value: Any, expected: tuple[int, int, int]) -> None:
    got = _shape(value, 3)
    if got != expected:
        got_text = "a ragged or non-list value" if got is None else str(got)
        raise RecipeError(f"{name}: expected shape {expected} (num_r, models, layers), got {got_text}")


def recipe_from_legacy(
    model_paths: Sequence[Any],
    num_r: int,
    layer_mask: Any,
    scaling_factors: Any = None,
    bias_factors: Any = None,
    input_layer_model: int = 0,
    output_layer_model: int = 0,
    add_last_layer: bool = True,
    last_layer_scale: float = 1.0,
    classification: bool | None = None,
    _raw: dict | None = None,
    _unknown: Sequence[str] = (),
) -> Recipe:
    """Build the hop list of a legacy recipe (the paper's layout; ``dfs-semantics.md``, "The hop list")."""
    if _unknown:
        raise RecipeError(f"recipe: unknown keys {sorted(_unknown)}; the legacy format has {list(_LEGACY_KEYS)}")
    if not isinstance(model_paths, (list, tuple)) or not model_paths:
        raise RecipeError(f"model_paths: expected a non-empty list of [path, revision], got {model_paths!r}")
    sources = [parse_source(m, f"model_paths[{i}]") for i, m in enumerate(model_paths)]
    num_r = _int(num_r, "num_r")
    if num_r < 1:
        raise RecipeError(f"num_r: expected an integer >= 1, got {num_r}")
    mask_shape = _shape(layer_mask, 3)
    if mask_shape is None or mask_shape[:2] != (num_r, len(sources)):
        got = "a ragged or non-list value" if mask_shape is None else str(mask_shape)
        raise RecipeError(f"layer_mask: expected shape ({num_r}, {len(sources)}, n_layers), got {got}")
    grid = mask_shape
    for name, value in (("scaling_factors", scaling_factors), ("bias_factors", bias_factors)):
        if value is not None:
            _check_grid(name, value, grid)
    for key, value in (("input_layer_model", input_layer_model), ("output_layer_model", output_layer_model)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(sources):
            raise RecipeError(f"{key}: expected a model index in 0..{len(sources) - 1}, got {value!r}")
    if not isinstance(add_last_layer, bool):
        raise RecipeError(f"add_last_layer: expected true or false, got {add_last_layer!r}")
    hops = []
    for n in range(grid[0]):
        for m in range(grid[1]):
            for layer in range(grid[2]):
                flag = layer_mask[n][m][layer]
                if not isinstance(flag, (bool, int, float)) and not isinstance(flag, torch.Tensor):
                    raise RecipeError(f"layer_mask[{n}][{m}][{layer}]: expected true/false, got {flag!r}")
                if not bool(flag):
                    continue
                where = f"[{n}][{m}][{layer}]"
                scale = 1.0 if scaling_factors is None else _as_tensor(scaling_factors[n][m][layer],
                                                                      "scaling_factors" + where)
                bias = 0.0 if bias_factors is None else _as_tensor(bias_factors[n][m][layer], "bias_factors" + where)
                if isinstance(bias, torch.Tensor) and bias.ndim != 1:
                    raise RecipeError(f"bias_factors{where}: expected a scalar or a length-H vector, "
                                      f"got shape {tuple(bias.shape)}")
                hops.append(Hop(m, layer, Transform(scale, bias), f"layer_mask{where}"))
    if add_last_layer:
        hops.append(Hop(output_layer_model, grid[2] - 1, Transform(_as_tensor(last_layer_scale, "last_layer_scale")),
                        "add_last_layer"))
    return Recipe(sources, hops, input_layer_model, output_layer_model, classification, raw=_raw or {}).check()


# ---------------------------------------------------------------------------------------------------- writing


def dump_native(recipe: Recipe) -> str:
    """The recipe in the native format, as YAML text."""
    hops = []
    for hop in recipe.hops:
        entry: dict[str, Any] = {"model": hop.model, "layer": hop.layer}
        scale, bias = hop.transform.to_yaml()
        if scale != 1.0:
            entry["scale"] = scale
        if bias != 0.0:
            entry["bias"] = bias
        hops.append(entry)
    doc: dict[str, Any] = {
        "models": [s.path if s.revision is None else {"path": s.path, "revision": s.revision}
                   for s in recipe.sources],
        "input_model": recipe.input_model,
        "output_model": recipe.output_model,
    }
    if recipe.classification is not None:
        doc["classification"] = recipe.classification
    doc["hops"] = hops
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)


def dump_legacy(
    sources: Sequence[Source],
    layer_mask: Any,
    scaling_factors: Any,
    input_layer_model: int = 0,
    output_layer_model: int = 0,
    add_last_layer: bool = False,
) -> str:
    """A legacy-format recipe as YAML text (plain lists: loadable by this tool and by ``yaml.safe_load``)."""
    doc = {
        "model_paths": [[s.path, s.revision] for s in sources],
        "num_r": len(layer_mask),
        "layer_mask": layer_mask,
        "scaling_factors": scaling_factors,
        "input_layer_model": input_layer_model,
        "output_layer_model": output_layer_model,
        "add_last_layer": add_last_layer,
    }
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)
