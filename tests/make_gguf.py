"""Writing a Llama/Mistral safetensors folder as a GGUF file the way llama.cpp's ``convert_hf_to_gguf.py`` lays
it out (used by the GGUF tests and by ``benchmarks/bench_gguf.py``).

What the converter does, and this function too: architecture ``llama`` (Mistral included), tensor names from
the ``gguf`` package's name map (``blk.N.attn_q.weight``, ...), the rows of ``q_proj``/``k_proj`` permuted for
llama.cpp's rotary layout (``LlamaModel.permute`` in the converter), 1-D tensors in F32, the metadata keys
under ``llama.``, and no ``output.weight`` when the head is tied. Tensors are written one at a time, so a
7B-width file is written without holding the model in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py): interleaved halves of each head's rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_llama_gguf(folder: Path, path: Path, types: Callable[[str], str] | None = None) -> Path:
    """``folder`` (config.json + safetensors) as a GGUF file at ``path``. ``types(hf_name)`` picks the ggml type
    of each 2-D tensor by name (``"F16"``, ``"BF16"``, ``"Q8_0"``, ...; default F16, llama.cpp's ``--outtype
    f16``); 1-D tensors are F32."""
    import gguf
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    rope = config.get("rope_parameters") or {}
    handles = [safe_open(str(f), framework="pt") for f in sorted(folder.glob("*.safetensors"))]
    where = {name: h for h in handles for name in h.keys()}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(folder.name)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.get(key) is not None:
            getattr(writer, f"add_{key}")(config[key])

    def qtype(hf_name: str, ndim: int) -> gguf.GGMLQuantizationType:
        return gguf.GGMLQuantizationType[(types(hf_name) if types else "F16") if ndim == 2 else "F32"]

    def gguf_name(hf_name: str) -> str:
        base, suffix = hf_name.rsplit(".", 1)
        return f"{names.get_name(base)}.{suffix}"

    order = [n for n in where if not (config.get("tie_word_embeddings") and n == "lm_head.weight")]
    for hf_name in order:  # the table first, from the shapes alone
        shape = where[hf_name].get_slice(hf_name).get_shape()
        kind = qtype(hf_name, len(shape))
        block, size = gguf.GGML_QUANT_SIZES[kind]
        writer.add_tensor_info(gguf_name(hf_name), shape, np.float32, int(np.prod(shape)) // block * size, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for hf_name in order:
        array = where[hf_name].get_tensor(hf_name).to(torch.float32).numpy()
        if hf_name.endswith("q_proj.weight"):
            array = permute(array, heads, heads)
        elif hf_name.endswith("k_proj.weight"):
            array = permute(array, heads, kv_heads)
        writer.write_tensor_data(gguf.quants.quantize(array, qtype(hf_name, array.ndim)))
    writer.close()
    return path
