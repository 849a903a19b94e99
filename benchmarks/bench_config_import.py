"""What reading configs by their effective values costs: the import of a family's transformers config module.

``plan.effective_config`` imports ``transformers.models.<type>.configuration_<type>`` on first use (validation
consults it only when sources spell a setting differently, or for families with per-layer settings such as
Qwen2). Each case runs in a fresh interpreter that has already imported torch (which ``plan.py`` imports at module
level) and times one statement, alternated over rounds (the CPUs are shared), with medians:

- ``torch only``: nothing more (the baseline);
- ``llama config module`` / ``qwen2 config module``: what ``effective_config`` imports for that family;
- ``AutoConfig.for_model(llama)``: the other way to reach the same class;
- ``import transformers``: the lazy top-level package alone;
- ``import dfsmerge``: the package as it stands (its ``__init__`` may import more than ``plan`` needs).

    python benchmarks/bench_config_import.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

CASES = {
    "torch only": "pass",
    "llama config module": "import transformers.models.llama.configuration_llama",
    "qwen2 config module": "import transformers.models.qwen2.configuration_qwen2",
    "AutoConfig.for_model(llama)": "from transformers import AutoConfig; AutoConfig.for_model('llama')",
    "import transformers": "import transformers",
    "import dfsmerge": "import dfsmerge",
}
PROGRAM = """
import sys, time
import torch
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
