"""Shared test infrastructure: tiny random source checkpoints (Llama / Mistral, causal LM or sequence
classification) with a tiny tokenizer beside them, and fixed token batches.

Everything is small (hidden 64, 4 layers, vocabulary 64) so the suite stays fast on two CPU cores. Weights are
drawn with a fixed seed at a scale where every layer changes the logits noticeably (unit-variance embeddings,
``1/sqrt(fan_in)`` projections, norm weights ``1 + 0.1 * randn``), so a dropped layer, a wrong norm or a
misplaced transform shows up far above the test tolerances.

Helpers (importable as ``from conftest import ...``): :func:`make_tiny_source`, :func:`make_tiny_tokenizer`,
:data:`VOCAB`, :data:`PAD_ID`, :data:`INPUT_IDS`, :data:`PADDED_IDS`, :data:`PADDED_MASK`.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` run from anywhere still imports the project under test
    sys.path.insert(0, str(ROOT))

# --------------------------------------------------------------------------------------------- tokenizer

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)
_WORDS = (
    "the a an of to in on at is was be are and or but not with for from by as it this that these those "
    "cat dog bird fish tree river stone cloud rain sun moon star red blue green black white big small "
    "old new fast slow run walk swim fly eat sleep sing read write one two"
).split()
VOCAB: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + _WORDS)}
VOCAB_SIZE = len(VOCAB)
assert VOCAB_SIZE == 64, VOCAB_SIZE

# A fixed batch (no padding) and a left-padded batch with its attention mask. Ids stay in 2..63.
INPUT_IDS = torch.tensor([
    [BOS_ID, 27, 40, 9, 33, 51, 6, 62, 18, 45, 12],
    [BOS_ID, 5, 5, 58, 31, 22, 47, 10, 36, 29, 63],
])
PADDED_IDS = torch.tensor([
    [BOS_ID, 44, 17, 8, 53, 30, 21, 60, 11],
    [PAD_ID, PAD_ID, PAD_ID, BOS_ID, 26, 39, 14, 57, 35],
    [PAD_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID, BOS_ID, 48, 19],
])
PADDED_MASK = (PADDED_IDS != PAD_ID).long()


def make_tiny_tokenizer():
    """A word-level fast tokenizer over :data:`VOCAB` with bos/eos/pad/unk (a ``PreTrainedTokenizerFast``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


# --------------------------------------------------------------------------------------------- sources


def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with seeded random values at a scale where each layer matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # shared (tied) parameters appear once
            if name.endswith("norm.weight"):
                value = 1.0 + 0.1 * torch.randn(param.shape, generator=gen)
            elif "embed_tokens" in name:
                value = torch.randn(param.shape, generator=gen)
            elif param.ndim == 2:
                value = torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[1])
            else:  # biases, if a config has them
                value = 0.1 * torch.randn(param.shape, generator=gen)
            param.copy_(value.to(param.dtype))


def make_tiny_source(
    path: str | Path,
    family: str = "llama",
    seed: int = 0,
    num_layers: int = 4,
    hidden: int = 64,
    intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = VOCAB_SIZE,
    tie_word_embeddings: bool = False,
    classification: bool = False,
    num_labels: int = 3,
    sliding_window: int | None = None,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int | None = None,
    rope_theta: float = 10000.0,
) -> Path:
    """Write a random ``{Llama,Mistral}For{CausalLM,SequenceClassification}`` checkpoint (safetensors) and the
    tiny tokenizer to ``path``; return ``path``. ``dtype``/``max_shard_size`` control how it is saved (e.g.
    ``torch.bfloat16`` and ``"20KB"`` for a sharded bf16 source). ``sliding_window`` is Mistral only."""
    import transformers
    from transformers import (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, MistralConfig,
                              MistralForCausalLM, MistralForSequenceClassification)

    path = Path(path)
    # RoPE settings: transformers 5 reads `rope_parameters`; 4.x reads a top-level `rope_theta` and would keep
    # `rope_parameters` as an unused attribute
    rope = ({"rope_parameters": {"rope_type": "default", "rope_theta": rope_theta}}
            if int(transformers.__version__.split(".")[0]) >= 5 else {"rope_theta": rope_theta})
    common = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=tie_word_embeddings, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
        eos_token_id=EOS_ID, **rope,
    )
    if classification:
        common["num_labels"] = num_labels
    if family == "llama":
        config = LlamaConfig(**common)
        cls = LlamaForSequenceClassification if classification else LlamaForCausalLM
    elif family == "mistral":
        config = MistralConfig(sliding_window=sliding_window, **common)
        cls = MistralForSequenceClassification if classification else MistralForCausalLM
    else:
        raise ValueError(f"unknown family {family!r}")
    torch.manual_seed(seed)  # anything post_init draws is overwritten below, but keep it deterministic anyway
    model = cls(config).eval()
    _randomize_(model, seed)
    if tie_word_embeddings and not classification:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    make_tiny_tokenizer().save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def sources_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sources")


@pytest.fixture(scope="session")
def llama_sources(sources_dir) -> list[Path]:
    """Three Llama causal LMs (seeds 0, 1, 2), untied head, 4 layers, hidden 64."""
    return [make_tiny_source(sources_dir / f"llama{s}", "llama", seed=s) for s in (0, 1, 2)]


@pytest.fixture(scope="session")
def mistral_sources(sources_dir) -> list[Path]:
    """Two Mistral causal LMs (seeds 10, 11), no sliding window."""
    return [make_tiny_source(sources_dir / f"mistral{s}", "mistral", seed=s) for s in (10, 11)]


@pytest.fixture(scope="session")
def mistral_window_sources(sources_dir) -> list[Path]:
    """Two Mistral causal LMs (seeds 12, 13) with sliding_window=4, shorter than the test batches."""
    return [make_tiny_source(sources_dir / f"mistral_sw{s}", "mistral", seed=s, sliding_window=4)
            for s in (12, 13)]


@pytest.fixture(scope="session")
def tied_llama_source(sources_dir) -> Path:
    """A Llama causal LM whose lm_head is tied to embed_tokens (seed 20)."""
    return make_tiny_source(sources_dir / "llama_tied", "llama", seed=20, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def cls_llama_sources(sources_dir) -> list[Path]:
    """Two LlamaForSequenceClassification models (seeds 30, 31), 3 labels, pad_token_id set."""
    return [make_tiny_source(sources_dir / f"llama_cls{s}", "llama", seed=s, classification=True)
            for s in (30, 31)]


@pytest.fixture(scope="session")
def sharded_bf16_llama_source(sources_dir) -> Path:
    """A Llama causal LM (seed 40) saved in bfloat16 across several safetensors shards."""
    return make_tiny_source(sources_dir / "llama_bf16_sharded", "llama", seed=40, dtype=torch.bfloat16,
                            max_shard_size="100KB")


@pytest.fixture
def input_ids() -> torch.Tensor:
    return INPUT_IDS.clone()


@pytest.fixture
def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), left-padded with :data:`PAD_ID`."""
    return PADDED_IDS.clone(), PADDED_MASK.clone()
