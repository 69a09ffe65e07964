"""Backend dispatch for the fused ops: every op has up to four implementations, picked by declared capability.

Each op registers one :class:`Backend` per implementation under a name from :data:`BACKEND_NAMES`. A backend
says what it cannot do as readable reasons (``not_supported_reasons(*args, **kwargs)``; an empty list means it
can run these arguments). Called without arguments it reports only what does not depend on the inputs (library
not built, Triton not installed), which is what ``python -m safeprune_engine.info`` shows.

:func:`choose` picks:

* ``backend=None``: the environment variable ``SAFEPRUNE_KERNELS`` (``auto`` when unset).
* ``"auto"``: among the backends with no reasons (the reference always runs; never Triton for CPU tensors: the
  interpreter is a test tool, slower than the reference), the one that measured fastest on this call's key
  (shapes, dtypes, layouts, grads, device), timed once and cached on disk per device (see ``autotune``;
  ops declare how to time themselves with :func:`register_benchmark`). Where timing is off
  (``SAFEPRUNE_AUTOTUNE=0``) or impossible (torch.compile tracing, fake tensors, CUDA graph capture, an op without
  a benchmark), the static rule: the first in :data:`BACKEND_NAMES` order with no reasons and no auto-skip
  reasons. Auto-skip reasons (``auto_skip_reasons``) say why a backend runs but should not be chosen without a
  measurement, e.g. a CPU kernel copy measured slower than torch's own kernels on such CPUs; forcing it still
  runs it.
* ``"off"`` / ``"reference"``: the reference.
* ``"cuda"`` / ``"triton"`` / ``"cpp"``: that backend, or a :class:`SafepruneError` listing why it cannot run.
  A forced backend never falls back silently.

Triton runs on CUDA tensors, and on CPU tensors only when its interpreter is on (``TRITON_INTERPRET=1`` set
before the kernel module was imported: Triton decides at decoration time).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Callable, Iterable

import torch

from safeprune_engine.errors import SafepruneError
from safeprune_engine.ops import autotune

BACKEND_NAMES = ("cuda", "triton", "cpp", "reference")  # auto priority order
ENV_VAR = "SAFEPRUNE_KERNELS"
MODES = ("auto", "off") + BACKEND_NAMES

_REGISTRY: dict[str, dict[str, "Backend"]] = {}


class Backend:
    """One implementation of one op.

    Either subclass it (override ``not_supported_reasons`` and ``__call__``) or build it from functions:
    ``Backend("cpp", run_fn, reasons_fn)`` where ``reasons_fn(*args, **kwargs) -> list[str]`` takes the op's
    arguments (and must accept none, then returning only input-independent reasons). ``auto_reasons`` (same
    signature) lists why auto should pass it over although it can run (slower than the reference here).
    """

    name: str = ""

    def __init__(self, name: str | None = None, fn: Callable | None = None,
                 reasons: Callable[..., Iterable[str]] | None = None,
                 auto_reasons: Callable[..., Iterable[str]] | None = None):
        if name is not None:
            self.name = name
        self._fn = fn
        self._reasons = reasons
        self._auto_reasons = auto_reasons

    def not_supported_reasons(self, *args, **kwargs) -> list[str]:
        return [] if self._reasons is None else list(self._reasons(*args, **kwargs))

    def auto_skip_reasons(self, *args, **kwargs) -> list[str]:
        """Why auto mode passes this backend over although it can run (empty: auto may pick it)."""
        return [] if self._auto_reasons is None else list(self._auto_reasons(*args, **kwargs))

    def __call__(self, *args, **kwargs):
        if self._fn is None:
            raise TypeError(f"backend {self.name!r} was built without a function and does not override __call__")
        return self._fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"


def register(op_name: str, backend: Backend) -> Backend:
    """Register `backend` for `op_name` (re-registering a name replaces the previous one). Returns it."""
    if backend.name not in BACKEND_NAMES:
        raise ValueError(f"backend name {backend.name!r} is not one of {BACKEND_NAMES}")
    _REGISTRY.setdefault(op_name, {})[backend.name] = backend
    return backend


def registered_ops() -> list[str]:
    return sorted(_REGISTRY)


def _backends(op_name: str) -> dict[str, Backend]:
    backends = _REGISTRY.get(op_name)
    if not backends:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise SafepruneError(f"unknown op {op_name!r} (registered ops: {known})")
    return backends


def requested_mode(backend: str | None = None) -> str:
    """The backend request: the argument if given, else $SAFEPRUNE_KERNELS, else "auto"."""
    source = "backend argument"
    if backend is None:
        backend, source = os.environ.get(ENV_VAR, "").strip() or "auto", f"${ENV_VAR}"
    mode = backend.lower()
    if mode not in MODES:
        raise SafepruneError(f"{source} is {backend!r}; choose one of {', '.join(MODES)}")
    return mode


def choose(op_name: str, *args, backend: str | None = None, **kwargs) -> Backend:
    """The backend that will run `op_name` on these arguments (see the module docstring for the rules)."""
    backends = _backends(op_name)
    mode = requested_mode(backend)
    if mode in ("off", "reference"):
        return _reference(op_name, backends)
    if mode == "auto":
        return _auto(op_name, backends, args, kwargs)
    candidate = backends.get(mode)
    if candidate is None:
        raise SafepruneError(f"op {op_name!r} has no {mode!r} backend (it has: {', '.join(backends)})")
    reasons = candidate.not_supported_reasons(*args, **kwargs)
    if reasons:
        raise SafepruneError(f"backend {mode!r} cannot run op {op_name!r} here: " + "; ".join(reasons)
                             + f" (use backend='auto' or unset ${ENV_VAR} to fall back)")
    return candidate


def _auto(op_name: str, backends: dict[str, Backend], args: tuple, kwargs: dict) -> Backend:
    tuner = autotune.tuner(op_name, args, kwargs)
    if tuner is not None:
        confirmed = backends.get(tuner.confirmed() or "")
        if confirmed is not None:
            return confirmed  # the usual call: decided (and checked) earlier in this process
        cached = backends.get(tuner.cached() or "")
        if cached is not None and (cached.name == "reference" or not cached.not_supported_reasons(*args, **kwargs)):
            tuner.confirm(cached.name)  # read from disk: checked once, in case the library went since
            return cached
    interpreted_only = any(t.device.type == "cpu" for t in tensors_in(list(args) + list(kwargs.values())))
    runnable = {name: backends[name] for name in BACKEND_NAMES if name in backends
                and not (name == "triton" and interpreted_only)
                and (name == "reference" or not backends[name].not_supported_reasons(*args, **kwargs))}
    if tuner is not None and len(runnable) > 1:
        fastest = tuner.measure(runnable)
        if fastest is not None:
            return runnable[fastest]
    for name, candidate in runnable.items():  # the static rule
        if name == "reference" or not candidate.auto_skip_reasons(*args, **kwargs):
            return candidate
    return _reference(op_name, backends)


def register_benchmark(op_name: str, bench: Callable, key: Callable | None = None) -> None:
    """How auto mode times `op_name`: ``bench(backend, args, kwargs, grad)`` returns a no-argument callable that
    runs `backend` on the dispatch call's arguments (forward, plus backward when `grad`); ``key(args, kwargs)``
    returns the arguments that decide the cost, the same for the op's forward and backward dispatch calls
    (default: all positional arguments). See ``autotune``."""
    autotune.register(op_name, bench, key)


def _reference(op_name: str, backends: dict[str, Backend]) -> Backend:
    if "reference" not in backends:
        raise SafepruneError(f"op {op_name!r} has no reference backend registered")
    return backends["reference"]


def available_backends(op_name: str, *args, **kwargs) -> dict[str, list[str]]:
    """Each registered backend of `op_name`, in priority order, with the reasons it cannot run (empty = can)."""
    backends = _backends(op_name)
    return {name: backends[name].not_supported_reasons(*args, **kwargs) for name in BACKEND_NAMES if name in backends}


# ---- reason helpers shared by the op modules ---------------------------------------------------------------
tensors_in = autotune.tensors_in  # the tensors among an op's arguments, inside lists and tuples too


def device_reasons(tensors: Iterable[torch.Tensor], device_types: tuple[str, ...]) -> list[str]:
    tensors = list(tensors)
    kinds = sorted({t.device.type for t in tensors})
    reasons = [f"tensors on {k}, needs {' or '.join(device_types)}" for k in kinds if k not in device_types]
    if len({t.device for t in tensors}) > 1:
        reasons.append("tensors on different devices: " + ", ".join(sorted({str(t.device) for t in tensors})))
    return reasons


def dtype_reasons(tensors: Iterable[torch.Tensor], dtypes: tuple[torch.dtype, ...]) -> list[str]:
    bad = sorted({str(t.dtype).replace("torch.", "") for t in tensors if t.dtype not in dtypes})
    allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
    return [f"dtype {d} not supported (supports {allowed})" for d in bad]


def triton_interpreting(kernel_module: str) -> bool:
    """Whether `kernel_module`'s Triton kernels run in the interpreter.

    Triton fixes this when a kernel is decorated, so an imported module is inspected; otherwise the current
    TRITON_INTERPRET decides what an import would do.
    """
    module = sys.modules.get(kernel_module)
    if module is not None:
        from triton.runtime.interpreter import InterpretedFunction

        return any(isinstance(v, InterpretedFunction) for v in vars(module).values())
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_reasons(tensors: Iterable[torch.Tensor], kernel_module: str) -> list[str]:
    """Why Triton cannot run `kernel_module` on `tensors` (CUDA tensors, or CPU ones under the interpreter)."""
    if importlib.util.find_spec("triton") is None:
        return ["triton is not installed (pip install triton, or the [kernels] extra)"]
    tensors = list(tensors)
    if not tensors and not torch.cuda.is_available() and not triton_interpreting(kernel_module):
        return ["no CUDA device is visible (Triton runs on GPUs; on CPU only under TRITON_INTERPRET=1, for tests)"]
    reasons = []
    for kind in sorted({t.device.type for t in tensors}):
        if kind == "cpu":
            if not triton_interpreting(kernel_module):
                reasons.append("CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 before import)")
        elif kind != "cuda":
            reasons.append(f"tensors on {kind}; Triton runs on cuda (or cpu under TRITON_INTERPRET=1)")
    return reasons
