"""An independent, slow, obviously-correct reference for what a DFS recipe computes.

It implements the forward pass of ``shared/dfs-semantics.md`` literally, hop by hop, on the *unmodified* source
models loaded with plain transformers in float32: nothing is folded, nothing is copied into a new model. It uses
no dfsmerge code except the :class:`~dfsmerge.recipe.Recipe` dataclasses it reads (and not even
``Transform.apply``: the transform is applied here by hand).

    e = embed(ids)                                  # input model
    x = T_0(e)
    for k in 0..K-1:                                # hop k runs layer (m_k, l_k)
        x = x + A_k(x)
        f = F_k(x)
        x = x + (T_{k+1}(f) if k+1 < K else f)
    logits = head(norm(x))                          # output model (lm_head or score)

Attention runs with the eager implementation and an explicit additive mask (causal, key padding, and the
source layer's sliding window if it has one, read from the source's ``config.json`` by the families' documented
rules, not by transformers' config classes); positions are ``0..T-1`` as in a plain transformers forward
without a cache; rotary embeddings come from the output model.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

__all__ = ["reference_logits", "apply_transform", "load_source", "is_classifier"]


@lru_cache(maxsize=32)
def load_source(path: str) -> torch.nn.Module:
    """The source checkpoint as its own architecture (causal LM or sequence classifier), float32, eager."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path)
    cls = AutoModelForSequenceClassification if is_classifier(config) else AutoModelForCausalLM
    model = cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def is_classifier(config) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))


def apply_transform(transform, x: torch.Tensor) -> torch.Tensor:
    """``S x + b`` on the last dimension: scalar multiply, vector elementwise, matrix ``x @ S.T``; plus b."""
    scale, bias = transform.scale, transform.bias
    if isinstance(scale, torch.Tensor):
        scale = scale.to(torch.float32)
        y = x @ scale.T if scale.ndim == 2 else x * scale
    else:
        y = x * float(scale)
    if isinstance(bias, torch.Tensor):
        y = y + bias.to(torch.float32)
    else:
        y = y + float(bias)
    return y


def _raw_config(path: str, model: torch.nn.Module) -> dict:
    """The source's ``config.json`` as written; a source without one (a GGUF file) has only its loaded config."""
    file = Path(path) / "config.json"
    return json.loads(file.read_text()) if file.is_file() else model.config.to_dict()


def _sliding_window(raw: dict, layer: int) -> int | None:
    """The window of source layer ``layer`` (None: full attention), from its ``config.json`` as each family's
    documentation states it. Llama: none. Mistral: ``sliding_window`` (default 4096) on every layer.
    Qwen2 / Qwen3: none unless ``use_sliding_window``; then ``sliding_window`` (default 4096) on the layers that
    ``layer_types`` marks ``sliding_attention`` or, without ``layer_types``, on layers ``max_window_layers``
    (default 28) and up ("the first max_window_layers layers use full attention")."""
    model_type = raw["model_type"]
    if model_type == "llama":
        return None
    if model_type == "mistral":
        return raw.get("sliding_window", 4096)
    if model_type in ("qwen2", "qwen3"):
        if not raw.get("use_sliding_window", False):
            return None
        window = raw.get("sliding_window", 4096)
        types = raw.get("layer_types")
        if types is not None:
            return window if types[layer] == "sliding_attention" else None
        return window if layer >= raw.get("max_window_layers", 28) else None
    raise ValueError(f"reference: no sliding-window rule for model_type {model_type!r}")


def _additive_mask(attention_mask: torch.Tensor, window: int | None) -> torch.Tensor:
    """(B, 1, T, T) float mask: 0 where query i may see key j, the float32 minimum elsewhere."""
    _, t = attention_mask.shape
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (i - j < window)
    allowed = allowed[None, None] & attention_mask.bool()[:, None, None, :]
    mask = torch.zeros(allowed.shape, dtype=torch.float32)
    return mask.masked_fill(~allowed, torch.finfo(torch.float32).min)


@torch.no_grad()
def reference_logits(recipe, input_ids, attention_mask=None) -> torch.Tensor:
    """Logits of ``recipe`` on ``input_ids`` (B, T): (B, T, vocab) for a causal LM, (B, num_labels) pooled at
    the rightmost non-pad token for a sequence classifier (as transformers pools). float32."""
    input_ids = torch.as_tensor(input_ids)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = torch.as_tensor(attention_mask)
    batch, seq = input_ids.shape

    models = {m: load_source(str(recipe.sources[m].path))
              for m in {recipe.input_model, recipe.output_model, *(h.model for h in recipe.hops)}}
    out_model = models[recipe.output_model]
    classification = recipe.classification
    if classification is None:
        classification = is_classifier(out_model.config)
    if classification and not is_classifier(out_model.config):
        raise ValueError("reference: classification recipe but the output model has no score head")
    if not classification and is_classifier(out_model.config):
        raise ValueError("reference: causal-LM recipe but the output model is a sequence classifier")

    x = models[recipe.input_model].model.embed_tokens(input_ids).to(torch.float32)
    x = apply_transform(recipe.hops[0].transform, x)

    position_ids = torch.arange(seq)[None].expand(batch, seq)
    cos, sin = out_model.model.rotary_emb(x, position_ids)

    n_hops = len(recipe.hops)
    for k, hop in enumerate(recipe.hops):
        source = models[hop.model]
        layer = source.model.layers[hop.layer]
        window = _sliding_window(_raw_config(str(recipe.sources[hop.model].path), source), hop.layer)
        mask = _additive_mask(attention_mask, window)
        attn, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), position_embeddings=(cos, sin),
                                  attention_mask=mask)
        x = x + attn
        f = layer.mlp(layer.post_attention_layernorm(x))
        if k + 1 < n_hops:
            f = apply_transform(recipe.hops[k + 1].transform, f)
        x = x + f

    x = out_model.model.norm(x)
    if not classification:
        return out_model.lm_head(x)
    logits = out_model.score(x)
    pad = out_model.config.pad_token_id
    if pad is None:
        last = torch.full((batch,), seq - 1)
    else:
        positions = torch.arange(seq)[None].expand(batch, seq)
        last = torch.where(input_ids != pad, positions, torch.zeros_like(positions)).max(dim=-1).values
    return logits[torch.arange(batch), last]
