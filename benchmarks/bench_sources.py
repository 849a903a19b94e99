"""Memory of loading a source into ``Sources``: a float32 Llama checkpoint (hidden 1024, 8 layers, vocabulary
32000: about 200M parameters, 0.8 GB on disk) loaded as bfloat16, each load in a fresh process.

Prints the peak anonymous memory (RssAnon sampled every 5 ms: what the process allocated, mmapped file pages
excluded) above what the process held after its imports, against the size of the bfloat16 model, and the peak
resident set (VmHWM, which also counts the mmapped float32 file pages the load touched: clean page cache the
kernel can drop). Twice: with ``sources.py`` opening safetensors as it does (memory-mapped) and with
safetensors' ``pread`` backend, where every ``get`` returns a tensor of its own, as a GGUF source's dequantized
tensors are (a loader that collects a state dict first then holds every one of them).

    python benchmarks/bench_sources.py [--workdir /tmp/dfsbench-sources] [--root CHECKOUT ...] [--rounds 3]

``--root`` names the checkouts whose ``dfsmerge`` is measured (default: this one); give two to compare.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=1024, intermediate_size=4096,
              num_attention_heads=16, num_key_value_heads=16, num_hidden_layers=8, vocab_size=32000,
              hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=2048, tie_word_embeddings=False,
              dtype="float32")

_LOAD = """
import functools, sys
import safetensors, transformers
from dfsmerge import Sources
if sys.argv[2] == "pread":  # every read returns a tensor of its own, no mapped file pages
    safetensors.safe_open = functools.partial(safetensors.safe_open, backend="pread")
transformers.LlamaForCausalLM  # what a load imports, before the baseline is taken
base = dict(line.split(":", 1) for line in open("/proc/self/status"))["RssAnon"]
model = Sources(dtype="bfloat16").model(sys.argv[1])
params = sum(p.numel() for p in model.parameters())
assert {p.dtype for p in model.parameters()} == {__import__("torch").bfloat16}
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(params, int(base.split()[0]) * 1024, int(status["VmHWM"].split()[0]) * 1024)
"""


def make_source(folder: Path) -> None:
    """A float32 checkpoint with random values (written once, then reused)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "model.safetensors").exists():
        return
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(folder)


def rss_anon(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def load(folder: Path, root: str, reads: str) -> tuple[int, int, int, int]:
    """Load ``folder`` into a fresh ``Sources``; return (parameters, peak RssAnon, RssAnon before the load,
    VmHWM) in bytes."""
    proc = subprocess.Popen([sys.executable, "-c", _LOAD, str(folder), reads], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": root},
                            cwd=folder)  # not a checkout: `python -c` puts the working folder first on sys.path
    peak = 0

    def sample() -> None:
        nonlocal peak
        while proc.poll() is None:
            peak = max(peak, rss_anon(proc.pid))
            time.sleep(0.005)

    thread = threading.Thread(target=sample)
    thread.start()
    out, err = proc.communicate()
    thread.join()
    if proc.returncode:
        raise SystemExit(f"load failed:\n{err}")
    params, base, hwm = map(int, out.split()[-3:])
    return params, peak, base, hwm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/dfsbench-sources")
    parser.add_argument("--root", nargs="+", default=[str(ROOT)], help="checkouts whose dfsmerge is measured")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    folder = Path(args.workdir) / "llama-f32"
    make_source(folder)
    file_bytes = (folder / "model.safetensors").stat().st_size
    runs = [(root, reads) for reads in ("mmap", "pread") for root in args.root]
    results: dict[tuple[str, str], list[tuple[int, int, int]]] = {run: [] for run in runs}
    params = 0
    for _ in range(args.rounds):
        for root, reads in runs:
            params, peak, base, hwm = load(folder, root, reads)
            results[root, reads].append((peak - base, hwm, base))
    model = 2 * params
    print(f"float32 source {file_bytes / 2**20:.0f} MiB on disk; bfloat16 model {model / 2**20:.0f} MiB "
          f"({params / 1e6:.0f}M parameters); {args.rounds} rounds, medians")
    for (root, reads), rows in results.items():
        peak, hwm, base = (statistics.median(r[i] for r in rows) for i in range(3))
        print(f"{reads:>5} reads, {root}: peak RssAnon above the imports {peak / 2**20:6.0f} MiB "
              f"({peak / model:.2f}x the bf16 model; imports {base / 2**20:.0f} MiB)  VmHWM {hwm / 2**20:6.0f} MiB")


if __name__ == "__main__":
    main()
