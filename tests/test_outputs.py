"""What other tools read from an output folder (issue 12): a tokenizer configuration that transformers 4.x and 5.x
both load (llama.cpp's converter pins 4.57; transformers 5 writes ``TokenizersBackend``, which 4.x does not know),
and the model card metadata hubs and converters read (``base_model``, ``base_model_relation``, ``tags``,
``library_name``, ``pipeline_tag``).

Set ``DFSMERGE_TF4_PYTHON`` to the interpreter of a transformers 4.x environment to also load the written
tokenizer with 4.x."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from huggingface_hub.repocard import metadata_load

from conftest import VOCAB
from dfsmerge import Hop, Recipe, Source, Transform, flatten, merge
from dfsmerge.writer import CARD_TAGS, TOKENIZER_CLASSES_BOTH_READ, hub_ids, portable_tokenizer_config
from test_merge_io import _populate_hub_cache

TEXT = "the cat is on the red stone"
TEXT_IDS = [VOCAB[word] for word in TEXT.split()]  # conftest's word-level tokenizer: one id per word


def _recipe(paths, input_model=0):
    return Recipe([Source(str(p)) for p in paths], [Hop(0, 0), Hop(1, 2, Transform(0.8)), Hop(0, 3)],
                  input_model=input_model).check()


def test_tokenizer_classes_both_read_are_fast_tokenizers_in_this_transformers():
    """Each listed name resolves, in the order AutoTokenizer tries names (4.x: ``<name>Fast`` first), to a
    tokenizer over ``tokenizer.json``. The suite runs under transformers 4.x and 5.x, so this checks both."""
    from transformers import PreTrainedTokenizerFast
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    for name in sorted(TOKENIZER_CLASSES_BOTH_READ):
        candidates = [name] if name.endswith("Fast") else [f"{name}Fast", name]
        cls = next(c for c in map(tokenizer_class_from_name, candidates) if c is not None)
        assert isinstance(cls, type) and issubclass(cls, PreTrainedTokenizerFast), (name, cls)


def test_portable_tokenizer_config_rule():
    files = {"tokenizer.json", "tokenizer_config.json"}
    written_by_5 = {"tokenizer_class": "TokenizersBackend", "backend": "tokenizers", "bos_token": "<s>"}
    assert portable_tokenizer_config(written_by_5, files) == {**written_by_5,
                                                             "tokenizer_class": "PreTrainedTokenizerFast"}
    assert portable_tokenizer_config({"tokenizer_class": "LlamaTokenizerFast"}, files) == \
        {"tokenizer_class": "LlamaTokenizerFast"}
    # without a tokenizer.json there is no fast tokenizer to name: the class stays
    assert portable_tokenizer_config(written_by_5, {"tokenizer.model"}) == written_by_5


_LOAD_TOKENIZER = """
import sys, transformers
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
print(transformers.__version__, type(tok).__name__, tok(sys.argv[2], add_special_tokens=False).input_ids)
"""


def test_merged_tokenizer_loads_with_transformers_4_and_5(llama_sources, tmp_path):
    from transformers import AutoTokenizer

    source_class = json.loads((llama_sources[1] / "tokenizer_config.json").read_text())["tokenizer_class"]
    out = merge(_recipe(llama_sources[:2], input_model=1), tmp_path / "out", quiet=True, dtype="float32")
    written = json.loads((out / "tokenizer_config.json").read_text())
    assert written["tokenizer_class"] in TOKENIZER_CLASSES_BOTH_READ
    if source_class in TOKENIZER_CLASSES_BOTH_READ:
        assert written["tokenizer_class"] == source_class
    assert (out / "tokenizer.json").read_bytes() == (llama_sources[1] / "tokenizer.json").read_bytes()
    ids = TEXT_IDS
    assert AutoTokenizer.from_pretrained(out)(TEXT, add_special_tokens=False).input_ids == ids
    tf4 = os.environ.get("DFSMERGE_TF4_PYTHON")
    if tf4:
        result = subprocess.run([tf4, "-c", _LOAD_TOKENIZER, str(out), TEXT], capture_output=True, text=True,
                                timeout=600, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        version, _, got = result.stdout.strip().split(" ", 2)
        assert version.startswith("4.") and json.loads(got) == ids, result.stdout


def test_hub_ids_are_the_sources_not_found_locally(llama_sources, tmp_path):
    local = str(llama_sources[0])
    (tmp_path / "model-a").mkdir()
    sources = [Source("org/model"), Source(local), Source("./x/y"), Source("org/model", "v2"), Source("gpt2"),
               Source(str(tmp_path / "m.gguf")), Source("a/b/c")]
    assert hub_ids(sources) == ["org/model", "gpt2"]
    os.chdir(tmp_path)  # a relative local folder is a path, not a hub ID
    assert hub_ids([Source("model-a")]) == []


def test_model_card_metadata_for_local_sources(llama_sources, cls_llama_sources, tmp_path):
    out = merge(_recipe(llama_sources[:2]), tmp_path / "out", quiet=True, dtype="float32")
    meta = metadata_load(out / "README.md")
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert set(CARD_TAGS) <= set(meta["tags"]) and "merge" in meta["tags"]
    assert "base_model" not in meta and "base_model_relation" not in meta  # local folders are no hub models
    assert str(llama_sources[1]) in (out / "README.md").read_text()
    cls = merge(_recipe(cls_llama_sources), tmp_path / "cls", quiet=True, dtype="float32")
    assert metadata_load(cls / "README.md")["pipeline_tag"] == "text-classification"


def test_model_card_names_hub_sources_as_base_models_and_flatten_keeps_them(llama_sources, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    _populate_hub_cache(cache, "org/tiny-a", llama_sources[0], "a" * 40)
    _populate_hub_cache(cache, "org/tiny-b", llama_sources[1], "b" * 40)
    recipe = Recipe([Source("org/tiny-a"), Source("org/tiny-b", "v1"), Source(str(llama_sources[2]))],
                    [Hop(0, 0), Hop(1, 2, Transform(0.8)), Hop(2, 1), Hop(0, 3)]).check()
    for fmt in ("flat", "compact"):
        out = merge(recipe, tmp_path / fmt, quiet=True, dtype="float32", cache_dir=str(cache), format=fmt)
        meta = metadata_load(out / "README.md")
        assert meta["base_model"] == ["org/tiny-a", "org/tiny-b"] and meta["base_model_relation"] == "merge"
    flat = flatten(tmp_path / "compact", tmp_path / "flattened", quiet=True)
    assert metadata_load(flat / "README.md")["base_model"] == ["org/tiny-a", "org/tiny-b"]
    # a compact checkpoint on the hub without our card: the flat folder derives from it, a conversion
    _populate_hub_cache(cache, "org/compact", tmp_path / "compact", "c" * 40)
    (cache / "models--org--compact" / "snapshots" / ("c" * 40) / "README.md").unlink()
    flat = flatten("org/compact", tmp_path / "from_hub", quiet=True, cache_dir=str(cache))
    meta = metadata_load(flat / "README.md")
    assert meta["base_model"] == ["org/compact"] and "base_model_relation" not in meta
