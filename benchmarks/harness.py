"""Shared benchmark helpers: step timing, peak memory, FLOP counting, device description, JSON output.

Timing: median wall time of N calls after W warmup calls, with torch.cuda.synchronize around every call on a GPU.
Memory: on CUDA the allocator's peak (reset after setup); on CPU the process's peak RSS (VmHWM), reset after setup by
writing "5" to /proc/self/clear_refs. CPU numbers are only meaningful with one variant per process, so callers run
each variant in its own subprocess.
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

MIB = 1024 * 1024


# ---- timing ----------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, steps: int) -> dict:
    """Run fn `warmup` times untimed, then `steps` times timed.

    Returns wall seconds (median, min, max, all) and the process's CPU seconds per call (median_cpu_s, all_cpu_s):
    with one thread on a shared CPU machine, CPU time is the measure that other processes barely disturb.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times, cpu = [], []
    for _ in range(steps):
        synchronize(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "all_s": times,
            "median_cpu_s": statistics.median(cpu), "all_cpu_s": cpu}


# ---- memory ----------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, flags=re.MULTILINE)
    return int(match.group(1)) if match else None


def rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). Returns False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_heap() -> None:
    """Give glibc's free heap pages back to the OS (malloc_trim), so RSS growth afterwards is real growth."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def _mallopt(param: int, value: int) -> bool:
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(param, value))
    except (OSError, AttributeError):
        return False


@contextmanager
def exact_heap(enabled: bool = True):
    """Make process RSS follow live memory while inside: glibc then serves every block >= 64 KiB with its own
    mmap and unmaps it on free, and trims the heap top, instead of keeping freed memory for reuse (which makes
    RSS peaks depend on allocation history). On exit: fixed thresholds at the values glibc's dynamic rule settles
    at (32 MiB mmap, 64 MiB trim), so later timing runs under steady-state allocator behaviour.
    """
    if not enabled:
        yield False
        return
    ok = _mallopt(_M_MMAP_THRESHOLD, 64 * 1024) and _mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
    try:
        yield ok
    finally:
        if ok:
            _mallopt(_M_MMAP_THRESHOLD, 32 * MIB)
            _mallopt(_M_TRIM_THRESHOLD, 64 * MIB)


class MemoryProbe:
    """Peak memory from `start()` (call it right after model setup) to `read()`.

    CUDA: bytes allocated by torch's caching allocator (max_memory_allocated), absolute and above the setup level.
    CPU: process RSS, absolute peak and peak above the RSS at `start()`; `baseline` (the RSS before any model
    was built) gives the models-plus-training footprint as well.
    """

    def __init__(self, device: torch.device, baseline_bytes: int | None = None):
        self.device = device
        self.baseline = baseline_bytes
        self.setup = None
        self.reset_ok = True

    def start(self) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.setup = torch.cuda.memory_allocated(self.device)
        else:
            import gc

            gc.collect()
            release_free_heap()  # setup's freed heap would otherwise hide part of the growth that follows
            self.reset_ok = reset_peak_rss()
            self.setup = rss_bytes()

    def level_above_setup(self) -> int | None:
        """What stays allocated between steps (optimizer states, gradients, anything a step leaves behind), above
        the setup level: call it between steps; the peak is what a step needs while it runs."""
        if self.device.type == "cuda":
            synchronize(self.device)
            return torch.cuda.memory_allocated(self.device) - self.setup
        import gc

        gc.collect()
        release_free_heap()
        level = rss_bytes()
        return None if level is None or self.setup is None else level - self.setup

    def read(self) -> dict:
        if self.device.type == "cuda":
            synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            return {"kind": "cuda_allocated", "setup_bytes": self.setup, "peak_bytes": peak,
                    "peak_above_setup_bytes": peak - self.setup,
                    "peak_reserved_bytes": torch.cuda.max_memory_reserved(self.device)}
        peak = peak_rss_bytes()
        out = {"kind": "cpu_rss", "setup_bytes": self.setup, "peak_bytes": peak,
               "peak_above_setup_bytes": None if peak is None or self.setup is None else peak - self.setup,
               "peak_reset_ok": self.reset_ok}
        if self.baseline is not None and peak is not None:
            out["baseline_bytes"] = self.baseline
            out["peak_above_baseline_bytes"] = peak - self.baseline
        return out


def primary_memory(mem: dict) -> int:
    """The number memory ratios use: allocator peak on CUDA, RSS growth above the post-setup level on CPU."""
    return mem["peak_bytes"] if mem["kind"] == "cuda_allocated" else mem["peak_above_setup_bytes"]


# ---- CPU contention --------------------------------------------------------------------------------------
def _busy_cpu_seconds() -> float | None:
    """CPU time spent busy by the whole machine since boot (all CPUs; steal counts as busy: it is lost to us)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class ContentionMeter:
    """How many CPUs other processes kept busy while a child process ran (CPU timings are unreliable above ~0.1).

    Use around a subprocess.run: machine busy time minus the waited-for children's own CPU time, over wall time.
    """

    def __enter__(self):
        self.busy, self.children, self.wall = _busy_cpu_seconds(), os.times(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        busy, children, wall = _busy_cpu_seconds(), os.times(), time.perf_counter()
        own = (children.children_user - self.children.children_user) + (
            children.children_system - self.children.children_system)
        elapsed = wall - self.wall
        self.other_cpus = None if busy is None or self.busy is None or elapsed <= 0 else max(
            0.0, (busy - self.busy - own) / elapsed)
        return False


def wait_for_quiet(max_wait_s: float, threshold_cpus: float, window_s: float = 2.0) -> float | None:
    """Poll until the machine's busy CPUs (over `window_s`) drop below `threshold_cpus`, for at most `max_wait_s`.

    Returns the last busy figure (None where /proc/stat is unreadable). Call while this process is idle.
    """
    deadline = time.perf_counter() + max_wait_s
    busy = None
    while True:
        before, start = _busy_cpu_seconds(), time.perf_counter()
        time.sleep(window_s)
        after = _busy_cpu_seconds()
        if before is None or after is None:
            return None
        busy = (after - before) / (time.perf_counter() - start)
        if busy < threshold_cpus or time.perf_counter() >= deadline:
            return busy


# ---- FLOPs -----------------------------------------------------------------------------------------------
def _cpu_sdpa_mapping() -> dict:
    """FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel: count it the same way."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    mapping = {}
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is not None:
        mapping[forward] = lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)
    if backward is not None:
        mapping[backward] = lambda g, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(g, q, k, v)
    return mapping


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (2 per multiply-add) of matmuls, convolutions and attention that fn runs, forward and backward.

    Elementwise work (norms, activations, the optimizer) is not counted: FLOP-based predictions therefore ignore
    memory-bound time.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_mapping()) as counter:
        fn()
    return int(counter.get_total_flops())


# ---- description and output ------------------------------------------------------------------------------
def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads, {os.cpu_count()} CPUs)"


def environment() -> dict:
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda}


def write_json(path: str | os.PathLike, data: dict) -> Path:
    """Write atomically (tmp + rename) so a crashed run never leaves half a results file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def mib(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / MIB:,.0f} MiB"
