"""The fused ops' Triton kernels, imported as ``safeprune_engine.kernels.<op>`` (importing this imports none).

Their sources live in the repository's top-level ``kernels/`` folder, which has no ``__init__.py`` on purpose: a
regular package there is found as the top-level package ``kernels`` (a PyPI distribution that transformers,
diffusers and bitsandbytes import) whenever the checkout is on sys.path. A folder without ``__init__.py`` is at
most a namespace portion, which Python ranks below any installed package, so it shadows nothing.

This module is the package: its ``__path__`` is that folder. Wheels install the folder next to this file
(setup.py's package_dir); a checkout or editable install uses the repository's folder (setuptools' editable finder
cannot import a mapped folder that has no ``__init__.py``).
"""
from pathlib import Path

_HERE = Path(__file__).parent
# the installed copy first: in site-packages the folder beside safeprune_engine/ may be the PyPI package `kernels`
__path__ = [str(folder) for folder in (_HERE / "kernels", _HERE.parent / "kernels") if folder.is_dir()][:1]
