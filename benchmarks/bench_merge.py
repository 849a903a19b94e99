"""Streaming-merge benchmark: two Mistral-7B-shaped sources with 4 layers each, a 7-hop recipe with scales.

Prints wall time, peak anonymous memory (RssAnon sampled every 10 ms, mmapped file pages excluded) and output
bytes for `dfsmerge merge`, next to `cp -r` of the same output folder and, when `--mergekit PATH/mergekit-yaml`
is given, mergekit's passthrough of the same stack (no scales: passthrough cannot scale a hop).

    python benchmarks/bench_merge.py [--workdir /tmp/dfsbench] [--mergekit /path/to/mergekit-yaml]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIG = dict(model_type="mistral", architectures=["MistralForCausalLM"], hidden_size=4096, intermediate_size=14336,
              num_attention_heads=32, num_key_value_heads=8, head_dim=128, num_hidden_layers=4, vocab_size=32000,
              hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=32768, sliding_window=None,
              rope_theta=10000.0, tie_word_embeddings=False, dtype="bfloat16", bos_token_id=1, eos_token_id=2)
HOPS = [(0, 0), (0, 1), (1, 1), (0, 2), (1, 2), (1, 3), (0, 3)]


def make_source(folder: Path, seed: int) -> None:
    """A sharded bf16 checkpoint with the Mistral-7B layer shapes (one shard per layer)."""
    from dfsmerge.families import FAMILIES

    if (folder / "model.safetensors.index.json").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    fam = FAMILIES["mistral"]
    groups = {"embed": {fam.embed: (32000, 4096)},
              **{f"layer{i}": {fam.layer_prefix.format(i=i) + k: s for k, s in fam.layer_tensors(CONFIG).items()}
                 for i in range(4)},
              "head": {fam.norm: (4096,), fam.lm_head: (32000, 4096)}}
    weight_map = {}
    for n, (_, tensors) in enumerate(groups.items()):
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in tensors.items()},
                  str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(CONFIG))


def measure(cmd: list[str]) -> tuple[float, int]:
    """Run ``cmd``; return wall seconds and the peak RssAnon (bytes) of it and its children."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0

    def sample() -> None:
        nonlocal peak
        while proc.poll() is None:
            peak = max(peak, _rss_anon(proc.pid))
            time.sleep(0.01)

    start = time.perf_counter()
    thread = threading.Thread(target=sample)
    thread.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    thread.join()
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed:\n{err}")
    return wall, peak


def _rss_anon(pid: int) -> int:
    total = 0
    pids = [pid]
    try:
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def drop_output(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run(["sync"], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/dfsbench")
    parser.add_argument("--mergekit", default=None, help="path to mergekit-yaml, to compare against")
    args = parser.parse_args()
    work = Path(args.workdir)
    sources = [work / "src_a", work / "src_b"]
    for i, folder in enumerate(sources):
        make_source(folder, i)
    recipe = {"models": [str(s) for s in sources], "input_model": 0, "output_model": 1,
              "hops": [{"model": m, "layer": l, "scale": 0.9 + 0.02 * k} for k, (m, l) in enumerate(HOPS)]}
    (work / "recipe.yml").write_text(json.dumps(recipe))

    out = work / "out_dfsmerge"
    drop_output(out)
    wall, peak = measure([sys.executable, "-m", "dfsmerge", "merge", str(work / "recipe.yml"), str(out), "--quiet"])
    size = folder_bytes(out)
    print(f"dfsmerge merge : {wall:7.2f} s  peak RssAnon {peak / 2**20:7.1f} MiB  output {size / 1e9:.3f} GB "
          f"({size / wall / 1e6:.0f} MB/s)")

    copy = work / "out_copy"
    drop_output(copy)
    cwall, cpeak = measure(["cp", "-r", str(out), str(copy)])
    print(f"cp -r          : {cwall:7.2f} s  peak RssAnon {cpeak / 2**20:7.1f} MiB  ratio dfsmerge/cp {wall / cwall:.2f}")
    drop_output(copy)

    if args.mergekit:
        slices = [{"sources": [{"model": str(sources[m]), "layer_range": [l, l + 1]}]} for m, l in HOPS]
        config = {"merge_method": "passthrough", "dtype": "bfloat16", "slices": slices}
        (work / "mergekit.yml").write_text(json.dumps(config))
        mk_out = work / "out_mergekit"
        drop_output(mk_out)
        mwall, mpeak = measure([args.mergekit, str(work / "mergekit.yml"), str(mk_out), "--lazy-unpickle",
                                "--out-shard-size", "5B"])
        print(f"mergekit       : {mwall:7.2f} s  peak RssAnon {mpeak / 2**20:7.1f} MiB  output "
              f"{folder_bytes(mk_out) / 1e9:.3f} GB  ratio dfsmerge/mergekit {wall / mwall:.2f}")
        drop_output(mk_out)
    drop_output(out)


if __name__ == "__main__":
    main()
