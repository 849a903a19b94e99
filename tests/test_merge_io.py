"""The merge as a file operation: atomic output, --force, validation before reading weights, sharding, .bin and
hub sources, the command line, the legacy API and the files written beside the weights."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import dfsmerge.sources
from conftest import INPUT_IDS, make_tiny_source
from dfsmerge import Hop, Recipe, RecipeError, Source, Transform, data_flow_space_layer_merge, merge
from dfsmerge.cli import main
from dfsmerge.recipe import dump_native, load_recipe


def _recipe(paths, hops=((0, 0, 1.0), (1, 2, 0.8), (0, 0, 1.2)), **kw):
    return Recipe([Source(str(p)) for p in paths], [Hop(m, l, Transform(s)) for m, l, s in hops], **kw).check()


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if "dfsmerge-tmp" in p.name or "dfsmerge-old" in p.name]


def _logits(folder, ids=INPUT_IDS):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


def test_existing_output_is_refused_then_replaced_with_force(llama_sources, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # a previous output: --force replaces nothing else
    (out / "keep.txt").write_text("mine")
    with pytest.raises(RecipeError, match="already exists; pass --force"):
        merge(_recipe(llama_sources), out, quiet=True)
    assert (out / "keep.txt").read_text() == "mine"
    merge(_recipe(llama_sources), out, quiet=True, force=True, dtype="float32")
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert _leftovers(tmp_path) == []


def test_failure_while_writing_leaves_nothing(llama_sources, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(llama_sources[1], broken)
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] = 96  # the tensors say 128: found only when layer tensors are read
    (broken / "config.json").write_text(json.dumps(config))
    other = tmp_path / "other"
    shutil.copytree(llama_sources[0], other)
    (other / "config.json").write_text(json.dumps({**json.loads((other / "config.json").read_text()),
                                                   "intermediate_size": 96}))
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match=r"has shape \(128, 64\), the config says \(96, 64\)"):
        merge(_recipe([other, broken]), out, quiet=True)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_truncated_source_shard_leaves_nothing(sharded_bf16_llama_source, tmp_path):
    src = tmp_path / "truncated"
    shutil.copytree(sharded_bf16_llama_source, src)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match=shard.name):
        merge(_recipe([src, src]), out, quiet=True)
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": 32}, r"models\[1\]: hidden_size = 32 differs from models\[0\] \(64\)"),
    ({"model_type": "gpt2"}, r"models\[1\] .*model_type 'gpt2' is not supported"),
    ({"num_attention_heads": 8}, r"models\[1\]: num_attention_heads = 8 differs"),
    ({"num_hidden_layers": 2}, r"layer 2 of models\[1\], which has 2 layers \(0..1\)"),
    ({"vocab_size": 65}, r"vocabulary sizes differ \(64 vs 65\)"),
])
def test_config_mismatches_are_found_before_any_weight_is_read(llama_sources, tmp_path, monkeypatch, change,
                                                                 message):
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((llama_sources[1] / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, **change}))  # no weights in this folder at all
    monkeypatch.setattr(dfsmerge.sources, "open_checkpoint", lambda *a, **k: pytest.fail("weights were opened"))
    monkeypatch.setattr(sys.modules["dfsmerge.merge"], "open_checkpoint", lambda *a, **k: pytest.fail("opened"))
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match=message):
        merge(_recipe([llama_sources[0], other], output_model=1), out, quiet=True)
    assert not out.exists()


def test_legacy_layer_count_error_names_the_mask(llama_sources, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"model_paths: [[{llama_sources[0]}, null]]\nnum_r: 1\n"
                      "layer_mask: [[[true, true, true, true, true]]]\n")
    with pytest.raises(RecipeError, match=r"layer_mask: expected shape \(1, 1, 4\), got \(1, 1, 5\)"):
        merge(recipe, tmp_path / "out", quiet=True)


def test_mistral_bias_with_a_window_is_refused_with_a_reason(mistral_window_sources, tmp_path):
    recipe = Recipe([Source(str(mistral_window_sources[0]))],
                    [Hop(0, 0), Hop(0, 1, Transform(1.0, torch.full((64,), 0.1)))]).check()
    with pytest.raises(RecipeError, match=r"bias_factors: models\[0\] has an active sliding window.*--format compact"):
        merge(recipe, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_sharded_output_has_an_index_and_loads(llama_sources, tmp_path):
    out = merge(_recipe(llama_sources), tmp_path / "out", quiet=True, dtype="float32", max_shard_size="60KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3 and set(index["weight_map"].values()) == {s.name for s in shards}
    for shard in shards:  # every shard but one-tensor shards stays under the limit
        with safe_open(str(shard), "pt") as f:
            names = list(f.keys())
        assert len(names) == 1 or shard.stat().st_size <= 60_000 + 4096
    single = merge(_recipe(llama_sources), tmp_path / "single", quiet=True, dtype="float32")
    torch.testing.assert_close(_logits(out), _logits(single), rtol=0, atol=0)


def test_bin_source_loads_with_weights_only_and_matches_safetensors(llama_sources, tmp_path):
    from safetensors.torch import load_file

    binsrc = tmp_path / "binsrc"
    shutil.copytree(llama_sources[1], binsrc, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(str(llama_sources[1] / "model.safetensors")), binsrc / "pytorch_model.bin")
    a = merge(_recipe([llama_sources[0], binsrc]), tmp_path / "a", quiet=True, dtype="float32")
    b = merge(_recipe(llama_sources[:2]), tmp_path / "b", quiet=True, dtype="float32")
    torch.testing.assert_close(_logits(a), _logits(b), rtol=0, atol=0)


def test_pickle_that_is_not_just_tensors_is_refused(llama_sources, tmp_path):
    evil = tmp_path / "evil"
    shutil.copytree(llama_sources[1], evil, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save({"x": Path("/")}, evil / "pytorch_model.bin")  # an arbitrary object: weights_only refuses it
    with pytest.raises(RecipeError, match="weights_only=True"):
        merge(_recipe([llama_sources[0], evil]), tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def _populate_hub_cache(cache: Path, repo: str, folder: Path, commit: str) -> None:
    """The layout huggingface_hub writes: models--org--name/{refs/<rev>, snapshots/<commit>/...}."""
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    (root / "refs" / "v1").write_text(commit)


def test_hub_ids_resolve_through_huggingface_hub_and_a_cache_dir(llama_sources, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the real code path, served from the pre-populated cache
    cache = tmp_path / "hub"
    _populate_hub_cache(cache, "org/tiny-a", llama_sources[0], "a" * 40)
    _populate_hub_cache(cache, "org/tiny-b", llama_sources[1], "b" * 40)
    recipe = Recipe([Source("org/tiny-a"), Source("org/tiny-b", "v1")],
                    [Hop(0, 0, Transform(1.0)), Hop(1, 2, Transform(0.8)), Hop(0, 0, Transform(1.2))]).check()
    hub = merge(recipe, tmp_path / "hub_out", quiet=True, dtype="float32", cache_dir=str(cache))
    local = merge(_recipe(llama_sources[:2]), tmp_path / "local_out", quiet=True, dtype="float32")
    torch.testing.assert_close(_logits(hub), _logits(local), rtol=0, atol=0)
    card = (hub / "README.md").read_text()
    assert "`org/tiny-b` revision `v1`" in card
    with pytest.raises(RecipeError, match="org/missing: not a local folder, and fetching it from the hub failed"):
        merge(Recipe([Source("org/missing")], [Hop(0, 0)]).check(), tmp_path / "x", quiet=True,
              cache_dir=str(cache))


def test_hub_download_asks_for_config_first_then_only_needed_files(llama_sources, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, revision=None, cache_dir=None, allow_patterns=None, **kw):
        calls.append((repo_id, revision, cache_dir, tuple(allow_patterns)))
        return str(llama_sources[0])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    recipe = Recipe([Source("org/tiny", "rev1")], [Hop(0, 0), Hop(0, 1)]).check()
    merge(recipe, tmp_path / "out", quiet=True, cache_dir="/some/cache")
    assert calls[0] == ("org/tiny", "rev1", "/some/cache", ("config.json",))
    weights_call = calls[1][3]
    assert "*.safetensors" in weights_call and "tokenizer.json" in weights_call
    assert not any(p.endswith(".bin") or p == "*" for p in weights_call)


def test_cli_errors_are_one_line_and_create_nothing(tmp_path, capsys):
    recipe = tmp_path / "bad.yml"
    recipe.write_text("model_paths: [[a, null]]\nnum_r: 2\nlayer_mask: [[[true]]]\n")
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: layer_mask: expected shape (2, 1, n_layers)") and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_merge_and_plan(llama_sources, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(dump_native(_recipe(llama_sources[:2])))
    plan = subprocess.run([sys.executable, "-m", "dfsmerge", "plan", str(recipe)], capture_output=True, text=True,
                          check=True).stdout
    per_layer = 2 * 64 * 64 + 2 * 2 * 16 * 64 + 3 * 64 * 128 + 2 * 64  # q,o + k,v (2 kv heads of 16) + mlp + norms
    params = 2 * 64 * 64 + 64 + 3 * per_layer  # embed, head, final norm, 3 hops
    assert "output: LlamaForCausalLM, 3 layers (2 distinct source layers)" in plan
    assert f"parameters: {params:,}" in plan
    done = subprocess.run([sys.executable, "-m", "dfsmerge", "merge", str(recipe), str(tmp_path / "out"),
                           "--quiet", "--dtype", "float16"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys()) == params
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float16


def test_output_folder_contents(llama_sources, tmp_path):
    out = merge(_recipe(llama_sources[:2], input_model=1, output_model=0), tmp_path / "out", quiet=True)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "README.md", "dfsmerge_recipe.yml"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["dtype"] == "bfloat16"
    assert config["architectures"] == ["LlamaForCausalLM"]
    again = load_recipe(out / "dfsmerge_recipe.yml")
    assert [(h.model, h.layer, h.transform.scale) for h in again.hops] == [(0, 0, 1.0), (1, 2, 0.8), (0, 0, 1.2)]
    card = (out / "README.md").read_text()
    assert str(llama_sources[1]) in card and "| 1 | 1 | 2 | 0.8 | 0 |" in card


def test_legacy_api(llama_sources, tmp_path):
    mask = [[[True, False, True, False], [False, True, False, False]]]
    scales = [[[1.0, 1.0, 0.7, 1.0], [1.0, 1.3, 1.0, 1.0]]]
    plan = data_flow_space_layer_merge([[str(llama_sources[0]), None], [str(llama_sources[1]), None]], 1, mask,
                                       scales, save_only_config=True, output_path=str(tmp_path / "cfg"))
    assert json.loads((tmp_path / "cfg" / "config.json").read_text())["num_hidden_layers"] == 4  # 3 + last layer
    assert [(h.model, h.layer) for h in plan.recipe.hops] == [(0, 0), (0, 2), (1, 1), (0, 3)]
    model, tokenizer = data_flow_space_layer_merge(
        [[str(llama_sources[0]), None], [str(llama_sources[1]), None]], 1, mask, scales,
        output_path=str(tmp_path / "full"), dtype="float32")
    assert model.config.num_hidden_layers == 4 and tokenizer.pad_token == "<pad>"
    torch.testing.assert_close(model(INPUT_IDS).logits, _logits(tmp_path / "full"))
