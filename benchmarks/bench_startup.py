"""Start-up benchmark: wall time of ``dfsmerge --help`` and ``dfsmerge plan`` in fresh processes, next to
``python -c "import torch"`` and ``python -c "import transformers; transformers.AutoModelForCausalLM"`` as
references, in alternated rounds (the CPUs are shared), medians printed. Also says whether each command imported
torch and transformers.

    python benchmarks/bench_startup.py [--rounds 7] [--root CHECKOUT ...]

``--root`` names the checkouts whose ``dfsmerge`` is timed (default: this one); give two (e.g. an export of an
older commit and this one) to compare them in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
              num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4, vocab_size=64, hidden_act="silu",
              rms_norm_eps=1e-5, max_position_embeddings=128, tie_word_embeddings=False)
# prints which heavy packages the command imported, at exit
_PROBE = "import atexit, sys; atexit.register(lambda: print('imported:', 'torch' in sys.modules, " \
         "'transformers' in sys.modules, file=sys.stderr))"


def run(args: list[str], env: dict, cwd: str) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, text=True, cwd=cwd)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{args} failed:\n{proc.stderr}")
    return wall, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--root", nargs="+", default=[str(ROOT)], help="checkouts whose dfsmerge is timed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "src").mkdir()
        (Path(tmp) / "src" / "config.json").write_text(json.dumps(CONFIG))
        recipe = Path(tmp) / "recipe.yml"
        recipe.write_text(json.dumps({"models": [str(Path(tmp) / "src")], "hops": [{"model": 0, "layer": i}
                                                                               for i in (0, 1, 1, 2, 3)]}))
        cli = f"{_PROBE}; import runpy; sys.argv = ['dfsmerge'] + sys.argv[1:]; runpy.run_module('dfsmerge', " \
              f"run_name='__main__')"
        commands = {
            "python -c 'import torch'": (args.root[0], [sys.executable, "-c", f"{_PROBE}; import torch"]),
            "import transformers + Auto class": (args.root[0], [sys.executable, "-c", f"{_PROBE}; import "
                                                 "transformers; transformers.AutoModelForCausalLM"]),
        }
        for n, root in enumerate(args.root):
            tag = f" [{n}]" if len(args.root) > 1 else ""
            commands[f"dfsmerge --help{tag}"] = (root, [sys.executable, "-c", cli, "--help"])
            commands[f"dfsmerge plan recipe.yml{tag}"] = (root, [sys.executable, "-c", cli, "plan", str(recipe)])
        times: dict[str, list[float]] = {name: [] for name in commands}
        imported: dict[str, str] = {}
        for _ in range(args.rounds):
            for name, (root, command) in commands.items():
                # cwd: not a checkout, since `python -c` puts the working folder first on sys.path
                wall, imported[name] = run(command, {**os.environ, "PYTHONPATH": root}, tmp)
                times[name].append(wall)
    print(f"{args.rounds} alternated rounds; " + ", ".join(f"[{n}] {root}" for n, root in enumerate(args.root)))
    for name, walls in times.items():
        torch_, transformers_ = imported[name].split()[1:3]
        print(f"{name:<36} median {statistics.median(walls):6.2f} s  (min {min(walls):5.2f}, max {max(walls):5.2f})"
              f"  torch {torch_:<5} transformers {transformers_}")


if __name__ == "__main__":
    main()
