"""The native build: every CUDA source compiles with nvcc alone (sm_80 and sm_90), the CUDA glue type-checks
against torch's headers, the CUDA sources stay free of torch headers, the glue follows the one-schema rule, and
the CPU library is built, loaded and complete."""
import os
import re
import shutil
import subprocess
import sysconfig
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


def _cuda_include_dir(nvcc: str) -> str | None:
    """The toolkit's include folder, as nvcc itself passes it (nvcc may be a wrapper script outside the toolkit)."""
    dryrun = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull], capture_output=True,
                            text=True, timeout=60)
    found = re.search(r'INCLUDES="-I([^"]+)"', dryrun.stdout + dryrun.stderr)
    return found.group(1) if found else None


@pytest.mark.parametrize("source", sorted(CSRC.glob("*_cuda.cpp")), ids=lambda p: p.name)
def test_cuda_glue_type_checks_against_torch_headers(source, tmp_path):
    """The torch side of the CUDA library (<op>_cuda.cpp) compiles (syntax and types, no code) against the installed
    torch and the CUDA toolkit, so a changed kernel signature or launcher contract is caught without a GPU or a
    CUDA build of torch. A CPU wheel lacks one generated header of c10/cuda; a stand-in is searched after torch's
    own include folders, so a CUDA build of torch uses its real one."""
    from torch.utils.cpp_extension import include_paths

    nvcc, cxx = shutil.which("nvcc"), shutil.which("g++") or shutil.which("c++")
    if nvcc is None or cxx is None:
        pytest.skip("nvcc or a C++ compiler is not on PATH")
    cuda_include = _cuda_include_dir(nvcc)
    assert cuda_include and (Path(cuda_include) / "cuda_runtime.h").exists(), cuda_include
    stand_in = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stand_in.parent.mkdir(parents=True)
    stand_in.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [f"-I{d}" for d in [CSRC, *include_paths(), sysconfig.get_paths()["include"], cuda_include]]
    result = subprocess.run([cxx, "-fsyntax-only", "-std=c++20", "-Wall", "-DTORCH_API_INCLUDE_EXTENSION_H",
                             "-DTORCH_EXTENSION_NAME=_C_cuda", *includes, f"-idirafter{tmp_path}", str(source)],
                            capture_output=True, text=True, timeout=600)
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
