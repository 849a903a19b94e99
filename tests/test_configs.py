"""Real configs read right (issue 8): sources compared by effective values, per-layer attention settings that
follow the hops however a source spells them, a classifier's pad token, and every spelling of a dtype.

Sources written by another transformers version are simulated by rewriting a tiny source's ``config.json`` the way
that version writes it (same weights). Numeric checks are against plain transformers on the source itself or
against the independent reference forward (tests/reference.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from conftest import INPUT_IDS, PAD_ID, PADDED_IDS, PADDED_MASK, VOCAB_SIZE, _randomize_, make_tiny_tokenizer
from dfsmerge import Sources, assemble, merge
from dfsmerge.space import parse_search
from dfsmerge.plan import dtype_name
from dfsmerge.recipe import Hop, Recipe, RecipeError, Source, Transform
from reference import reference_logits

BATCHES = [(INPUT_IDS, None), (PADDED_IDS, PADDED_MASK)]
# transformers 4 reads no rope_parameters (the 5.x spelling), so it cannot take the 5.x side of a pair
needs_5 = pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5, reason="5.x spelling needs transformers 5")


def respell(source: Path, target: Path, change) -> Path:
    """A copy of ``source`` whose config.json is ``change(config)`` (weights and tokenizer unchanged)."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(change(config), indent=2))
    return target


def as_4x(config: dict) -> dict:
    """The config as transformers 4.4x wrote it: top-level ``rope_theta`` (and ``rope_scaling`` with ``type``),
    ``torch_dtype``; no ``rope_parameters``, and ``head_dim`` / ``mlp_bias`` left out for their defaults."""
    rope = config["rope_parameters"]
    old = {k: v for k, v in config.items() if k not in ("rope_parameters", "head_dim", "mlp_bias", "dtype")}
    extra = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type")}
    return {**old, "rope_theta": rope["rope_theta"], "rope_scaling": {"type": rope["rope_type"], **extra} if extra
            else None, "torch_dtype": "float32", "transformers_version": "4.44.2"}


def spelled_4x(source: Path, target: Path) -> Path:
    return respell(source, target, as_4x)


def valid(logits, mask):
    """Only the positions of real tokens: what a pad query row computes is unspecified."""
    return logits if mask is None else logits[mask.bool()]


def logits_of(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


# ---------------------------------------------------------------------------------------- two spellings


@pytest.fixture(scope="module")
def linear_rope_source(tmp_path_factory, llama_sources) -> Path:
    """A Llama source (llama_sources[2]'s weights) with linear RoPE scaling, factor 4, spelled the 5.x way."""
    def linear(config):
        return {**config, "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}
    return respell(llama_sources[2], tmp_path_factory.mktemp("rope") / "linear", linear)


@needs_5
@pytest.mark.parametrize("which", ["plain", "linear_rope"])
def test_two_spellings_of_one_model_give_the_sources_logits(which, llama_sources, linear_rope_source, tmp_path):
    """Layers alternately from a 5.x-style folder and a 4.x-style copy of it (top-level rope_theta or 4.x
    rope_scaling, no head_dim, no mlp_bias): one architecture, so the merge is the source itself."""
    source = llama_sources[0] if which == "plain" else linear_rope_source
    old = spelled_4x(source, tmp_path / "old")
    raw = json.loads((old / "config.json").read_text())
    assert "rope_parameters" not in raw and "head_dim" not in raw and "rope_theta" in raw
    recipe = Recipe([Source(str(source)), Source(str(old))], [Hop(0, 0), Hop(1, 1), Hop(0, 2), Hop(1, 3)],
                    input_model=1, output_model=1).check()
    out = merge(recipe, tmp_path / "out", dtype="float32", quiet=True)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    for ids, mask in BATCHES:
        torch.testing.assert_close(valid(logits_of(model, ids, mask), mask), valid(logits_of(plain, ids, mask), mask),
                                   atol=1e-4, rtol=1e-4)


@needs_5
def test_two_spellings_of_two_models_match_the_reference(llama_sources, tmp_path):
    """A 5.x-style source and another source spelled the 4.x way, with scales: the reference's logits."""
    old = spelled_4x(llama_sources[1], tmp_path / "old")
    recipe = Recipe([Source(str(llama_sources[0])), Source(str(old))],
                    [Hop(0, 0), Hop(1, 1, Transform(0.8)), Hop(0, 2), Hop(1, 1, Transform(1.2)), Hop(1, 3)],
                    input_model=0, output_model=1).check()
    out = merge(recipe, tmp_path / "out", dtype="float32", quiet=True)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for ids, mask in BATCHES:
        torch.testing.assert_close(valid(logits_of(model, ids, mask), mask),
                                   valid(reference_logits(recipe, ids, mask), mask), atol=1e-4, rtol=1e-4)


@needs_5
@pytest.mark.parametrize("change, key", [
    (lambda c: {**c, "rope_theta": 500000.0}, "rope_parameters"),  # a different base, in the other spelling
    (lambda c: {**c, "rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_parameters"),
    (lambda c: {**c, "head_dim": 32}, "head_dim"),
])
def test_different_layers_in_another_spelling_are_still_refused(change, key, llama_sources, tmp_path):
    old = respell(spelled_4x(llama_sources[1], tmp_path / "old"), tmp_path / "changed", change)
    recipe = Recipe([Source(str(llama_sources[0])), Source(str(old))], [Hop(0, 0), Hop(1, 1)]).check()
    with pytest.raises(RecipeError, match=rf"models\[1\]: {key} = .* differs from models\[0\]"):
        merge(recipe, tmp_path / "out", dtype="float32", quiet=True)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------- Qwen2 windows

WINDOW, FULL_LAYERS = 4, 2  # layers 0, 1 full attention; 2, 3 a window of 4 (shorter than the test batches)


def qwen2_source(path: Path, seed: int, spelling: str) -> Path:
    """A windowed Qwen2 causal LM. ``spelling``: "4x" (``use_sliding_window`` and ``max_window_layers``, no
    ``layer_types``, as 4.x wrote it) or "5x" (``layer_types`` written out)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         use_sliding_window=True, sliding_window=WINDOW, max_window_layers=FULL_LAYERS,
                         pad_token_id=PAD_ID, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).eval()
    _randomize_(model, seed)
    model.save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    if spelling == "4x":
        raw = json.loads((path / "config.json").read_text())
        del raw["layer_types"]
        (path / "config.json").write_text(json.dumps(raw, indent=2))
    return path


@pytest.fixture(scope="module")
def qwen2_windowed(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("qwen2_windows")
    return [qwen2_source(folder / "a", 60, "4x"), qwen2_source(folder / "b", 61, "5x")]


def test_reference_applies_qwen2_windows_like_transformers(qwen2_windowed):
    """The reference reads the window rule from config.json by hand; on the source itself it must agree with
    transformers, and the windows must change the result (or this would test nothing)."""
    path = qwen2_windowed[0]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    identity = Recipe([Source(str(path))], [Hop(0, layer) for layer in range(4)]).check()
    for ids, mask in BATCHES:
        torch.testing.assert_close(valid(reference_logits(identity, ids, mask), mask),
                                   valid(logits_of(model, ids, mask), mask), atol=1e-5, rtol=1e-5)
    unwindowed = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, layer_types=["full_attention"] * 4)
    assert (logits_of(unwindowed, INPUT_IDS, None) - logits_of(model, INPUT_IDS, None)).abs().max() > 1e-2


def test_qwen2_windows_from_max_window_layers_follow_the_hops(qwen2_windowed, tmp_path):
    """Hops reorder layers of a source without layer_types (windows from max_window_layers) and of one with
    them: the output writes each hop's effective type and computes the reference's per-layer windows."""
    hops = [(0, 3), (1, 0), (0, 2), (1, 3), (0, 0), (1, 2), (0, 1)]
    recipe = Recipe([Source(str(p)) for p in qwen2_windowed],
                    [Hop(m, layer, Transform(0.9 if k % 2 else 1.0)) for k, (m, layer) in enumerate(hops)],
                    input_model=0, output_model=0).check()
    out = merge(recipe, tmp_path / "out", dtype="float32", quiet=True)
    written = json.loads((out / "config.json").read_text())["layer_types"]
    assert written == ["sliding_attention" if layer >= FULL_LAYERS else "full_attention" for _, layer in hops]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for ids, mask in BATCHES:
        torch.testing.assert_close(valid(logits_of(model, ids, mask), mask),
                                   valid(reference_logits(recipe, ids, mask), mask), atol=1e-4, rtol=1e-4)


def test_qwen2_disabled_windows_of_different_sizes_are_one_architecture(tmp_path):
    """``sliding_window`` differs but ``use_sliding_window`` is false in both (as in many Qwen2.5 configs):
    no layer slides, so the layers are interchangeable."""
    from dfsmerge.plan import make_plan

    base = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 64, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "use_sliding_window": False, "max_window_layers": 21}
    recipe = Recipe([Source("a"), Source("b")], [Hop(0, 0), Hop(1, 1)]).check()
    plan = make_plan(recipe, [{**base, "sliding_window": 32768}, {**base, "sliding_window": 131072}])
    assert plan.config["layer_types"] == ["full_attention", "full_attention"]


# ---------------------------------------------------------------------------------------- classifier pad


@pytest.mark.parametrize("spelling", ["null", "absent"])
@pytest.mark.parametrize("how", ["merge", "assemble"])
def test_classifier_with_a_causal_lm_input_runs_padded_batches(spelling, how, llama_sources, cls_llama_sources,
                                                               tmp_path):
    """The input model is a causal LM whose config has no pad token (``null`` as transformers 5 writes it, or
    no key); the classifier's pad token must stay, so a padded batch of several rows pools at the last real token."""
    def no_pad(config):
        return {k: v for k, v in config.items() if k != "pad_token_id"} if spelling == "absent" else \
            {**config, "pad_token_id": None}
    lm = respell(llama_sources[0], tmp_path / "lm", no_pad)
    recipe = Recipe([Source(str(lm)), Source(str(cls_llama_sources[0]))],
                    [Hop(0, 0), Hop(1, 1), Hop(0, 2), Hop(1, 3)], input_model=0, output_model=1).check()
    if how == "merge":
        out = merge(recipe, tmp_path / "out", dtype="float32", quiet=True)
        assert json.loads((out / "config.json").read_text())["pad_token_id"] == PAD_ID
        model = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    else:
        model, _ = assemble(recipe, sources=Sources(dtype="float32"))
    assert PADDED_IDS.shape[0] > 1 and (PADDED_IDS == PAD_ID).any()
    got = logits_of(model, PADDED_IDS, PADDED_MASK)
    torch.testing.assert_close(got, reference_logits(recipe, PADDED_IDS, PADDED_MASK), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------- dtypes


def test_every_spelling_of_a_dtype_is_one_dtype():
    for spelling in ("float32", "torch.float32", torch.float32):
        assert dtype_name(spelling) == "float32"
    assert dtype_name(torch.bfloat16) == "bfloat16"
    for bad in ("int8", torch.int8, "torch.", 32, None, "x" * 10_000):
        with pytest.raises(RecipeError, match="^dtype: expected bfloat16, float16 or float32") as err:
            dtype_name(bad)
        assert len(str(err.value)) < 200


def test_torch_dtypes_are_accepted_by_merge_assemble_and_search_files(llama_sources, tmp_path):
    recipe = Recipe([Source(str(llama_sources[0]))], [Hop(0, 0), Hop(0, 1)]).check()
    out = merge(recipe, tmp_path / "out", dtype=torch.bfloat16, quiet=True)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model, _ = assemble(recipe, dtype=torch.float32)
    assert model.dtype == torch.float32
    sources = Sources(dtype="torch.float32")
    assert sources.dtype == "float32"
    assemble(recipe, sources=sources, dtype=torch.float32)  # the same dtype, spelled differently: no error
    (tmp_path / "data.jsonl").write_text('{"text": "a b"}\n')
    doc = yaml.safe_load("models: [A, B]\ndtype: torch.float32\nevaluator: {type: loglik, data: data.jsonl}\n")
    assert parse_search(doc, tmp_path).dtype == "float32"
