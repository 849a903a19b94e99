"""Start-up (issue 12): the command line, ``plan`` and ``merge`` import no transformers (``--help`` and a merge that
only copies tensors no torch either),
while a compact folder still loads with ``AutoModelForCausalLM.from_pretrained`` and no remote code once dfsmerge
is imported, whichever of dfsmerge and transformers is imported first. Each check runs in a fresh interpreter,
since this test process has imported both long ago."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                            timeout=600, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


_CLI = """
import sys
from dfsmerge.cli import main
assert "torch" not in sys.modules and "transformers" not in sys.modules, "import dfsmerge.cli"
recipe, out = sys.argv[1:]
assert main(["plan", recipe]) == 0
assert "transformers" not in sys.modules, "dfsmerge plan"
assert main(["merge", recipe, out, "--quiet"]) == 0
assert "transformers" not in sys.modules, "dfsmerge merge"
print("ok")
"""


def test_cli_plan_and_merge_import_no_transformers(llama_sources, tmp_path):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(json.dumps({"models": [str(p) for p in llama_sources[:2]], "hops": [
        {"model": 0, "layer": 0}, {"model": 1, "layer": 2, "scale": 0.8}, {"model": 0, "layer": 3}]}))
    result = run_python(_CLI, str(recipe), str(tmp_path / "out"), cwd=tmp_path)
    assert "parameters:" in result.stdout and result.stdout.rstrip().endswith("ok")
    assert (tmp_path / "out" / "model.safetensors").is_file()


_COPY = """
import sys
from dfsmerge.cli import main
assert main(["merge", sys.argv[1], sys.argv[2], "--quiet"]) == 0
assert "torch" not in sys.modules, "a merge that copies every tensor imported torch"
print("ok")
"""


def test_merge_that_only_copies_imports_no_torch(sharded_bf16_llama_source, tmp_path):
    """bfloat16 shards into a bfloat16 output, no scales: every tensor is a byte copy, torch (~1-2 s) unneeded.
    The copy is checked against the source's tensors, read with torch in this process."""
    from safetensors.torch import load_file

    src = sharded_bf16_llama_source
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(json.dumps({"models": [str(src)], "hops": [{"model": 0, "layer": 1}, {"model": 0, "layer": 0}]}))
    assert run_python(_COPY, str(recipe), str(tmp_path / "out"), cwd=tmp_path).stdout.rstrip().endswith("ok")
    source = {k: v for f in sorted(src.glob("*.safetensors")) for k, v in load_file(f).items()}
    merged = {k: v for f in sorted((tmp_path / "out").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert merged["model.layers.0.self_attn.q_proj.weight"].equal(source["model.layers.1.self_attn.q_proj.weight"])
    assert merged["model.layers.1.mlp.down_proj.weight"].equal(source["model.layers.0.mlp.down_proj.weight"])
    assert merged["lm_head.weight"].equal(source["lm_head.weight"])


def test_help_imports_no_torch(tmp_path):
    code = "import runpy, sys\nsys.argv = ['dfsmerge', '--help']\ntry:\n    runpy.run_module('dfsmerge', " \
           "run_name='__main__')\nexcept SystemExit as exc:\n    assert exc.code == 0\n" \
           "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    assert "usage: dfsmerge" in run_python(code, cwd=tmp_path).stdout


_LOAD = """
import sys
import torch
{first}
{second}
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
print(type(model).__module__, type(model).__name__)
"""


@pytest.mark.parametrize("first, second", [
    # transformers' modeling files import its Auto module halfway through their own import
    ("import dfsmerge", "from transformers import LlamaForCausalLM"),
    ("from transformers import AutoConfig", "import dfsmerge"),
], ids=["dfsmerge-first", "transformers-first"])
def test_compact_loads_without_remote_code_in_either_import_order(llama_sources, tmp_path, first, second):
    from dfsmerge import Hop, Recipe, Source, Transform, merge

    recipe = Recipe([Source(str(llama_sources[0]))], [Hop(0, 0), Hop(0, 1, Transform(0.7)), Hop(0, 1)]).check()
    out = merge(recipe, tmp_path / "compact", dtype="float32", quiet=True, format="compact")
    result = run_python(_LOAD.format(first=first, second=second), str(out), cwd=tmp_path)
    assert result.stdout.split()[-2:] == ["dfsmerge.modeling_dfs", "DFSLlamaForCausalLM"]


def test_public_names_resolve_to_the_functions():
    """``dfsmerge.merge`` stays the function after ``import dfsmerge.merge`` binds the submodule of that name."""
    import dfsmerge
    import dfsmerge.merge
    from dfsmerge.merge import merge

    assert dfsmerge.merge is merge and callable(dfsmerge.flatten) and callable(dfsmerge.assemble)
    assert set(dfsmerge.__all__) <= set(dir(dfsmerge))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dfsmerge.nope  # noqa: B018
