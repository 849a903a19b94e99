"""Merge recipes: the legacy YAML format, the native hop-list format, and the hop list both become.

A recipe is parsed into a :class:`Recipe`: the sources, the ordered hops and where the embeddings and the head
come from. Everything downstream (the streaming writer, the in-memory model, the search) reads only this
object. The meaning of a hop is ``../shared/dfs-semantics.md``; this module only turns files into hops and
checks what can be checked without looking at the sources.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import reprlib
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import yaml

if TYPE_CHECKING:
    import torch

__all__ = [
    "RecipeError",
    "read_file",
    "is_tensor",
    "brief",
    "did_you_mean",
    "check_integer",
    "check_number",
    "Source",
    "Transform",
    "Hop",
    "Recipe",
    "load_recipe",
    "parse_recipe",
    "load_yaml",
    "parse_source",
    "looks_local",
    "check_revision",
    "recipe_from_legacy",
    "dump_legacy",
    "dump_native",
]


class RecipeError(ValueError):
    """A recipe (or a source it names) is not what it should be. The message, one line of at most
    ``MAX_MESSAGE`` characters, starts with the field or file it is about and says what was expected."""

    def __init__(self, message: str):
        message = " ".join(str(message).split())  # one line, whatever a library put into it
        if len(message) > MAX_MESSAGE:
            cut = len(message) - MAX_MESSAGE
            message = f"{message[:MAX_MESSAGE // 2]} [... {cut} characters cut ...] {message[-MAX_MESSAGE // 2:]}"
        super().__init__(message)


MAX_MESSAGE = 1000

_BRIEF = reprlib.Repr()
_BRIEF.maxstring = _BRIEF.maxother = 60
_BRIEF.maxlong = 30
_BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxdict = _BRIEF.maxset = 6
_BRIEF.maxlevel = 3


def brief(value: Any) -> str:
    """``repr(value)`` cut to about 80 characters (long strings, lists, huge integers), for error messages."""
    try:
        return _BRIEF.repr(value)
    except ValueError:  # an integer beyond Python's str conversion limit
        return f"<{type(value).__name__} too large to print>"


def did_you_mean(key: Any, known: Sequence[str]) -> str:
    """`` (did you mean 'layer_mask'?)`` for a misspelt key, or ``""``."""
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_integer(value: Any, where: str, low: int, high: int | None = None) -> int:
    """``value`` if it is an int (a bool is not one) in ``low..high`` (``high`` None: no upper bound); else a
    :class:`RecipeError` ``where: expected an integer >= low`` (or ``in low..high``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise RecipeError(f"{where}: expected an integer {bound}, got {brief(value)}")
    return value


def check_number(value: Any, where: str, expected: str, within: Callable[[float], bool]) -> float:
    """``value`` as a float if it is a finite int or float (a bool is not one; NaN, the infinities and ints
    beyond float's range are refused) for which ``within`` holds; else a :class:`RecipeError`
    ``where: expected <expected>, got <value>``."""
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an int beyond 1.8e308
        number = math.inf
    if not (math.isfinite(number) and within(number)):
        raise RecipeError(f"{where}: expected {expected}, got {brief(value)}")
    return number


def _check_keys(doc: dict, known: Sequence[str], where: str) -> None:
    for key in doc:
        if key not in known:
            raise RecipeError(f"{where}: unknown key {brief(key)}{did_you_mean(key, known)}; expected some of "
                              f"{list(known)}")


# ---------------------------------------------------------------------------------------------------- YAML

# Resource bounds of the YAML loader. A real recipe nests 8 levels at most (an OrderedDict-wrapped grid of H x H
# matrices) and its numbers have a few dozen characters; the value bound stops alias expansion ("billion laughs")
# while leaving room for vector scales of every slot of a large model (3 x 2 x 80 slots of 8192 values is 3.9M).
MAX_DEPTH = 32
MAX_VALUES = 20_000_000
MAX_NUMBER_CHARS = 40
MAX_FILE_BYTES = 1 << 30  # read_file: recipes, search files, evaluator data, configs and tokenizer files
_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader plus the two Python tags real legacy recipes carry, with numbers by YAML 1.2 (``_INT``,
    ``_FLOAT``), refusing duplicate keys, documents nested deeper than ``MAX_DEPTH``, holding more than
    ``MAX_VALUES`` values once aliases are expanded, and numbers longer than ``MAX_NUMBER_CHARS`` characters or
    not matching YAML 1.2 under an explicit ``!!int`` or ``!!float``. Nothing else is ever constructed."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def fetch_flow_collection_start(self, token_class: type) -> None:
        # the scanner looks up to 1024 characters ahead, in time quadratic in the brackets still open there:
        # refuse deep flow nesting as it is scanned, before the composer sees it
        if self.flow_level >= MAX_DEPTH:
            raise yaml.scanner.ScannerError(None, None, f"nested deeper than {MAX_DEPTH} levels", self.get_mark())
        super().fetch_flow_collection_start(token_class)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node: yaml.Node) -> Any:
        _expanded_size(node, {}, set())
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may override keys: no duplicate
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # unhashable: SafeConstructor gives its own error
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {brief(key)}",
                                                            key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        digits = _number_text(self, node, _INT, "an integer (10, 0o12 or 0xA)")
        return int(digits[2:], 8 if digits[1] == "o" else 16) if digits[:2] in ("0o", "0x") else int(digits)

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        digits = _number_text(self, node, _FLOAT, "a float (0.5, 5e-1, .inf or .nan)")
        special = digits.lstrip("+-").lower() in (".inf", ".nan")
        return float(digits.replace(".", "") if special else digits)  # Python spells .inf and .nan inf and nan


# Numbers by the YAML 1.2 core schema (https://yaml.org/spec/1.2.2/#1032-tag-resolution), not PyYAML's YAML 1.1
# rules: 010 is ten (1.1: octal 8), 1e5 and 1.5e3 are floats (1.1: text), 1:30 and 0b11 are text (1.1: base 60
# and binary). Beyond 1.2, as PyYAML does, `_` may separate the digits after the first (1_000 is 1000). Matched
# from the start to the very end (\Z: no trailing newline), by the resolvers and by the constructors alike.
_INT = re.compile(r"(?:[-+]?[0-9][0-9_]*|0o[0-7][0-7_]*|0x[0-9a-fA-F][0-9a-fA-F_]*)\Z")
_FLOAT = re.compile(r"(?:[-+]?(?:\.[0-9][0-9_]*|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
                    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))\Z")


def _number_text(loader: yaml.SafeLoader, node: yaml.ScalarNode, pattern: re.Pattern, expected: str) -> str:
    """The digits of an int or float node (its ``_`` removed), which must match ``pattern`` and have at most
    ``MAX_NUMBER_CHARS`` characters; an explicit tag (``!!int 1e0``) is held to the same rule."""
    text = loader.construct_scalar(node)
    if len(text) > MAX_NUMBER_CHARS:
        raise yaml.constructor.ConstructorError(None, None, f"a number of {len(text)} characters (at most "
                                                f"{MAX_NUMBER_CHARS})", node.start_mark)
    if not pattern.match(text):
        raise yaml.constructor.ConstructorError(None, None, f"{node.tag.replace('tag:yaml.org,2002:', '!!')}: "
                                                f"expected {expected}, got {brief(text)}", node.start_mark)
    return text.replace("_", "")


def _expanded_size(node: yaml.Node, sizes: dict[int, tuple[int, int]], active: set[int]) -> tuple[int, int]:
    """(values, depth) of ``node`` with every alias expanded; refuses more than ``MAX_VALUES`` values, a depth
    beyond ``MAX_DEPTH`` and an alias inside its own anchor. Each node is counted once (memoised)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in active:
        raise yaml.composer.ComposerError(None, None, "an alias refers to the collection that holds it",
                                          node.start_mark)
    if isinstance(node, yaml.ScalarNode):
        return 1, 1
    children = node.value if isinstance(node, yaml.SequenceNode) else [n for pair in node.value for n in pair]
    active.add(key)
    values, depth = 1, 1
    for child in children:
        child_values, child_depth = _expanded_size(child, sizes, active)
        values, depth = values + child_values, max(depth, child_depth + 1)
    active.discard(key)
    if values > MAX_VALUES:
        raise yaml.composer.ComposerError(None, None, f"more than {MAX_VALUES:,} values once aliases are "
                                          "expanded", node.start_mark)
    if depth > MAX_DEPTH:
        raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels once aliases "
                                          "are expanded", node.start_mark)
    sizes[key] = values, depth
    return values, depth


def _construct_tuple(loader: yaml.SafeLoader, node: yaml.Node) -> list:
    return loader.construct_sequence(node, deep=True)


def _construct_ordered_dict(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict:
    """``!!python/object/apply:collections.OrderedDict`` as ``yaml.dump`` writes it: ``[[[key, value], ...]]``
    as the arguments, or a mapping with ``args`` and ``dictitems``."""
    def refuse(problem: str) -> yaml.constructor.ConstructorError:
        return yaml.constructor.ConstructorError(None, None, f"OrderedDict: {problem}", node.start_mark)

    if suffix != "collections.OrderedDict":
        raise yaml.constructor.ConstructorError(
            None, None, f"refusing Python tag !!python/object/apply:{suffix}", node.start_mark
        )
    if isinstance(node, yaml.SequenceNode):  # yaml.dump(OrderedDict) writes [[pairs]] as the args
        args, items = loader.construct_sequence(node, deep=True), {}
    elif isinstance(node, yaml.MappingNode):
        spec = loader.construct_mapping(node, deep=True)
        unknown = sorted(map(str, set(spec) - {"args", "dictitems"}))
        if unknown:
            raise refuse(f"unknown keys {brief(unknown)}; expected args and dictitems")
        args, items = spec.get("args") or [], spec.get("dictitems") or {}
    else:
        raise refuse("expected a list of [key, value] pairs")
    if not isinstance(args, list) or len(args) > 1 or not isinstance(items, dict):
        raise refuse("expected one argument, a list of [key, value] pairs")
    pairs = args[0] if args else []
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        raise refuse(f"expected a list of [key, value] pairs, got {brief(pairs)}")
    if not all(isinstance(key, str) for key, _ in pairs):
        raise refuse(f"expected string keys, got {brief([key for key, _ in pairs])}")
    return {**dict(pairs), **items}


def _refuse(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> None:
    """Any other tag: a Python one (``!!python/...``) or a custom one (``!name``), named whole as written (a long
    message is cut by :class:`RecipeError`, marked)."""
    tag = node.tag.replace("tag:yaml.org,2002:", "!!", 1)
    kind = "refusing Python tag" if tag.startswith("!!python/") else "unknown tag"
    raise yaml.constructor.ConstructorError(
        None, None, f"{kind} {tag}: recipes may only use !!python/tuple and "
        "!!python/object/apply:collections.OrderedDict", node.start_mark,
    )


_RecipeLoader.yaml_implicit_resolvers = {  # SafeLoader's, less its YAML 1.1 int and float (its own left as is)
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(_INT_TAG, _INT, list("-+0123456789"))  # before float: 10 is an int
_RecipeLoader.add_implicit_resolver(_FLOAT_TAG, _FLOAT, list("-+.0123456789"))
_RecipeLoader.add_constructor(_INT_TAG, _RecipeLoader.construct_yaml_int)
_RecipeLoader.add_constructor(_FLOAT_TAG, _RecipeLoader.construct_yaml_float)
_RecipeLoader.add_constructor("tag:yaml.org,2002:python/tuple", _construct_tuple)
_RecipeLoader.add_multi_constructor("tag:yaml.org,2002:python/object/apply:", _construct_ordered_dict)
_RecipeLoader.add_multi_constructor("tag:yaml.org,2002:python/", _refuse)
_RecipeLoader.add_multi_constructor("!", _refuse)


class _RecipeDumper(yaml.SafeDumper):
    """SafeDumper that also quotes the strings YAML 1.2 reads as numbers (``08``, ``1e5``, ``0o7``), besides those
    YAML 1.1 does (``010``, ``1:30``): what it writes reads the same by :func:`load_yaml` and ``yaml.safe_load``."""


_RecipeDumper.add_implicit_resolver(_INT_TAG, _INT, list("-+0123456789"))  # after SafeDumper's own
_RecipeDumper.add_implicit_resolver(_FLOAT_TAG, _FLOAT, list("-+.0123456789"))


def _yaml_problem(exc: yaml.YAMLError, where: str) -> str:
    """``file:line:column: problem`` from PyYAML's multi-line messages."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        text = " ".join(part for part in (exc.context, exc.problem) if part)
        return f"{where}:{mark.line + 1}:{mark.column + 1}: {text}" if mark else f"{where}: {text}"
    if isinstance(exc, yaml.reader.ReaderError):
        return f"{where}: character {exc.position}: {exc.reason}"
    return f"{where}: {exc}"


def load_yaml(text: str | bytes, where: str) -> dict:
    """Parse recipe-style YAML safely (only the two legacy Python tags, within the resource bounds above);
    ``where`` names the file in errors. Bytes must be UTF-8. Raises :class:`RecipeError`."""
    if isinstance(text, bytes):
        text = _decode(text, where)
    try:
        doc = yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise RecipeError(_yaml_problem(exc, where)) from None
    if not isinstance(doc, dict):
        raise RecipeError(f"{where}: expected a mapping at the top level, got {type(doc).__name__}")
    return doc


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise RecipeError(f"{where}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                          f"{exc.start})") from None


# ---------------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Source:
    """One source checkpoint: a local folder, a ``.gguf`` file, or a hub ID with an optional revision."""

    path: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.path if self.revision is None else f"{self.path}@{self.revision}"


def is_tensor(value: Any) -> bool:
    """Whether ``value`` is a torch tensor, without importing torch: while torch is not imported nothing is one.
    A merge that only copies tensors (scalar or no scales) runs without torch, whose import is ~1-2 s."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _as_tensor(value: Any, field_name: str) -> float | torch.Tensor:
    """A scale or bias as a float or a float32 tensor (vector or square matrix), finite, within float32."""
    expected = f"{field_name}: expected a number, a length-H vector or an H x H matrix"
    if is_tensor(value) and value.dtype == sys.modules["torch"].bool or _holds_bool(value):
        raise RecipeError(f"{expected}, got true/false (a boolean is not a scale)")
    if value is None or isinstance(value, (str, bytes, dict)):
        raise RecipeError(f"{expected}, got {brief(value)}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value if isinstance(value, float) else 0.0):
            raise RecipeError(f"{field_name}: contains NaN or infinity")
        if abs(value) > _FLOAT32_MAX:
            raise RecipeError(f"{field_name}: {brief(value)} is beyond the float32 range")
        return float(value)
    import torch

    try:
        tensor = (value.detach().to(torch.float32) if is_tensor(value) else
                  torch.tensor(value, dtype=torch.float32))
    except (TypeError, ValueError, RuntimeError, OverflowError):  # ragged, strings, None, huge integers
        raise RecipeError(f"{expected}, got {brief(value)}") from None
    if tensor.ndim == 0:
        return _as_tensor(float(tensor), field_name)
    if tensor.ndim > 2 or (tensor.ndim == 2 and tensor.shape[0] != tensor.shape[1]):
        raise RecipeError(f"{expected}, got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise RecipeError(f"{field_name}: contains NaN or infinity (or values beyond the float32 range)")
    return tensor


_FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max


def _holds_bool(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, bool):
            return True
        if isinstance(item, (list, tuple)):
            stack.extend(item)
    return False


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
            if is_tensor(part):
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
        import torch

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
                raise RecipeError(f"{key}: expected a model index in 0..{n - 1}, got {brief(value)}")
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


def read_file(path: str | os.PathLike) -> bytes:
    """The bytes of a file a user names (a recipe, a search file, evaluator data) or a small file of a model
    (config, tokenizer). Anything but a regular file (a folder, a device, a pipe, a socket), or one larger than
    ``MAX_FILE_BYTES``, is refused before a byte is read: ``OSError`` whose ``strerror`` says so (``/dev/zero``
    would never end; a FIFO would block until something writes to it, so the file is opened without waiting,
    then checked)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a device, pipe or socket"
            raise OSError(0, f"not a regular file ({kind})", str(path))
        if info.st_size > MAX_FILE_BYTES:
            raise OSError(0, f"{info.st_size} bytes, more than the {MAX_FILE_BYTES >> 30} GiB such a file may have",
                          str(path))
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read a recipe file (legacy or native format, UTF-8). Relative local model paths are taken relative to the
    recipe file when they exist there. Raises :class:`RecipeError` naming the file or the field."""
    path = Path(path)
    try:
        data = read_file(path)
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe: {exc.strerror}") from None
    recipe = parse_recipe(load_yaml(data, str(path)))
    base = path.resolve().parent
    recipe.sources = [_relative_to(src, base) for src in recipe.sources]
    return recipe


def _relative_to(src: Source, base: Path) -> Source:
    candidate = base / src.path
    if not Path(src.path).is_absolute() and not Path(src.path).exists() and candidate.exists():
        return Source(str(candidate), src.revision)
    return src


def parse_recipe(doc: dict) -> Recipe:
    """Turn a parsed YAML document (legacy or native) into a checked :class:`Recipe`. A misspelt key is named
    with the key it probably meant."""
    if not isinstance(doc, dict):
        raise RecipeError(f"recipe: expected a mapping, got {type(doc).__name__}")
    if "hops" in doc:
        return _parse_native(doc)
    if any(key in doc for key in _LEGACY_KEYS):
        _check_keys(doc, _LEGACY_KEYS, "recipe")
        for key in ("model_paths", "num_r", "layer_mask"):
            if key not in doc:
                raise RecipeError(f"{key}: missing; a legacy recipe needs model_paths, num_r and layer_mask")
        return recipe_from_legacy(**doc, _raw=doc)
    hint = next((did_you_mean(k, ("hops", *_LEGACY_KEYS)) for k in doc if did_you_mean(k, ("hops", *_LEGACY_KEYS))),
                "")
    raise RecipeError(f"recipe: expected either `hops` (native format) or `model_paths`, `num_r` and `layer_mask` "
                      f"(legacy format); found keys {brief(sorted(map(str, doc)))}{hint}")


def parse_source(value: Any, where: str) -> Source:
    """A source written as a path or hub ID, ``[path, revision]`` or ``{path, revision}``. The path must not be
    empty; a revision must look like a git branch, tag or commit (``git check-ref-format``'s rules) and is
    refused on a path that is plainly local (absolute, ``./``, ``../``, ``~``)."""
    if isinstance(value, dict):
        _check_keys(value, ("path", "revision"), where)
        path, revision = value.get("path"), value.get("revision")
    elif isinstance(value, (list, tuple)) and len(value) in (1, 2):
        path, revision = value[0], value[1] if len(value) == 2 else None
    else:
        path, revision = value, None
    if not isinstance(path, str):
        raise RecipeError(f"{where}: expected a path or hub ID, [path, revision] or {{path, revision}}, "
                          f"got {brief(value)}")
    if not path.strip():
        raise RecipeError(f"{where}: the model path is empty")
    if revision is not None:
        check_revision(revision, f"{where}.revision")
        if looks_local(path):
            raise RecipeError(f"{where}.revision: {brief(path)} is a local path; a revision applies to hub IDs only")
    return Source(path, revision)


def looks_local(path: str) -> bool:
    """True for a path that cannot be a hub ID (``name`` or ``org/name``): absolute, ``./``, ``../``, ``~``,
    more than one ``/``, or a ``.gguf`` file."""
    return (Path(path).is_absolute() or path in (".", "..") or path.startswith(("./", "../", "~", ".\\", "..\\"))
            or path.count("/") > 1 or path.endswith(".gguf"))


_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//|/\.|\.lock(/|$)|^[/.]|[/.]$")


def check_revision(revision: Any, where: str) -> str:
    """A hub revision: a branch, tag or commit name by ``git check-ref-format``'s rules (no ``..``, no spaces or
    control characters, no ``~^:?*[\\``, no ``@{``, no component starting with ``.`` or ending in ``.lock``)."""
    if not isinstance(revision, str):
        raise RecipeError(f"{where}: expected a branch, tag or commit name, got {brief(revision)}")
    if not revision or revision == "@" or len(revision) > 255 or _REF_FORBIDDEN.search(revision):
        raise RecipeError(f"{where}: {brief(revision)} is not a branch, tag or commit name (git ref rules: no "
                          "'..', spaces, ~^:?*[\\ or '@{', no part starting with '.' or ending in '.lock')")
    return revision


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecipeError(f"{where}: expected an integer, got {brief(value)}")
    return value


def _classification(value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise RecipeError(f"classification: expected true, false or null (follow the output model), "
                          f"got {brief(value)}")
    return value


_NATIVE_KEYS = ("models", "hops", "input_model", "output_model", "classification")
_HOP_KEYS = ("model", "layer", "scale", "bias")


def _parse_native(doc: dict) -> Recipe:
    _check_keys(doc, _NATIVE_KEYS, "recipe")
    models = doc.get("models")
    if not isinstance(models, list):
        raise RecipeError(f"models: expected a list of sources, got {brief(models)}")
    sources = [parse_source(m, f"models[{i}]") for i, m in enumerate(models)]
    if not isinstance(doc["hops"], list):
        raise RecipeError(f"hops: expected a list of {{model, layer, scale, bias}}, got {brief(doc['hops'])}")
    hops = []
    for k, entry in enumerate(doc["hops"]):
        if not isinstance(entry, dict) or "layer" not in entry:
            raise RecipeError(f"hops[{k}]: expected {{model, layer, scale, bias}}, got {brief(entry)}")
        _check_keys(entry, _HOP_KEYS, f"hops[{k}]")
        transform = Transform(_as_tensor(entry.get("scale", 1.0), f"hops[{k}].scale"),
                              _as_tensor(entry.get("bias", 0.0), f"hops[{k}].bias"))
        if transform.has_bias and not isinstance(transform.bias, float) and transform.bias.ndim != 1:
            raise RecipeError(f"hops[{k}].bias: expected a scalar or a length-H vector")
        hops.append(Hop(_int(entry.get("model", 0), f"hops[{k}].model"),
                        _int(entry["layer"], f"hops[{k}].layer"), transform, f"hops[{k}]"))
    return Recipe(sources, hops, _int(doc.get("input_model", 0), "input_model"),
                  _int(doc.get("output_model", 0), "output_model"),
                  _classification(doc.get("classification")), raw=doc).check()


_LEGACY_KEYS = ("model_paths", "num_r", "layer_mask", "scaling_factors", "bias_factors", "input_layer_model",
                "output_layer_model", "add_last_layer", "last_layer_scale", "classification")


def _shape(value: Any, depth: int) -> tuple[int, ...] | None:
    """The shape of ``depth`` levels of nested lists, or None when ragged."""
    if depth == 0:
        return ()
    if is_tensor(value):
        return tuple(value.shape[:depth]) if value.ndim >= depth else None
    if not isinstance(value, (list, tuple)) or not value:
        return (len(value),) if isinstance(value, (list, tuple)) and depth == 1 else None
    inner = {_shape(v, depth - 1) for v in value}
    if len(inner) != 1 or None in inner:
        return None
    return (len(value), *inner.pop())


def _mask_flag(flag: Any, where: str) -> bool:
    """A ``layer_mask`` entry: a boolean, or the integers 0 and 1 old files carry."""
    if is_tensor(flag) and flag.numel() == 1:
        flag = flag.item()
    if isinstance(flag, bool) or (isinstance(flag, int) and flag in (0, 1)):
        return bool(flag)
    raise RecipeError(f"{where}: expected true or false (or 0/1), got {brief(flag)}")


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
) -> Recipe:
    """Build the hop list of a legacy recipe (the paper's layout; ``dfs-semantics.md``, "The hop list").
    ``layer_mask`` entries are booleans (0 and 1 are accepted, as old files have them)."""
    if not isinstance(model_paths, (list, tuple)) or not model_paths:
        raise RecipeError(f"model_paths: expected a non-empty list of [path, revision], got {brief(model_paths)}")
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
            raise RecipeError(f"{key}: expected a model index in 0..{len(sources) - 1}, got {brief(value)}")
    if not isinstance(add_last_layer, bool):
        raise RecipeError(f"add_last_layer: expected true or false, got {brief(add_last_layer)}")
    classification = _classification(classification)
    hops = []
    for n in range(grid[0]):
        for m in range(grid[1]):
            for layer in range(grid[2]):
                where = f"[{n}][{m}][{layer}]"
                if not _mask_flag(layer_mask[n][m][layer], "layer_mask" + where):
                    continue
                scale = 1.0 if scaling_factors is None else _as_tensor(scaling_factors[n][m][layer],
                                                                      "scaling_factors" + where)
                bias = 0.0 if bias_factors is None else _as_tensor(bias_factors[n][m][layer], "bias_factors" + where)
                if is_tensor(bias) and bias.ndim != 1:
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
    return yaml.dump(doc, Dumper=_RecipeDumper, sort_keys=False, default_flow_style=None)


def dump_legacy(
    sources: Sequence[Source],
    layer_mask: Any,
    scaling_factors: Any,
    input_layer_model: int = 0,
    output_layer_model: int = 0,
    add_last_layer: bool = False,
    last_layer_scale: float = 1.0,
) -> str:
    """A legacy-format recipe as YAML text (plain lists: loadable by this tool and by ``yaml.safe_load``);
    ``last_layer_scale`` is written when it is not 1."""
    doc = {
        "model_paths": [[s.path, s.revision] for s in sources],
        "num_r": len(layer_mask),
        "layer_mask": layer_mask,
        "scaling_factors": scaling_factors,
        "input_layer_model": input_layer_model,
        "output_layer_model": output_layer_model,
        "add_last_layer": add_last_layer,
    }
    if last_layer_scale != 1.0:
        doc["last_layer_scale"] = last_layer_scale
    return yaml.dump(doc, Dumper=_RecipeDumper, sort_keys=False, default_flow_style=None)
