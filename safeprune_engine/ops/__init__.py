"""Fused ops with several implementations each (torch reference, Triton, CUDA, CPU C++), picked per call.

One module per op (``groupnorm_silu``, ``distill_loss``, ``pruned_conv``) holds the torch reference, the backend
declarations, the public ``torch.ops.safeprune.<op>`` custom op and a python function named like the module,
which this package exports (importing it registers every op; op modules import only torch, never Triton)::

    from safeprune_engine.ops import groupnorm_silu
    y = groupnorm_silu(x, 32, weight, bias, 1e-5)            # backend from $SAFEPRUNE_KERNELS, default auto

``dispatch`` is the backend machinery, ``native`` loads the compiled libraries. A new op is one new module here
whose public function has the module's name.
"""
from __future__ import annotations

import pkgutil
from importlib import import_module

_INFRASTRUCTURE = ("dispatch", "native")
OP_NAMES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _INFRASTRUCTURE))


def _bind_public_functions() -> None:
    for name in OP_NAMES:
        # the function replaces the submodule attribute that the import just set
        globals()[name] = getattr(import_module(f"{__name__}.{name}"), name)


_bind_public_functions()

__all__ = list(OP_NAMES)
