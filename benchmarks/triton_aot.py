"""Ahead-of-time compile of every Triton kernel at the launches SD-1.5 makes, for sm_80 and sm_90, without a GPU.

Reads registers and spills (local memory bytes per thread) of each compiled kernel. The launch configurations
are not re-derived here: the ops' own Triton backends (ops/*.py -> kernels/*.py launchers) run on fake CUDA
tensors (torch FakeTensorMode, no device needed) with every kernel's launch intercepted, so the constexprs,
num_warps, num_stages and argument specialisations (int == 1, 16-byte divisibility) are the ones a real launch
would compile. Each recorded launch is then compiled with ``triton.compile`` for ``GPUTarget("cuda", 80|90, 32)``
(ptxas ships in the Triton wheel) and the cubin's resource usage read with the wheel's cuobjdump: registers per
thread and local memory per thread (stack frame + local: where register spills go, and what Triton reports as
``n_spills`` on a device), with ptxas -v's spill stores/loads where that is not 0. With a CUDA device of the same
capability the driver's own n_regs / n_spills are added (the cubins load; nothing launches).

    python benchmarks/triton_aot.py                      # full sweep -> benchmarks/results/triton_aot.json
    python benchmarks/triton_aot.py --subset default     # the representative subset tests/test_triton_aot.py runs
    python benchmarks/triton_aot.py --targets 90 --ops groupnorm_silu --out /tmp/aot.json

TRITON_INTERPRET is switched off for this process (the launchers pick their GPU configurations). Exit status 1
when a bf16/fp16 kernel spills (fp32 ones are reported, not failed: the other helper's precision policy).
Every compile lands in Triton's cache (a later real launch of the same configuration on an sm_90 device finds
it there), so a row's compile_s is the full compile only when the cache was cold (a hit takes ~0.05 s).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: kernels compile, launchers pick GPU configs
os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
try:
    import safeprune_engine  # noqa: F401  (installed, or found next to benchmarks/)
except ImportError:
    sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor.*")  # the distill launcher's address table
warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")

TARGETS = {80: "sm_80 (A100)", 90: "sm_90 (H100/H200)"}
LOW_PRECISION = ("bfloat16", "float16")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# SD-1.5 UNet at 64x64 latents, batch 2 (a CFG pair): (C, H, W, groups) of every GroupNorm + SiLU it runs (resnet
# norm1 on block inputs incl. the up path's concatenations, norm2, conv_norm_out). Pruned widths remove whole
# groups (prune/width.py keeps 10/20/40-channel groups), so channels per group stay, groups shrink.
SD15_GN = [(320, 64, 64, 32), (640, 32, 32, 32), (1280, 16, 16, 32), (1280, 8, 8, 32),
           (320, 32, 32, 32), (640, 16, 16, 32), (2560, 8, 8, 32), (2560, 16, 16, 32), (1920, 16, 16, 32),
           (1920, 32, 32, 32), (1280, 32, 32, 32), (960, 32, 32, 32), (960, 64, 64, 32), (640, 64, 64, 32)]
PRUNED_GN = [(160, 64, 64, 16), (200, 64, 64, 20), (480, 32, 32, 24), (320, 32, 32, 16), (960, 16, 16, 24),
             (640, 16, 16, 16), (960, 8, 8, 24)]
DEFAULT_GN = [(320, 64, 64, 32), (1280, 8, 8, 32), (200, 64, 64, 20)]
# feature-KD pairs: the 9 block outputs (4 down, mid, 4 up) then the noise prediction
SD15_KD = [(320, 32, 32), (640, 16, 16), (1280, 8, 8), (1280, 8, 8), (1280, 8, 8),
           (1280, 16, 16), (1280, 32, 32), (640, 64, 64), (320, 64, 64), (4, 64, 64)]
KD_DTYPES = [("float32", "float32"), ("bfloat16", "bfloat16"), ("float16", "float16"), ("float32", "bfloat16")]
BATCH = 2


@dataclass
class Launch:
    """One intercepted kernel launch: the JIT function and its arguments (tensors as pointer stand-ins)."""
    kernel: object
    args: tuple
    kwargs: dict
    grid: object


@dataclass
class Case:
    op: str
    name: str
    dtype: str
    run: object  # () -> None: calls the op's Triton backend on fake CUDA tensors
    launches: list = field(default_factory=list)


class _Pointer:
    """What Triton's specialisation reads from a tensor argument: its dtype and address (alignment)."""

    def __init__(self, tensor: torch.Tensor):
        self.dtype = tensor.dtype
        # fake tensors have no memory; a real allocation is 256-byte aligned, a view adds its offset
        self._ptr = 256 + tensor.storage_offset() * tensor.element_size()

    def data_ptr(self):
        return self._ptr


def _stand_in(value):
    return _Pointer(value) if isinstance(value, torch.Tensor) else value


@contextlib.contextmanager
def _recording(modules, sink: list):
    """Every JIT kernel of `modules` records its launches into `sink` instead of running."""
    from triton.runtime.jit import JITFunction

    patched = []
    for module in modules:
        for value in vars(module).values():
            if isinstance(value, JITFunction) and "run" not in vars(value):
                def run(*args, grid, warmup, _fn=value, **kwargs):
                    sink.append(Launch(_fn, tuple(map(_stand_in, args)),
                                       {k: _stand_in(v) for k, v in kwargs.items()}, grid))
                value.run = run
                patched.append(value)
    try:
        yield
    finally:
        for value in patched:
            del value.run


def _backend(op: str):
    """The op's registered Triton backend: the same glue (argument conversion, launcher) a real call runs."""
    from safeprune_engine.ops import dispatch

    return dispatch._backends(op)["triton"]


def _kernel_modules():
    from safeprune_engine.kernels import distill_loss, groupnorm_silu, pruned_conv

    return [groupnorm_silu, distill_loss, pruned_conv]


# ---- cases: each runs an op's forward and backward through its Triton backend --------------------------------
def _gn_cases(subset: str) -> list[Case]:
    shapes = DEFAULT_GN if subset == "default" else SD15_GN + PRUNED_GN
    dtypes = list(LOW_PRECISION) if subset == "default" else list(DTYPES)
    layouts = [False] if subset == "default" else [False, True]
    cases = []
    for (c, h, w, groups), dtype, channels_last in itertools.product(shapes, dtypes, layouts):
        def run(c=c, h=h, w=w, groups=groups, dtype=DTYPES[dtype], channels_last=channels_last):
            from safeprune_engine.ops.groupnorm_silu import kernel_layout

            backend = _backend("groupnorm_silu")
            layout = torch.channels_last if channels_last else torch.contiguous_format
            x = kernel_layout(torch.empty(BATCH, c, h, w, device="cuda", dtype=dtype, memory_format=layout))
            weight, bias = torch.empty(c, device="cuda", dtype=dtype), torch.empty(c, device="cuda", dtype=dtype)
            y, mean, rstd = backend.forward(x, groups, weight, bias, 1e-5)
            backend.backward(torch.empty_like(y), x, weight, bias, mean, rstd, groups)
        layout = "channels_last" if channels_last else "nchw"
        cases.append(Case("groupnorm_silu", f"({BATCH},{c},{h},{w}) G={groups} {layout}", dtype, run))
    return cases


def _kd_cases(subset: str) -> list[Case]:
    pairs = KD_DTYPES[1:3] if subset == "default" else KD_DTYPES
    cases = []
    for s_dtype, t_dtype in pairs:
        def run(s_dtype=DTYPES[s_dtype], t_dtype=DTYPES[t_dtype]):
            backend = _backend("distill_loss")
            students = [torch.empty(BATCH, *shape, device="cuda", dtype=s_dtype) for shape in SD15_KD]
            teachers = [torch.empty(BATCH, *shape, device="cuda", dtype=t_dtype) for shape in SD15_KD]
            weights = [1.0] * len(students)
            backend.forward(students, teachers, weights)
            backend.backward(torch.empty((), device="cuda"), students, teachers, weights)
        # the kernels' arithmetic dtype is the student's; the teacher only changes the loads
        cases.append(Case("distill_loss", f"9 SD-1.5 block maps + output, teacher {t_dtype}", s_dtype, run))
    return cases


# SD-1.5 convs at 64x64 latents (label, C_in, C_out, k, stride, H, prologue, temb, residual): resnet conv1 (GN+SiLU
# prologue, time-embedding bias), conv2 (prologue, residual), the 1x1 shortcut, a downsampler, conv_out
SD15_CONV = [
    ("resnet conv1", 320, 320, 3, 1, 64, True, True, False),
    ("resnet conv2", 320, 320, 3, 1, 64, True, False, True),
    ("resnet conv1", 640, 640, 3, 1, 32, True, True, False),
    ("resnet conv1", 1280, 1280, 3, 1, 16, True, True, False),
    ("resnet conv2", 1280, 1280, 3, 1, 8, True, False, True),
    ("shortcut 1x1", 960, 640, 1, 1, 32, False, False, False),
    ("downsample", 320, 320, 3, 2, 64, False, False, False),
    ("conv_out", 320, 4, 3, 1, 64, True, False, False),
]
# pruned resnets (students are sliced): conv1 writes the pruned inner width, conv2 reads it (160/200/480/960)
PRUNED_CONV = [
    ("pruned conv1", 320, 160, 3, 1, 64, True, True, False),
    ("pruned conv2", 200, 320, 3, 1, 64, True, False, True),
    ("pruned conv1", 640, 480, 3, 1, 32, True, True, False),
    ("pruned conv2", 480, 640, 3, 1, 32, True, False, True),
    ("pruned conv1", 1280, 960, 3, 1, 16, True, True, False),
    ("pruned conv2", 960, 1280, 3, 1, 8, True, False, True),
]
DEFAULT_CONV = [PRUNED_CONV[0], SD15_CONV[5]]


def _conv_cases(subset: str) -> list[Case]:
    from safeprune_engine.ops import pruned_conv as glue

    table = DEFAULT_CONV if subset == "default" else SD15_CONV + PRUNED_CONV
    # "float32 exact": fp32 with TF32 off (torch.backends.cudnn.allow_tf32 = False), the IEEE tl.dot path
    dtypes = ["bfloat16"] if subset == "default" else list(DTYPES) + ["float32 exact"]
    cases = []
    for spec, dtype in itertools.product(table, dtypes):
        label, c_in, c_out, k, stride, h, prologue, temb, residual = spec

        def run(c_in=c_in, c_out=c_out, k=k, stride=stride, h=h, prologue=prologue, temb=temb, residual=residual,
                dtype=DTYPES[dtype.split()[0]], exact=dtype.endswith("exact")):
            backend = _backend("pruned_conv")
            ho = glue.output_size(h, k, stride, k // 2)
            x = torch.empty(BATCH, c_in, h, h, device="cuda", dtype=dtype)
            weight = torch.empty(c_out, c_in, k, k, device="cuda", dtype=dtype)
            bias = torch.empty(c_out, device="cuda", dtype=dtype)
            sc = sh = None
            if prologue:
                sc = torch.empty(BATCH, c_in, device="cuda", dtype=torch.float32)
                sh = torch.empty_like(sc)
            t = torch.empty(BATCH, c_out, device="cuda", dtype=dtype) if temb else None
            r = torch.empty(BATCH, c_out, ho, ho, device="cuda", dtype=dtype) if residual else None
            tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, not exact
            try:
                out = backend.forward(x, weight, bias, stride, k // 2, sc, sh, t, r, 1.0)
                backend.backward(torch.empty_like(out), x, weight, stride, k // 2, sc, sh, 1.0, True, True)
            finally:
                torch.backends.cudnn.allow_tf32 = tf32
        extras = "+".join(n for n, on in (("prologue", prologue), ("temb", temb), ("residual", residual)) if on)
        name = f"{label} {c_in}->{c_out} k{k} s{stride} @{h}x{h}" + (f" [{extras}]" if extras else "")
        cases.append(Case("pruned_conv", name, dtype, run))
    return cases


CASE_BUILDERS = {"groupnorm_silu": _gn_cases, "distill_loss": _kd_cases, "pruned_conv": _conv_cases}


def _basic_getitem(self, index):
    """Tensor[int | slice | None, ...] through select/slice ops: python indexing of a fake CUDA tensor asks for a
    CUDA device guard that a CPU-only torch lacks, the aten ops do not."""
    out, dim = self, 0
    for item in index if isinstance(index, tuple) else (index,):
        if isinstance(item, int):
            out = out.select(dim, item)
        elif isinstance(item, slice):
            out = torch.ops.aten.slice.Tensor(out, dim, item.start, item.stop, item.step or 1)
            dim += 1
        elif item is None:
            out = out.unsqueeze(dim)
            dim += 1
        else:
            raise TypeError(f"triton_aot: unsupported index {item!r} in a launcher under fake tensors")
    return out


@contextlib.contextmanager
def _fake_cuda():
    """Fake CUDA tensors (shapes, strides, dtypes, no memory) that work without a GPU."""
    original = torch.Tensor.__getitem__
    torch.Tensor.__getitem__ = _basic_getitem
    try:
        with FakeTensorMode():
            yield
    finally:
        torch.Tensor.__getitem__ = original


def record(case: Case) -> list[Launch]:
    sink: list[Launch] = []
    with _recording(_kernel_modules(), sink), _fake_cuda():
        case.run()
    case.launches = sink
    return sink


# ---- compile and read resource usage -------------------------------------------------------------------------
def _specialise(launch: Launch, target):
    """(signature, constexprs, attrs, options) exactly as JITFunction.run derives them, for `target`."""
    from triton import knobs
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(target)
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # JITFunction.run adds these (3.9)
        if hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


_RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def resource_usage(cubin: bytes) -> dict:
    """Registers and local memory (bytes per thread) of a cubin, from cuobjdump: spill_bytes = stack frame +
    local, which is the driver's CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES (Triton's ``n_spills``)."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    match = _RESOURCE.search(text)
    if match is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    regs, stack, _shared, local = map(int, match.groups())
    return {"regs": regs, "spill_bytes": stack + local, "stack_bytes": stack, "local_bytes": local}


def ptxas_spills(ptx: str, capability: int) -> dict:
    """Spill stores / loads (bytes) from ptxas -v on the kernel's PTX, assembled as Triton does: tells register
    spills from a stack frame that holds something else."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as folder:
        src = Path(folder) / "kernel.ptx"
        src.write_text(ptx)
        log = subprocess.run([get_ptxas(capability).path, "-v", "--regAllocOptLevel=2", "-lineinfo",
                              f"--gpu-name={sm_arch_from_capability(capability)}", str(src), "-o",
                              str(Path(folder) / "kernel.cubin")], capture_output=True, text=True).stderr
    match = _PTXAS_SPILLS.search(log)
    return {} if match is None else {"spill_stores": int(match.group(1)), "spill_loads": int(match.group(2))}


def _add_driver_usage(rows: dict, unique: dict) -> str | None:
    """With a CUDA device here, add the driver's registers and spills (what CompiledKernel.n_regs / n_spills
    report) to the rows of the device's own target: the cubins load (Triton cache hits), nothing launches.
    Returns the device's name."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    for key, job in unique.items():
        if job[-1].arch == major * 10 + minor:
            kernel = _compile(job)
            kernel._init_handles()
            rows[key].update(driver_regs=kernel.n_regs, driver_spills=kernel.n_spills)
    return torch.cuda.get_device_name()


def _short(constexprs: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in constexprs.items() if k.isupper() and k.startswith(("BLOCK", "B", "TILE")))


def _constexpr_values(signature, constexprs, fn) -> dict:
    names = [p.name for p in fn.params]
    out = {}
    for path, value in constexprs.items():
        name = names[path[0]] if len(path) == 1 else str(path)
        if signature.get(name) == "constexpr":
            out[name] = value if isinstance(value, (int, float, bool, str, type(None))) else str(value)
    return out


def _job(launch: Launch, capability: int):
    """(dedup key, compile arguments) of one recorded launch for sm_<capability>."""
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", capability, 32)
    signature, constexprs, attrs, options = _specialise(launch, target)
    key = (launch.kernel.fn.__qualname__, capability, repr(sorted(signature.items())),
           repr(sorted(constexprs.items(), key=str)), repr(sorted(attrs.items(), key=str)),
           repr(sorted(options.__dict__.items(), key=str)))
    return key, (launch.kernel, signature, constexprs, attrs, options, target)


def _compile(job):
    import triton
    from triton.compiler import ASTSource

    fn, signature, constexprs, attrs, options, target = job
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def compile_row(job) -> dict:
    """Compile one job (a Triton cache hit when compiled before) and read its resource usage."""
    fn, signature, constexprs, _attrs, _options, target = job
    start = time.perf_counter()
    kernel = _compile(job)
    usage = resource_usage(kernel.asm["cubin"])
    if usage["spill_bytes"]:
        usage.update(ptxas_spills(kernel.asm["ptx"], target.arch))
    return {
        "kernel": fn.fn.__name__, "target": f"sm_{target.arch}", "num_warps": kernel.metadata.num_warps,
        "num_stages": kernel.metadata.num_stages, "constexprs": _constexpr_values(signature, constexprs, fn),
        "pointer_dtypes": sorted({v for v in signature.values() if v.startswith("*")}),
        "shared_bytes": kernel.metadata.shared, **usage, "compile_s": round(time.perf_counter() - start, 2),
    }


_POOL_JOBS: list = []  # the unique jobs, inherited by forked workers (JIT functions do not pickle)


def _pool_row(index: int):
    return index, compile_row(_POOL_JOBS[index])


def calibration(capability: int = 90) -> dict:
    """A launch that must spill (GroupNorm apply, 8192-element tile on one warp: 256 fp32 values per thread),
    compiled like the sweep's: shows the measurement sees spills."""
    case = _gn_cases("default")[0]
    launch = next(item for item in record(case) if item.kernel.fn.__name__ == "_apply_kernel")
    launch.kwargs.update(BLOCK_HW=512, BLOCK_CG=16, num_warps=1)
    return {"what": "GroupNorm apply, 512x16 tile, 1 warp", **compile_row(_job(launch, capability)[1])}


def sweep(ops, subset: str, capabilities, out: Path | None, jobs: int = 1, log=print) -> dict:
    """Record every case's launches, compile each distinct specialisation once (in `jobs` forked processes) and
    return the table; `out` is rewritten as compiles finish (cases whose kernels are all done)."""
    import multiprocessing

    result = {"triton": __import__("triton").__version__, "subset": subset, "batch": BATCH,
              "targets": [f"sm_{c}" for c in capabilities], "cases": []}
    cases, keys, unique = [], [], {}
    for op in ops:
        for case in CASE_BUILDERS[op](subset):
            case_keys = []
            for launch, capability in itertools.product(record(case), capabilities):
                key, job = _job(launch, capability)
                unique.setdefault(key, job)
                case_keys.append(key)
            cases.append(case)
            keys.append(case_keys)
    order = list(unique)
    position = {k: i for i, k in enumerate(order)}
    _POOL_JOBS[:] = [unique[k] for k in order]
    log(f"{sum(map(len, keys))} kernel launches in {len(cases)} cases, {len(order)} distinct compiles, "
        f"{jobs} process(es)")
    rows: dict = {}

    def publish():
        # one row per distinct compile; a case lists its launches' rows by index (cases share compiles)
        result["compiles"] = [rows.get(k) for k in order]
        result["cases"] = [{"op": case.op, "case": case.name, "dtype": case.dtype,
                            "kernels": [position[k] for k in case_keys]}
                           for case, case_keys in zip(cases, keys) if all(k in rows for k in case_keys)]
        if out is not None:
            write(result, out)

    def done(index, row):
        rows[order[index]] = row
        log(f"[{len(rows):4d}/{len(order)}] {row['kernel']:32s} {row['target']} warps={row['num_warps']} "
            f"{_short(row['constexprs'])} regs={row['regs']:3d} spill={row['spill_bytes']:5d}B {row['compile_s']:.1f}s")
        if len(rows) % 16 == 0:
            publish()

    if jobs > 1 and len(order) > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            for index, row in pool.imap_unordered(_pool_row, range(len(order))):
                done(index, row)
    else:
        for index in range(len(order)):
            done(*_pool_row(index))
    result["device"] = _add_driver_usage(rows, unique)
    result["calibration"] = calibration(capabilities[-1])
    log(f"calibration (must spill): {result['calibration']['kernel']} {result['calibration']['target']} "
        f"regs={result['calibration']['regs']} spill={result['calibration']['spill_bytes']}B")
    publish()
    result["summary"] = summary(result)
    if out is not None:
        write(result, out)
    return result


def case_rows(result: dict):
    """(case, compile row) for every launch of every finished case."""
    return [(c, result["compiles"][i]) for c in result["cases"] for i in c["kernels"]]


def spilling(result: dict, dtypes=LOW_PRECISION) -> list[str]:
    """'op dtype case kernel target: N B' for every kernel of a `dtypes` case with local memory."""
    return [f"{c['op']} {c['dtype']} {c['case']} {k['kernel']} {k['target']}: {k['spill_bytes']} B"
            for c, k in case_rows(result) if c["dtype"] in dtypes and k["spill_bytes"]]


def summary(result: dict) -> dict:
    per = {}
    for c, k in case_rows(result):
        entry = per.setdefault(f"{c['op']}/{k['kernel']}/{c['dtype']}/{k['target']}",
                               {"max_regs": 0, "max_spill_bytes": 0, "spilling_cases": 0})
        entry["max_regs"] = max(entry["max_regs"], k["regs"])
        entry["max_spill_bytes"] = max(entry["max_spill_bytes"], k["spill_bytes"])
        entry["spilling_cases"] += bool(k["spill_bytes"])
    done = [k for k in result["compiles"] if k is not None]
    return {"kernels": per, "low_precision_spills": spilling(result),
            "fp32_spills": spilling(result, ("float32", "float32 exact")),
            "compiles": len(done), "compile_s_total": round(sum(k["compile_s"] for k in done), 1)}


def write(result: dict, out: Path) -> None:
    """JSON with one line per compile row and per case (the full sweep has ~1000 of each)."""
    def block(items):
        return "[\n" + ",\n".join("  " + json.dumps(item) for item in items) + "\n ]"

    def mapping(d, indent):  # one line per key; values one line each (nested mappings: one more level)
        pad = " " * indent
        body = ",\n".join(f"{pad} {json.dumps(k)}: " + (mapping(v, indent + 1) if isinstance(v, dict) and
                                                         indent < 2 else json.dumps(v)) for k, v in d.items())
        return "{\n" + body + "\n" + pad + "}"

    head = {k: v for k, v in result.items() if k not in ("compiles", "cases")}
    parts = [f" {json.dumps(k)}: {mapping(v, 1) if isinstance(v, dict) else json.dumps(v)}" for k, v in head.items()]
    parts += [f" {json.dumps(k)}: {block(result.get(k, []))}" for k in ("compiles", "cases")]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("{\n" + ",\n".join(parts) + "\n}\n")
    tmp.replace(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", choices=("default", "full"), default="full")
    parser.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated (80,90)")
    parser.add_argument("--ops", default=",".join(CASE_BUILDERS), help="ops, comma-separated")
    parser.add_argument("--jobs", type=int, default=max(1, min(16, (os.cpu_count() or 2) - 1)),
                        help="compile processes (default: CPUs - 1, at most 16)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "triton_aot.json")
    args = parser.parse_args(argv)
    capabilities = [int(c) for c in args.targets.split(",")]
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    start = time.perf_counter()
    result = sweep(ops, args.subset, capabilities, args.out, jobs=args.jobs,
                   log=lambda line: print(line, flush=True))
    s = result["summary"]
    print(f"\n{s['compiles']} distinct kernels compiled (or found in Triton's cache) in "
          f"{time.perf_counter() - start:.0f} s -> {args.out}")
    for name, entry in sorted(s["kernels"].items()):
        print(f"  {name:64s} max regs {entry['max_regs']:3d}  max spill {entry['max_spill_bytes']:5d} B"
              f"  ({entry['spilling_cases']} spilling)")
    if s["fp32_spills"]:
        print(f"fp32 kernels with local memory: {len(s['fp32_spills'])} (reported; see the JSON)")
    if s["low_precision_spills"]:
        print("bf16/fp16 kernels with local memory (must be 0):\n  " + "\n  ".join(s["low_precision_spills"]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
