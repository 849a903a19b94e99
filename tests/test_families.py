"""Families beyond Llama and Mistral that the family table covers: Qwen2 (attention q/k/v biases)."""

import torch

from conftest import INPUT_IDS, _randomize_, make_tiny_tokenizer, VOCAB_SIZE
from dfsmerge import Hop, Recipe, Source, Transform, merge
from reference import reference_logits


def _qwen2_source(path, seed):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).eval()
    _randomize_(model, seed)
    model.save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


def test_qwen2_merge_matches_reference(tmp_path):
    from transformers import AutoModelForCausalLM

    paths = [_qwen2_source(tmp_path / f"q{s}", s) for s in (50, 51)]
    recipe = Recipe([Source(str(p)) for p in paths],
                    [Hop(0, 0, Transform(1.1)), Hop(1, 1, Transform(torch.linspace(0.5, 1.5, 64))), Hop(0, 0),
                     Hop(1, 3, Transform(0.8))], input_model=0, output_model=1).check()
    out = merge(recipe, tmp_path / "out", dtype="float32", quiet=True)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.num_hidden_layers == 4
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(model(INPUT_IDS).logits, reference_logits(recipe, INPUT_IDS), atol=1e-4, rtol=1e-4)


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
