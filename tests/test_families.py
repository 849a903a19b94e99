"""Families beyond Llama and Mistral through every path, against the independent reference (tests/reference.py):
Qwen2 (biases on q/k/v) and Qwen3 (per-head ``q_norm`` / ``k_norm``, which are layer tensors like any other).

Their sources mix full and sliding-window attention layers (explicit ``layer_types``, a window shorter than the
test batches), so every path must give each hop its source layer's mask: the flat merge, the in-memory model,
the compact format, flatten and the search.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import INPUT_IDS, PAD_ID, PADDED_IDS, PADDED_MASK, VOCAB_SIZE, _randomize_, make_tiny_tokenizer
from dfsmerge import Hop, Recipe, RecipeError, Source, Sources, Transform, assemble, flatten, merge
from reference import reference_logits

H = 64
LAYER_TYPES = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
WINDOW = 4  # shorter than the test batches, so a sliding layer run with a full mask (or the reverse) shows
BATCHES = [(INPUT_IDS, None), (PADDED_IDS, PADDED_MASK)]
FAMILY_NAMES = ["qwen2", "qwen3"]


def qwen_source(path, family: str, seed: int, window: bool = True, classification: bool = False):
    """A random Qwen2 / Qwen3 checkpoint (hidden 64, 4 layers; Qwen3 with head_dim 16) and the tiny tokenizer.
    With ``window``, layers 1 and 3 are sliding-window layers (``layer_types`` given explicitly)."""
    import transformers

    name = {"qwen2": "Qwen2", "qwen3": "Qwen3"}[family]
    kwargs = dict(vocab_size=VOCAB_SIZE, hidden_size=H, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, pad_token_id=PAD_ID, bos_token_id=2, eos_token_id=3,
                  use_sliding_window=window, sliding_window=WINDOW if window else None,
                  layer_types=LAYER_TYPES if window else ["full_attention"] * 4)
    if family == "qwen3":
        kwargs["head_dim"] = 16
    if classification:
        kwargs["num_labels"] = 3
    config = getattr(transformers, f"{name}Config")(**kwargs)
    cls = getattr(transformers, f"{name}ForSequenceClassification" if classification else f"{name}ForCausalLM")
    model = cls(config).eval()
    _randomize_(model, seed)
    model.save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def pair(family, tmp_path_factory) -> list:
    folder = tmp_path_factory.mktemp(family)
    return [qwen_source(folder / f"s{seed}", family, seed) for seed in (50, 51)]


@pytest.fixture(scope="module")
def sources() -> Sources:
    return Sources(dtype="float32")


def vec(seed: int) -> torch.Tensor:
    return 1.0 + 0.3 * torch.randn(H, generator=torch.Generator().manual_seed(seed))


def mat(seed: int) -> torch.Tensor:
    return torch.eye(H) + 0.3 * torch.randn(H, H, generator=torch.Generator().manual_seed(seed)) / H**0.5


def bias(seed: int) -> torch.Tensor:
    return 0.2 * torch.randn(H, generator=torch.Generator().manual_seed(seed))


def recipe(paths, hops, input_model=0, output_model=1) -> Recipe:
    """hops: (model, layer) or (model, layer, scale) or (model, layer, scale, bias)."""
    return Recipe([Source(str(p)) for p in paths], [Hop(h[0], h[1], Transform(*h[2:])) for h in hops],
                  input_model, output_model).check()


# A layer in three hops, both attention types, every kind of scale; the biased one only for what runs biases.
SCALES = [(0, 0, 1.1), (1, 1, vec(1)), (0, 0), (1, 3, mat(3)), (0, 1, 0.8), (0, 0, 0.9)]
BIASED = [(0, 0, vec(4), bias(4)), (1, 1, vec(1)), (0, 0, 1.0, 0.05), (1, 3, mat(3), bias(3)), (0, 1, 0.8)]


def hop_types(rec: Recipe) -> list[str]:
    return [LAYER_TYPES[h.layer] for h in rec.hops]


def assert_matches(model, rec: Recipe, classification: bool = False) -> None:
    """``model``'s logits are the reference's on a plain and a left-padded batch (real tokens only), at 1e-4."""
    for ids, mask in BATCHES:
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask).logits
        want = reference_logits(rec, ids, mask)
        if mask is not None and not classification:
            got, want = got[mask.bool()], want[mask.bool()]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {n: t for f in sorted(folder.glob("*.safetensors")) for n, t in load_file(f).items()}


# --------------------------------------------------------------------------------------------- the paths


def test_the_windows_matter(family, pair, tmp_path):
    """Guard: the same weights with full attention everywhere compute something else, so a hop given the wrong
    mask fails the tests below."""
    full = [qwen_source(tmp_path / f"f{seed}", family, seed, window=False) for seed in (50, 51)]
    diff = reference_logits(recipe(pair, SCALES), INPUT_IDS) - reference_logits(recipe(full, SCALES), INPUT_IDS)
    assert diff.abs().max() > 1e-2


def test_flat_merge(family, pair, tmp_path):
    from transformers import AutoModelForCausalLM

    rec = recipe(pair, SCALES)
    model = AutoModelForCausalLM.from_pretrained(merge(rec, tmp_path / "flat", dtype="float32", quiet=True),
                                                 dtype=torch.float32)
    assert type(model).__name__ == f"{family.capitalize()}ForCausalLM"
    assert model.config.num_hidden_layers == len(rec.hops) and model.config.layer_types == hop_types(rec)
    if family == "qwen3":
        assert model.model.layers[0].self_attn.q_norm.weight.shape == (16,)
    assert_matches(model, rec)


def test_flat_merge_refuses_a_bias(family, pair, tmp_path):
    """Neither family has an MLP bias to fold one into; the compact format and the in-memory model run it."""
    with pytest.raises(RecipeError, match="bias_factors"):
        merge(recipe(pair, BIASED), tmp_path / "flat", dtype="float32", quiet=True)


def test_in_memory(family, pair, sources):
    """The assembled model against the reference, with biases; cached generation equals uncached (one cache slot
    per hop, of its layer's kind)."""
    rec = recipe(pair, BIASED)
    model, tokenizer = assemble(rec, sources)
    assert type(model).__name__ == f"DFS{family.capitalize()}ForCausalLM" and tokenizer is not None
    assert model.config.layer_types == hop_types(rec) and len(model.model.dfs_layers) == 4
    assert_matches(model, rec)
    generate = dict(input_ids=PADDED_IDS, attention_mask=PADDED_MASK, max_new_tokens=6, do_sample=False,
                    pad_token_id=PAD_ID)
    cached = model.generate(**generate)
    assert torch.equal(cached, model.generate(**generate, use_cache=False))
    assert torch.equal(cached[:, PADDED_IDS.shape[1]], reference_logits(rec, PADDED_IDS, PADDED_MASK)[:, -1].argmax(-1))


def test_in_memory_classifier(family, tmp_path, sources):
    from transformers import AutoModelForSequenceClassification

    paths = [qwen_source(tmp_path / f"c{seed}", family, seed, classification=True) for seed in (52, 53)]
    rec = recipe(paths, [(0, 0, vec(6)), (1, 1, 0.8), (0, 1), (1, 3, mat(7))])
    model, _ = assemble(rec, sources)
    assert type(model).__name__ == f"DFS{family.capitalize()}ForSequenceClassification"
    assert_matches(model, rec, classification=True)
    flat = AutoModelForSequenceClassification.from_pretrained(merge(rec, tmp_path / "flat", dtype="float32",
                                                                    quiet=True), dtype=torch.float32)
    assert_matches(flat, rec, classification=True)


def test_compact(family, pair, tmp_path):
    from transformers import AutoModelForCausalLM

    rec = recipe(pair, BIASED)
    out = merge(rec, tmp_path / "compact", dtype="float32", quiet=True, format="compact")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == f"dfs_{family}" and config["layer_types"] == hop_types(rec)
    own = {"qwen2": "self_attn.q_proj.bias", "qwen3": "self_attn.k_norm.weight"}[family]
    assert f"model.dfs_layers.0.{own}" in tensors(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == f"DFS{family.capitalize()}ForCausalLM"
    assert_matches(model, rec)
    # the window a hop's attention passes on (flash attention reads it rather than the mask) is its layer's
    windows = [getattr(view, "hop", view).self_attn.sliding_window for view in model.model.layers]
    assert windows == [WINDOW if t == "sliding_attention" else None for t in hop_types(rec)]


def test_compact_then_flatten_equals_the_flat_merge(family, pair, tmp_path):
    rec = recipe(pair, SCALES)
    compact = merge(rec, tmp_path / "compact", dtype="float32", quiet=True, format="compact")
    flat, direct = flatten(compact, tmp_path / "flat", quiet=True), merge(rec, tmp_path / "direct", dtype="float32",
                                                                          quiet=True)
    a, b = tensors(flat), tensors(direct)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert json.loads((flat / "config.json").read_text()) == json.loads((direct / "config.json").read_text())


def test_search(family, pair, tmp_path):
    """A short search over both sources runs (candidates are in-memory models) and its best recipe is what the
    reference computes."""
    from dfsmerge.evolve import evolve
    from dfsmerge.space import load_search
    from dfsmerge.recipe import load_recipe

    # the tiny word-level tokenizer is not a Qwen tokenizer (transformers 5 loads Qwen2Tokenizer for these folders,
    # which reads every text as one unknown token), so the candidates are scored on token ids directly
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"ids": ids}) + "\n" for ids in INPUT_IDS.tolist()))
    (tmp_path / "on_ids.py").write_text(
        "import torch\n"
        "def score(model, tokenizer, examples):\n"
        "    ids = torch.tensor([e['ids'] for e in examples])\n"
        "    logits = model(input_ids=ids).logits[:, :-1].float()\n"
        "    return -torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item()\n")
    doc = {"models": [str(p) for p in pair], "num_r": 1, "dtype": "float32",
           "search": {"population": 4, "generations": 1, "seed": 0},
           "evaluator": {"python": "on_ids:score", "data": "data.jsonl", "validation": 0}}
    (tmp_path / "search.yml").write_text(yaml.safe_dump(doc))
    result = evolve(load_search(tmp_path / "search.yml"), tmp_path / "run", quiet=True)
    assert result.done == 2 + 4  # the two sources' baselines, then 4 searched trials
    best = load_recipe(tmp_path / "run" / "best_recipe_native.yml")
    model, _ = assemble(best, Sources(dtype="float32"))
    assert_matches(model, best)


# --------------------------------------------------------------------------------------------- the table


def test_dfs_class_names_in_the_table_match_modeling_dfs():
    """plan.compact_plan writes the DFS class names and auto_map from the family table (data), while
    modeling_dfs.py, which must import nothing of dfsmerge, defines the classes: the two must agree."""
    from dfsmerge.families import FAMILIES
    from dfsmerge.modeling_dfs import DFS_CLASSES

    assert sorted(DFS_CLASSES) == sorted(name for name, family in FAMILIES.items() if family.dfs)
    for name, (config_class, causal_lm, classifier) in DFS_CLASSES.items():
        family = FAMILIES[name]
        assert config_class.model_type == family.dfs_model_type
        assert [config_class.__name__, causal_lm.__name__, classifier.__name__] == \
            [family.dfs_class(k) for k in ("Config", "ForCausalLM", "ForSequenceClassification")]
        assert config_class.default_auto_map() == family.dfs_auto_map()


@pytest.mark.parametrize("family_name", FAMILY_NAMES)
def test_layer_tensors_are_the_models_own(family_name, tmp_path):
    """Family.layer_tensors, from the config alone, names exactly the tensors of a decoder layer of that family
    with their shapes (Qwen3's q_norm / k_norm included)."""
    from safetensors import safe_open

    from dfsmerge.families import FAMILIES

    path = qwen_source(tmp_path / "s", family_name, 0)
    config = json.loads((path / "config.json").read_text())
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        stored = {n.removeprefix("model.layers.1."): tuple(f.get_slice(n).get_shape()) for n in f.keys()
                  if n.startswith("model.layers.1.")}
    assert FAMILIES[family_name].layer_tensors(config) == stored
