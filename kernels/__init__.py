"""Triton kernels of safeprune-engine, installed as ``safeprune_engine.kernels``.

The source folder is called ``kernels``, a name that belongs to another PyPI package which transformers and
bitsandbytes probe for. When this folder is picked up under that bare name (the repository root on sys.path,
e.g. ``python -c`` run from a checkout), it presents itself as an empty namespace package, which is what
those probes read as "not installed", and exports nothing.
"""
if __name__ == "kernels":
    __file__ = None  # probes treat a package without __file__ and __version__ as a stray namespace dir
else:
    _LAZY = {"patch_unet": "safeprune_engine.patching", "unpatch_unet": "safeprune_engine.patching"}

    def __getattr__(name):
        # patch_unet/unpatch_unet live in safeprune_engine.patching (diffusers-free until called); importing
        # this package must not import it, nor any Triton kernel module
        if name in _LAZY:
            import importlib

            return getattr(importlib.import_module(_LAZY[name]), name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def __dir__():
        return sorted(list(globals()) + list(_LAZY))
