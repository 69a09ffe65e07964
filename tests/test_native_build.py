"""The native build: every CUDA source compiles with nvcc alone (sm_80 and sm_90), the CUDA sources stay free of
torch headers, the glue follows the one-schema rule, and the CPU library is built, loaded and complete."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from safeprune_engine.ops import native

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CUDA_SOURCES = sorted(CSRC.glob("*.cu"))
ARCHS = ("80", "90")


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[p.name for p in CUDA_SOURCES])
def test_cuda_source_compiles_with_nvcc_alone(source, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the CUDA sources cannot be compile-checked on this machine")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    result = subprocess.run([nvcc, "-c", "-O3", "-std=c++17", *gencode, f"-I{CSRC}", str(source),
                             "-o", str(tmp_path / "out.o")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "warning" not in result.stderr.lower(), result.stderr[-4000:]


def test_cuda_sources_include_no_torch_headers():
    for path in sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cuh")):
        includes = re.findall(r'#include\s+[<"]([^>"]+)[>"]', path.read_text())
        torch_headers = [h for h in includes if h.split("/")[0] in ("torch", "ATen", "c10", "caffe2")]
        assert not torch_headers, f"{path.name} includes {torch_headers}: .cu/.cuh must compile with nvcc alone"


def test_each_schema_is_defined_once_in_a_cpu_file():
    """Schemas live in <op>_cpu.cpp (always built); <op>_cuda.cpp only adds CUDA kernels (see csrc/checks.h)."""
    for path in sorted(CSRC.glob("*_cuda.cpp")):
        text = path.read_text()
        assert "m.def(" not in text and "TORCH_LIBRARY_FRAGMENT" not in text, path.name
        assert "TORCH_LIBRARY_IMPL(safeprune_C, CUDA" in text, path.name


def _cpu_schemas() -> list[str]:
    names = []
    for path in sorted(CSRC.glob("*_cpu.cpp")):
        names += re.findall(r'm\.def\(\s*"([A-Za-z0-9_]+)\(', path.read_text())
    return names


@pytest.mark.skipif(os.environ.get("SAFEPRUNE_SKIP_NATIVE") == "1", reason="SAFEPRUNE_SKIP_NATIVE=1: not built")
def test_cpu_extension_is_built_loaded_and_has_every_op():
    assert native.cpu_reasons() == [], "the CPU extension must be built by `pip install --no-build-isolation -e .`"
    schemas = _cpu_schemas()
    assert "groupnorm_silu_forward" in schemas and "distill_loss_backward" in schemas
    missing = [name for name in schemas if not native.has_kernel(name, "CPU") and name != "cpu_isa"]
    assert not missing, f"rebuild the extension: the loaded library lacks {missing}"
    assert torch.ops.safeprune_C.cpu_isa() in ("generic", "avx2", "avx512")


def test_missing_cuda_library_is_a_reason_not_an_error():
    reasons = native.cuda_reasons()
    if torch.cuda.is_available() and not reasons:
        assert native.has_kernel("groupnorm_silu_forward", "CUDA")
    else:
        assert reasons and all(isinstance(r, str) and r for r in reasons)
