"""The package's layering, as the import-linter contracts in pyproject.toml write it down: no upward import, no
cycle, the engine never imports the toy world, shipped code never imports the test helpers. Function-local
imports count. A self-test proves the contracts can fail."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("importlinter", reason="import-linter is not installed (pip install 'safeprune-engine[dev]')")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """lint-imports over the safeprune_engine package under `root`, with the contracts of root/pyproject.toml."""
    env = dict(os.environ, PYTHONPATH=str(root))  # the package in `root`, not an installed copy
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--no-cache"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)


def test_import_contracts_hold():
    done = lint_imports(ROOT)
    assert "Contracts:" in done.stdout, done.stdout + done.stderr  # the contracts were read and checked
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


def test_contracts_catch_an_upward_import_and_a_cycle(tmp_path):
    """A copy of the package with two planted violations, both function-local imports: errors (the lowest layer)
    imports the run layer, and the run's session imports its job module (a cycle inside the run layer)."""
    copy = tmp_path / "checkout"
    shutil.copytree(ROOT / "safeprune_engine", copy / "safeprune_engine",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    with open(copy / "safeprune_engine" / "errors.py", "a") as errors:
        errors.write("\n\ndef _planted():\n    from .run import job  # noqa: F401\n")
    with open(copy / "safeprune_engine" / "run" / "session.py", "a") as session:
        session.write("\n\ndef _planted():\n    from . import job  # noqa: F401\n")
    done = lint_imports(copy)
    report = done.stdout
    assert done.returncode != 0, report
    assert "safeprune_engine.errors -> safeprune_engine.run.job" in report, report[-6000:]
    assert "safeprune_engine.run.session -> safeprune_engine.run.job" in report, report[-6000:]
    # the run layer's own contract (kept on the real package, see above) is the one that breaks for the cycle
    assert "Run layer order BROKEN" in report.split("Broken contracts")[0]
