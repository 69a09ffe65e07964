"""Build script.

The pure-Python package is always built. Native extensions, sources in csrc/:

* ``safeprune_engine._C`` (CPU C++ ops, OpenMP): csrc/*_cpu.cpp + csrc/module.cpp, always built.
* ``safeprune_engine._C_cuda`` (CUDA ops): csrc/*.cu + csrc/*_cuda.cpp + csrc/module.cpp, built only when torch
  is a CUDA build and a CUDA toolkit (nvcc) is found.

Environment switches: SAFEPRUNE_SKIP_NATIVE=1 builds neither (the ops then run on Triton or the torch reference);
SAFEPRUNE_SKIP_CUDA=1 builds only the CPU library; SAFEPRUNE_CUDA_ARCHS="8.0;9.0" picks the GPU architectures
(default: torch's TORCH_CUDA_ARCH_LIST rule, i.e. the visible GPUs); SAFEPRUNE_NVCC_THREADS (default 4) and
MAX_JOBS (default from free memory) bound the build's parallelism. The Triton kernels live in the top-level
kernels/ folder and are installed as safeprune_engine.kernels (see safeprune_engine/kernels.py).
"""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
# every package with an __init__.py (new ones ship without editing this file), plus the Triton kernels: the top-level
# kernels/ folder has no __init__.py (so that it never shadows the PyPI package `kernels`) and is mapped by package_dir
PACKAGES = find_packages(HERE, include=["safeprune_engine", "safeprune_engine.*"]) + ["safeprune_engine.kernels"]


def _csrc(predicate) -> list[str]:
    folder = os.path.join(HERE, CSRC)
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(CSRC, name) for name in os.listdir(folder) if predicate(name))


def _default_max_jobs() -> str:
    """About 2 GiB of free memory per compiler job (nvcc and template-heavy C++ need it), at least 1."""
    try:
        with open("/proc/meminfo") as f:
            free_kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return str(os.cpu_count() or 1)
    return str(max(1, min(os.cpu_count() or 1, free_kib // (2 * 1024 * 1024))))


def native_extensions():
    """The CPU extension always, the CUDA one when torch and the machine support it (see the module docstring)."""
    if os.environ.get("SAFEPRUNE_SKIP_NATIVE") == "1":
        return [], {}
    cpu_sources = _csrc(lambda n: n.endswith("_cpu.cpp"))
    if not cpu_sources:
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension

    os.environ.setdefault("MAX_JOBS", _default_max_jobs())
    include = [os.path.join(HERE, CSRC)]
    # -fno-trapping-math lets GCC if-convert (and so vectorise) the clamps in the kernels' loops
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-DNDEBUG"]
    extensions = [CppExtension("safeprune_engine._C", cpu_sources + [os.path.join(CSRC, "module.cpp")],
                               include_dirs=include, extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"])]
    cuda_sources = _csrc(lambda n: n.endswith((".cu", "_cuda.cpp")))
    want_cuda = os.environ.get("SAFEPRUNE_SKIP_CUDA") != "1" and cuda_sources
    if want_cuda and torch.version.cuda is not None and CUDA_HOME is not None:
        from torch.utils.cpp_extension import CUDAExtension

        archs = os.environ.get("SAFEPRUNE_CUDA_ARCHS")
        if archs:
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # torch turns it into -gencode flags
        nvcc_flags = ["-O3", "-DNDEBUG", "--use_fast_math", "-lineinfo",
                      "--threads", os.environ.get("SAFEPRUNE_NVCC_THREADS", "4")]
        extensions.append(CUDAExtension(
            "safeprune_engine._C_cuda", cuda_sources + [os.path.join(CSRC, "module.cpp")], include_dirs=include,
            extra_compile_args={"cxx": ["-O3", "-DNDEBUG"], "nvcc": nvcc_flags}))
    elif want_cuda:
        why = "torch is a CPU build" if torch.version.cuda is None else "no CUDA toolkit (CUDA_HOME/nvcc) found"
        print(f"safeprune-engine: not building safeprune_engine._C_cuda: {why}")
    return extensions, {"build_ext": BuildExtension}


ext_modules, cmdclass = native_extensions()

setup(
    packages=PACKAGES,
    # the shipped toy teacher and judge (safetensors + configs) travel with the package
    package_data={"safeprune_engine.toy": ["assets/**/*"]},
    include_package_data=True,
    package_dir={"safeprune_engine.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
