"""Auto mode's measured choice: time every backend that can run a call once, keep the fastest, remember it on disk.

Like cuDNN's benchmark mode and Triton's autotuner: the first call of an op with a new *key* (op name, each
tensor's shape, dtype, layout and requires_grad, the op's non-tensor arguments, the device type) runs every
eligible backend, the reference (eager torch) included, on that call's own arguments and keeps the fastest, so a
fused op is never used where it measured slower than eager. Later calls with the same key look the choice up.

Timing: one warm-up call (Triton compiles, oneDNN builds its primitives, caches fill), then 3 to 10 timed calls
(as many as fit in about 50 ms after the third), the median; CUDA is synchronised around each call. When any
tensor of the key requires grad the op will be differentiated, so forward *and* backward are timed (what training
pays), and the backward call of the op finds the same key and the same choice. A backend that raises while being
timed is left out (with a warning). Timing runs without autograd and changes no input and no random state.

Each op says how to run one backend on its arguments (:func:`register`: ``bench(backend, args, kwargs, grad)``
returns a no-argument callable; ``key(args, kwargs)`` the arguments that decide the cost). An op without a
benchmark keeps the static rule (``dispatch`` module docstring), as do calls that cannot be timed: inside
torch.compile tracing, on fake/meta or other tensor subclasses, during CUDA graph capture or JIT tracing.

Cache: one JSON file per device fingerprint (CPU: model, torch's and our kernels' instruction sets, torch threads;
GPU: name, capability, SM count; both: torch, CUDA, Triton and safeprune-engine versions), in
``$SAFEPRUNE_CACHE_DIR/autotune`` (default ``~/.cache/safeprune_engine/autotune``, under ``$XDG_CACHE_HOME`` when
set). Writes are atomic (a temporary file renamed over the old one, after merging what other processes wrote
meanwhile), so concurrent processes (pytest-xdist, ranks) never leave a torn file; two writes racing may drop
one entry, which costs a timing later. A file that is unreadable, corrupt or written for another fingerprint or
format is ignored with a warning and replaced at the next write. Delete the folder to time again.

Per call, once decided, auto costs one tuple key and a dict lookup (cheaper than the static rule's reasons
checks); a decision read from disk is checked against the backend's reasons once per process. Timing compares
backends inside the op: the op's own per-call overhead (custom op, dispatch) is paid whichever backend runs.

``SAFEPRUNE_AUTOTUNE=0`` turns timing off: auto then takes the first capable backend in priority order, skipping
backends with static auto-skip reasons (the rule before measurements).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import statistics
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

log = logging.getLogger("safeprune_engine")

ENV_SWITCH = "SAFEPRUNE_AUTOTUNE"  # 0/false/off/no: the static rule, no timing
ENV_CACHE_DIR = "SAFEPRUNE_CACHE_DIR"  # the decisions go to <it>/autotune
FORMAT = 1  # of the JSON file; another value is a foreign file
WARMUP, MIN_REPS, MAX_REPS, BUDGET_S = 1, 3, 10, 0.05


# ---- what each op registers ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Benchmark:
    """How to time one op. ``bench(backend, args, kwargs, grad)`` returns a callable running ``backend`` on the
    call's arguments, forward and, when ``grad``, backward; ``key(args, kwargs)`` returns the values that decide
    the cost (shared by the op's forward and backward dispatch calls, so both find the same decision)."""

    bench: Callable[..., Callable[[], Any]]
    key: Callable[[tuple, dict], Iterable]


_BENCHMARKS: dict[str, Benchmark] = {}


def register(op_name: str, bench: Callable[..., Callable[[], Any]],
             key: Callable[[tuple, dict], Iterable] | None = None) -> None:
    """Let auto mode time `op_name` (see :class:`Benchmark`); `key` defaults to every positional argument."""
    _BENCHMARKS[op_name] = Benchmark(bench, key or (lambda args, kwargs: args))


def enabled() -> bool:
    """False when ``$SAFEPRUNE_AUTOTUNE`` switches timing off."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def tensors_in(values: Iterable) -> list[torch.Tensor]:
    """The tensors among `values`, looking into lists and tuples."""
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(tensors_in(value))
    return found


def _untimeable(tensors: list[torch.Tensor]) -> bool:
    """Fake, meta, functional or other subclass tensors (torch.compile tracing), CUDA graph capture, JIT tracing."""
    if not tensors or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True
    for t in tensors:
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type == "meta":
            return True
    return tensors[0].device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# ---- keys and device fingerprints ------------------------------------------------------------------------------
def _fast(value):
    """`value` as a hashable tuple part of the in-process key (a finer split than :func:`describe`'s)."""
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype, value.stride(), value.requires_grad, value.device.type)
    if isinstance(value, (list, tuple)):
        return tuple(_fast(v) for v in value)
    return value


def describe(value) -> str:
    """A value as it enters a key: tensors by dtype, shape, layout and requires_grad (never their data)."""
    if isinstance(value, torch.Tensor):
        if value.is_contiguous():
            layout = ""
        elif value.dim() == 4 and value.is_contiguous(memory_format=torch.channels_last):
            layout = "cl"
        else:
            layout = "s" + ",".join(map(str, value.stride()))
        shape = "x".join(map(str, value.shape))
        return f"{str(value.dtype).replace('torch.', '')}[{shape}]{layout}{'g' if value.requires_grad else ''}"
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(describe(v) for v in value) + ")"
    return "-" if value is None else repr(value)


@functools.cache
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def _software() -> dict:
    return {"format": FORMAT, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": _version("triton"),
            "safeprune_engine": _version("safeprune-engine")}


def _device_context(device: torch.device) -> tuple:
    """What, besides the hardware, changes speeds within a process: cheap to read on every call."""
    if device.type == "cpu":
        return ("cpu", torch.get_num_threads(), os.environ.get("SAFEPRUNE_CPU_ISA", ""))
    if device.type == "cuda":
        return ("cuda", device.index if device.index is not None else torch.cuda.current_device())
    return (device.type, device.index)


def device_context(device: torch.device) -> tuple:
    """The key part naming the device a decision holds for (its cache file); for decisions made outside the ops,
    e.g. whether a whole patched UNet is faster (patching)."""
    return _device_context(torch.device(device))


@functools.lru_cache(maxsize=64)
def fingerprint(context: tuple) -> dict:
    """The device a decision holds for (see the module docstring), from :func:`_device_context`'s tuple."""
    kind = context[0]
    if kind == "cpu":
        from . import native

        hardware = {"device": "cpu", "model": _cpu_model(), "torch_isa": torch.backends.cpu.get_cpu_capability(),
                    "kernels_isa": native.cpu_isa(), "threads": context[1]}
    elif kind == "cuda":
        props = torch.cuda.get_device_properties(context[1])
        hardware = {"device": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}",
                    "sms": props.multi_processor_count}
    else:
        hardware = {"device": kind}
    return {**hardware, **_software()}


def default_directory() -> Path:
    root = os.environ.get(ENV_CACHE_DIR)
    if root:
        return Path(root).expanduser() / "autotune"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "safeprune_engine" / "autotune"


# ---- the cache ---------------------------------------------------------------------------------------------------
class DecisionCache:
    """Decisions in memory and in one JSON file per device fingerprint under `directory` (None: the default,
    read when first needed). ``timings`` counts the calls that timed backends (tests read it)."""

    def __init__(self, directory: str | Path | None = None):
        self._directory = Path(directory) if directory is not None else None
        self._lock = threading.Lock()
        self._memory: dict[tuple, dict[str, dict]] = {}  # device context -> key -> entry
        self._unwritable: set[Path] = set()
        self.confirmed: dict[tuple, str] = {}  # Tuner.fast_key -> backend checked to run (see Tuner)
        self.timings = 0

    @property
    def directory(self) -> Path:
        if self._directory is None:
            self._directory = default_directory()
        return self._directory

    def path(self, context: tuple) -> Path:
        fp = fingerprint(context)
        digest = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
        return self.directory / f"{fp['device']}-{digest}.json"

    def _read(self, context: tuple, warn: bool) -> dict[str, dict]:
        path = self.path(context)
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except (OSError, ValueError) as error:
            if warn:
                warnings.warn(f"autotune cache {path} is unreadable ({error}); ignoring it and timing again",
                              RuntimeWarning, stacklevel=2)
            return {}
        problem = None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            problem = f"format {data.get('format') if isinstance(data, dict) else '?'}, expected {FORMAT}"
        elif data.get("fingerprint") != fingerprint(context):
            problem = "written for another device or software version"
        elif not isinstance(data.get("entries"), dict) or not all(
                isinstance(e, dict) and isinstance(e.get("backend"), str) for e in data["entries"].values()):
            problem = "malformed entries"
        if problem is not None:
            if warn:
                warnings.warn(f"autotune cache {path} ignored ({problem}); timing again", RuntimeWarning,
                              stacklevel=2)
            return {}
        return data["entries"]

    def lookup(self, context: tuple, key: str) -> dict | None:
        """The entry ({"backend", "ms", "source"}) for `key` on this device, from memory or disk; None if none."""
        entries = self._memory.get(context)
        if entries is None:
            with self._lock:
                entries = self._memory.get(context)
                if entries is None:
                    entries = {k: {**e, "source": "disk"} for k, e in self._read(context, warn=True).items()}
                    self._memory[context] = entries
        return entries.get(key)

    def store(self, context: tuple, key: str, backend: str, times_ms: dict[str, float]) -> None:
        entry = {"backend": backend, "ms": {k: round(v, 4) for k, v in times_ms.items()}}
        with self._lock:
            self._memory.setdefault(context, {})[key] = {**entry, "source": "timed"}
            self._write(context, key, entry)

    def _write(self, context: tuple, key: str, entry: dict) -> None:
        path = self.path(context)
        if path in self._unwritable:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            entries = self._read(context, warn=False)  # what other processes wrote since: merge, then replace
            entries[key] = entry
            document = {"format": FORMAT, "fingerprint": fingerprint(context), "entries": entries}
            handle, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(handle, "w") as f:
                    json.dump(document, f, indent=1, sort_keys=True)
                os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half of one
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as error:
            self._unwritable.add(path)
            warnings.warn(f"autotune cache {path} cannot be written ({error}); decisions stay in memory",
                          RuntimeWarning, stacklevel=3)

    def clear_memory(self) -> None:
        with self._lock:
            self._memory.clear()
            self.confirmed.clear()


_CACHE = DecisionCache()


def cache() -> DecisionCache:
    return _CACHE


def set_cache(new: DecisionCache) -> DecisionCache:
    """Use `new` from now on (tests, or another folder); returns the previous cache."""
    global _CACHE
    previous, _CACHE = _CACHE, new
    return previous


# ---- timing ------------------------------------------------------------------------------------------------------
def measure(run: Callable[[], Any], device: torch.device) -> float:
    """Median seconds of `run()` after a warm-up call (synchronised on CUDA)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(WARMUP):
        run()
    sync()
    times: list[float] = []
    while len(times) < MAX_REPS:
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
        if len(times) >= MIN_REPS and sum(times) > BUDGET_S:
            break
    return statistics.median(times)


@dataclass
class _OpStats:
    choices: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (backend, "timed" | "disk")
    seconds: float = 0.0
    reported: int = 0


_STATS: dict[str, _OpStats] = {}


class Tuner:
    """One auto-mode call that can be timed: its key, its device, the cached decision, the measurement.

    Two lookups: a cheap in-process one (a tuple of shapes, dtypes, strides, grads; holds decisions this process
    already confirmed, so a hit costs no reasons check and no string building) and the key string of the disk file.
    """

    def __init__(self, op_name: str, benchmark: Benchmark, args: tuple, kwargs: dict, device: torch.device):
        self.op_name, self.benchmark, self.args, self.kwargs, self.device = op_name, benchmark, args, kwargs, device
        self.values = list(benchmark.key(args, kwargs))
        self.context = _device_context(device)
        self.fast_key = (op_name, self.context, tuple(_fast(v) for v in self.values))
        self._key: str | None = None

    @property
    def key(self) -> str:
        if self._key is None:
            self._key = f"{self.op_name}:{self.device.type}:" + ",".join(describe(v) for v in self.values)
        return self._key

    @property
    def grad(self) -> bool:
        return any(t.requires_grad for t in tensors_in(self.values))

    def confirmed(self) -> str | None:
        """The backend this process already chose (or read and checked) for this call's key."""
        return _CACHE.confirmed.get(self.fast_key)

    def cached(self) -> str | None:
        """The decision stored for this key (memory or disk), still to be checked against the backends' reasons."""
        entry = _CACHE.lookup(self.context, self.key)
        return None if entry is None else entry["backend"]

    def confirm(self, backend: str, source: str = "disk") -> None:
        _CACHE.confirmed[self.fast_key] = backend
        _STATS.setdefault(self.op_name, _OpStats()).choices.setdefault(self.key, (backend, source))

    def measure(self, candidates: dict[str, Any]) -> str | None:
        """Time each candidate (name -> Backend, priority order); store and return the fastest (None: all failed)."""
        started = time.perf_counter()
        times: dict[str, float] = {}
        with torch.no_grad():
            for name, backend in candidates.items():
                try:
                    run = self.benchmark.bench(backend, self.args, self.kwargs, self.grad)
                except (TypeError, ValueError, IndexError):  # not the op's full arguments (a capability query)
                    return None
                try:
                    times[name] = measure(run, self.device)
                except Exception as error:  # e.g. out of memory: never chosen, the run goes on
                    warnings.warn(f"autotune: backend {name!r} of {self.op_name} failed while being timed "
                                  f"({type(error).__name__}: {error}); leaving it out", RuntimeWarning, stacklevel=3)
        _CACHE.timings += 1
        stats = _STATS.setdefault(self.op_name, _OpStats())
        stats.seconds += time.perf_counter() - started
        if not times:
            return None
        best = min(times, key=times.get)  # ties keep priority order
        times_ms = {name: 1e3 * t for name, t in times.items()}
        _CACHE.store(self.context, self.key, best, times_ms)
        stats.choices[self.key] = (best, "timed")
        self.confirm(best, "timed")
        log.debug("autotune %s -> %s (%s)", self.key, best,
                  ", ".join(f"{n} {t:.3f} ms" for n, t in times_ms.items()))
        return best


def tuner(op_name: str, args: tuple, kwargs: dict) -> Tuner | None:
    """A :class:`Tuner` for this call, or None when it cannot be timed (switched off, no benchmark, tracing)."""
    benchmark = _BENCHMARKS.get(op_name)
    if benchmark is None or not enabled():
        return None
    tensors = tensors_in(list(args) + list(kwargs.values()))
    if _untimeable(tensors):
        return None
    return Tuner(op_name, benchmark, args, kwargs, tensors[0].device)


def summary_lines(new_only: bool = False) -> list[str]:
    """One line per op: how many call keys auto decided, which backend won how often, what timing cost.
    `new_only`: only ops with decisions since the last such call (a run logs these after its first step)."""
    lines = []
    for op_name in sorted(_STATS):
        stats = _STATS[op_name]
        if new_only and len(stats.choices) == stats.reported:
            continue
        stats.reported = len(stats.choices)
        counts: dict[str, int] = {}
        for backend, _source in stats.choices.values():
            counts[backend] = counts.get(backend, 0) + 1
        timed = sum(source == "timed" for _, source in stats.choices.values())
        chosen = ", ".join(f"{b} {n}" for b, n in sorted(counts.items(), key=lambda item: -item[1]))
        lines.append(f"kernels auto: {op_name}: {len(stats.choices)} call shapes -> {chosen} "
                     f"({timed} timed in {stats.seconds:.2f} s, {len(stats.choices) - timed} from the cache in "
                     f"{_CACHE.directory})")
    return lines


def reset_stats() -> None:
    _STATS.clear()
