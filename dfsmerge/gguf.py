"""GGUF sources: a recipe may name a ``.gguf`` file (or a folder holding one) as a source.

A file is parsed once per process, by the ``gguf`` package's memory-mapped ``GGUFReader``; everything comes
from that one parse:

- the config, from the metadata alone (transformers' GGUF-to-config table), so a recipe is validated before
  any weight is read;
- the tensors, one at a time when asked for, with their Hugging Face names and llama.cpp's layout undone by
  transformers' own code (``get_gguf_hf_weights_map`` for the names; its ``TENSOR_PROCESSORS``, e.g. the
  reverse of the Q/K permutation that llama.cpp's converter applies to Llama attention). F32/F16/BF16 tensors
  are zero-copy views of the mapped file; quantized ones are dequantized by ``gguf.quants.dequantize``, one
  tensor in float32 at a time. Nothing is held between reads, so memory does not grow with the layer count.

The tokenizer the file carries is saved as ordinary tokenizer files only when asked for (the input model's,
for a merge's output). This module returns plain parts (:class:`GGUFParts`); ``sources.py`` wraps them.
transformers' own ``from_pretrained(..., gguf_file=...)`` is not used: it dequantizes every tensor at once and
marks the model as quantized.
"""

from __future__ import annotations

import atexit
import copy
import inspect
import logging
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .recipe import RecipeError, Source

__all__ = ["GGUFParts", "gguf_file", "gguf_config", "open_gguf"]

log = logging.getLogger("dfsmerge")


@dataclass
class GGUFParts:
    """What a GGUF source provides: ``config`` (a config.json dict), ``tensors`` (Hugging Face name -> a function
    returning that tensor), ``tokenizer`` (a function that writes the file's tokenizer into a folder, kept until
    the process ends, and returns it; None when the file has none) and ``note`` (for logs and model cards)."""

    config: dict
    tensors: dict[str, Callable[[], torch.Tensor]]
    tokenizer: Callable[[], Path | None]
    note: str


def gguf_file(source: Source) -> Path:
    """The one ``.gguf`` file a source names (the file itself, or the only one in a folder)."""
    path = Path(source.path)
    if path.is_dir():
        files = sorted(path.glob("*.gguf"))
        if len(files) != 1:
            raise RecipeError(f"{source}: expected one .gguf file in the folder, found {[f.name for f in files]}; "
                              "name the file itself")
        path = files[0]
    if not path.is_file():
        raise RecipeError(f"{source}: no such GGUF file")
    return path


def gguf_config(source: Source) -> dict:
    """The ``config.json`` a GGUF source would have, from its metadata only (no tensor data is read)."""
    return copy.deepcopy(_parsed(gguf_file(source))[1])


def open_gguf(source: Source, dtype: torch.dtype = torch.float32) -> GGUFParts:
    """The parts of a GGUF source. Tensors are read when their function is called: F32/F16/BF16 ones as
    zero-copy views in the file's dtype, quantized ones dequantized into ``dtype``."""
    path = gguf_file(source)
    reader, config = _parsed(path)
    names, processor = _hf_names(reader, config)
    tensors = {names[t.name]: (lambda t=t: _tensor(t, processor, dtype)) for t in reader.tensors if t.name in names}
    quantized = any(t.tensor_type not in _PLAIN for t in reader.tensors)
    note = f"{'dequantized from' if quantized else 'from'} GGUF {_file_type(reader)}"
    log.info("%s: %s, %d tensors (read one at a time)", path.name, note, len(tensors))
    has_tokenizer = "tokenizer.ggml.model" in reader.fields
    return GGUFParts(config, tensors, lambda: _tokenizer_folder(path) if has_tokenizer else None, note)


def _key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def _parsed(path: Path) -> tuple[Any, dict]:
    return _parse(*_key(path))


@lru_cache(maxsize=8)  # the one parse of a file's metadata per process: planning and opening share it
def _parse(path: str, size: int, mtime_ns: int) -> tuple[Any, dict]:
    """(the file's ``GGUFReader``, its config dict)."""
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise RecipeError(f"{path}: reading GGUF files needs the gguf package (pip install gguf): {exc}") from None
    try:
        reader = GGUFReader(path, "c")  # copy-on-write: tensors are writable views, the file is never written
        return reader, _config(reader)
    except Exception as exc:  # the gguf reader raises struct.error, ValueError, IndexError... on a damaged file
        raise RecipeError(f"{path}: cannot read the GGUF metadata (a truncated or damaged file?): {exc}") from None


def _config(reader) -> dict:
    """The config dict transformers rebuilds from GGUF metadata (``load_gguf_checkpoint``), from the fields
    already parsed: its table ``GGUF_TO_TRANSFORMERS_MAPPING["config"]`` names the config key of each metadata
    key; as there, the head is tied when the file has no ``output.weight`` and the vocabulary size is the
    tokenizer's when the metadata does not state it."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import GGUF_TO_TRANSFORMERS_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    table = GGUF_TO_TRANSFORMERS_MAPPING["config"]
    values: dict[str, Any] = {"tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors)}
    for key, field in reader.fields.items():
        prefix, _, rest = key.partition(".")
        name = table.get(prefix, {}).get(rest)
        if name not in (None, -1):
            values[name] = field.contents()
    if "vocab_size" not in values and "tokenizer.ggml.tokens" in reader.fields:
        values["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    config = AutoConfig.for_model(**values).to_diff_dict()
    config = {k: v for k, v in config.items() if not k.startswith("_")}  # e.g. the file's general.name
    # GGUF stores float32: rms_norm_eps 1e-05 arrives as 9.99999974e-06. Its shortest float32 spelling is the
    # value the original config.json had, so a GGUF and a safetensors copy of one model agree.
    config = {k: float(str(np.float32(v))) if isinstance(v, float) else v for k, v in config.items()}
    architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type"))
    config["architectures"] = [architecture] if architecture else []
    return config


def _hf_names(reader, config: dict) -> tuple[dict[str, str], Any]:
    """GGUF tensor name -> Hugging Face name, and the tensor processor of the file's architecture, both from
    transformers' GGUF loader (the names are read off a parameter-less skeleton of the model)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map)

    architecture = str(reader.fields["general.architecture"].contents())
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config)
    with torch.device("meta"):  # allocates nothing: only the parameter names are needed
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    if "processor" not in inspect.signature(get_gguf_hf_weights_map).parameters:  # transformers 4.x: no processor
        return get_gguf_hf_weights_map(skeleton), processor
    return get_gguf_hf_weights_map(skeleton, processor), processor


_PLAIN = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # ggml type ids (gguf.GGMLQuantizationType)


def _tensor(tensor, processor, dtype: torch.dtype) -> torch.Tensor:
    """One tensor of the file in Hugging Face layout: a view of the mapped file where llama.cpp stored it as
    plain values and did not permute it, else a fresh array (dequantized into ``dtype``, and/or permuted)."""
    from gguf.quants import dequantize

    plain = _PLAIN.get(tensor.tensor_type)
    data = tensor.data if plain is not None else dequantize(tensor.data, tensor.tensor_type)
    data = processor.process(weights=data, name=tensor.name).weights  # e.g. Llama's Q/K permutation reversed
    result = torch.from_numpy(np.ascontiguousarray(data))
    if plain is None:
        return result.to(dtype)
    return result.view(plain) if plain is torch.bfloat16 else result  # BF16 is mapped as bytes (no numpy type)


def _file_type(reader) -> str:
    """``3`` -> ``"Q4_1"`` (llama.cpp's ``general.file_type``: the type of most tensors)."""
    from gguf import LlamaFileType

    field = reader.fields.get("general.file_type")
    code = field.contents() if field is not None else None
    try:
        return LlamaFileType(code).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"file type {code}"


@lru_cache(maxsize=8)
def _tokenizer_folder(path: Path) -> Path:
    """The file's tokenizer saved as ordinary tokenizer files, in a folder removed when the process ends. The
    fast tokenizer class is named directly: ``AutoTokenizer`` would first parse the whole metadata again only
    to find that class."""
    from transformers import PreTrainedTokenizerFast

    folder = Path(tempfile.mkdtemp(prefix="dfsmerge-gguf-tokenizer-"))
    atexit.register(shutil.rmtree, folder, True)
    PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(folder)
    return folder
