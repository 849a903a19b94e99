"""The reference itself (tests/reference.py) against plain transformers: it needs no dfsmerge executor."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from conftest import INPUT_IDS, PADDED_IDS, PADDED_MASK
from dfsmerge.recipe import Hop, Recipe, Source, Transform
from reference import reference_logits

BATCHES = [(INPUT_IDS, None), (PADDED_IDS, PADDED_MASK)]


def identity_recipe(*paths, model=0, layers=4, input_model=0, output_model=0, classification=None):
    return Recipe([Source(str(p)) for p in paths], [Hop(model, l) for l in range(layers)],
                  input_model, output_model, classification)


def valid(logits, mask):
    """Only the positions of real tokens: what a pad query row computes is unspecified."""
    return logits if mask is None else logits[mask.bool()]


@pytest.mark.parametrize("which", ["llama", "tied", "mistral", "mistral_window"])
def test_identity_recipe_reproduces_the_source(which, request):
    path = {
        "llama": lambda: request.getfixturevalue("llama_sources")[0],
        "tied": lambda: request.getfixturevalue("tied_llama_source"),
        "mistral": lambda: request.getfixturevalue("mistral_sources")[0],
        "mistral_window": lambda: request.getfixturevalue("mistral_window_sources")[0],
    }[which]()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for ids, mask in BATCHES:
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask).logits
        got = reference_logits(identity_recipe(path), ids, mask)
        torch.testing.assert_close(valid(got, mask), valid(want, mask), atol=1e-5, rtol=1e-5)


def test_identity_recipe_reproduces_a_classifier(cls_llama_sources):
    path = cls_llama_sources[0]
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    for ids, mask in BATCHES:
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask).logits
        got = reference_logits(identity_recipe(path), ids, mask)
        assert got.shape == (ids.shape[0], 3)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sliding_window_matters(mistral_window_sources):
    """The window-4 sources are only a test of windows if the window changes the result."""
    path = mistral_window_sources[0]
    recipe = identity_recipe(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.config.sliding_window = None
    with torch.no_grad():
        unwindowed = model(input_ids=INPUT_IDS).logits
    assert (reference_logits(recipe, INPUT_IDS) - unwindowed).abs().max() > 1e-2


def test_transforms_agree_with_folding_them_into_the_weights(llama_sources):
    """T_0 folded into the embedding rows, T_{k+1} into hop k's down_proj (rows), as the semantics file says,
    computed with plain transformers on an edited copy of the source."""
    path = llama_sources[0]
    gen = torch.Generator().manual_seed(123)
    s0 = 1.0 + 0.3 * torch.randn(64, generator=gen)
    b0 = 0.2 * torch.randn(64, generator=gen)
    s2 = 0.5
    s3 = torch.eye(64) + 0.2 * torch.randn(64, 64, generator=gen) / 8
    hops = [Hop(0, 0, Transform(s0, b0)), Hop(0, 1), Hop(0, 2, Transform(s2)), Hop(0, 3, Transform(s3))]
    recipe = Recipe([Source(str(path))], hops)

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.copy_(emb * s0 + b0)
        down1 = model.model.layers[1].mlp.down_proj.weight
        down1.mul_(s2)
        down2 = model.model.layers[2].mlp.down_proj.weight
        down2.copy_(s3 @ down2)
        for ids, mask in BATCHES:
            want = model(input_ids=ids, attention_mask=mask).logits
            got = reference_logits(recipe, ids, mask)
            torch.testing.assert_close(valid(got, mask), valid(want, mask), atol=1e-4, rtol=1e-4)
    plain = reference_logits(identity_recipe(path), INPUT_IDS)
    assert (reference_logits(recipe, INPUT_IDS) - plain).abs().max() > 1e-1


def test_layers_embeddings_and_head_come_from_where_the_recipe_says(llama_sources):
    """Embeddings of model 1, layers of model 0, head of model 2 == model 0 with model 1's embedding and
    model 2's final norm and lm_head swapped in."""
    recipe = identity_recipe(*llama_sources, input_model=1, output_model=2)
    model = AutoModelForCausalLM.from_pretrained(llama_sources[0], dtype=torch.float32).eval()
    m1 = AutoModelForCausalLM.from_pretrained(llama_sources[1], dtype=torch.float32)
    m2 = AutoModelForCausalLM.from_pretrained(llama_sources[2], dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(m1.model.embed_tokens.weight)
        model.model.norm.weight.copy_(m2.model.norm.weight)
        model.lm_head.weight.copy_(m2.lm_head.weight)
        want = model(input_ids=INPUT_IDS).logits
    torch.testing.assert_close(reference_logits(recipe, INPUT_IDS), want, atol=1e-5, rtol=1e-5)


def test_repeated_and_reordered_hops_run_the_named_layers(llama_sources):
    """Hops (0,2),(0,2),(0,0) == a 3-layer model built from those layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = llama_sources[0]
    recipe = Recipe([Source(str(path))], [Hop(0, 2), Hop(0, 2), Hop(0, 0)])
    src = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = LlamaConfig.from_pretrained(path)
    config.num_hidden_layers = 3
    model = LlamaForCausalLM(config).eval()
    state = {k: v for k, v in src.state_dict().items() if ".layers." not in k}
    for new, old in enumerate([2, 2, 0]):
        prefix = f"model.layers.{old}."
        state.update({k.replace(prefix, f"model.layers.{new}."): v.clone()
                      for k, v in src.state_dict().items() if k.startswith(prefix)})
    model.load_state_dict(state)
    with torch.no_grad():
        want = model(input_ids=INPUT_IDS).logits
    torch.testing.assert_close(reference_logits(recipe, INPUT_IDS), want, atol=1e-5, rtol=1e-5)
