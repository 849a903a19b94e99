"""DFS models: the hop list of a data-flow-space merge, run over decoder layers that are stored once.

This one file is both the in-memory model that ``dfsmerge.assemble`` builds and the modeling code of the compact
checkpoint format. It imports only torch and transformers: a compact checkpoint carries a copy of it, so
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` works without dfsmerge, and importing
dfsmerge registers its classes with the Auto classes, so no remote code is needed there.

A DFS model is a standard Llama / Mistral / Qwen2 / Qwen3 model with two changes. Its decoder layers are stored
once, in ``model.dfs_layers``, and its ``model.layers``, the list transformers' own model loop runs, holds one
*view* per hop (:func:`hop_view`): a shallow copy of a stored layer that shares every parameter, has its own
KV-cache slot and sends its MLP output through the next hop's transform. So it computes (``dfs-semantics.md``)::

    x = T_0(embed(ids))                               # hop 0's view applies T_0 to its input
    for k in 0..K-1:                                  # hop k runs stored layer u_k
        x = x + A_k(x)
        x = x + (T_{k+1}(F_k(x)) if k+1 < K else F_k(x))
    logits = head(norm(x))

The config is the family's config plus the hop table. ``num_hidden_layers`` is the number of hops (one cache slot
each), and so are per-layer lists such as Qwen's ``layer_types`` (hop ``k`` has its source layer's attention type,
which picks its mask and its cache slot's kind); ``dfs_layers`` lists the stored layers as ``[source model,
source layer]`` (provenance only); ``dfs_hops`` lists the hops as ``[stored layer, scale kind, bias kind]``,
kinds being ``"scalar"``, ``"vector"``, ``"matrix"`` or ``null`` (none). Weights: the family's names, with
``model.dfs_layers.{u}.*`` for the stored layers and ``model.dfs_transforms.{k}.scale`` / ``.bias`` for every
hop whose transform is not the identity.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
import transformers
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig,
                          LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel, MistralConfig,
                          MistralForCausalLM, MistralForSequenceClassification, MistralModel, Qwen2Config,
                          Qwen2ForCausalLM, Qwen2ForSequenceClassification, Qwen2Model, Qwen3Config, Qwen3ForCausalLM,
                          Qwen3ForSequenceClassification, Qwen3Model)

__all__ = ["HopTransform", "hop_view", "DFS_CLASSES", "DFSLlamaConfig", "DFSLlamaModel", "DFSLlamaForCausalLM",
           "DFSLlamaForSequenceClassification", "DFSMistralConfig", "DFSMistralModel", "DFSMistralForCausalLM",
           "DFSMistralForSequenceClassification", "DFSQwen2Config", "DFSQwen2Model", "DFSQwen2ForCausalLM",
           "DFSQwen2ForSequenceClassification", "DFSQwen3Config", "DFSQwen3Model", "DFSQwen3ForCausalLM",
           "DFSQwen3ForSequenceClassification"]


class HopTransform(nn.Module):
    """``T(h) = S h + b`` on the last dimension: ``scale`` has shape () (a scalar), (H,) (a diagonal) or (H, H);
    ``bias`` has shape () or (H,). A missing part is the identity."""

    def __init__(self, hidden_size: int, scale: str | None, bias: str | None):
        super().__init__()
        shapes = {"scalar": (), "vector": (hidden_size,), "matrix": (hidden_size, hidden_size)}
        self.matrix = scale == "matrix"
        self.scale = None
        if scale:
            self.scale = nn.Parameter(torch.eye(hidden_size) if self.matrix else torch.ones(shapes[scale]))
        self.bias = nn.Parameter(torch.zeros(shapes[bias])) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            x = x @ self.scale.T if self.matrix else x * self.scale
        return x if self.bias is None else x + self.bias


class TransformedMLP(nn.Module):
    """A hop's MLP followed by the next hop's transform: ``T_{k+1}(F_k(x))``."""

    def __init__(self, mlp: nn.Module, transform: HopTransform):
        super().__init__()
        self.mlp = mlp
        self.transform = transform
        self.training = mlp.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform(self.mlp(x))


class TransformedInput(nn.Module):
    """Hop 0 with ``T_0`` applied to its input, the embeddings (also when the caller passes ``inputs_embeds``).
    Other attributes are the hop's (the model loop of transformers 4.x reads ``attention_type`` off each layer)."""

    def __init__(self, hop: nn.Module, transform: HopTransform):
        super().__init__()
        self.hop = hop
        self.transform = transform
        self.training = hop.training

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.hop(self.transform(hidden_states), *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("hop"), name)


def hop_view(layer: nn.Module, index: int, transform: HopTransform | None, config: Any) -> nn.Module:
    """Hop ``index`` running decoder ``layer``: a shallow copy that shares all of the layer's parameters,
    submodules and hooks, but has its own attention object with ``layer_idx = index`` (so each hop has its own
    KV-cache slot, even when a layer runs in several hops) reading the model's ``config``, and, when
    ``transform`` is given, sends its MLP output through it."""
    view = copy.copy(layer)
    view._modules = dict(layer._modules)  # its own children table; the children themselves stay shared
    view.self_attn = copy.copy(layer.self_attn)
    for module in (view, view.self_attn):  # transformers 4.x leaves a `forward` bound to the layer on a layer whose
        module.__dict__.pop("forward", None)  # outputs it recorded: the view must run its own, on itself
    view.self_attn.layer_idx = index
    view.self_attn.config = config  # one attention implementation (and mask format) for all hops
    if transform is not None:
        view.mlp = TransformedMLP(layer.mlp, transform)
    return view


# transformers 5 records hidden states and attentions with forward hooks on the decoder layers, which each hop view
# shares with its stored layer; 4.x instead patches, for the length of a call, the `forward` of the decoder layers
# it finds among the model's submodules, and the hop views are not submodules.
_RECORDS_BY_PATCHING = int(transformers.__version__.split(".")[0]) < 5


@contextlib.contextmanager
def _stored_layers(config: Any, stored: list[int]) -> Iterator[None]:
    """The config as seen by a family model while it builds its decoder layers: ``num_hidden_layers`` is the
    number of stored layers (it builds that many) and ``layer_types``, where the family has it (Qwen2, Qwen3), is
    that of the stored layers (layer ``i``'s attention takes its type and sliding window from entry ``i``); the
    per-hop values again afterwards. ``stored[u]`` is a hop that runs stored layer ``u``."""
    hops, layer_types = config.num_hidden_layers, getattr(config, "layer_types", None)
    config.num_hidden_layers = len(stored)
    if layer_types is not None:
        config.layer_types = [layer_types[k] for k in stored]
    try:
        yield
    finally:
        config.num_hidden_layers = hops
        if layer_types is not None:
            config.layer_types = layer_types


class DFSConfig:
    """The family config plus the hop table (mixed into one config class per family)."""

    def __init__(self, dfs_layers: list | None = None, dfs_hops: list | None = None, **kwargs: Any):
        self.dfs_layers = [list(x) for x in dfs_layers or []]
        self.dfs_hops = [list(x) for x in dfs_hops or []]
        kwargs.setdefault("auto_map", self.default_auto_map())
        super().__init__(**kwargs)

    @classmethod
    def default_auto_map(cls) -> dict[str, str]:
        """Where ``from_pretrained(..., trust_remote_code=True)`` finds the classes: this file, in the folder."""
        prefix = f"modeling_dfs.{cls.__name__.removesuffix('Config')}"
        return {"AutoConfig": f"{prefix}Config", "AutoModel": f"{prefix}Model",
                "AutoModelForCausalLM": f"{prefix}ForCausalLM",
                "AutoModelForSequenceClassification": f"{prefix}ForSequenceClassification"}


class DFSModel:
    """The decoder of a DFS model (mixed into the family's ``*Model``): stored layers, per-hop transforms, and
    ``layers``, the plain list of hop views that the family's forward runs."""

    def __init__(self, config: Any):
        first_hop = {u: k for k, (u, _, _) in reversed(list(enumerate(config.dfs_hops)))}
        with _stored_layers(config, [first_hop[u] for u in range(len(config.dfs_layers))]):
            super().__init__(config)  # embeddings, norm, rotary embedding and one decoder layer per stored layer
        self.dfs_layers = self._modules.pop("layers")
        self.dfs_transforms = nn.ModuleDict({
            str(k): HopTransform(config.hidden_size, scale, bias)
            for k, (_, scale, bias) in enumerate(config.dfs_hops) if scale or bias
        })
        self.link_hops()

    def link_hops(self) -> None:
        """(Re)build ``self.layers``, one view per hop over ``dfs_layers``. Views hold no state of their own, so
        they are not registered submodules: parameters, ``state_dict`` and ``to()`` see each stored layer once."""
        transforms, hops = self.dfs_transforms, self.config.dfs_hops
        views = [hop_view(self.dfs_layers[u], k, transforms[str(k + 1)] if str(k + 1) in transforms else None,
                          self.config) for k, (u, _, _) in enumerate(hops)]
        if "0" in transforms:
            views[0] = TransformedInput(views[0], transforms["0"])
        self.layers = views

    if _RECORDS_BY_PATCHING:
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            """The family's forward, with the hop views registered as submodules ``hops.k`` for the call, so that
            transformers 4.x records their outputs (``output_hidden_states``, ``output_attentions``)."""
            self._modules["hops"] = nn.ModuleList(self.layers)
            try:
                return super().forward(*args, **kwargs)
            finally:
                del self._modules["hops"]

    def train(self, mode: bool = True) -> Any:
        """``Module.train``, for the hop views too."""
        super().train(mode)
        for view in self.layers:  # not registered, so not reached by Module.train
            view.train(mode)
        return self


class DFSHeadModel:
    """What the DFS causal LM and classifier add to the family's: saving as a flat model or as compact."""

    def save_pretrained(self, save_directory: str | Path, *args: Any, format: str = "flat", **kwargs: Any) -> None:
        """``format="flat"`` (default): a plain folder of the family (Llama, Mistral, Qwen2, Qwen3) with one
        physical layer per hop and the transforms folded into the weights (needs dfsmerge). ``format="compact"``:
        this model as it is, each stored layer once, with this modeling file beside it."""
        if format == "flat":
            try:
                from dfsmerge.flatten import save_flat
            except ImportError as exc:
                raise ImportError("saving a DFS model as a flat model needs dfsmerge (pip install dfsmerge); "
                                  "save_pretrained(..., format='compact') needs nothing") from exc
            save_flat(self, save_directory, *args, **kwargs)
        elif format == "compact":
            super().save_pretrained(save_directory, *args, **kwargs)
            shutil.copyfile(__file__, Path(save_directory) / "modeling_dfs.py")
        else:
            raise ValueError(f"format: expected 'flat' or 'compact', got {format!r}")


class DFSForCausalLM(DFSHeadModel):
    """The family's causal LM over a DFS decoder (``base_model_class``)."""

    def __init__(self, config: Any):
        with _stored_layers(config, []):
            super().__init__(config)  # the family's head over a decoder with no layers, replaced next
        self.model = self.base_model_class(config)
        self.post_init()


# ------------------------------------------------------------------------------------------- llama


class DFSLlamaConfig(DFSConfig, LlamaConfig):
    model_type = "dfs_llama"


class DFSLlamaModel(DFSModel, LlamaModel):
    config_class = DFSLlamaConfig


class DFSLlamaForCausalLM(DFSForCausalLM, LlamaForCausalLM):
    config_class = DFSLlamaConfig
    base_model_class = DFSLlamaModel


class DFSLlamaForSequenceClassification(DFSHeadModel, LlamaForSequenceClassification):
    config_class = DFSLlamaConfig  # its decoder comes from AutoModel.from_config: DFSLlamaModel, registered below


# ------------------------------------------------------------------------------------------- mistral


class DFSMistralConfig(DFSConfig, MistralConfig):
    model_type = "dfs_mistral"


class DFSMistralModel(DFSModel, MistralModel):
    config_class = DFSMistralConfig


class DFSMistralForCausalLM(DFSForCausalLM, MistralForCausalLM):
    config_class = DFSMistralConfig
    base_model_class = DFSMistralModel


class DFSMistralForSequenceClassification(DFSHeadModel, MistralForSequenceClassification):
    config_class = DFSMistralConfig


# ------------------------------------------------------------------------------------------- qwen2


class DFSQwen2Config(DFSConfig, Qwen2Config):
    model_type = "dfs_qwen2"


class DFSQwen2Model(DFSModel, Qwen2Model):
    config_class = DFSQwen2Config


class DFSQwen2ForCausalLM(DFSForCausalLM, Qwen2ForCausalLM):
    config_class = DFSQwen2Config
    base_model_class = DFSQwen2Model


class DFSQwen2ForSequenceClassification(DFSHeadModel, Qwen2ForSequenceClassification):
    config_class = DFSQwen2Config


# ------------------------------------------------------------------------------------------- qwen3


class DFSQwen3Config(DFSConfig, Qwen3Config):
    model_type = "dfs_qwen3"


class DFSQwen3Model(DFSModel, Qwen3Model):
    config_class = DFSQwen3Config


class DFSQwen3ForCausalLM(DFSForCausalLM, Qwen3ForCausalLM):
    config_class = DFSQwen3Config
    base_model_class = DFSQwen3Model


class DFSQwen3ForSequenceClassification(DFSHeadModel, Qwen3ForSequenceClassification):
    config_class = DFSQwen3Config


# family model_type -> (config, causal LM, sequence classifier)
DFS_CLASSES: dict[str, tuple[type, type, type]] = {
    "llama": (DFSLlamaConfig, DFSLlamaForCausalLM, DFSLlamaForSequenceClassification),
    "mistral": (DFSMistralConfig, DFSMistralForCausalLM, DFSMistralForSequenceClassification),
    "qwen2": (DFSQwen2Config, DFSQwen2ForCausalLM, DFSQwen2ForSequenceClassification),
    "qwen3": (DFSQwen3Config, DFSQwen3ForCausalLM, DFSQwen3ForSequenceClassification),
}

for _config, _causal, _classifier in DFS_CLASSES.values():
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _causal.base_model_class, exist_ok=True)
    AutoModelForCausalLM.register(_config, _causal, exist_ok=True)
    AutoModelForSequenceClassification.register(_config, _classifier, exist_ok=True)
