"""GGUF-source benchmark: the same merge from a safetensors source and from its F16 GGUF, at 4 and 8 layers of
Mistral-7B width (hidden 4096, MLP 14336, vocabulary 32000).

The sources are ``bench_merge.py``'s bf16 perf sources (4 layers, and one more with 8), written as GGUF the
way llama.cpp's converter lays them out (``tests/make_gguf.py``: F16 weights, F32 norms, Q/K rows permuted).
The recipe runs every layer once and scales every other hop (bf16 output), so the safetensors merge copies
most tensors as bytes while the GGUF merge converts every tensor from F16. Runs alternate between the two
sources in each round; medians of wall time and peak anonymous memory (RssAnon, sampled every 10 ms) are
printed, with the per-layer slope of the peak: (peak at 8 layers - peak at 4) / 4.

    python benchmarks/bench_gguf.py [--workdir /tmp/dfsbench] [--rounds 3] [--layers 4,8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from bench_merge import drop_output, make_source, measure  # noqa: E402
from make_gguf import write_llama_gguf  # noqa: E402


def sources(work: Path, layers: int) -> dict[str, Path]:
    folder = work / ("src_a" if layers == 4 else f"src_{layers}l")  # src_a: bench_merge.py's 4-layer source
    make_source(folder, 0, layers)
    gguf = work / f"src_{layers}l.f16.gguf"
    if not gguf.exists():
        write_llama_gguf(folder, gguf.with_suffix(".tmp"))
        gguf.with_suffix(".tmp").rename(gguf)
    return {"safetensors": folder, "gguf": gguf}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/dfsbench")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", default="4,8")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    depths = [int(n) for n in args.layers.split(",")]
    paths = {n: sources(work, n) for n in depths}
    recipes = {}
    for n, kinds in paths.items():
        for kind, path in kinds.items():
            hops = [{"layer": l, **({"scale": 0.9 + 0.02 * l} if l % 2 else {})} for l in range(n)]
            recipes[(n, kind)] = work / f"recipe_gguf_{n}l_{kind}.yml"
            recipes[(n, kind)].write_text(json.dumps({"models": [str(path)], "hops": hops}))

    runs: dict[tuple[int, str], list[tuple[float, int]]] = {}
    out = work / "out_gguf"
    for r in range(args.rounds):
        for n in depths:
            for kind in (["safetensors", "gguf"] if r % 2 == 0 else ["gguf", "safetensors"]):
                drop_output(out)
                runs.setdefault((n, kind), []).append(
                    measure([sys.executable, "-m", "dfsmerge", "merge", str(recipes[(n, kind)]), str(out), "--quiet"]))
                drop_output(out)
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    print(f"\n{args.rounds} alternated rounds, medians; bf16 output, every layer once, every other hop scaled")
    print(f"{'layers':>6} {'source':12} {'wall s':>7} {'peak RssAnon MiB':>17} {'GGUF / safetensors':>19}")
    med = {key: (statistics.median(w for w, _ in v), statistics.median(p for _, p in v) / 2**20)
           for key, v in runs.items()}
    for n in depths:
        for kind in ("safetensors", "gguf"):
            wall, peak = med[(n, kind)]
            ratio = (f"time {wall / med[(n, 'safetensors')][0]:.2f}x, peak {peak / med[(n, 'safetensors')][1]:.2f}x"
                     if kind == "gguf" else "")
            print(f"{n:6d} {kind:12} {wall:7.2f} {peak:17.0f} {ratio:>19}")
    if len(depths) >= 2:
        lo, hi = depths[0], depths[-1]
        for kind in ("safetensors", "gguf"):
            slope = (med[(hi, kind)][1] - med[(lo, kind)][1]) / (hi - lo)
            print(f"per-layer slope of the peak, {kind}: {slope:+.1f} MiB/layer ({lo} -> {hi} layers)")


if __name__ == "__main__":
    main()
