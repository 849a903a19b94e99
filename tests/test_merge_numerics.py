"""The merge executor against the independent reference (tests/reference.py).

Each case builds a recipe, runs ``dfsmerge.merge.merge`` into a temporary folder, loads the folder with plain
transformers (no dfsmerge code) and compares its logits with ``reference_logits`` on a fixed batch and on a
left-padded batch with an attention mask.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from conftest import INPUT_IDS, PAD_ID, PADDED_IDS, PADDED_MASK, VOCAB
from dfsmerge.recipe import Hop, Recipe, RecipeError, Source, Transform, dump_native, recipe_from_legacy
from reference import reference_logits

H = 64  # hidden size of every fixture source
L = 4  # layers of every fixture source
RIGHT_PADDED_IDS = torch.tensor([[2, 9, 33, 51, 6, 62, PAD_ID, PAD_ID], [2, 27, 40, PAD_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID]])
RIGHT_PADDED_MASK = (RIGHT_PADDED_IDS != PAD_ID).long()
# no padding; left padding (generation-style); right padding (where classifier pooling is not the last column)
BATCHES = [(INPUT_IDS, None), (PADDED_IDS, PADDED_MASK), (RIGHT_PADDED_IDS, RIGHT_PADDED_MASK)]


# --------------------------------------------------------------------------------------------- helpers


def vec(seed: int, spread: float = 0.3) -> torch.Tensor:
    """A length-H vector around 1."""
    return 1.0 + spread * torch.randn(H, generator=torch.Generator().manual_seed(seed))


def bias(seed: int, size: float = 0.2) -> torch.Tensor:
    return size * torch.randn(H, generator=torch.Generator().manual_seed(seed))


def mat(seed: int, spread: float = 0.3) -> torch.Tensor:
    """An H x H matrix around the identity (not symmetric, so S vs S^T is caught)."""
    return torch.eye(H) + spread * torch.randn(H, H, generator=torch.Generator().manual_seed(seed)) / H**0.5


def recipe(paths, hops, input_model=0, output_model=0, classification=None) -> Recipe:
    """hops: (model, layer) or (model, layer, scale) or (model, layer, scale, bias)."""
    built = [Hop(h[0], h[1], Transform(*h[2:])) for h in hops]
    return Recipe([Source(str(p)) for p in paths], built, input_model, output_model, classification).check()


def run_merge(rec, out: Path, **kwargs) -> Path:
    from dfsmerge.merge import merge

    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("quiet", True)
    result = merge(rec, out, **kwargs)
    assert Path(result) == Path(out)
    return Path(result)


def load_merged(out: Path, classification: bool = False):
    cls = AutoModelForSequenceClassification if classification else AutoModelForCausalLM
    model, info = cls.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    missing = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    assert not missing, f"the merged folder does not load cleanly: {missing}"
    return model.eval()


def valid(logits: torch.Tensor, mask) -> torch.Tensor:
    """Only the positions of real tokens: what a pad query row computes is unspecified."""
    return logits if mask is None else logits[mask.bool()]


def assert_matches_reference(out: Path, rec: Recipe, classification: bool = False, atol: float = 1e-4):
    """The merged folder has one layer per hop, loads cleanly and computes the reference's logits."""
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == len(rec.hops)
    model = load_merged(out, classification)
    assert len(model.model.layers) == len(rec.hops)
    for ids, mask in BATCHES:
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask).logits
        want = reference_logits(rec, ids, mask)
        assert got.shape == want.shape
        if not classification:
            got, want = valid(got, mask), valid(want, mask)
        torch.testing.assert_close(got, want, atol=atol, rtol=atol)
    return model


def assert_transforms_matter(rec: Recipe):
    """Guard against a case that would pass with the transforms ignored."""
    plain = Recipe(rec.sources, [Hop(h.model, h.layer) for h in rec.hops], rec.input_model, rec.output_model,
                   rec.classification)
    diff = (reference_logits(rec, INPUT_IDS) - reference_logits(plain, INPUT_IDS)).abs().max()
    assert diff > 1e-2, diff


# --------------------------------------------------------------------------------------------- transforms


def test_scalar_scales(llama_sources, tmp_path):
    rec = recipe(llama_sources[:2], [(0, 0), (1, 1, 0.7), (0, 2, 1.3), (1, 3, 0.5), (0, 3, 0.9)])
    assert_transforms_matter(rec)
    assert_matches_reference(run_merge(rec, tmp_path / "out"), rec)


def test_vector_scales(llama_sources, tmp_path):
    rec = recipe(llama_sources[:2], [(0, 0), (0, 1, vec(1)), (1, 2, vec(2)), (1, 3, vec(3)), (0, 3, vec(4))])
    assert_transforms_matter(rec)
    assert_matches_reference(run_merge(rec, tmp_path / "out"), rec)


def test_matrix_scales(llama_sources, tmp_path):
    rec = recipe(llama_sources[:2], [(0, 0), (1, 1, mat(1)), (0, 2, mat(2)), (1, 3, mat(3))])
    assert_transforms_matter(rec)
    assert_matches_reference(run_merge(rec, tmp_path / "out"), rec)


def test_vector_and_scalar_biases_llama(llama_sources, tmp_path):
    rec = recipe(llama_sources[:2], [(0, 0, 1.0, bias(10)), (1, 1, vec(1), bias(11)), (0, 2, 0.8, 0.15),
                                      (1, 3, mat(3), bias(13))])
    assert_transforms_matter(rec)
    out = run_merge(rec, tmp_path / "out")
    assert json.loads((out / "config.json").read_text()).get("mlp_bias") is True
    assert_matches_reference(out, rec)


@pytest.mark.parametrize("kind", ["scalar", "vector", "matrix", "vector+bias"])
def test_embedding_transform(kind, llama_sources, tmp_path):
    """T_0 (hop 0's transform) acts on the embeddings."""
    t0 = {"scalar": (1.7,), "vector": (vec(5),), "matrix": (mat(5),), "vector+bias": (vec(5), bias(5))}[kind]
    rec = recipe(llama_sources[:1], [(0, 0, *t0), (0, 1), (0, 2), (0, 3)])
    assert_transforms_matter(rec)
    assert_matches_reference(run_merge(rec, tmp_path / "out"), rec)


# --------------------------------------------------------------------------------------------- layouts


def test_repeated_layer(llama_sources, tmp_path):
    """One source layer in three hops, each with its own transform: three physical copies."""
    rec = recipe(llama_sources[:1], [(0, 0), (0, 1, 0.8), (0, 1, vec(7)), (0, 1, 1.2), (0, 3, 0.6)])
    assert_transforms_matter(rec)
    model = assert_matches_reference(run_merge(rec, tmp_path / "out"), rec)
    downs = [model.model.layers[k].mlp.down_proj.weight for k in (1, 2, 3)]
    assert not torch.equal(downs[0], downs[1]) and not torch.equal(downs[1], downs[2])
    torch.testing.assert_close(model.model.layers[1].self_attn.q_proj.weight,
                               model.model.layers[3].self_attn.q_proj.weight, atol=0, rtol=0)


def test_three_models(llama_sources, tmp_path):
    rec = recipe(llama_sources, [(0, 0), (1, 0, 0.9), (2, 1, vec(1)), (0, 2, mat(2)), (1, 3, 1.1), (2, 3, vec(3))],
                 input_model=2, output_model=1)
    assert_transforms_matter(rec)
    assert_matches_reference(run_merge(rec, tmp_path / "out"), rec)


def test_input_model_differs_from_output_model(llama_sources, tmp_path):
    rec = recipe(llama_sources[:2], [(0, 0, vec(1)), (1, 1, 0.8), (0, 2), (1, 3)], input_model=1, output_model=0)
    out = run_merge(rec, tmp_path / "out")
    model = assert_matches_reference(out, rec)
    src_in = AutoModelForCausalLM.from_pretrained(llama_sources[1], dtype=torch.float32)
    src_out = AutoModelForCausalLM.from_pretrained(llama_sources[0], dtype=torch.float32)
    torch.testing.assert_close(model.model.embed_tokens.weight, src_in.model.embed_tokens.weight * vec(1))
    torch.testing.assert_close(model.lm_head.weight, src_out.lm_head.weight, atol=0, rtol=0)
    torch.testing.assert_close(model.model.norm.weight, src_out.model.norm.weight, atol=0, rtol=0)


def test_add_last_layer_with_last_layer_scale(llama_sources, tmp_path):
    mask = [[[True, False, True, False], [False, True, False, False]],
            [[False, True, False, False], [True, False, False, True]]]
    scales = [[[1.0, 1.0, 0.9, 1.0], [1.0, 1.1, 1.0, 1.0]],
              [[1.0, 0.7, 1.0, 1.0], [1.2, 1.0, 1.0, 0.8]]]
    rec = recipe_from_legacy([[str(p), None] for p in llama_sources[:2]], 2, mask, scales,
                             input_layer_model=0, output_layer_model=1, add_last_layer=True, last_layer_scale=0.6)
    assert [(h.model, h.layer) for h in rec.hops] == [(0, 0), (0, 2), (1, 1), (0, 1), (1, 0), (1, 3), (1, 3)]
    assert rec.hops[-1].transform.scale == 0.6 and not rec.hops[-1].transform.has_bias
    assert_transforms_matter(rec)
    assert_matches_reference(run_merge(rec, tmp_path / "out"), rec)


def test_legacy_recipe_file(llama_sources, tmp_path):
    """merge() takes a path to a legacy YAML recipe (bias_factors all zero, as old recipes write them)."""
    doc = {
        "model_paths": [[str(p), None] for p in llama_sources[:2]],
        "num_r": 1,
        "layer_mask": [[[True, True, False, True], [False, True, True, True]]],
        "scaling_factors": [[[1.0, 0.8, 1.0, 1.1], [1.0, 0.9, 1.2, 0.7]]],
        "bias_factors": [[[0.0] * L, [0.0] * L]],
        "input_layer_model": 1,
        "output_layer_model": 0,
        "add_last_layer": False,
    }
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(doc))
    from dfsmerge.recipe import load_recipe

    rec = load_recipe(path)
    assert len(rec.hops) == 6
    assert_matches_reference(run_merge(path, tmp_path / "out"), rec)


def test_native_recipe_file_with_matrix_and_bias(llama_sources, tmp_path):
    rec = recipe(llama_sources[:2], [(0, 0, vec(1), bias(1)), (1, 1, mat(2)), (0, 3, vec(3), bias(3))])
    path = tmp_path / "recipe.yml"
    path.write_text(dump_native(rec))
    assert_matches_reference(run_merge(path, tmp_path / "out"), rec)


# --------------------------------------------------------------------------------------------- heads


def test_tied_embeddings_untied_by_embedding_transform(tied_llama_source, tmp_path):
    """Folding T_0 into the embedding must leave the head the untransformed (tied) source embedding."""
    rec = recipe([tied_llama_source], [(0, 0, vec(9), bias(9)), (0, 1), (0, 2, 0.8), (0, 3)])
    assert_transforms_matter(rec)
    out = run_merge(rec, tmp_path / "out")
    model = assert_matches_reference(out, rec)
    src = AutoModelForCausalLM.from_pretrained(tied_llama_source, dtype=torch.float32)
    emb = src.model.embed_tokens.weight
    torch.testing.assert_close(model.lm_head.weight, emb, atol=0, rtol=0)
    torch.testing.assert_close(model.model.embed_tokens.weight, emb * vec(9) + bias(9))
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_tied_embeddings_identity_t0(tied_llama_source, tmp_path):
    rec = recipe([tied_llama_source], [(0, 0), (0, 1, vec(2)), (0, 3)])
    assert_matches_reference(run_merge(rec, tmp_path / "out"), rec)


def test_sequence_classification(cls_llama_sources, tmp_path):
    """The score head (and final norm) come from the output model; logits pooled at the last real token."""
    rec = recipe(cls_llama_sources, [(0, 0, vec(1)), (1, 1, 0.8), (0, 2, vec(2)), (1, 3)],
                 input_model=0, output_model=1)
    assert_transforms_matter(rec)
    out = run_merge(rec, tmp_path / "out")
    config = AutoConfig.from_pretrained(out)
    assert config.architectures[0] == "LlamaForSequenceClassification"
    assert config.num_labels == 3 and config.pad_token_id is not None
    model = assert_matches_reference(out, rec, classification=True)
    src_out = AutoModelForSequenceClassification.from_pretrained(cls_llama_sources[1], dtype=torch.float32)
    torch.testing.assert_close(model.score.weight, src_out.score.weight, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------- mistral


def test_mistral_pair(mistral_sources, tmp_path):
    rec = recipe(mistral_sources, [(0, 0, vec(1)), (1, 1, 0.8), (0, 2, mat(2)), (1, 2, vec(3)), (1, 3)],
                 input_model=1, output_model=0)
    assert_transforms_matter(rec)
    out = run_merge(rec, tmp_path / "out")
    assert AutoConfig.from_pretrained(out).model_type == "mistral"
    assert_matches_reference(out, rec)


def test_mistral_sliding_window_follows_the_layers(mistral_window_sources, tmp_path):
    rec = recipe(mistral_window_sources, [(0, 0), (1, 1, 0.9), (0, 2), (1, 3, vec(4))])
    out = run_merge(rec, tmp_path / "out")
    assert AutoConfig.from_pretrained(out).sliding_window == 4
    assert_matches_reference(out, rec)


def test_mistral_bias_without_a_window_is_written_as_llama(mistral_sources, tmp_path):
    """A Mistral layer without a sliding window is a Llama layer, and Llama has an MLP bias: the flat merge of an
    affine recipe is a plain LlamaForCausalLM with mlp_bias (the rule merge, flatten and save share)."""
    rec = recipe(mistral_sources, [(0, 0), (1, 1, vec(1), bias(1)), (0, 3, 0.9, 0.05)])
    out = run_merge(rec, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["mlp_bias"] and "sliding_window" not in config
    assert_matches_reference(out, rec)


def test_mistral_bias_with_a_window_is_refused(mistral_window_sources, tmp_path):
    rec = recipe(mistral_window_sources, [(0, 0), (1, 1, 1.0, bias(1)), (0, 3)])
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match="sliding window.*--format compact"):
        run_merge(rec, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no half-written temporary folder left beside it either


def test_mistral_embedding_bias_is_folded(mistral_sources, tmp_path):
    """b_0 goes into the embedding rows, so it needs no MLP bias: allowed on Mistral too."""
    rec = recipe(mistral_sources[:1], [(0, 0, vec(1), bias(1)), (0, 1), (0, 3)])
    out = run_merge(rec, tmp_path / "out")
    assert not json.loads((out / "config.json").read_text()).get("mlp_bias", False)
    assert_matches_reference(out, rec)


# --------------------------------------------------------------------------------------------- output folder


def test_output_folder_config_and_tokenizer(llama_sources, tmp_path):
    rec = recipe(llama_sources[:2], [(0, 0), (1, 1), (1, 1), (0, 2), (0, 3)], input_model=1)
    out = run_merge(rec, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5
    tok = AutoTokenizer.from_pretrained(out)
    src_tok = AutoTokenizer.from_pretrained(llama_sources[1])
    text = "the cat and a dog run fast"
    assert tok(text)["input_ids"] == src_tok(text)["input_ids"]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 2, 3)


def test_default_dtype_is_bfloat16(llama_sources, tmp_path):
    rec = recipe(llama_sources[:2], [(0, 0, vec(1)), (1, 1, 0.8), (0, 2, mat(2)), (1, 3)])
    out = run_merge(rec, tmp_path / "out", dtype="bfloat16")
    from dfsmerge.merge import merge

    default = merge(rec, tmp_path / "default", quiet=True)  # no dtype argument
    files = sorted(Path(default).glob("*.safetensors"))
    assert files
    for file in files:
        with safe_open(file, "pt") as f:
            for name in f.keys():
                assert f.get_slice(name).get_dtype() == "BF16", (file.name, name)
    for file in sorted(out.glob("*.safetensors")):
        with safe_open(file, "pt") as f, safe_open(Path(default) / file.name, "pt") as g:
            assert set(f.keys()) == set(g.keys())
            for name in f.keys():
                assert torch.equal(f.get_tensor(name), g.get_tensor(name)), name
    model = load_merged(Path(default))
    with torch.no_grad():
        got = model(input_ids=INPUT_IDS).logits
    want = reference_logits(rec, INPUT_IDS)
    err = (got - want).abs().max() / want.abs().max()
    assert 0 < err < 0.05, err


def test_sharded_bf16_source_and_sharded_output(sharded_bf16_llama_source, llama_sources, tmp_path):
    rec = recipe([sharded_bf16_llama_source, llama_sources[0]],
                 [(0, 0, vec(1)), (1, 1, 0.7), (0, 2, vec(2)), (0, 3, mat(3)), (1, 3)])
    out = run_merge(rec, tmp_path / "out", max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    assert_matches_reference(out, rec)


def test_legacy_api_returns_model_and_tokenizer(llama_sources, tmp_path):
    from dfsmerge import dfs_excute_from_config

    doc = {
        "model_paths": [[str(p), None] for p in llama_sources[:2]],
        "num_r": 1,
        "layer_mask": [[[True, False, True, True], [True, True, False, False]]],
        "scaling_factors": [[[1.0, 1.0, 0.8, 1.2], [0.9, 1.1, 1.0, 1.0]]],
        "bias_factors": [[[0.0] * L, [0.0] * L]],
        "input_layer_model": 0,
        "output_layer_model": 1,
    }
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(doc))
    rec = recipe_from_legacy(**doc)  # add_last_layer defaults to True
    model, tok = dfs_excute_from_config(merge_config=str(path), output_path=str(tmp_path / "out"), device="cpu",
                                        dtype="float32")
    assert tok("the cat")["input_ids"] == [VOCAB["the"], VOCAB["cat"]]
    with torch.no_grad():
        got = model(input_ids=INPUT_IDS).logits.float()
    torch.testing.assert_close(got, reference_logits(rec, INPUT_IDS), atol=1e-4, rtol=1e-4)
    assert_matches_reference(tmp_path / "out", rec)

