"""The compiled extensions: ``safeprune_engine._C`` (CPU C++ ops) and ``safeprune_engine._C_cuda`` (CUDA ops).

Loading one registers its ops under ``torch.ops.safeprune_C``. A library that was not built (or fails to load)
is not an error: :func:`cpu_reasons` / :func:`cuda_reasons` return why, and the dispatcher uses the other
backends. Nothing here warns or raises on import.

Registration rule for csrc/ (see csrc/checks.h): each op's schema is defined once, with
``TORCH_LIBRARY_FRAGMENT(safeprune_C, m)`` in its ``<op>_cpu.cpp``; ``<op>_cuda.cpp`` adds only a
``TORCH_LIBRARY_IMPL(safeprune_C, CUDA, m)``. The CUDA library therefore needs the CPU one, which is loaded first.
"""
from __future__ import annotations

import functools
import importlib

import torch

CPU_MODULE = "safeprune_engine._C"
CUDA_MODULE = "safeprune_engine._C_cuda"
NAMESPACE = "safeprune_C"


@functools.cache
def _load(module_name: str) -> str | None:
    """Import a compiled module; the failure as one line, or None when it loaded."""
    try:
        importlib.import_module(module_name)
    except ImportError as error:  # also ModuleNotFoundError: the usual "not built" case
        if isinstance(error, ModuleNotFoundError) and error.name == module_name:
            return (f"{module_name} is not built (reinstall with `pip install --no-build-isolation -e .` "
                    "without SAFEPRUNE_SKIP_NATIVE=1)")
        return f"{module_name} failed to load: {error}"
    except OSError as error:
        return f"{module_name} failed to load: {error}"
    return None


def cpu_reasons() -> list[str]:
    """Why the CPU C++ library is unusable (empty when it is loaded)."""
    failure = _load(CPU_MODULE)
    return [] if failure is None else [failure]


def cuda_reasons() -> list[str]:
    """Why the CUDA library is unusable (empty when it is loaded and a GPU is visible)."""
    if torch.version.cuda is None:
        return [f"torch {torch.__version__} is a CPU-only build"]
    reasons = cpu_reasons()
    if reasons:
        return [f"{CUDA_MODULE} needs {CPU_MODULE}, which is not usable: {reasons[0]}"]
    failure = _load(CUDA_MODULE)
    if failure is not None:
        return [failure]
    if not torch.cuda.is_available():
        return ["no CUDA device is visible"]
    return []


def _schema_exists(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"{NAMESPACE}::{name}", "")
    except RuntimeError:
        return False
    return True


def has_kernel(name: str, dispatch_key: str) -> bool:
    """Whether ``safeprune_C::<name>`` has a kernel for `dispatch_key` ("CPU" or "CUDA")."""
    cpu_reasons()
    if dispatch_key == "CUDA" and torch.version.cuda is not None:
        _load(CUDA_MODULE)
    if not _schema_exists(name):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", dispatch_key)


def op(name: str):
    """``torch.ops.safeprune_C.<name>`` (call only after the reasons came back empty)."""
    return getattr(getattr(torch.ops, NAMESPACE), name)


def native_reasons(op_names: tuple[str, ...], dispatch_key: str) -> list[str]:
    """Input-independent reasons a native backend cannot run: library not loaded, or ops missing from it."""
    reasons = cpu_reasons() if dispatch_key == "CPU" else cuda_reasons()
    if reasons:
        return reasons
    library = CPU_MODULE if dispatch_key == "CPU" else CUDA_MODULE
    missing = [n for n in op_names if not has_kernel(n, dispatch_key)]
    return [f"{library} has no {dispatch_key} kernel for {', '.join(missing)} (rebuild the extension)"] if missing else []


def cpu_isa() -> str | None:
    """The instruction-set copy the CPU kernels run now ("avx512", "avx2", "generic"); None when not built."""
    return None if cpu_reasons() else str(op("cpu_isa")())


def baseline_copy_reasons(*_args, **_kwargs) -> list[str]:
    """Auto-skip reason for a CPU op whose baseline (generic) copy is slower than torch's AVX-512 kernels.

    Measured on a 2-core AMD EPYC (GroupNorm+SiLU, 2x320x64x64 fp32, 1 thread): the generic copy (SSE2 on x86)
    runs the forward in 3.0 ms against torch eager's 1.35 ms with AVX-512, but beats torch's own AVX2 (4.6 ms)
    and baseline (8.4 ms) kernels. So auto's static rule (no timing: SAFEPRUNE_AUTOTUNE=0, torch.compile tracing)
    passes the generic copy over only where torch runs AVX-512 kernels (SAFEPRUNE_CPU_ISA=generic on such a CPU);
    timed auto measures it; backend="cpp" still runs it.
    """
    isa = cpu_isa()
    capability = torch.backends.cpu.get_cpu_capability()
    if isa == "generic" and capability.upper().startswith("AVX512"):
        return [f"the CPU kernels run their generic copy (SAFEPRUNE_CPU_ISA or the CPU) while torch's own kernels use "
                f"{capability}: measured slower than the reference there (backend='cpp' still runs it)"]
    return []
