"""Writing output folders: sharded safetensors streamed tensor by tensor, inside an atomic temporary folder.

Every shape is known from the plan before the first byte is written, so each shard's safetensors header is
written first and the tensors' bytes are streamed after it: at most one tensor (or one row chunk of a folded
tensor) is in memory at a time, and copied tensors go from the mmapped source straight to the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from .plan import DTYPES, TensorTask
from .recipe import RecipeError

__all__ = ["parse_size", "atomic_folder", "write_tensors", "check_target"]

_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal units as in transformers; ``GiB`` for binary)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _UNITS:
        raise RecipeError(f"max_shard_size: expected a size like 5GB or 500MB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def check_target(target: Path, force: bool) -> None:
    """Refuse an existing output folder unless ``force``; done before any work."""
    if target.exists() and not force:
        raise RecipeError(f"output: {target} already exists; pass --force (force=True) to replace it")
    if target.exists() and not target.is_dir():
        raise RecipeError(f"output: {target} exists and is not a folder")


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it becomes ``target`` (replacing an existing
    one only with ``force``), on any error it is removed and ``target`` is untouched."""
    target = Path(target).absolute()
    check_target(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".dfsmerge-tmp", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        if target.exists():
            old = target.with_name(f".{target.name}.dfsmerge-old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _shards(tasks: Sequence[TensorTask], itemsize: int, max_bytes: int) -> list[list[TensorTask]]:
    shards: list[list[TensorTask]] = [[]]
    size = 0
    for task in tasks:
        nbytes = task.numel * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(task)
        size += nbytes
    return shards


def _header(tasks: Sequence[TensorTask], dtype: torch.dtype) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for task in tasks:
        end = offset + task.numel * dtype.itemsize
        header[task.name] = {"dtype": _ST_DTYPES[dtype], "shape": list(task.shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def write_tensors(
    folder: Path,
    tasks: Sequence[TensorTask],
    get: Callable[[int, str], torch.Tensor],
    dtype: str = "bfloat16",
    max_shard_size: str | int = "5GB",
    device: str = "cpu",
    progress: bool = True,
) -> list[Path]:
    """Stream every task's tensor into safetensors shards in ``folder``; writes the index when sharded."""
    from tqdm.auto import tqdm

    out_dtype = DTYPES[dtype]
    shards = _shards(tasks, out_dtype.itemsize, parse_size(max_shard_size))
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    total = sum(t.numel for t in tasks) * out_dtype.itemsize
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="merging",
               disable=not progress or not sys.stderr.isatty())
    weight_map = {}
    with bar:
        for name, shard in zip(names, shards):
            with open(folder / name, "wb") as f:
                f.write(_header(shard, out_dtype))
                for task in shard:
                    written = 0
                    for chunk in task.chunks(get, device):
                        data = chunk.to(out_dtype).contiguous().reshape(-1).view(torch.uint8)
                        f.write(memoryview(data.cpu().numpy()))
                        written += data.numel()
                    if written != task.numel * out_dtype.itemsize:
                        raise RecipeError(f"{task.name}: wrote {written} bytes, expected "
                                          f"{task.numel * out_dtype.itemsize}")
                    weight_map[task.name] = name
                    bar.update(written)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [folder / n for n in names]
