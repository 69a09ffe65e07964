"""Nothing in the checkout shadows an installed package (house rule 9), checked in fresh subprocesses.

Two folders of the repository end up first on sys.path: the root (``python -c``, ``python -m``, notebooks and
subprocesses started there) and benchmarks/ (a script's own folder is its sys.path[0]). The top-level folder
``kernels/`` shares its name with a PyPI distribution that transformers, diffusers and bitsandbytes import; a fake
installed ``kernels`` distribution makes these tests independent of whether the real one happens to be installed.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

# how each folder gets onto sys.path: as the working directory of `python -c`, or as the folder of a script run
# there (sys.path[0] is then the folder itself, which `-c` code can set before its first import)
PLACES = {
    "root -c": (ROOT, ""),
    "benchmarks -c": (BENCHMARKS, ""),
    "benchmarks script": (ROOT, f"import sys; sys.path[0] = {str(BENCHMARKS)!r}\n"),
}


def run_python(place: str, code: str, extra_path: Path | None = None) -> str:
    """Run `code` in a fresh interpreter placed as `place`; `extra_path` goes on sys.path after the checkout."""
    cwd, prologue = PLACES[place]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if extra_path is not None:
        # after anything the caller's PYTHONPATH holds: an installed package comes after the working directory
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(extra_path)) if p)
    result = subprocess.run([sys.executable, "-c", prologue + textwrap.dedent(code)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{place}: exit {result.returncode}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture
def fake_kernels_distribution(tmp_path):
    """A folder holding an installed-looking `kernels` distribution: a regular package plus its dist-info."""
    package = tmp_path / "kernels"
    package.mkdir()
    (package / "__init__.py").write_text("__version__ = '0.18.2'\n\n\nclass CUDAProperties:\n    pass\n")
    info = tmp_path / "kernels-0.18.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.18.2\n")
    (info / "top_level.txt").write_text("kernels\n")
    return tmp_path


@pytest.mark.parametrize("place", PLACES)
def test_diffusers_and_our_kernels_import_from_the_checkout(place):
    out = run_python(place, """
        import importlib.util, json, sys
        from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
        import safeprune_engine.kernels

        bare = sys.modules.get("kernels")  # imported by a probe of transformers/diffusers, or absent
        print(json.dumps({
            "classes": [c.__module__ for c in (AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel)],
            "kernels_path": list(safeprune_engine.kernels.__path__),
            "pruned_conv": importlib.util.find_spec("safeprune_engine.kernels.pruned_conv").origin,
            "bare_kernels": None if bare is None else [getattr(bare, "__file__", None), list(getattr(bare, "__path__", []))],
            "triton_imported": "triton" in sys.modules,
        }))
    """)
    seen = json.loads(out.splitlines()[-1])
    assert all(module.startswith("diffusers.") for module in seen["classes"])
    assert [Path(p).resolve() for p in seen["kernels_path"]] == [(ROOT / "kernels").resolve()]
    assert Path(seen["pruned_conv"]).resolve() == (ROOT / "kernels" / "pruned_conv.py").resolve()
    if seen["bare_kernels"] is not None:  # whatever `kernels` resolved to, it is none of this checkout's files
        file, path = seen["bare_kernels"]  # (an installed one may lie under the root: make install's .venv does)
        ours = (ROOT / "kernels", BENCHMARKS)
        assert file is None or not any(Path(file).resolve().is_relative_to(o.resolve()) for o in ours), file


@pytest.mark.parametrize("place", PLACES)
def test_an_installed_kernels_package_wins_over_the_checkout(place, fake_kernels_distribution):
    out = run_python(place, """
        import kernels
        from kernels import CUDAProperties
        print(kernels.__file__)
    """, extra_path=fake_kernels_distribution)
    assert Path(out.splitlines()[-1]) == fake_kernels_distribution / "kernels" / "__init__.py"


def importable_names(folder: Path) -> dict[str, str]:
    """Top-level names a folder on sys.path offers: its modules and folders named like identifiers -> entry."""
    names = {}
    for entry in sorted(folder.iterdir()):
        name = entry.name.split(".")[0] if entry.is_file() and entry.suffix in (".py", ".so", ".pyd") else entry.name
        if entry.is_dir() and "." in entry.name:
            continue
        if name.isidentifier():
            names[name] = entry.name
    return names


@pytest.mark.parametrize("place", ["root -c", "benchmarks script"])
def test_no_name_of_the_checkout_resolves_to_it_over_an_installed_or_stdlib_module(place, fake_kernels_distribution):
    folder = BENCHMARKS if "benchmarks" in place else ROOT
    names = importable_names(folder)
    out = run_python(place, f"""
        import importlib.metadata, importlib.util, json, sys
        from pathlib import Path

        folder, names = Path({str(folder)!r}), {names!r}
        installed = {{name for name, dists in importlib.metadata.packages_distributions().items()
                      if set(dists) != {{"safeprune-engine"}}}}  # our own package may resolve to our checkout
        candidates = sorted(set(names) & (installed | set(sys.stdlib_module_names)))
        clashes = {{}}
        for name in candidates:
            spec = importlib.util.find_spec(name)
            where = [] if spec is None else [spec.origin or "", *(spec.submodule_search_locations or [])]
            mine = (folder / names[name]).resolve()
            hits = [w for w in where if w and Path(w).resolve().is_relative_to(mine)]
            if hits:
                clashes[name] = hits
        print(json.dumps({{"candidates": candidates, "clashes": clashes}}))
    """, extra_path=fake_kernels_distribution)
    seen = json.loads(out.splitlines()[-1])
    if folder == ROOT:  # the root's kernels/ folder competes with the fake distribution, which counts as installed
        assert "kernels" in names and "kernels" in seen["candidates"]
    assert seen["clashes"] == {}
