"""The package's import layering (issue 9): modules import only downward, following the data.

The contract itself is ``[tool.importlinter]`` in ``pyproject.toml``; this runs import-linter's ``lint-imports``
on it, so the suite fails on an upward import or a cycle (imports inside functions count).
"""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports() -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    return subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_import_contract_is_kept():
    result = _lint_imports()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_every_module_is_in_a_layer():
    """A new module outside the contract would escape the check."""
    text = (ROOT / "pyproject.toml").read_text()
    modules = {p.stem for p in (ROOT / "dfsmerge").glob("*.py")} - {"__init__", "__main__"}
    missing = sorted(m for m in modules if f"dfsmerge.{m}" not in text)
    assert not missing, f"modules missing from the import-linter layers: {missing}"


def test_contract_would_catch_an_upward_import(tmp_path):
    """The check can fail: the same contract over a copy of the package with one upward import in a function."""
    copy = tmp_path / "dfsmerge"
    shutil.copytree(ROOT / "dfsmerge", copy, ignore=shutil.ignore_patterns("__pycache__"))
    with (copy / "plan.py").open("a") as f:
        f.write("\n\ndef _upward():\n    from .merge import merge\n    return merge\n")
    shutil.copyfile(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    result = subprocess.run([exe, "--config", str(tmp_path / "pyproject.toml")], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode != 0 and "dfsmerge.plan -> dfsmerge.merge" in result.stdout, result.stdout
