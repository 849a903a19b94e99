"""The compact format (``merge --format compact``), loading it with and without dfsmerge, and ``flatten`` of our
compact folders, of Sakana AI's EvoLLM-JP layout and of the earlier executor's affine layout (both built here from
their description: config ``num_hops``; ``model.input_layers``, ``model.input_scales`` and, affine,
``model.input_bias``; layers ``model.layers.i`` stored once)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from conftest import PADDED_IDS, PADDED_MASK
from dfsmerge import RecipeError, Sources, assemble, flatten, merge, plan_recipe
from dfsmerge.cli import main
from dfsmerge.modeling_dfs import DFSLlamaForCausalLM, DFSLlamaForSequenceClassification
from reference import reference_logits
from test_assemble import H, assert_matches, bias, mat, recipe, vec


def compact_merge(rec, out: Path, **kwargs) -> Path:
    return merge(rec, out, dtype="float32", quiet=True, format="compact", **kwargs)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def assert_same_folder(got: Path, want: Path) -> None:
    """Same tensors, bit for bit, and the same config."""
    a, b = tensors(got), tensors(want)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert json.loads((got / "config.json").read_text()) == json.loads((want / "config.json").read_text())


@pytest.fixture
def mixed(llama_sources) -> object:
    """Two models, a layer in three hops, every kind of transform."""
    return recipe(llama_sources[:2], [(0, 0, vec(5)), (0, 1, 0.8), (0, 1, vec(1)), (1, 2, mat(2), bias(2)), (0, 1),
                                      (1, 3, 1.1, 0.05)], input_model=1)


# --------------------------------------------------------------------------------------------- the format


def test_compact_folder(mixed, tmp_path):
    out = compact_merge(mixed, tmp_path / "compact")
    assert {"modeling_dfs.py", "config.json", "tokenizer.json", "dfsmerge_recipe.yml", "README.md"} <= \
        {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "dfs_llama" and config["architectures"] == ["DFSLlamaForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_dfs.DFSLlamaForCausalLM"
    assert config["num_hidden_layers"] == 6 and config["dfs_layers"] == [[0, 0], [0, 1], [1, 2], [1, 3]]
    assert config["dfs_hops"] == [[0, "vector", None], [1, "scalar", None], [1, "vector", None],
                                  [2, "matrix", "vector"], [1, None, None], [3, "scalar", "scalar"]]
    stored = tensors(out)
    assert not any(n.startswith("model.layers.") for n in stored)
    assert {n.split(".")[2] for n in stored if n.startswith("model.dfs_layers.")} == {"0", "1", "2", "3"}
    assert stored["model.dfs_transforms.1.scale"].shape == ()
    assert stored["model.dfs_transforms.3.scale"].shape == (H, H)
    assert stored["model.dfs_transforms.3.bias"].shape == (H,)
    assert "compact" in (out / "README.md").read_text()
    # `dfsmerge plan`'s sizes are those of the files
    flat = merge(mixed, tmp_path / "flat", dtype="float32", quiet=True)
    plan = plan_recipe(mixed, "float32")
    assert plan.compact_params() == sum(t.numel() for t in stored.values())
    assert plan.num_params() == sum(t.numel() for t in tensors(flat).values())
    assert plan.compact_params() < plan.num_params()


def test_compact_loads_with_dfsmerge_installed(mixed, tmp_path):
    """No trust_remote_code: importing dfsmerge registered the classes with the Auto classes."""
    out = compact_merge(mixed, tmp_path / "compact")
    assert type(AutoConfig.from_pretrained(out)).__name__ == "DFSLlamaConfig"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model) is DFSLlamaForCausalLM
    assert_matches(model, mixed)
    assert torch.equal(model.generate(PADDED_IDS, attention_mask=PADDED_MASK, max_new_tokens=6, do_sample=False),
                       model.generate(PADDED_IDS, attention_mask=PADDED_MASK, max_new_tokens=6, do_sample=False,
                                      use_cache=False))


def test_compact_classifier(cls_llama_sources, tmp_path):
    rec = recipe(cls_llama_sources, [(0, 0), (1, 1, vec(1)), (0, 1, 0.7), (1, 3)], output_model=1)
    out = compact_merge(rec, tmp_path / "compact")
    model = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32)
    assert type(model) is DFSLlamaForSequenceClassification
    assert_matches(model, rec, classification=True)
    flat = flatten(out, tmp_path / "flat", quiet=True)
    assert_same_folder(flat, merge(rec, tmp_path / "direct", dtype="float32", quiet=True))


_WITHOUT_DFSMERGE = """
import sys
sys.modules["dfsmerge"] = None  # installed in this environment, but not importable here
try:
    import dfsmerge
except ImportError:
    pass
else:
    raise SystemExit("dfsmerge is importable")
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32)
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
ids, mask = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(input_ids=ids, attention_mask=mask).logits, sys.argv[3])
"""


def test_compact_loads_without_dfsmerge(mixed, tmp_path):
    """``trust_remote_code=True`` runs the modeling file the folder carries; nothing of dfsmerge is needed."""
    out = compact_merge(mixed, tmp_path / "compact")
    torch.save((PADDED_IDS, PADDED_MASK), tmp_path / "batch.pt")
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-I", "-c", _WITHOUT_DFSMERGE, str(out), str(tmp_path / "batch.pt"),
                             str(tmp_path / "logits.pt")], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(tmp_path / "logits.pt")[PADDED_MASK.bool()]
    want = reference_logits(mixed, PADDED_IDS, PADDED_MASK)[PADDED_MASK.bool()]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------- flatten


@pytest.mark.parametrize("kind", ["mixed", "tied", "mistral"])
def test_compact_then_flatten_equals_the_flat_merge(kind, mixed, tied_llama_source, mistral_sources, tmp_path):
    rec = {"mixed": lambda: mixed,
           "tied": lambda: recipe([tied_llama_source], [(0, 0, vec(3), bias(3)), (0, 1), (0, 1, 0.9), (0, 3)]),
           "mistral": lambda: recipe(mistral_sources, [(0, 0), (1, 1, vec(1)), (0, 2, mat(2)), (1, 1)])}[kind]()
    compact = compact_merge(rec, tmp_path / "compact")
    flat = flatten(compact, tmp_path / "flat", quiet=True)
    assert_same_folder(flat, merge(rec, tmp_path / "direct", dtype="float32", quiet=True))
    assert (flat / "dfsmerge_recipe.yml").read_text() == (compact / "dfsmerge_recipe.yml").read_text()
    assert (flat / "tokenizer.json").is_file()


def test_save_pretrained_writes_either_format(mixed, tmp_path):
    """An assembled model saves what ``merge`` writes: flat by default, compact by option."""
    model, _ = assemble(mixed, Sources(dtype="float32"))
    model.save_pretrained(tmp_path / "flat")
    a, b = tensors(tmp_path / "flat"), tensors(merge(mixed, tmp_path / "direct", dtype="float32", quiet=True))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    model.save_pretrained(tmp_path / "compact", format="compact")
    a, b = tensors(tmp_path / "compact"), tensors(compact_merge(mixed, tmp_path / "direct_compact"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert_matches(AutoModelForCausalLM.from_pretrained(tmp_path / "compact", dtype=torch.float32), mixed)


def _evo_checkpoint(folder: Path, source: Path, stored: list[int], hops: list[int], scales: torch.Tensor,
                    bias: torch.Tensor | None = None) -> Path:
    """A checkpoint in Sakana's EvoLLM layout (with ``bias``: the earlier executor's affine layout) over the
    layers ``stored`` of ``source``, stored once as ``model.layers.i``; hop k runs stored layer ``hops[k]``."""
    src = load_file(source / "model.safetensors")
    out = {n: t for n, t in src.items() if not n.startswith("model.layers.")}
    for i, layer in enumerate(stored):
        prefix = f"model.layers.{layer}."
        out.update({f"model.layers.{i}." + n[len(prefix):]: t for n, t in src.items() if n.startswith(prefix)})
    out["model.input_layers"] = torch.tensor(hops)
    out["model.input_scales"] = scales
    if bias is not None:
        out["model.input_bias"] = bias
    folder.mkdir()
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    name = "EvoMistralAffine" if bias is not None else "EvoMistral"
    config.update(model_type=name.lower(), architectures=[f"{name}ForCausalLM"], num_hops=len(hops),
                  num_hidden_layers=len(stored), auto_map={"AutoModelForCausalLM": f"modeling_evo.{name}ForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copyfile(source / "tokenizer.json", folder / "tokenizer.json")
    shutil.copyfile(source / "tokenizer_config.json", folder / "tokenizer_config.json")
    return folder


def test_flatten_sakana_layout(mistral_sources, tmp_path):
    """input_scales[k] scales what flows into hop k: the embeddings for hop 0, then the previous MLP output."""
    stored, hops = [0, 1, 3], [0, 1, 1, 2, 1, 2]
    scales = torch.tensor([1.2, 0.9, 1.1, 0.8, 1.0, 0.7])
    folder = _evo_checkpoint(tmp_path / "evo", mistral_sources[0], stored, hops, scales)
    flat = flatten(folder, tmp_path / "flat", quiet=True)
    model = AutoModelForCausalLM.from_pretrained(flat, dtype=torch.float32)
    assert type(model).__name__ == "MistralForCausalLM" and model.config.num_hidden_layers == 6
    assert not (flat / "dfsmerge_recipe.yml").exists() and (flat / "tokenizer.json").is_file()
    rec = recipe(mistral_sources[:1], [(0, stored[u], float(s)) for u, s in zip(hops, scales)])
    assert_matches(model, rec)


def test_flatten_affine_layout(mistral_sources, tmp_path):
    """Matrices and biases: a Mistral model has no MLP bias, so without a sliding window it becomes Llama."""
    stored, hops = [2, 0], [1, 0, 0, 1]
    scales = torch.stack([mat(10 + k) for k in range(4)])
    biases = torch.stack([bias(20 + k) for k in range(4)])
    folder = _evo_checkpoint(tmp_path / "affine", mistral_sources[1], stored, hops, scales, biases)
    flat = flatten(folder, tmp_path / "flat", quiet=True)
    model = AutoModelForCausalLM.from_pretrained(flat, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.mlp_bias
    rec = recipe(mistral_sources[1:], [(0, stored[u], scales[k], biases[k]) for k, u in enumerate(hops)])
    assert_matches(model, rec)


def test_flatten_refuses_what_is_not_a_dfs_checkpoint(llama_sources, tmp_path):
    with pytest.raises(RecipeError, match="not a DFS checkpoint"):
        flatten(llama_sources[0], tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_flatten_keeps_the_recipe_only_while_it_makes_the_hop_table(llama_sources, tmp_path, caplog):
    """The compact folder's dfsmerge_recipe.yml goes with its flat copy; after config.json's hops were edited
    (a hop added) it would make another model, so it is left out, with a warning."""
    compact = compact_merge(recipe([llama_sources[0]], [(0, 0), (0, 1, 0.5), (0, 3)]), tmp_path / "compact")
    flatten(compact, tmp_path / "flat", quiet=True)
    assert (tmp_path / "flat" / "dfsmerge_recipe.yml").read_text() == (compact / "dfsmerge_recipe.yml").read_text()
    config = json.loads((compact / "config.json").read_text())
    config.update(dfs_hops=config["dfs_hops"] + [[0, None, None]], num_hidden_layers=4)
    config.pop("layer_types", None)
    (compact / "config.json").write_text(json.dumps(config))
    flatten(compact, tmp_path / "edited", quiet=True)
    assert not (tmp_path / "edited" / "dfsmerge_recipe.yml").exists()
    assert "dfsmerge_recipe.yml is not copied" in caplog.text


def test_compact_refuses_families_it_has_no_model_for(tmp_path, monkeypatch):
    from dataclasses import replace

    from transformers import Qwen2Config

    from dfsmerge.families import FAMILIES

    # every family in the table has DFS classes today; a table entry with dfs=False is one that has none
    monkeypatch.setitem(FAMILIES, "qwen2", replace(FAMILIES["qwen2"], dfs=False))
    source = tmp_path / "qwen2"  # a config is all it takes to be refused: no weight is read before that
    Qwen2Config(hidden_size=64, num_attention_heads=4, num_hidden_layers=2).save_pretrained(source)
    with pytest.raises(RecipeError, match="compact format"):
        compact_merge(recipe([source], [(0, 0), (0, 1)]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- CLI


def test_cli_merge_compact_flatten_and_plan(mixed, tmp_path, capsys):
    from dfsmerge.recipe import dump_native

    path = tmp_path / "recipe.yml"
    path.write_text(dump_native(mixed))
    assert main(["merge", str(path), str(tmp_path / "compact"), "--format", "compact", "--dtype", "float32",
                 "--quiet"]) == 0
    assert main(["flatten", str(tmp_path / "compact"), str(tmp_path / "flat"), "--quiet"]) == 0
    assert_same_folder(tmp_path / "flat", merge(mixed, tmp_path / "direct", dtype="float32", quiet=True))
    assert main(["flatten", str(tmp_path / "compact"), str(tmp_path / "flat"), "--quiet"]) == 2  # exists
    capsys.readouterr()
    assert main(["plan", str(path), "--dtype", "float32"]) == 0
    compact_bytes = sum(f.stat().st_size for f in (tmp_path / "compact").glob("*.safetensors"))
    shown = capsys.readouterr().out.split("compact ")[-1].split()[0]
    assert abs(float(shown) * 1000 - compact_bytes) / compact_bytes < 0.05  # KB, up to the headers
