"""What loading an exported student needs: safeprune-engine imported, or (remote_code=True) nothing but diffusers.

Width-pruned students are PrunedUNet2DConditionModel; block-removal students are plain UNet2DConditionModel.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safeprune_engine.errors import SafepruneError
from safeprune_engine.models import pruned_unet
from safeprune_engine.models.export import REMOTE_CODE_MODULE, export_pipeline, load_pipeline, ship_unet_code
from safeprune_engine.models.pruned_unet import PrunedUNet2DConditionModel
from safeprune_engine.prune.bk import bk_student
from safeprune_engine.prune.width import prune
from safeprune_engine.testing import tiny_pipeline

ROUNDTRIP_ATOL = 5e-5
REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red square on noise"


def unet_inputs(seed: int, batch: int = 2, text_len: int = 6) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 4, 8, 8, generator=gen),
        timestep=torch.randint(0, 1000, (batch,), generator=gen),
        encoder_hidden_states=torch.randn(batch, text_len, 32, generator=gen),
    )


@pytest.fixture(scope="module")
def teacher():
    # a pipeline has the vae/text_encoder/tokenizer/scheduler attributes export_pipeline reads from a TeacherBundle
    return tiny_pipeline(seed=3)


@pytest.fixture(scope="module")
def width_student(teacher):
    student, _ = prune(teacher.unet, ratio=0.5)
    return student.eval()


@pytest.fixture(scope="module")
def exports(teacher, width_student, tmp_path_factory):
    """{"width": a remote-code export of the width-pruned student, "bk": a remote-code export of a BK student}."""
    base = tmp_path_factory.mktemp("exports")
    bk, _ = bk_student(teacher.unet, "bk-small")
    return {
        "width": export_pipeline(teacher, width_student, base / "width", remote_code=True),
        "bk": export_pipeline(teacher, bk.eval(), base / "bk", remote_code=True),
        "bk_student": bk.eval(),
    }


def module_imports(path: Path) -> set[str]:
    """Top-level names of every module a Python file imports by statement ('.' for relative imports)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." if node.level else node.module.split(".")[0])
    return names


def test_pruned_unet_module_depends_on_torch_and_diffusers_only():
    # what lets the file ship verbatim: diffusers copies a remote file alone (a relative import breaks the copy)
    # and asks users to install every package its import statements name
    imports = module_imports(Path(pruned_unet.__file__))
    assert imports - set(sys.stdlib_module_names) <= {"torch", "diffusers"}, imports


def test_remote_code_export_ships_the_class_source_verbatim(exports, width_student):
    path = exports["width"]
    shipped = path / "unet" / f"{REMOTE_CODE_MODULE}.py"
    assert shipped.read_bytes() == Path(pruned_unet.__file__).read_bytes()
    index = json.loads((path / "model_index.json").read_text())
    assert index["unet"] == [REMOTE_CODE_MODULE, "PrunedUNet2DConditionModel"]
    assert json.loads((path / "unet" / "config.json").read_text())["pruned_widths"] == width_student.pruned_widths

    # the shipped file, imported on its own, builds the same model from the exported folder
    spec = importlib.util.spec_from_file_location("shipped_pruned_unet_copy", shipped)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    copy_class = module.PrunedUNet2DConditionModel
    assert copy_class is not PrunedUNet2DConditionModel and copy_class.__module__ == "shipped_pruned_unet_copy"
    loaded = copy_class.from_pretrained(path / "unet").eval()
    inputs = unet_inputs(seed=11)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).sample, width_student(**inputs).sample, atol=ROUNDTRIP_ATOL, rtol=0)
    # inside safeprune-engine the copy raises the package's error type
    with pytest.raises(SafepruneError, match="unknown sections"):
        module.normalize_widths({"blocks": {}})


def test_load_pipeline_uses_the_installed_class_for_a_remote_code_export(exports, width_student):
    pipe = load_pipeline(exports["width"])
    assert type(pipe.unet) is PrunedUNet2DConditionModel  # not the shipped copy: no code from the folder runs
    assert pipe.config.unet == ("safeprune_engine", "PrunedUNet2DConditionModel")
    inputs = unet_inputs(seed=12)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(**inputs).sample, width_student(**inputs).sample,
                                   atol=ROUNDTRIP_ATOL, rtol=0)
    image = pipe(PROMPT, num_inference_steps=1, output_type="np").images  # default size from the unet's config
    assert image.shape == (1, 16, 16, 3)


def test_block_removal_students_stay_plain(exports):
    path = exports["bk"]
    assert not list((path / "unet").glob("*.py"))
    assert json.loads((path / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]
    with pytest.raises(SafepruneError, match="not a PrunedUNet2DConditionModel"):
        ship_unet_code(path)


def test_exported_student_loads_once_the_package_is_imported(exports, tmp_path):
    # diffusers 0.42 imports only its own libraries by name and finds any other library in sys.modules: plain
    # from_pretrained refuses until `import safeprune_engine` ran; load_pipeline works (it imports the package)
    path = tmp_path / "pipe"
    shutil.copytree(exports["width"], path)
    (path / "unet" / f"{REMOTE_CODE_MODULE}.py").unlink()  # the default export: no shipped code
    index = json.loads((path / "model_index.json").read_text())
    (path / "model_index.json").write_text(json.dumps({**index, "unet": ["safeprune_engine", index["unet"][1]]}))
    script = (
        "import sys\n"
        "from diffusers import StableDiffusionPipeline\n"
        "try:\n"
        "    StableDiffusionPipeline.from_pretrained(sys.argv[1])\n"
        "except ValueError as error:\n"
        "    assert 'import safeprune_engine before' in str(error), error\n"
        "else:\n"
        "    raise SystemExit('loaded without importing safeprune_engine')\n"
        "assert 'safeprune_engine' not in sys.modules\n"
        "import safeprune_engine\n"
        "pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])\n"
        "assert type(pipe.unet) is safeprune_engine.PrunedUNet2DConditionModel, type(pipe.unet)\n"
        "assert type(safeprune_engine.load_pipeline(sys.argv[1]).unet) is type(pipe.unet)\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(path)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]


# Runs in `python -I` (ignores PYTHONPATH, puts neither cwd nor the script's folder on sys.path) from a temp cwd, so
# the checkout is unreachable by path. The venv may still provide safeprune-engine through an installed package or
# an editable-install finder on sys.meta_path, so a first finder refuses the name outright: that covers every way
# the package could be installed, and the script asserts that the import fails before it loads anything.
NO_PACKAGE_SCRIPT = """
import importlib.abc, sys


class RefuseSafeprune(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "safeprune_engine":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, RefuseSafeprune())
try:
    import safeprune_engine
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("safeprune_engine is importable")

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel

torch.set_num_threads(1)
width, bk, work = sys.argv[1:4]
try:
    DiffusionPipeline.from_pretrained(width)
except ValueError as error:
    assert "trust_remote_code" in str(error), error
else:
    raise SystemExit("the shipped code ran without trust_remote_code")
pipe = DiffusionPipeline.from_pretrained(width, trust_remote_code=True)
unet_class = type(pipe.unet)
assert unet_class.__name__ == "PrunedUNet2DConditionModel", unet_class
assert unet_class.__module__.startswith("diffusers_modules."), unet_class.__module__
try:  # without the package, the copy raises its own ValueError subclass
    sys.modules[unet_class.__module__].normalize_widths({"blocks": {}})
except ValueError as error:
    assert "unknown sections" in str(error) and type(error).__name__ == "SafepruneError", repr(error)
else:
    raise SystemExit("bad widths accepted")
plain = StableDiffusionPipeline.from_pretrained(bk)
assert type(plain.unet) is UNet2DConditionModel, type(plain.unet)

inputs = torch.load(work + "/inputs.pt", weights_only=True)
with torch.no_grad():
    out = {"width": pipe.unet(**inputs).sample, "bk": plain.unet(**inputs).sample}
images = pipe(sys.argv[4], num_inference_steps=2, height=16, width=16, output_type="pt",
              generator=torch.Generator().manual_seed(0)).images
out["images"] = images
torch.save(out, work + "/out.pt")
leaked = sorted(name for name in sys.modules if name.split(".")[0] == "safeprune_engine")
assert not leaked, leaked
"""


def test_remote_code_export_loads_without_the_package(exports, width_student, tmp_path):
    width, bk = tmp_path / "width", tmp_path / "bk"
    shutil.copytree(exports["width"], width)
    shutil.copytree(exports["bk"], bk)
    inputs = unet_inputs(seed=13)
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-I", "-c", NO_PACKAGE_SCRIPT, str(width), str(bk), str(tmp_path), PROMPT],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # diffusers ran the shipped file from its modules cache, not from the export folder
    assert (tmp_path / "modules" / "diffusers_modules" / "local" / f"{REMOTE_CODE_MODULE}.py").is_file()

    out = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(out["width"], width_student(**inputs).sample, atol=ROUNDTRIP_ATOL, rtol=0)
        torch.testing.assert_close(out["bk"], exports["bk_student"](**inputs).sample, atol=ROUNDTRIP_ATOL, rtol=0)
    here = load_pipeline(exports["width"])
    expected = here(PROMPT, num_inference_steps=2, height=16, width=16, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images
    assert out["images"].shape == (1, 3, 16, 16)
    torch.testing.assert_close(out["images"], expected, atol=ROUNDTRIP_ATOL, rtol=0)


def test_safeprune_prune_export_remote_code_flag(tmp_path, capsys):
    """`safeprune prune --export-remote-code` writes the remote-code export; without the flag the unet folder
    holds no code and model_index names the package's class."""
    from safeprune_engine.cli import main
    from safeprune_engine.testing import save_tiny_pipeline

    teacher_dir = save_tiny_pipeline(tmp_path / "teacher", seed=0)
    plain, remote = tmp_path / "plain", tmp_path / "remote"
    common = ["prune", "--teacher", str(teacher_dir), "--prune-ratio", "0.5", "--latency-repeats", "1"]
    assert main(common + ["--out", str(plain)]) == 0
    assert main(common + ["--out", str(remote), "--export-remote-code"]) == 0
    capsys.readouterr()
    assert not list((plain / "unet").glob("*.py"))
    assert json.loads((plain / "model_index.json").read_text())["unet"][0] == "safeprune_engine"
    shipped = remote / "unet" / f"{REMOTE_CODE_MODULE}.py"
    assert shipped.read_bytes() == Path(pruned_unet.__file__).read_bytes()
    assert json.loads((remote / "model_index.json").read_text())["unet"][0] == REMOTE_CODE_MODULE


def test_safeprune_run_export_remote_code_flag(tmp_path, capsys):
    """`safeprune run --export-remote-code` ships the pruned UNet class in the run's exported pipeline."""
    from safeprune_engine.cli import main
    from safeprune_engine.testing import save_tiny_pipeline, write_image_folder

    teacher_dir = save_tiny_pipeline(tmp_path / "teacher", seed=0)
    data = write_image_folder(tmp_path / "data", ["a red square", "a blue square"] * 2, size=16)
    out = tmp_path / "run"
    assert main(["run", "--teacher", str(teacher_dir), "--data", str(data), "--method", "distill-only",
                 "--steps", "1", "--batch-size", "2", "--resolution", "16", "--no-progress",
                 "--export-remote-code", "--out", str(out)]) == 0
    capsys.readouterr()
    shipped = out / "pipeline" / "unet" / f"{REMOTE_CODE_MODULE}.py"
    assert shipped.read_bytes() == Path(pruned_unet.__file__).read_bytes()
    assert json.loads((out / "pipeline" / "model_index.json").read_text())["unet"][0] == REMOTE_CODE_MODULE
