"""Streaming-merge benchmark: two Mistral-7B-shaped sources with 4 layers each (bf16), a 7-hop stack.

Two workloads, each run by `dfsmerge merge`, by mergekit's passthrough (same stack, same scales) and by
`cp -r` of the output folder, in alternated rounds (the order rotates each round); medians are printed.

- ``copy``: no scales. Every output tensor is a source tensor unchanged: file-to-file copies.
- ``scaled``: hops 1-6 carry scales, so the down projections of hops 0-5 are folded (``S_{k+1} W_down``), which
  mergekit's passthrough writes as a per-slice ``scale`` filtered on ``down_proj``.

The ``merge()`` row is `dfsmerge.merge()` timed inside its process, after the imports: the merge's own work.
Per run: wall time and peak anonymous memory (RssAnon of the process and its children, sampled every 10 ms;
the page cache of mmapped or copied files is not counted). The CPUs are shared, so the ratios against `cp -r`
measured in the same rounds are the figures to compare. `python -m dfsmerge --help` is timed in the same
rounds: the start-up (imports) every dfsmerge command pays. With ``--check`` the dfsmerge and mergekit outputs
are compared tensor by tensor once (they must be bit-identical).

mergekit: ``--mergekit PATH/mergekit-yaml``, or ``--mergekit-venv DIR``, which creates a throwaway virtualenv
there (mergekit 0.1.5, CPU torch 2.13.0) on first use; neither touches the project's own environment.

    python benchmarks/bench_merge.py [--workdir /tmp/dfsbench] [--rounds 3] [--mergekit-venv /tmp/mkvenv] [--check]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
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
SCALES = [1.0] + [0.9 + 0.03 * k for k in range(1, len(HOPS))]  # hop 0 unscaled: passthrough cannot scale embeddings
MERGEKIT = "mergekit==0.1.5"
# the merge alone, after the imports: what `dfsmerge merge` costs beyond its start-up
IN_PROCESS = ("import sys, time; from dfsmerge import merge; t = time.perf_counter(); "
              "merge(sys.argv[1], sys.argv[2], quiet=True); print(time.perf_counter() - t)")


def make_source(folder: Path, seed: int, num_layers: int = 4) -> None:
    """A sharded bf16 checkpoint with the Mistral-7B layer shapes (one shard per layer)."""
    from dfsmerge.families import FAMILIES

    if (folder / "model.safetensors.index.json").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    fam = FAMILIES["mistral"]
    config = {**CONFIG, "num_hidden_layers": num_layers}
    groups = {"embed": {fam.embed: (32000, 4096)},
              **{f"layer{i}": {fam.layer_prefix.format(i=i) + k: s for k, s in fam.layer_tensors(config).items()}
                 for i in range(num_layers)},
              "head": {fam.norm: (4096,), fam.lm_head: (32000, 4096)}}
    weight_map = {}
    for n, (_, tensors) in enumerate(groups.items()):
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in tensors.items()},
                  str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))


def measure(cmd: list[str]) -> tuple[float, int]:
    """Run ``cmd``; return wall seconds and the peak RssAnon (bytes) of it and its children."""
    return run(cmd)[:2]


def run(cmd: list[str]) -> tuple[float, int, str]:
    """Run ``cmd``; return wall seconds, the peak RssAnon (bytes) of it and its children, and its stdout."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0

    def sample() -> None:
        nonlocal peak
        while proc.poll() is None:
            peak = max(peak, _rss_anon(proc.pid))
            time.sleep(0.01)

    start = time.perf_counter()
    thread = threading.Thread(target=sample)
    thread.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    thread.join()
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed:\n{err}")
    return wall, peak, out


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


def mergekit_yaml(venv: Path) -> Path:
    """``mergekit-yaml`` of a throwaway virtualenv at ``venv``, created on first use (CPU torch pinned first, so
    pip does not pull a CUDA build)."""
    exe = venv / "bin" / "mergekit-yaml"
    if not exe.exists():
        print(f"creating {venv} with {MERGEKIT} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, MERGEKIT], check=True)
    return exe


def recipes(work: Path, sources: list[Path]) -> dict[str, tuple[Path, Path]]:
    """Per workload: (dfsmerge recipe, mergekit config) for the same stack."""
    out = {}
    for workload, scales in (("copy", [1.0] * len(HOPS)), ("scaled", SCALES)):
        recipe = {"models": [str(s) for s in sources], "input_model": 0, "output_model": 0,
                  "hops": [{"model": m, "layer": l, **({"scale": s} if s != 1.0 else {})}
                           for (m, l), s in zip(HOPS, scales)]}
        slices = []
        for k, (m, l) in enumerate(HOPS):  # hop k's down_proj carries hop k+1's scale
            after = scales[k + 1] if k + 1 < len(HOPS) else 1.0
            source = {"model": str(sources[m]), "layer_range": [l, l + 1]}
            if after != 1.0:
                source["parameters"] = {"scale": [{"filter": "down_proj", "value": after}, {"value": 1.0}]}
            slices.append({"sources": [source]})
        config = {"merge_method": "passthrough", "dtype": "bfloat16", "slices": slices}
        (work / f"recipe_{workload}.yml").write_text(json.dumps(recipe))
        (work / f"mergekit_{workload}.yml").write_text(json.dumps(config))
        out[workload] = (work / f"recipe_{workload}.yml", work / f"mergekit_{workload}.yml")
    return out


def same_tensors(a: Path, b: Path) -> str:
    """'bit-identical', or what differs, between two output folders' tensors."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict:
        handles = [safe_open(str(f), framework="pt") for f in sorted(folder.glob("*.safetensors"))]
        return {name: (h, name) for h in handles for name in h.keys()}

    ta, tb = tensors(a), tensors(b)
    if set(ta) != set(tb):
        return f"different names: {sorted(set(ta) ^ set(tb))[:5]}"
    bad = [n for n in ta if not torch.equal(ta[n][0].get_tensor(n), tb[n][0].get_tensor(n))]
    return "bit-identical" if not bad else f"{len(bad)} tensors differ, e.g. {bad[:3]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/dfsbench")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mergekit", default=None, help="path to mergekit-yaml, to compare against")
    parser.add_argument("--mergekit-venv", default=None, help=f"a throwaway venv for {MERGEKIT} (created if missing)")
    parser.add_argument("--check", action="store_true", help="compare dfsmerge's and mergekit's tensors once")
    parser.add_argument("--workloads", default="copy,scaled")
    args = parser.parse_args()
    work = Path(args.workdir)
    sources = [work / "src_a", work / "src_b"]
    for i, folder in enumerate(sources):
        make_source(folder, i)
    mergekit = args.mergekit or (str(mergekit_yaml(Path(args.mergekit_venv))) if args.mergekit_venv else None)
    workloads = {k: v for k, v in recipes(work, sources).items() if k in args.workloads.split(",")}

    def dfsmerge(workload: str, out: Path) -> list[str]:
        return [sys.executable, "-m", "dfsmerge", "merge", str(workloads[workload][0]), str(out), "--quiet"]

    def mergekit_cmd(workload: str, out: Path) -> list[str]:
        return [mergekit, str(workloads[workload][1]), str(out), "--lazy-unpickle", "--out-shard-size", "5B"]

    for workload in workloads:  # a reference output per workload: what `cp -r` copies
        ref = work / f"ref_{workload}"
        drop_output(ref)
        subprocess.run(dfsmerge(workload, ref), check=True)
        if args.check and mergekit:
            mk = work / "check_mergekit"
            drop_output(mk)
            subprocess.run(mergekit_cmd(workload, mk), check=True, capture_output=True)
            print(f"{workload}: dfsmerge vs mergekit tensors: {same_tensors(ref, mk)}", flush=True)
            drop_output(mk)

    tools = ["dfsmerge", "merge()", "cp -r", *(["mergekit"] if mergekit else [])]
    runs: dict[tuple[str, str], list[tuple[float, int]]] = {}
    startup: list[float] = []
    for r in range(args.rounds):
        startup.append(measure([sys.executable, "-m", "dfsmerge", "--help"])[0])
        for workload in workloads:
            for tool in tools[r % len(tools):] + tools[:r % len(tools)]:
                out = work / "out"
                drop_output(out)
                cmd = {"dfsmerge": dfsmerge(workload, out),
                       "merge()": [sys.executable, "-c", IN_PROCESS, str(workloads[workload][0]), str(out)],
                       "cp -r": ["cp", "-r", str(work / f"ref_{workload}"), str(out)],
                       "mergekit": mergekit_cmd(workload, out) if mergekit else []}[tool]
                wall, peak, stdout = run(cmd)
                runs.setdefault((workload, tool), []).append((float(stdout) if tool == "merge()" else wall, peak))
                drop_output(out)
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    print(f"\n{args.rounds} alternated rounds, medians; output {folder_bytes(work / 'ref_copy') / 1e9:.2f} GB "
          f"(7 hops of Mistral-7B width, bf16); `python -m dfsmerge --help`: {statistics.median(startup):.2f} s")
    print(f"{'workload':9} {'tool':9} {'wall s':>7} {'peak RssAnon MiB':>17} {'/ cp -r':>8} {'/ mergekit':>11}")
    for workload in workloads:
        wall = {t: statistics.median(w for w, _ in runs[(workload, t)]) for t in tools}
        for tool in tools:
            peak = statistics.median(p for _, p in runs[(workload, tool)])
            vs_mk = f"{wall[tool] / wall['mergekit']:11.2f}" if mergekit else f"{'':11}"
            vs_cp = wall[tool] / wall["cp -r"]
            print(f"{workload:9} {tool:9} {wall[tool]:7.2f} {peak / 2**20:17.0f} {vs_cp:8.2f} {vs_mk}")
    for workload in workloads:
        drop_output(work / f"ref_{workload}")


if __name__ == "__main__":
    main()
