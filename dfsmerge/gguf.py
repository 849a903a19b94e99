"""GGUF sources: a recipe may name a ``.gguf`` file (or a folder holding one) as a source.

The config is rebuilt from the file's metadata alone (transformers' GGUF config mapping), so a recipe is
validated before any weight is read. Opening the source dequantizes every tensor into memory, with the Hugging
Face tensor names, through transformers' GGUF loader (which uses the ``gguf`` package), and saves the tokenizer
the file carries into a temporary folder, so a merge's output gets ordinary tokenizer files.

transformers' own ``from_pretrained(..., gguf_file=...)`` marks the loaded model as quantized (``hf_quantizer``,
``config.quantization_config``), which blocks ``save_pretrained`` until both are cleared. dfsmerge never goes
through it: the weights become a plain state dict and the output config is written from the metadata.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .recipe import RecipeError, Source

__all__ = ["gguf_file", "gguf_config", "open_gguf"]

log = logging.getLogger("dfsmerge")


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
    path = gguf_file(source)
    stat = path.stat()
    return copy.deepcopy(_config(str(path.resolve()), stat.st_size, stat.st_mtime_ns))


@lru_cache(maxsize=8)  # parsing the metadata takes seconds; a merge needs it for planning and for opening
def _config(path: str, size: int, mtime_ns: int) -> dict:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name).to_diff_dict()
    except ImportError as exc:
        raise RecipeError(f"{path}: reading GGUF files needs the gguf package (pip install gguf): {exc}") from None
    except (ValueError, OSError, KeyError) as exc:
        raise RecipeError(f"{path}: cannot read the GGUF metadata: {exc}") from None
    config = {k: v for k, v in config.items() if not k.startswith("_")}  # e.g. the file's general.name
    # GGUF stores float32: rms_norm_eps 1e-05 arrives as 9.99999974e-06. Its shortest float32 spelling is the
    # value the original config.json had, so a GGUF and a safetensors copy of one model agree.
    config = {k: float(str(np.float32(v))) if isinstance(v, float) else v for k, v in config.items()}
    architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type"))
    config["architectures"] = [architecture] if architecture else []
    return config


def open_gguf(source: Source, dtype: torch.dtype = torch.float32
              ) -> tuple[tempfile.TemporaryDirectory, dict[str, Callable[[], torch.Tensor]], str]:
    """Dequantize a GGUF source into memory (``dtype``): a temporary folder holding the tokenizer saved from the
    file (removed when the folder object is collected), the tensors by their Hugging Face names, and a note
    that says what was dequantized."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = gguf_file(source)
    config = gguf_config(source)
    with torch.device("meta"):  # allocates nothing: the loader only needs its parameter names
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    log.info("%s: dequantizing GGUF tensors into %s", path.name, str(dtype).removeprefix("torch."))
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)
    tensors = {name: t.to(dtype) for name, t in parsed["tensors"].items()}
    note = f"dequantized from GGUF {_file_type(parsed['ignore'].get('file_type'))}"
    log.info("%s: %s, %d tensors", path.name, note, len(tensors))

    folder = tempfile.TemporaryDirectory(prefix="dfsmerge-gguf-tokenizer-")
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(folder.name)
    return folder, {n: (lambda t=t: t) for n, t in tensors.items()}, note


def _file_type(code: int | None) -> str:
    """``3`` -> ``"Q4_1"`` (llama.cpp's ``general.file_type``: the type of most tensors)."""
    from gguf import LlamaFileType

    try:
        return LlamaFileType(code).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"file type {code}"
