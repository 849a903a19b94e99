"""Source checkpoints: finding them (local folder, hub ID, GGUF file) and reading their tensors lazily.

This and ``writer.py`` are the only modules that touch model files. Configs are read first and alone, so a
recipe is validated before any weight is downloaded or read.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from .plan import torch_dtype
from .recipe import RecipeError, Source, brief, looks_local, read_file

if TYPE_CHECKING:
    import torch

__all__ = ["Checkpoint", "StoredBytes", "read_config", "check_config", "open_checkpoint", "TOKENIZER_FILES"]

log = logging.getLogger("dfsmerge")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
_WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json")
_BIN_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")


def _is_gguf(source: Source) -> bool:
    path = _local(source)
    return path is not None and (path.suffix == ".gguf" or (path.is_dir() and not (path / "config.json").exists()
                                                            and any(path.glob("*.gguf"))))


def _local(source: Source) -> Path | None:
    """The source's local path, or None for a hub ID. A path that is plainly local but missing is an error,
    not a hub request; so is a revision on a local path."""
    path = Path(source.path).expanduser()
    if path.exists():
        if source.revision is not None:
            raise RecipeError(f"{source}: {source.path} is a local path; a revision applies to hub IDs only")
        return path
    if looks_local(source.path):
        raise RecipeError(f"{source.path}: no such folder or file")
    return None


def _hub_download(source: Source, patterns: Iterable[str], cache_dir: str | None) -> Path:
    """Fetch only the files matching ``patterns`` of a hub repository (or find them in the cache)."""
    import huggingface_hub

    try:
        folder = huggingface_hub.snapshot_download(
            repo_id=source.path, revision=source.revision, cache_dir=cache_dir, allow_patterns=list(patterns)
        )
    except Exception as exc:  # the hub library raises many types; the user needs the message, not the class
        raise RecipeError(f"{source}: not a local folder, and fetching it from the hub failed: {exc}") from None
    return Path(folder)


def read_config(source: Source, cache_dir: str | None = None) -> dict:
    """The ``config.json`` of a source, downloading nothing else, checked by :func:`check_config`."""
    if _is_gguf(source):
        from .gguf import gguf_config

        return check_config(gguf_config(source), str(source))
    folder = _local(source)
    if folder is None:
        folder = _hub_download(source, ["config.json"], cache_dir)
    elif not folder.is_dir():
        raise RecipeError(f"{source}: expected a model folder, a .gguf file or a hub ID, got a file")
    elif not (folder / "config.json").is_file():
        raise RecipeError(f"{source}: folder has no config.json")
    return check_config(_read_json(folder / "config.json"), f"{source}: config.json")


def _read_json(file: Path) -> object:
    try:
        data = read_file(file)
    except OSError as exc:
        raise RecipeError(f"{file}: cannot read it: {exc.strerror}") from None
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{file}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{file}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
    except (RecursionError, ValueError) as exc:  # deep nesting; integers beyond Python's str conversion limit
        raise RecipeError(f"{file}: not a JSON file dfsmerge can read ({type(exc).__name__}: {exc})") from None


_SIZE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
_OPTIONAL_SIZE_KEYS = ("num_key_value_heads", "head_dim", "num_labels", "sliding_window", "max_window_layers")
_FLAG_KEYS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window")


def check_config(config: object, where: str) -> dict:
    """Refuse a config that cannot describe a decoder-only model: not a mapping, ``model_type`` missing or not a
    string, a layer size missing or not an integer in 1..2**31-1 (optional ones: 0.. or null), a flag that is not
    a boolean, a list-valued key (``architectures``, ``layer_types``) that is not a list of strings. Returns
    ``config``; raises :class:`RecipeError` naming ``where`` and the key."""
    if not isinstance(config, dict):
        raise RecipeError(f"{where}: expected a JSON object (a mapping of settings), got {type(config).__name__}")
    if not isinstance(config.get("model_type"), str):
        raise RecipeError(f"{where}: model_type: expected a string such as 'llama', got "
                          f"{brief(config.get('model_type'))}")
    for key in _SIZE_KEYS + _OPTIONAL_SIZE_KEYS:
        value, low = config.get(key), int(key in _SIZE_KEYS)
        if value is None and key in _OPTIONAL_SIZE_KEYS:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value < 2**31:
            got = "nothing (the key is missing)" if key not in config else brief(value)
            raise RecipeError(f"{where}: {key}: expected an integer in {low}..2**31-1, got {got}")
    for key in _FLAG_KEYS:
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise RecipeError(f"{where}: {key}: expected true or false, got {brief(config[key])}")
    for key in ("architectures", "layer_types"):
        value = config.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise RecipeError(f"{where}: {key}: expected a list of strings, got {brief(value)}")
    if config.get("layer_types") is not None and len(config["layer_types"]) != config["num_hidden_layers"]:
        raise RecipeError(f"{where}: layer_types: expected num_hidden_layers = {config['num_hidden_layers']} "
                          f"entries (transformers' rule), got {len(config['layer_types'])}")
    eps = config.get("rms_norm_eps")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 1):
        raise RecipeError(f"{where}: rms_norm_eps: expected a small positive number, got {brief(eps)}")
    return config


@dataclass(frozen=True)
class StoredBytes:
    """Where a tensor lies in a file exactly as :meth:`Checkpoint.get` returns it: ``nbytes`` bytes from byte
    ``offset`` of ``path`` (row-major, little-endian, ``dtype``, ``shape``). The writer copies such a range file
    to file when the output wants the tensor unchanged. ``dtype`` is a name (``"bfloat16"``), so that copying
    needs no torch."""

    path: Path
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


class Checkpoint:
    """Lazy, read-only access to the tensors of one source. Safetensors tensors are zero-copy views of the
    memory-mapped files (and :meth:`stored` says where their bytes lie); ``.bin`` files are read with
    ``torch.load(weights_only=True, mmap=True)``; GGUF tensors come from ``gguf.py``, one at a time.

    ``folder`` (where tokenizer files live) may be given as a function, called once when first needed: a GGUF
    source writes its tokenizer files only if a merge asks for them."""

    def __init__(self, source: Source, folder: Path | Callable[[], Path | None] | None, config: dict,
                 tensors: dict[str, Callable[[], torch.Tensor]], note: str = "",
                 stored: dict[str, StoredBytes] | None = None):
        self.source = source
        self._folder = folder
        self.config = config
        self._getters = tensors
        self._stored = stored or {}
        self.note = note  # e.g. "dequantized from GGUF Q4_1", for logs and model cards

    @property
    def folder(self) -> Path | None:
        if callable(self._folder):
            self._folder = self._folder()
        return self._folder

    def __contains__(self, name: str) -> bool:
        return name in self._getters

    def names(self) -> list[str]:
        return list(self._getters)

    def get(self, name: str) -> torch.Tensor:
        """One tensor; a clear error when the source lacks it."""
        if name not in self._getters:
            raise RecipeError(f"{self.source}: tensor {name!r} is missing from the checkpoint")
        return self._getters[name]()

    def stored(self, name: str) -> StoredBytes | None:
        """Where tensor ``name`` lies in a file as :meth:`get` returns it; None when it is not stored as is."""
        return self._stored.get(name)

    def check_shapes(self, expected: Iterable[tuple[str | None, tuple[int, ...]]], where: str) -> None:
        """Raise ``RecipeError`` naming ``where`` (e.g. ``models[1]``) and the tensor when a tensor's shape in the
        file headers differs from the ``(name, shape)`` the config implies. Reads no weights: only tensors whose
        header was read (safetensors) are checked here; others are checked as they are read."""
        for name, shape in expected:
            stored = self._stored.get(name) if name is not None else None
            if stored is not None and stored.shape != tuple(shape):
                raise RecipeError(f"{where}: tensor {name!r} has shape {stored.shape}, the config says "
                                  f"{tuple(shape)}")

    def get_as(self, name: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """Tensor ``name`` as ``dtype`` (a floating tensor; others keep theirs) on ``device``, like
        ``get(name).to(device, dtype)``: the zero-copy view when that changes nothing. A tensor that is converted
        or moved and lies in a file is read from it in pieces of about 64 MB into the new tensor, so neither a
        second whole copy of it nor the file's pages stay in memory (a mapped view's pages would, until the
        checkpoint is closed). On the meta device, a tensor of a safetensors file is not read (its header gives
        its shape)."""
        import torch

        stored = self.stored(name)
        if stored is not None and torch.device(device).type == "meta":
            return torch.empty(stored.shape, dtype=dtype, device="meta")
        if stored is None:
            tensor = self.get(name)
            return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
        source_dtype = getattr(torch, stored.dtype)  # StoredBytes are floating point: see _SAFETENSORS_DTYPES
        if dtype == source_dtype and torch.device(device) == torch.device("cpu"):
            return self.get(name)
        out = torch.empty(stored.shape, dtype=dtype, device=device)
        flat, step = out.view(-1), max(1, _READ_PIECE_BYTES // source_dtype.itemsize)
        piece = torch.empty(min(step, flat.numel()), dtype=source_dtype)
        with open(stored.path, "rb", buffering=0) as f:
            f.seek(stored.offset)
            for start in range(0, flat.numel(), step):
                part = piece[:min(step, flat.numel() - start)]
                _read_exactly(f, memoryview(part.view(torch.uint8).numpy()), stored.path)
                flat[start:start + part.numel()].copy_(part)
        return out

    def tokenizer_files(self) -> list[Path]:
        """The tokenizer files beside the weights (any entry of such a name, a folder or a broken link too)."""
        if self.folder is None:
            return []
        return [self.folder / f for f in TOKENIZER_FILES if os.path.lexists(self.folder / f)]

    def check_tokenizer_files(self, where: str) -> None:
        """Raise ``RecipeError`` naming ``where`` and the file when a tokenizer file an output would copy cannot
        be read as the writer reads it: not a regular file, a ``.json`` one that is not a UTF-8 JSON object
        (:func:`_read_json`), a ``tokenizer_class`` that is not a name, a ``.jinja``/``.txt`` one that is not
        UTF-8 text, a ``tokenizer.json`` that the ``tokenizers`` library (transformers' fast tokenizers) refuses.
        Reads no weights."""
        for file in self.tokenizer_files():
            problem = "not a regular file" if not file.is_file() else None
            if problem is None and file.suffix == ".json":
                doc = _read_json(file)
                if not isinstance(doc, dict):
                    problem = f"expected a JSON object, got {type(doc).__name__}"
                elif not isinstance(doc.get("tokenizer_class"), (str, type(None))):
                    problem = f"tokenizer_class: expected a class name, got {brief(doc['tokenizer_class'])}"
            elif problem is None and file.suffix in (".jinja", ".txt"):  # read as text by transformers
                try:
                    read_file(file).decode("utf-8")
                except UnicodeDecodeError as exc:
                    problem = f"not UTF-8 text (byte offset {exc.start})"
            if problem is None and file.name == "tokenizer.json":
                from tokenizers import Tokenizer

                try:
                    Tokenizer.from_file(str(file))
                except Exception as exc:  # the tokenizers library raises plain Exceptions
                    problem = f"{type(exc).__name__}: {brief(str(exc))}"
            if problem is not None:
                raise RecipeError(f"{where}: {file}: not a tokenizer file transformers can read: {problem}")


_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def _safetensors_getters(files: list[Path]) -> tuple[dict[str, Callable[[], torch.Tensor]], dict[str, StoredBytes]]:
    """Getters of zero-copy views, and where each tensor's bytes lie (from each file's header). Each file is
    checked here by safetensors itself (opened with ``framework="numpy"``, which needs no torch); it is opened
    for torch when a tensor is first read, so a merge that only copies bytes never imports torch."""
    from safetensors import safe_open

    getters: dict[str, Callable[[], torch.Tensor]] = {}
    stored: dict[str, StoredBytes] = {}
    for file in files:
        try:
            names = list(safe_open(str(file), framework="numpy").keys())
        except Exception as exc:  # safetensors raises SafetensorError for truncated or corrupt files
            raise RecipeError(f"{file}: cannot open safetensors file: {exc}") from None
        handle = _TorchHandle(file)
        for name in names:
            getters[name] = (lambda n=name, h=handle: h.get(n))
        stored.update(_safetensors_layout(file))
    return getters, stored


class _TorchHandle:
    """One file's ``safe_open(framework="pt")``, opened on first use; ``get`` gives a zero-copy tensor view."""

    def __init__(self, file: Path):
        self.file, self._handle = file, None

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        try:
            if self._handle is None:
                self._handle = safe_open(str(self.file), framework="pt")
            return self._handle.get_tensor(name)
        except Exception as exc:
            raise RecipeError(f"{self.file}: cannot read tensor {name!r}: {exc}") from None


def _safetensors_layout(file: Path) -> dict[str, StoredBytes]:
    """Byte ranges of a safetensors file's tensors. The format (huggingface/safetensors): an 8-byte little-endian
    header length N, N bytes of JSON ``{name: {dtype, shape, data_offsets: [begin, end]}}``, then the data, with
    offsets counted from byte 8 + N. Called after ``safe_open`` has checked the file."""
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    ranges = {}
    for name, info in header.items():
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"]) if name != "__metadata__" else None
        if dtype is not None:
            begin, end = info["data_offsets"]
            ranges[name] = StoredBytes(file, 8 + length + begin, end - begin, dtype, tuple(info["shape"]))
    return ranges


_READ_PIECE_BYTES = 64 << 20


def _read_exactly(f, buffer: memoryview, path: Path) -> None:
    """Fill ``buffer`` from the unbuffered file ``f``; RecipeError when the file ends first."""
    done = 0
    while done < len(buffer):
        n = f.readinto(buffer[done:])
        if not n:
            raise RecipeError(f"{path}: the file ends before the tensor data its header describes")
        done += n


def _bin_getters(files: list[Path]) -> dict[str, Callable[[], torch.Tensor]]:
    import torch

    getters: dict[str, Callable[[], torch.Tensor]] = {}
    for file in files:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise RecipeError(f"{file}: cannot load with weights_only=True: {exc}") from None
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            inner = [k for k, v in state.items() if isinstance(v, dict)] if isinstance(state, dict) else []
            hint = f" (it holds a dict under {brief(inner[0])}: a training checkpoint?)" if inner else ""
            raise RecipeError(f"{file}: expected a state dict (tensor names -> tensors), got "
                              f"{type(state).__name__}{hint}")
        for name, tensor in state.items():
            getters[name] = (lambda t=tensor: t)
    return getters


def _weight_files(folder: Path) -> tuple[str, list[Path]]:
    for kind, index, single in (("safetensors", "model.safetensors.index.json", "model.safetensors"),
                                ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index).is_file():
            return kind, _indexed_files(folder / index)
        if (folder / single).is_file():
            return kind, [folder / single]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return "safetensors", files
    raise RecipeError(f"{folder}: no model.safetensors, safetensors index or pytorch_model.bin found")


def _indexed_files(index: Path) -> list[Path]:
    """The weight files an index names: ``weight_map`` maps tensor names to file names in the index's folder."""
    weight_map = _read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise RecipeError(f"{index}: weight_map: expected a mapping of tensor names to file names, got "
                          f"{brief(weight_map)}")
    files = list(dict.fromkeys(weight_map.values()))
    for name in files:
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise RecipeError(f"{index}: weight_map: expected file names in the index's folder, got {brief(name)}")
    return [index.parent / name for name in files]


def open_checkpoint(source: Source, config: dict, cache_dir: str | None = None,
                    dtype: str | torch.dtype = "float32") -> Checkpoint:
    """Open a source for reading; hub sources are downloaded (weights, config, tokenizer files only).
    ``dtype`` (any spelling ``plan.dtype_name`` accepts) only matters for quantized GGUF tensors: the type they
    are dequantized into."""
    if _is_gguf(source):
        from .gguf import open_gguf

        parts = open_gguf(source, torch_dtype(dtype))
        return Checkpoint(source, parts.tokenizer, config, parts.tensors, parts.note)
    folder = _local(source)
    if folder is None:
        folder = _hub_download(source, ["config.json", *_WEIGHT_PATTERNS, *TOKENIZER_FILES], cache_dir)
        if not any(folder.glob("*.safetensors")):
            folder = _hub_download(source, ["config.json", *_BIN_PATTERNS, *TOKENIZER_FILES], cache_dir)
    kind, files = _weight_files(folder)
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise RecipeError(f"{source}: weight files listed in the index are missing: {[m.name for m in missing]}")
    if kind == "safetensors":
        getters, stored = _safetensors_getters(files)
        return Checkpoint(source, folder, config, getters, stored=stored)
    return Checkpoint(source, folder, config, _bin_getters(files))
