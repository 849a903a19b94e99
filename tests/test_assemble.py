"""The in-memory DFS model (``dfsmerge.assemble``) against the independent reference and the flat merge.

Every case checks three things computed three ways: the assembled model's logits, the reference's
(tests/reference.py) and those of the flat folder ``merge`` writes, loaded with plain transformers. Then what only
the in-memory model has to get right: zero copy, one KV-cache slot per hop, reuse of loaded sources.
"""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaForCausalLM

from conftest import INPUT_IDS, PAD_ID, PADDED_IDS, PADDED_MASK, VOCAB
from dfsmerge import RecipeError, Sources, assemble
from dfsmerge.merge import merge
from dfsmerge.modeling_dfs import DFSLlamaForCausalLM
from dfsmerge.recipe import Hop, Recipe, Source, Transform
from reference import reference_logits

H = 64
BATCHES = [(INPUT_IDS, None), (PADDED_IDS, PADDED_MASK)]


def vec(seed: int) -> torch.Tensor:
    return 1.0 + 0.3 * torch.randn(H, generator=torch.Generator().manual_seed(seed))


def bias(seed: int) -> torch.Tensor:
    return 0.2 * torch.randn(H, generator=torch.Generator().manual_seed(seed))


def mat(seed: int) -> torch.Tensor:
    return torch.eye(H) + 0.3 * torch.randn(H, H, generator=torch.Generator().manual_seed(seed)) / H**0.5


def recipe(paths, hops, input_model=0, output_model=0) -> Recipe:
    """hops: (model, layer) or (model, layer, scale) or (model, layer, scale, bias)."""
    return Recipe([Source(str(p)) for p in paths], [Hop(h[0], h[1], Transform(*h[2:])) for h in hops],
                  input_model, output_model).check()


@pytest.fixture(scope="module")
def sources() -> Sources:
    return Sources(dtype="float32")


def logits(model, ids, mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def assert_matches(model, rec: Recipe, classification: bool = False) -> None:
    """``model``'s logits are the reference's, on a plain and on a left-padded batch (real tokens only)."""
    for ids, mask in BATCHES:
        got, want = logits(model, ids, mask), reference_logits(rec, ids, mask)
        if mask is not None and not classification:
            got, want = got[mask.bool()], want[mask.bool()]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


CASES = {
    "repeated layer": lambda s: recipe(s["llama"][:1], [(0, 0), (0, 1, 0.8), (0, 1, 1.2), (0, 1, vec(1)), (0, 3, 0.6)]),
    "scalar": lambda s: recipe(s["llama"][:2], [(0, 0, 1.3), (1, 1, 0.7), (0, 2, 1.1), (1, 3, 0.9)]),
    "affine": lambda s: recipe(s["llama"][:2], [(0, 0, mat(1), bias(1)), (1, 1, mat(2), bias(2)), (0, 1, vec(3), 0.1),
                                                (1, 1, mat(4)), (1, 3)]),
    "three models": lambda s: recipe(s["llama"], [(0, 0), (1, 0, 0.9), (2, 1, vec(1)), (0, 2, mat(2)), (1, 3, 1.1),
                                                  (2, 3, vec(3))], input_model=2, output_model=1),
    "mistral": lambda s: recipe(s["mistral"], [(0, 0, vec(1)), (1, 1, 0.8), (0, 2, mat(2)), (1, 2, vec(3)), (1, 2)],
                                input_model=1),
    "sliding window": lambda s: recipe(s["window"], [(0, 0), (1, 1, 0.9), (1, 1), (0, 2), (1, 3, vec(4))]),
    "tied, T_0 on the embeddings": lambda s: recipe([s["tied"]], [(0, 0, vec(9), bias(9)), (0, 1), (0, 1, 0.8),
                                                                  (0, 3)]),
}


@pytest.fixture(scope="module")
def paths(llama_sources, mistral_sources, mistral_window_sources, tied_llama_source):
    return {"llama": llama_sources, "mistral": mistral_sources, "window": mistral_window_sources,
            "tied": tied_llama_source}


@pytest.mark.parametrize("case", CASES)
def test_assembled_equals_reference_and_flat_merge(case, paths, sources, tmp_path):
    rec = CASES[case](paths)
    model, tokenizer = assemble(rec, sources)
    assert len(model.model.layers) == len(rec.hops) == model.config.num_hidden_layers
    assert len(model.model.dfs_layers) == len(rec.used_layers())
    assert tokenizer("the cat")["input_ids"] == [VOCAB["the"], VOCAB["cat"]]
    assert_matches(model, rec)
    if case.startswith("tied"):  # T_0 runs at run time: the head can stay the (untransformed) embedding table
        assert model.lm_head.weight is model.model.embed_tokens.weight
    flat = AutoModelForCausalLM.from_pretrained(merge(rec, tmp_path / "flat", dtype="float32", quiet=True),
                                                dtype=torch.float32)
    assert not type(flat).__name__.startswith("DFS")
    for ids, mask in BATCHES:
        torch.testing.assert_close(logits(model, ids, mask), logits(flat, ids, mask), atol=1e-4, rtol=1e-4)


def test_is_a_model_of_the_output_family(llama_sources, sources):
    model, _ = assemble(recipe(llama_sources[:2], [(0, 0), (1, 1)]), sources)
    assert isinstance(model, LlamaForCausalLM) and isinstance(model, DFSLlamaForCausalLM)
    assert model.config.model_type == "dfs_llama"


def test_mistral_with_a_bias(mistral_sources, sources, tmp_path):
    """Mistral has no MLP bias; the in-memory model applies it at run time, and its flat save writes a Llama model
    (the same layers when there is no sliding window), as the flat merge does."""
    rec = recipe(mistral_sources, [(0, 0), (1, 1, vec(1), bias(1)), (0, 3, 0.9, 0.05)])
    model, _ = assemble(rec, sources)
    assert_matches(model, rec)
    model.save_pretrained(tmp_path / "flat")
    flat = AutoModelForCausalLM.from_pretrained(tmp_path / "flat", dtype=torch.float32)
    assert type(flat).__name__ == "LlamaForCausalLM" and flat.config.mlp_bias
    assert_matches(flat, rec)


def test_sequence_classification(cls_llama_sources, sources, tmp_path):
    rec = recipe(cls_llama_sources, [(0, 0, vec(1)), (1, 1, 0.8), (0, 2, mat(2), bias(2)), (1, 3)], output_model=1)
    model, _ = assemble(rec, sources)
    assert type(model).__name__ == "DFSLlamaForSequenceClassification"
    assert_matches(model, rec, classification=True)
    labels = torch.tensor([0, 2, 1])
    loss = model(input_ids=PADDED_IDS, attention_mask=PADDED_MASK, labels=labels).loss
    want = torch.nn.functional.cross_entropy(reference_logits(rec, PADDED_IDS, PADDED_MASK), labels)
    torch.testing.assert_close(loss, want, atol=1e-4, rtol=1e-4)
    flat_path = merge(rec, tmp_path / "flat", dtype="float32", quiet=True)
    flat = AutoModelForSequenceClassification.from_pretrained(flat_path, dtype=torch.float32)
    torch.testing.assert_close(logits(model, PADDED_IDS, PADDED_MASK), logits(flat, PADDED_IDS, PADDED_MASK),
                               atol=1e-4, rtol=1e-4)


def test_labels_loss(llama_sources, sources):
    rec = recipe(llama_sources[:2], [(0, 0), (1, 1, 0.8), (1, 1, 1.1), (0, 3)])
    model, _ = assemble(rec, sources)
    loss = model(input_ids=INPUT_IDS, labels=INPUT_IDS).loss
    want = reference_logits(rec, INPUT_IDS)[:, :-1].flatten(0, 1)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(want, INPUT_IDS[:, 1:].reshape(-1)),
                               atol=1e-4, rtol=1e-4)
    loss.backward()  # the transforms are parameters too
    assert model.model.dfs_transforms["1"].scale.grad is not None


# --------------------------------------------------------------------------------------------- zero copy


def _storages(tensors) -> dict[int, int]:
    """data_ptr -> bytes of every distinct storage behind ``tensors``."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def test_zero_copy(llama_sources, sources):
    """The storage an assembled model holds is the used source layers, the embeddings, the final norm and the
    head, each once, plus its own small transforms: a layer in three hops is not copied."""
    rec = recipe(llama_sources[:2], [(0, 0), (0, 1, 0.8), (0, 1, vec(1)), (0, 1, 1.2), (1, 2, 0.9), (0, 1)],
                 input_model=1, output_model=0)
    model, _ = assemble(rec, sources)
    held = _storages([*model.parameters(), *model.buffers()])
    first, last = sources.model(rec.sources[1]), sources.model(rec.sources[0])
    expected = _storages([p for m, layer in rec.used_layers()
                          for p in sources.model(rec.sources[m]).model.layers[layer].parameters()])
    expected |= _storages([first.model.embed_tokens.weight, last.model.norm.weight, last.lm_head.weight,
                           *last.model.rotary_emb.buffers()])
    transforms = _storages(model.model.dfs_transforms.parameters())
    assert held == expected | transforms
    assert sum(transforms.values()) == (3 + H) * 4  # three scalars and a vector, float32
    rotary = len(list(last.model.rotary_emb.buffers()))  # inv_freq; transformers 5 adds original_inv_freq
    assert len(expected) == 3 * 9 + 3 + rotary  # 3 distinct layers of 9 tensors; embed, norm, head; rotary
    again, _ = assemble(rec, sources)  # a second candidate holds the same storage again, nothing new
    assert _storages([*again.parameters(), *again.buffers()]).keys() - expected.keys() == \
        _storages(again.model.dfs_transforms.parameters()).keys()


def test_candidates_do_not_share_module_state(llama_sources, sources):
    """Hooks and modes set on one candidate reach neither the sources nor another candidate."""
    rec = recipe(llama_sources[:1], [(0, 0), (0, 1, 0.8), (0, 1)])
    one, _ = assemble(rec, sources)
    two, _ = assemble(rec, sources)
    one.model.dfs_layers[1].register_forward_hook(lambda *args: None)
    one.train()
    assert one.model.layers[2].training and one.model.layers[2].self_attn.training
    assert not two.training and not two.model.layers[2].training
    assert not sources.model(rec.sources[0]).training
    assert not two.model.dfs_layers[1]._forward_hooks
    assert not sources.model(rec.sources[0]).model.layers[1]._forward_hooks
    out = one(input_ids=INPUT_IDS, output_hidden_states=True)  # hooks on a stored layer see every hop it runs in
    assert len(out.hidden_states) == len(rec.hops) + 1


def test_sources_that_recorded_their_outputs_still_assemble(llama_sources):
    """transformers 4.x records ``output_hidden_states`` by patching the layers' ``forward`` for the call and leaves
    a ``forward`` bound to each layer behind: a hop view copied from such a layer must still run itself."""
    sources = Sources(dtype="float32")
    rec = recipe(llama_sources[:1], [(0, 0), (0, 1, 0.8), (0, 1, vec(1)), (0, 3)])
    source = sources.model(rec.sources[0])
    with torch.no_grad():
        assert len(source(input_ids=INPUT_IDS, output_hidden_states=True).hidden_states) == 5
    model, _ = assemble(rec, sources)
    assert_matches(model, rec)
    with torch.no_grad():
        assert len(model(input_ids=INPUT_IDS, output_hidden_states=True).hidden_states) == len(rec.hops) + 1
    model.model.link_hops()  # after its own recorded call
    assert_matches(model, rec)


# --------------------------------------------------------------------------------------------- KV cache


def _generate(model, ids, mask, use_cache: bool) -> torch.Tensor:
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                          use_cache=use_cache, pad_token_id=PAD_ID)


@pytest.mark.parametrize("padded", [False, True], ids=["no padding", "left padding"])
def test_cache_consistency_with_repeated_layers(padded, llama_sources, sources):
    rec = recipe(llama_sources[:2], [(0, 0), (0, 1, 0.9), (1, 2), (0, 1, vec(2)), (1, 2, 1.1), (0, 1), (0, 3)])
    model, _ = assemble(rec, sources)
    ids, mask = (PADDED_IDS, PADDED_MASK) if padded else (INPUT_IDS, None)
    cached = _generate(model, ids, mask, use_cache=True)
    assert torch.equal(cached, _generate(model, ids, mask, use_cache=False))
    # the first new token is the reference's greedy choice
    last = reference_logits(rec, ids, mask)[:, -1].argmax(-1)
    assert torch.equal(cached[:, ids.shape[1]], last)
    # and the check has teeth: hops sharing their layer's cache slot generate something else
    for view, (u, _, _) in zip(model.model.layers, model.config.dfs_hops):
        getattr(view, "hop", view).self_attn.layer_idx = u
    try:
        broken = _generate(model, ids, mask, use_cache=True)
    except RuntimeError:  # with a mask, the doubled keys of a shared slot may not even fit it
        broken = None
    assert broken is None or not torch.equal(broken, cached)


# --------------------------------------------------------------------------------------------- sources, API


def test_sources_are_loaded_once(llama_sources, monkeypatch):
    sources = Sources(llama_sources[:2], dtype="float32")
    first = recipe(llama_sources[:2], [(0, 0), (1, 1, 0.5), (0, 3)])
    assemble(first, sources)

    def no_io(*args, **kwargs):
        raise AssertionError("a source was read again")

    module = sys.modules["dfsmerge.assemble"]  # the package's `assemble` attribute is the function
    monkeypatch.setattr(module, "open_checkpoint", no_io)
    monkeypatch.setattr(module, "read_config", no_io)
    model, _ = assemble(recipe(llama_sources[:2], [(1, 0), (0, 2, 1.2), (1, 1), (1, 1)]), sources)
    assert len(model.model.layers) == 4


def test_recipe_is_validated_before_loading(llama_sources):
    sources = Sources(dtype="float32")
    with pytest.raises(RecipeError, match="layer 7 of models\\[0\\]"):
        assemble(recipe(llama_sources[:1], [(0, 0), (0, 7)]), sources)
    assert not sources._loaded


def test_sources_settings_must_agree(llama_sources):
    with pytest.raises(RecipeError, match="dtype"):
        assemble(recipe(llama_sources[:1], [(0, 0)]), Sources(dtype="float32"), dtype="bfloat16")


def test_legacy_api_returns_the_assembled_model(llama_sources):
    from dfsmerge import dfs_execute_from_config

    doc = {"model_paths": [[str(p), None] for p in llama_sources[:2]], "num_r": 1,
           "layer_mask": [[[True, False, True, True], [True, True, False, False]]],
           "scaling_factors": [[[1.0, 1.0, 0.8, 1.2], [0.9, 1.1, 1.0, 1.0]]], "output_layer_model": 1}
    model, tokenizer = dfs_execute_from_config(doc, dtype="float32")
    assert isinstance(model, DFSLlamaForCausalLM) and tokenizer is not None
    from dfsmerge.recipe import parse_recipe

    assert_matches(model, parse_recipe(doc))


def test_default_dtype_is_bfloat16(llama_sources):
    model, _ = assemble(recipe(llama_sources[:1], [(0, 0), (0, 1, 0.8)]))
    assert model.dtype == torch.bfloat16
    assert model.model.dfs_transforms["1"].scale.dtype == torch.bfloat16
    err = (logits(model, INPUT_IDS).float() - reference_logits(recipe(llama_sources[:1], [(0, 0), (0, 1, 0.8)]),
                                                                INPUT_IDS)).abs().max()
    assert err < 0.1, err


# --------------------------------------------------------------------------------------------- devices


def test_device_errors_are_clear():
    for bad, message in [("gpu", "expected cpu, cuda, cuda:N"), ([], "empty list"), (["cpu", "tpu:0"], "'tpu:0'"),
                         (f"cuda:{torch.cuda.device_count()}", "is not on this machine")]:
        with pytest.raises(RecipeError, match=f"^device: .*{message}"):
            Sources(device=bad)
    expected = [torch.device("cuda", i) for i in range(torch.cuda.device_count())] or [torch.device("cpu")]
    assert Sources(device="auto").devices == expected


def test_sources_take_the_devices_in_turn(llama_sources):
    """A device list places the sources round robin; a candidate over them equals the reference."""
    held = Sources(dtype="float32", device=["cpu", "cpu"])
    rec = recipe(llama_sources[:2], [(0, 0), (1, 1, vec(1)), (0, 2, 0.9), (1, 3)], output_model=1)
    model, _ = assemble(rec, held)
    assert held.devices == [torch.device("cpu")] * 2
    assert_matches(model, rec)


def test_placement_over_two_devices(llama_sources):
    """Source 1 on the meta device (shapes, no data) shows where each part of a candidate lives and that a hop
    whose layer is on another device than its input moves the input there. A full forward ending on the meta
    device is not possible: the rotary embedding comes from the output model, and nothing leaves the meta device."""
    held = Sources(dtype="float32", device=["cpu", "meta"])
    rec = recipe(llama_sources[:2], [(0, 0, 0.5), (0, 1, vec(1)), (1, 2, 0.9), (1, 1, mat(2), bias(2)),
                                      (0, 3, 1.1)], input_model=0, output_model=1)
    model, _ = assemble(rec, held)
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert held.model(rec.sources[0]).device == cpu and held.model(rec.sources[1]).device == meta
    decoder = model.model
    assert decoder.embed_tokens.weight.device == cpu
    assert decoder.norm.weight.device == model.lm_head.weight.device == meta
    assert [next(decoder.dfs_layers[u].parameters()).device for u, _, _ in model.config.dfs_hops] == \
        [cpu, cpu, meta, meta, cpu]
    # T_0 acts on the embeddings (cpu); T_{k+1} on hop k's MLP output, on hop k's layer's device
    assert {k: t.scale.device for k, t in decoder.dfs_transforms.items()} == \
        {"0": cpu, "1": cpu, "2": cpu, "3": meta, "4": meta}
    hidden = torch.randn(2, 5, H)
    cos_sin = tuple(torch.ones(2, 5, H // 4) for _ in range(2))
    with torch.no_grad():
        out = decoder.layers[2](hidden, attention_mask=None, position_embeddings=cos_sin)
    assert out.device == meta and out.shape == hidden.shape
    assert decoder.norm(hidden).device == meta  # the last hop's output goes to the head's device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_candidate_over_cpu_and_cuda_equals_reference(llama_sources):
    held = Sources(dtype="float32", device=["cpu", "cuda:0"])
    rec = recipe(llama_sources[:2], [(0, 0, vec(1)), (1, 1, 0.8), (0, 2, mat(2), bias(2)), (1, 3), (0, 3)],
                 input_model=0, output_model=1)
    model, _ = assemble(rec, held)
    for ids, mask in BATCHES:
        got = logits(model, ids, mask).cpu()
        want = reference_logits(rec, ids, mask)
        if mask is not None:
            got, want = got[mask.bool()], want[mask.bool()]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    cached = _generate(model, PADDED_IDS, PADDED_MASK, use_cache=True)
    assert torch.equal(cached, _generate(model, PADDED_IDS, PADDED_MASK, use_cache=False))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_loaded_source_equals_transformers_own_loading(llama_sources, tied_llama_source, dtype):
    """Sources reads tensor by tensor onto a model built on the meta device: the result is what transformers'
    ``from_pretrained`` gives, parameters and buffers (the rotary frequencies), bit for bit; a tied head stays
    tied."""
    held = Sources(dtype=dtype)
    for path in (llama_sources[0], tied_llama_source):
        got = held.model(str(path))
        want = LlamaForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        for (name, a), (_, b) in zip([*got.named_parameters(), *got.named_buffers()],
                                     [*want.named_parameters(), *want.named_buffers()], strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), name
        assert not got.training and got.dtype == getattr(torch, dtype)
    tied = held.model(str(tied_llama_source))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def test_missing_tensor_is_named(llama_sources, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for file in llama_sources[0].iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RecipeError, match="tensor 'model.layers.2.mlp.up_proj.weight' is missing"):
        Sources(dtype="float32").model(str(broken))


def test_checkpoint_get_as_reads_converted_tensors_from_the_file(llama_sources, sharded_bf16_llama_source,
                                                                  monkeypatch):
    """``get_as`` is ``get(name).to(device, dtype)``, bit for bit: the zero-copy view when nothing changes, and
    otherwise a new tensor read from the file in pieces (made small here, so that tensors span several)."""
    from dfsmerge.sources import open_checkpoint, read_config

    module = sys.modules["dfsmerge.sources"]
    monkeypatch.setattr(module, "_READ_PIECE_BYTES", 1000)
    for path in (llama_sources[0], sharded_bf16_llama_source):
        source = Source(str(path))
        checkpoint = open_checkpoint(source, read_config(source))
        for name in checkpoint.names():
            view = checkpoint.get(name)
            for dtype in (torch.bfloat16, torch.float32, torch.float16):
                got = checkpoint.get_as(name, dtype)
                assert got.dtype == dtype and torch.equal(got, view.to(dtype)), (path.name, name, dtype)
                if dtype == view.dtype:
                    assert got.data_ptr() == view.data_ptr()  # the same mapped bytes, not a copy
                else:
                    assert checkpoint.stored(name) is not None and got.data_ptr() != view.data_ptr()
