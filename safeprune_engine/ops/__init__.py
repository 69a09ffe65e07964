"""Fused ops with several implementations each (torch reference, Triton, CUDA, CPU C++), picked per call.

One module per op (``groupnorm_silu``, ``distill_loss``, ``pruned_conv``) holds the torch reference, the backend
declarations, the public ``torch.ops.safeprune.<op>`` custom op and a python function named like the module::

    from safeprune_engine.ops.groupnorm_silu import groupnorm_silu
    y = groupnorm_silu(x, 32, weight, bias, 1e-5)            # backend from $SAFEPRUNE_KERNELS, default auto

Importing this package imports every op module, which registers the ops (op modules import only torch, never
Triton). The functions are not re-exported here: a package attribute named like a submodule would shadow it.
``dispatch`` is the backend machinery (``autotune`` its measured auto choice), ``native`` loads the compiled
libraries. A new op is one new module.
"""
from __future__ import annotations

import pkgutil
from importlib import import_module

_INFRASTRUCTURE = ("autotune", "dispatch", "native")
OP_NAMES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _INFRASTRUCTURE))

for _module in OP_NAMES:
    import_module(f"{__name__}.{_module}")
