"""Build script.

The pure-Python package is always built. A native extension (safeprune_engine._C, sources in csrc/) is
added here once csrc/ holds sources; SAFEPRUNE_SKIP_NATIVE=1 skips it. The Triton kernels live in the
top-level kernels/ folder and are installed as safeprune_engine.kernels.
"""
import os

from setuptools import setup

PACKAGES = [
    "safeprune_engine",
    "safeprune_engine.models",
    "safeprune_engine.prune",
    "safeprune_engine.distill",
    "safeprune_engine.unlearn",
    "safeprune_engine.bilevel",
    "safeprune_engine.data",
    "safeprune_engine.toy",
    "safeprune_engine.eval",
    "safeprune_engine.kernels",
]


def native_extensions():
    """C++/CUDA extensions from csrc/; empty until csrc/ holds sources."""
    if os.environ.get("SAFEPRUNE_SKIP_NATIVE") == "1":
        return [], {}
    sources = sorted(
        os.path.join("csrc", name) for name in os.listdir("csrc") if name.endswith((".cpp", ".cu"))
    ) if os.path.isdir("csrc") else []
    if not sources:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    cpp_sources = [s for s in sources if s.endswith(".cpp")]
    ext = CppExtension("safeprune_engine._C", cpp_sources, extra_compile_args=["-O3", "-fopenmp"],
                       extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension}


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
