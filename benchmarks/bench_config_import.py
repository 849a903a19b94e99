"""What reading configs by their effective values costs: the import of a family's transformers config module.

``plan.effective_config`` imports ``transformers.models.<type>.configuration_<type>`` on first use (validation
consults it only when sources spell a setting differently, or for families with per-layer settings such as
Qwen2). Each case runs in a fresh interpreter that has already imported ``dfsmerge.plan`` (and so torch) and
times, alternated over rounds (the CPUs are shared), with medians:

- ``plan only``: nothing more (the baseline: an empty statement);
- ``llama`` / ``qwen2``: one ``effective_config`` call, i.e. that family's config module;
- ``AutoConfig``: ``from transformers import AutoConfig`` plus ``AutoConfig.for_model("llama")``, the other way;
- ``import transformers``: the lazy top-level package alone.

    python benchmarks/bench_config_import.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

CASES = {
    "plan only": "pass",
    "llama effective_config": "effective_config({'hidden_size': 64, 'num_attention_heads': 4}, FAMILIES['llama'])",
    "qwen2 effective_config": "effective_config({'hidden_size': 64, 'num_attention_heads': 4}, FAMILIES['qwen2'])",
    "AutoConfig.for_model(llama)": "from transformers import AutoConfig; AutoConfig.for_model('llama')",
    "import transformers": "import transformers",
}
PROGRAM = """
import sys, time
from dfsmerge.families import FAMILIES
from dfsmerge.plan import effective_config
start = time.perf_counter()
{statement}
print(time.perf_counter() - start, len(sys.modules))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in CASES}
    modules: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, statement in CASES.items():
            out = subprocess.run([sys.executable, "-c", PROGRAM.format(statement=statement)], check=True,
                                 capture_output=True, text=True).stdout.split()
            times[name].append(float(out[0]))
            modules[name] = int(out[1])
    for name in CASES:
        print(f"{name:30s} +{statistics.median(times[name]):6.2f} s (median of {args.rounds}), "
              f"{modules[name]} modules loaded")


if __name__ == "__main__":
    main()
