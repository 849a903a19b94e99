"""How tensors reach the output file: unchanged tensors as byte copies (with the read/write fallback), folded ones
computed in pieces; and GGUF sources read tensor by tensor.

Expected values are computed here from the source files directly (safetensors' own loader, transformers' GGUF
loader), never by dfsmerge's code. The GGUF files are written by ``make_gguf.py`` as llama.cpp's converter lays
them out (Q/K rows permuted, llama.cpp's names)."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import dfsmerge.writer
from conftest import INPUT_IDS, make_tiny_source
from dfsmerge import Hop, Recipe, RecipeError, Source, Transform, merge
from dfsmerge.sources import StoredBytes

pytest.importorskip("gguf")
from make_gguf import write_llama_gguf  # noqa: E402  (needs gguf)

HOPS = [(0, 0, 1.0), (0, 1, 0.8), (0, 1, 1.25), (0, 3, 1.0), (0, 2, 0.5)]  # hop k's down_proj gets hop k+1's scale


def recipe_over(path: Path, hops=HOPS, vector: bool = False) -> Recipe:
    scales = [torch.linspace(0.5, 1.5, 64) if vector and k == 2 else s for k, (_, _, s) in enumerate(hops)]
    return Recipe([Source(str(path))], [Hop(m, l, Transform(s)) for (m, l, _), s in zip(hops, scales)]).check()


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in folder.glob("*.safetensors"):
        out.update(load_file(str(file)))
    return out


def expected_flat(source: dict[str, torch.Tensor], hops, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The flat merge of a scalar-scaled hop list, from dfs-semantics.md: layer k is source layer l_k, its
    down_proj times hop k+1's scale (folded in float32, rounded once); embeddings, norm and head copied."""
    out = {"model.embed_tokens.weight": source["model.embed_tokens.weight"],
           "model.norm.weight": source["model.norm.weight"], "lm_head.weight": source["lm_head.weight"]}
    for k, (_, layer, _) in enumerate(hops):
        after = hops[k + 1][2] if k + 1 < len(hops) else 1.0
        for name, value in source.items():
            prefix = f"model.layers.{layer}."
            if name.startswith(prefix):
                if name.endswith("down_proj.weight") and after != 1.0:
                    value = value.to(torch.float32) * after
                out[f"model.layers.{k}." + name[len(prefix):]] = value
    return {n: t.to(dtype) for n, t in out.items()}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


# ------------------------------------------------------------------------------------------- byte copies


@pytest.fixture
def copy_calls(monkeypatch) -> list[int]:
    """The byte counts of every os.copy_file_range call (the real one still runs)."""
    calls, real = [], os.copy_file_range

    def spy(src, dst, count, offset_src=None, offset_dst=None):
        n = real(src, dst, count, offset_src, offset_dst)
        calls.append(n)
        return n

    monkeypatch.setattr(os, "copy_file_range", spy)
    return calls


def test_unchanged_tensors_are_byte_copies_and_folds_are_exact(sharded_bf16_llama_source, tmp_path, copy_calls):
    source = tensors(sharded_bf16_llama_source)
    out = merge(recipe_over(sharded_bf16_llama_source), tmp_path / "out", quiet=True)
    got, expected = tensors(out), expected_flat(source, HOPS, torch.bfloat16)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(bits(got[name]), bits(expected[name])), name
    folded = {f"model.layers.{k}.mlp.down_proj.weight" for k in range(len(HOPS) - 1) if HOPS[k + 1][2] != 1.0}
    assert len(folded) == 3 and sum(copy_calls) == sum(got[n].nbytes for n in expected if n not in folded)


def test_converted_copies_go_in_pieces(sharded_bf16_llama_source, tmp_path, monkeypatch, copy_calls):
    """A float32 output of a bf16 source converts every tensor: no byte copy, and a tensor larger than one
    piece is written in several, with the same result."""
    monkeypatch.setattr(dfsmerge.writer, "_PIECE_ELEMENTS", 1000)
    out = merge(recipe_over(sharded_bf16_llama_source), tmp_path / "out", dtype="float32", quiet=True)
    got = tensors(out)
    expected = expected_flat(tensors(sharded_bf16_llama_source), HOPS, torch.float32)
    assert all(torch.equal(got[n], expected[n]) for n in expected) and copy_calls == []


@pytest.mark.parametrize("failure", [errno.EXDEV, errno.ENOSYS, errno.EINVAL, "missing", "partial"])
def test_copy_falls_back_to_reads_and_writes(sharded_bf16_llama_source, tmp_path, monkeypatch, failure):
    """Where the kernel copy is refused (another filesystem, an old kernel, a platform without it), or stops
    after part of a range, the rest is read and written: the output is the same bytes."""
    reference = tensors(merge(recipe_over(sharded_bf16_llama_source), tmp_path / "ref", quiet=True))
    real, calls = os.copy_file_range, []

    def refuse(src, dst, count, offset_src=None, offset_dst=None):
        calls.append(count)
        if failure == "partial" and len(calls) % 2:  # every other call copies 100 bytes, the next one fails
            return real(src, dst, min(count, 100), offset_src, offset_dst)
        raise OSError(errno.EXDEV if failure == "partial" else failure, "refused")

    if failure == "missing":
        monkeypatch.delattr(os, "copy_file_range")
    else:
        monkeypatch.setattr(os, "copy_file_range", refuse)
    got = tensors(merge(recipe_over(sharded_bf16_llama_source), tmp_path / "out", quiet=True))
    assert all(torch.equal(bits(got[n]), bits(reference[n])) for n in reference)
    assert failure == "missing" or calls


def test_copy_of_a_range_past_the_end_of_the_file_is_an_error(tmp_path):
    source = tmp_path / "short.bin"
    source.write_bytes(bytes(range(100)))
    with open(tmp_path / "out.bin", "wb", buffering=0) as f:
        dfsmerge.writer.copy_bytes(StoredBytes(source, 40, 50, torch.uint8, (50,)), f)
        with pytest.raises(RecipeError, match=r"short.bin: file ends at byte 100, a tensor's data runs to byte 140"):
            dfsmerge.writer.copy_bytes(StoredBytes(source, 90, 50, torch.uint8, (50,)), f)
    assert (tmp_path / "out.bin").read_bytes()[:50] == bytes(range(40, 90))


# ------------------------------------------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def gguf_sources(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama (float32 safetensors), the same weights as an F16 GGUF (1-D tensors F32, as llama.cpp's
    --outtype f16 writes), and as a GGUF of mixed types (Q8_0, BF16, F16, F32)."""
    folder = tmp_path_factory.mktemp("gguf")
    source = make_tiny_source(folder / "llama", "llama", seed=5)
    mixed = {"q_proj": "Q8_0", "embed": "Q8_0", "k_proj": "BF16", "up_proj": "BF16", "lm_head": "BF16"}
    return {"safetensors": source, "f16": write_llama_gguf(source, folder / "f16.gguf"),
            "mixed": write_llama_gguf(source, folder / "mixed.gguf",
                                      lambda name: next((t for k, t in mixed.items() if k in name), "F16"))}


def transformers_gguf_tensors(path: Path) -> dict[str, torch.Tensor]:
    """What transformers' own GGUF loader reads (names mapped, Q/K permutation reversed, dequantized)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path.parent, gguf_file=path.name))
    return load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]


def test_gguf_tensors_equal_transformers_loader(gguf_sources):
    from dfsmerge.sources import open_checkpoint, read_config

    source = Source(str(gguf_sources["mixed"]))
    checkpoint = open_checkpoint(source, read_config(source))
    expected = transformers_gguf_tensors(gguf_sources["mixed"])
    assert sorted(checkpoint.names()) == sorted(expected)
    for name, value in expected.items():
        assert torch.equal(checkpoint.get(name).to(torch.float32), value.to(torch.float32)), name
    assert checkpoint.note == "dequantized from GGUF F16" and checkpoint.folder is None  # no tokenizer in the file


def test_gguf_config_equals_transformers(gguf_sources):
    from transformers import AutoConfig

    from dfsmerge.gguf import gguf_config

    path = gguf_sources["f16"]
    ours = gguf_config(Source(str(path)))
    theirs = AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_diff_dict()
    theirs = {k: v for k, v in theirs.items() if not k.startswith("_")}
    assert ours.pop("architectures") == ["LlamaForCausalLM"]
    assert ours.pop("rms_norm_eps") == 1e-5 and theirs.pop("rms_norm_eps") == pytest.approx(1e-5, rel=1e-7)
    assert ours == theirs
    original = json.loads((gguf_sources["safetensors"] / "config.json").read_text())
    rope = "rope_parameters" if "rope_parameters" in original else "rope_theta"  # transformers 5 / 4.x layout
    keys = ("hidden_size", "num_hidden_layers", "vocab_size", "head_dim", "bos_token_id", "tie_word_embeddings", rope)
    assert {k: ours[k] for k in keys} == {k: original[k] for k in keys}


@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
def test_gguf_merge_equals_safetensors_merge(gguf_sources, tmp_path, vector):
    """The same recipe over the F16 GGUF and over the float32 safetensors it was made from: equal tensors
    within F16 rounding (relative 2^-11), the same config, and logits that agree."""
    from transformers import AutoModelForCausalLM

    outs = {kind: merge(recipe_over(gguf_sources[kind], vector=vector), tmp_path / kind, dtype="float32",
                        quiet=True) for kind in ("f16", "safetensors")}
    got, expected = tensors(outs["f16"]), tensors(outs["safetensors"])
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=2**-11, atol=1e-7, msg=name)
    configs = [json.loads((outs[k] / "config.json").read_text()) for k in ("f16", "safetensors")]
    assert configs[0] == {**configs[1], "transformers_version": configs[0].get("transformers_version")}
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(outs[k]).eval()(INPUT_IDS).logits for k in outs]
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-2)  # F16 weights: about 2e-3 here


def test_gguf_metadata_is_parsed_once(gguf_sources, tmp_path, monkeypatch):
    """Planning, opening and reading every tensor of a merge parse the file once (one GGUFReader)."""
    import gguf

    path = tmp_path / "fresh.gguf"  # a file this process has not parsed yet
    shutil.copyfile(gguf_sources["f16"], path)
    readers, real = [], gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **k: readers.append(a) or real(*a, **k))
    merge(recipe_over(path), tmp_path / "out", quiet=True)
    assert len(readers) == 1
