"""What dfsmerge knows about model families, as data: one table, one entry per ``model_type``.

Adding a family whose decoder layer is the usual pre-norm ``x + A(x)``, ``x + F(x)`` with the usual tensor
names (Qwen2 is one) is one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .recipe import RecipeError

__all__ = ["Family", "FAMILIES", "family_of", "SHAPE_KEYS"]


@dataclass(frozen=True)
class Family:
    """Names and rules of one family of decoder-only models."""

    model_type: str
    causal_lm: str  # architecture name written into config.json
    classifier: str
    mlp_bias_key: str | None = None  # config key that gives every MLP projection a bias (None: impossible)
    attention_bias: tuple[str, ...] = ()  # attention projections that always carry a bias
    per_layer_keys: tuple[str, ...] = ()  # config lists indexed by layer, which must follow each hop

    # tensor names; `{i}` is the layer index
    embed: str = "model.embed_tokens.weight"
    norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    score: str = "score.weight"
    layer_prefix: str = "model.layers.{i}."
    down_proj: str = "mlp.down_proj"

    def layer_tensors(self, config: dict) -> dict[str, tuple[int, ...]]:
        """Suffix -> shape of every tensor of one decoder layer, from the config alone."""
        h, inter = config["hidden_size"], config["intermediate_size"]
        heads = config["num_attention_heads"]
        kv = config.get("num_key_value_heads") or heads
        hd = config.get("head_dim") or h // heads
        shapes: dict[str, tuple[int, ...]] = {
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (heads * hd, h),
            "self_attn.k_proj.weight": (kv * hd, h),
            "self_attn.v_proj.weight": (kv * hd, h),
            "self_attn.o_proj.weight": (h, heads * hd),
            "mlp.gate_proj.weight": (inter, h),
            "mlp.up_proj.weight": (inter, h),
            "mlp.down_proj.weight": (h, inter),
        }
        attn_bias = list(self.attention_bias) if not config.get("attention_bias") else ["q_proj", "k_proj",
                                                                                        "v_proj", "o_proj"]
        for proj in attn_bias:
            shapes[f"self_attn.{proj}.bias"] = (shapes[f"self_attn.{proj}.weight"][0],)
        if self.mlp_bias_key and config.get(self.mlp_bias_key):
            shapes.update({"mlp.gate_proj.bias": (inter,), "mlp.up_proj.bias": (inter,), "mlp.down_proj.bias": (h,)})
        return shapes


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "LlamaForCausalLM", "LlamaForSequenceClassification", mlp_bias_key="mlp_bias"),
        Family("mistral", "MistralForCausalLM", "MistralForSequenceClassification"),
        Family("qwen2", "Qwen2ForCausalLM", "Qwen2ForSequenceClassification",
               attention_bias=("q_proj", "k_proj", "v_proj"), per_layer_keys=("layer_types",)),
    )
}

# Config keys that decide the shape or the arithmetic of a decoder layer: all sources must agree on them.
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
              "hidden_act", "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling", "attention_bias",
              "mlp_bias", "sliding_window")


def family_of(config: dict, where: str) -> Family:
    """The family of a source config, or a clear error naming the source."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise RecipeError(f"{where}: model_type {model_type!r} is not supported; dfsmerge merges "
                          f"{sorted(FAMILIES)}")
    return FAMILIES[model_type]
