"""What dfsmerge knows about model families, as data: one table, one entry per ``model_type``.

Adding a family whose decoder layer is the usual pre-norm ``x + A(x)``, ``x + F(x)`` with the usual tensor
names (Qwen2 and Qwen3 are such) is one entry here, plus its DFS classes in ``modeling_dfs.py`` for the in-memory
model and the compact format.
"""

from __future__ import annotations

from dataclasses import dataclass

from .recipe import RecipeError

__all__ = ["Family", "FAMILIES", "family_of", "family_of_type", "SHAPE_KEYS"]


@dataclass(frozen=True)
class Family:
    """Names and rules of one family of decoder-only models."""

    model_type: str
    causal_lm: str  # architecture name written into config.json
    classifier: str
    mlp_bias_key: str | None = None  # config key that gives every MLP projection a bias (None: impossible)
    attention_bias: tuple[str, ...] = ()  # attention projections that always carry a bias
    head_norms: tuple[str, ...] = ()  # norms over each head's features, shape (head_dim,): Qwen3's q_norm, k_norm
    per_layer_keys: tuple[str, ...] = ()  # config lists indexed by layer, which must follow each hop
    dfs: bool = True  # modeling_dfs.py has DFS classes for it: in-memory models and the compact format
    # A family without MLP bias whose layer, with no sliding window, is another family's layer (Mistral's is
    # Llama's): a flat output that needs a down_proj bias is written as that family. `default_window` is the
    # window the family's config class assumes when config.json has no `sliding_window` key.
    biased_as: str | None = None
    default_window: int | None = None

    # tensor names; `{i}` is the layer index
    embed: str = "model.embed_tokens.weight"
    norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    score: str = "score.weight"
    layer_prefix: str = "model.layers.{i}."
    down_proj: str = "mlp.down_proj"

    @property
    def dfs_model_type(self) -> str:
        """The ``model_type`` of this family's DFS model (``modeling_dfs.py``): ``llama`` -> ``dfs_llama``."""
        return f"dfs_{self.model_type}"

    def dfs_class(self, kind: str) -> str:
        """The name of a DFS class in ``modeling_dfs.py``: ``kind`` is ``Config``, ``Model``, ``ForCausalLM`` or
        ``ForSequenceClassification`` (``llama`` -> ``DFSLlamaForCausalLM``)."""
        return f"DFS{self.causal_lm.removesuffix('ForCausalLM')}{kind}"

    def dfs_auto_map(self) -> dict[str, str]:
        """Where ``from_pretrained(..., trust_remote_code=True)`` finds a compact folder's classes: the
        ``modeling_dfs.py`` inside it (transformers' ``auto_map`` convention)."""
        return {auto: f"modeling_dfs.{self.dfs_class(kind)}" for auto, kind in
                (("AutoConfig", "Config"), ("AutoModel", "Model"), ("AutoModelForCausalLM", "ForCausalLM"),
                 ("AutoModelForSequenceClassification", "ForSequenceClassification"))}

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
        for norm in self.head_norms:
            shapes[f"self_attn.{norm}.weight"] = (hd,)
        if self.mlp_bias_key and config.get(self.mlp_bias_key):
            shapes.update({"mlp.gate_proj.bias": (inter,), "mlp.up_proj.bias": (inter,), "mlp.down_proj.bias": (h,)})
        return shapes


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "LlamaForCausalLM", "LlamaForSequenceClassification", mlp_bias_key="mlp_bias"),
        Family("mistral", "MistralForCausalLM", "MistralForSequenceClassification", biased_as="llama",
               default_window=4096),
        Family("qwen2", "Qwen2ForCausalLM", "Qwen2ForSequenceClassification",
               attention_bias=("q_proj", "k_proj", "v_proj"), per_layer_keys=("layer_types",)),
        Family("qwen3", "Qwen3ForCausalLM", "Qwen3ForSequenceClassification", head_norms=("q_norm", "k_norm"),
               per_layer_keys=("layer_types",)),
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


def family_of_type(model_type: str, where: str) -> Family:
    """The family a DFS model type wraps: ``dfs_mistral``, ``evomistral``, ``evomistralaffine`` -> mistral."""
    for name in sorted(FAMILIES, key=len, reverse=True):
        if name in model_type:
            return FAMILIES[name]
    raise RecipeError(f"{where}: model_type {model_type!r} names none of the families {sorted(FAMILIES)}")
