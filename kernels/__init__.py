"""Triton kernels of safeprune-engine, installed as ``safeprune_engine.kernels``.

The source folder is called ``kernels``, a name that belongs to another PyPI package which transformers and
bitsandbytes probe for. When this folder is picked up under that bare name (the repository root on sys.path,
e.g. ``python -c`` run from a checkout), it presents itself as an empty namespace package, which is what
those probes read as "not installed", and exports nothing.
"""
if __name__ == "kernels":
    __file__ = None  # probes treat a package without __file__ and __version__ as a stray namespace dir
else:
    pass
