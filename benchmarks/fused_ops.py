"""Kernel benchmark: the fused ops against torch eager and torch.compile at SD-1.5 UNet shapes and pruned widths.

For every case (op, shape, dtype, mode) each provider is timed: our backends (CPU: "cpp"; GPU: "triton", "cuda"),
"torch_eager" (the unfused torch code a diffusers UNet runs), "torch_compile" (the same code through
torch.compile, where --compile allows), and reference points ("copy": a torch copy of the case's bytes, the bound
for an elementwise op; on CPU "torch_eager_inplace" for GroupNorm + SiLU with an in-place SiLU). Each result has the
median time, the first call's time (a cold compile lands there), achieved GB/s over the op's minimal traffic and
over the traffic of our kernels, TFLOP/s, and their fractions of the device ceilings measured in the same run (a
large copy's bandwidth, a large matmul's throughput).
JSON goes to benchmarks/results/fused_ops-<cpu|cuda>.json (--out to change).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/fused_ops.py              # CPU: batch 1-2, a few shapes (~3 min)
    python benchmarks/fused_ops.py --device cuda                           # GPU: batch 1, 8, 32, all shapes
    python benchmarks/fused_ops.py --device cuda --quick                   # GPU headline cases (gpu_check.sh)

Adding an op: write `<op>_cases(device, quick) -> list[Case]` below next to
`groupnorm_silu_cases`: one Case per (shape, dtype, mode) with `setup(device)` returning {provider: zero-argument
callable} (build inputs once inside setup; each callable runs the op, forward or forward+backward), the op's
minimal bytes moved and the bytes our kernels move, and its FLOPs (2 per multiply-add for a convolution); then add
the function to CASE_BUILDERS. Provider names: our backends by their dispatch names ("cpp", "triton", "cuda"),
baselines "torch_eager" / "torch_compile" (e.g. a cuDNN F.conv2d of the pruned shape). The summary's speedups are
eager time / provider time and compile time / provider time; "<ours>_vs_copy" is copy time / our time.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import safeprune_engine  # noqa: F401  (installed, or found next to benchmarks/)
except ImportError:
    sys.path.insert(1, str(HERE.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from harness import device_description, wait_for_quiet, write_json  # noqa: E402

# SD-1.5 UNet at 64x64 latents: (channels, height, width, groups) of its GroupNorm + SiLU pairs per resolution
SD15_GN = [(320, 64, 64, 32), (640, 32, 32, 32), (1280, 16, 16, 32), (1280, 8, 8, 32)]
# pruned widths: whole groups removed (the pruner keeps 10/20/40-channel groups): 20 of 32 groups kept
PRUNED_GN = [(200, 64, 64, 20), (400, 32, 32, 20), (800, 16, 16, 20)]
# feature-KD pairs of SD-1.5 at 64x64 latents: down, mid and up block outputs, then the noise prediction
SD15_KD = [(320, 32, 32), (640, 16, 16), (1280, 8, 8), (1280, 8, 8), (1280, 8, 8),
           (1280, 16, 16), (1280, 32, 32), (640, 64, 64), (320, 64, 64), (4, 64, 64)]
# per-element FLOPs we count for elementwise ops (documented conventions, not hardware counts):
GN_FLOPS_FORWARD = 10  # statistics 3, normalise + affine 2, SiLU 5 (exp counted as 1)
GN_FLOPS_BACKWARD = 24  # recompute z and silu' 12, two reductions 4, dx 8
KD_FLOPS_FORWARD, KD_FLOPS_BACKWARD = 3, 3


@dataclass
class Case:
    op: str
    name: str
    params: dict
    dtype: torch.dtype
    mode: str  # "forward" | "forward+backward"
    bytes_min: int  # what any implementation must move
    bytes_kernel: int  # what our kernels move (e.g. a second read for split statistics)
    flops: int
    setup: Callable[[torch.device], dict]
    compile: bool = True
    results: dict = field(default_factory=dict)


def _our_backends(device: torch.device) -> list[str]:
    return ["cpp"] if device.type == "cpu" else ["triton", "cuda"]


def _available(op: str, backend: str, *args) -> list[str]:
    from safeprune_engine.ops import dispatch

    return dispatch.available_backends(op, *args).get(backend, ["not registered"])


# ---- GroupNorm + SiLU ----------------------------------------------------------------------------------------
def _gn_setup(n, c, h, w, groups, dtype, mode, channels_last, compile_it):
    def setup(device):
        from safeprune_engine.ops.groupnorm_silu import groupnorm_silu

        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, c, h, w, generator=g).to(device, dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        weight = torch.randn(c, generator=g).to(device, dtype)
        bias = torch.randn(c, generator=g).to(device, dtype)
        dy = torch.randn_like(x)
        backward = mode == "forward+backward"
        if backward:
            x.requires_grad_()
            weight.requires_grad_()
            bias.requires_grad_()

        def wrap(fn):
            if not backward:
                return lambda: fn(x)
            inputs = (x, weight, bias)
            return lambda: torch.autograd.grad(fn(x), inputs, dy)

        eager = lambda t: F.silu(F.group_norm(t, groups, weight, bias, 1e-5))  # noqa: E731
        providers = {"torch_eager": wrap(eager)}
        if not backward and device.type == "cpu":
            providers["torch_eager_inplace"] = wrap(
                lambda t: F.silu(F.group_norm(t, groups, weight, bias, 1e-5), inplace=True))
        if compile_it:
            providers["torch_compile"] = wrap(torch.compile(eager, fullgraph=True, dynamic=False))
        for backend in _our_backends(device):
            if not _available("groupnorm_silu", backend, x, groups, weight, bias):
                providers[backend] = wrap(
                    lambda t, b=backend: groupnorm_silu(t, groups, weight, bias, 1e-5, backend=b))
        out = torch.empty_like(x)
        copies = 2 if backward else 1  # forward+backward moves about twice a forward's bytes
        providers["copy"] = lambda: [out.copy_(x.detach()) for _ in range(copies)]
        return providers
    return setup


def groupnorm_silu_cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type == "cpu":
        shapes = [(2, 320, 64, 64, 32, False), (2, 320, 64, 64, 32, True), (1, 640, 32, 32, 32, False),
                  (2, 1280, 16, 16, 32, False), (2, 200, 64, 64, 20, False)]
        dtypes, compiled = [torch.float32], {(2, 320, 64, 64, 32, False)}
    else:
        shapes = [(n, *s, False) for n in (1, 8, 32) for s in SD15_GN + PRUNED_GN]
        shapes += [(8, 320, 64, 64, 32, True), (8, 640, 32, 32, 32, True)]
        dtypes = [torch.bfloat16, torch.float32]
        compiled = {(8, *s, False) for s in SD15_GN}  # compile costs seconds per shape: batch 8 stands for all
    if quick and device.type == "cuda":
        # the headline: SD-1.5's four GroupNorm+SiLU shapes and one pruned width, batch 8, bf16, one compiled
        shapes = [(8, *s, False) for s in SD15_GN + PRUNED_GN[:1]]
        dtypes, compiled = [torch.bfloat16], {(8, *SD15_GN[0], False)}
    elif quick:
        shapes = shapes[:2]
    cases = []
    for n, c, h, w, groups, channels_last in shapes:
        # on a GPU float32 only at batch 8 (bf16 is the training dtype), to keep gpu_check.sh within its minutes
        for dtype in (dtypes if device.type == "cpu" or n == 8 else dtypes[:1]):
            for mode in ("forward", "forward+backward"):
                numel, elt = n * c * h * w, torch.tensor([], dtype=dtype).element_size()
                backward = mode == "forward+backward"
                # minimal: fwd reads x, writes y; bwd reads x, dy, writes dx. Ours re-read x (and dy) once more
                bytes_min = numel * elt * (2 + (3 if backward else 0))
                bytes_kernel = numel * elt * (3 + (5 if backward else 0))
                flops = numel * (GN_FLOPS_FORWARD + (GN_FLOPS_BACKWARD if backward else 0))
                layout = "nhwc" if channels_last else "nchw"
                cases.append(Case(
                    "groupnorm_silu", f"groupnorm_silu {n}x{c}x{h}x{w} g{groups} {layout} {str(dtype)[6:]} {mode}",
                    dict(batch=n, channels=c, height=h, width=w, groups=groups, layout=layout), dtype, mode,
                    bytes_min, bytes_kernel, flops,
                    _gn_setup(n, c, h, w, groups, dtype, mode, channels_last,
                              (n, c, h, w, groups, channels_last) in compiled and dtype == dtypes[0]
                              and (device.type == "cpu" or mode == "forward"))))
    return cases


# ---- distillation loss ----------------------------------------------------------------------------------------
def _kd_setup(n, student_dtype, teacher_dtype, mode, compile_it):
    def setup(device):
        from safeprune_engine.ops.distill_loss import distill_loss

        g = torch.Generator().manual_seed(0)
        teachers = [torch.randn(n, *s, generator=g).to(device, teacher_dtype) for s in SD15_KD]
        students = [(t.float() + 0.1).to(student_dtype) for t in teachers]
        weights = [1.0] * (len(SD15_KD) - 1) + [2.0]
        backward = mode == "forward+backward"
        for s in students:
            s.requires_grad_(backward)

        def eager(ss):
            return sum(w * F.mse_loss(s.float(), t.float()) for s, t, w in zip(ss, teachers, weights))

        def wrap(fn):
            if not backward:
                return lambda: fn(students)
            return lambda: torch.autograd.grad(fn(students), students)

        providers = {"torch_eager": wrap(eager)}
        if compile_it:
            providers["torch_compile"] = wrap(torch.compile(eager, fullgraph=True, dynamic=False))
        for backend in _our_backends(device):
            if not _available("distill_loss", backend, students, teachers, weights):
                providers[backend] = wrap(lambda ss, b=backend: distill_loss(ss, teachers, weights, backend=b))
        flat_s = torch.cat([s.detach().reshape(-1) for s in students])
        out = torch.empty_like(flat_s)
        providers["copy"] = lambda: out.copy_(flat_s)
        return providers
    return setup


def distill_loss_cases(device: torch.device, quick: bool) -> list[Case]:
    batches = [1, 2] if device.type == "cpu" else [1, 8, 32]
    dtypes = [(torch.float32, torch.bfloat16)] + ([(torch.float32, torch.float32)] if device.type == "cuda" else [])
    if quick:
        batches = [8] if device.type == "cuda" else batches[:1]
    cases = []
    per_image = sum(c * h * w for c, h, w in SD15_KD)
    for n in batches:
        for s_dtype, t_dtype in dtypes:
            for mode in ("forward", "forward+backward"):
                numel = n * per_image
                s_elt, t_elt = (torch.tensor([], dtype=d).element_size() for d in (s_dtype, t_dtype))
                backward = mode == "forward+backward"
                # forward reads both; backward reads both again and writes the student gradients
                bytes_min = numel * (s_elt + t_elt) * (2 if backward else 1) + (numel * s_elt if backward else 0)
                flops = numel * (KD_FLOPS_FORWARD + (KD_FLOPS_BACKWARD if backward else 0))
                cases.append(Case(
                    "distill_loss", f"distill_loss sd15x{len(SD15_KD)} pairs batch {n} "
                                    f"{str(s_dtype)[6:]}/{str(t_dtype)[6:]} {mode}",
                    dict(batch=n, pairs=len(SD15_KD), elements=numel, teacher_dtype=str(t_dtype)[6:]), s_dtype, mode,
                    bytes_min, bytes_min, flops,
                    _kd_setup(n, s_dtype, t_dtype, mode, compile_it=(n == batches[-1] and t_dtype == torch.bfloat16))))
    return cases


# ---- pruned convolution ---------------------------------------------------------------------------------------
# SD-1.5 resnet convs at 64x64 latents with widths pruned as the width pruner does (20 of 32 norm groups kept);
# the student is physically sliced, so both sides run on the kept widths (the dense ones only name the layer):
# (name, dense C_in, kept C_in, dense C_out, kept C_out, H, W, k, stride, norm groups of the input)
PRUNED_CONV = [
    ("conv2 320", 320, 200, 320, 320, 64, 64, 3, 1, 20),    # reads the pruned inner width, writes the block width
    ("conv1 640", 640, 640, 640, 400, 32, 32, 3, 1, 32),    # reads the block input, writes the pruned inner width
    ("conv2 1280", 1280, 800, 1280, 1280, 16, 16, 3, 1, 20),
    ("shortcut 320->640", 320, 320, 640, 640, 32, 32, 1, 1, 32),
    ("downsample 320", 320, 320, 320, 320, 64, 64, 3, 2, 32),
]


def _pc_setup(n, spec, dtype, mode, fused, compile_it):
    _, _, k_in, _, k_out, h, w, k, stride, groups = spec
    padding = k // 2

    def setup(device):
        from safeprune_engine.ops.pruned_conv import groupnorm_scale_shift, pruned_conv

        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, k_in, h, w, generator=g).to(device, dtype)
        weight = (torch.randn(k_out, k_in, k, k, generator=g) * (k_in * k * k) ** -0.5).to(device, dtype)
        bias = torch.randn(k_out, generator=g).to(device, dtype)
        gamma = torch.randn(k_in, generator=g).to(device, dtype)
        beta = torch.randn(k_in, generator=g).to(device, dtype)
        ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
        temb = torch.randn(n, k_out, generator=g).to(device, dtype)
        residual = torch.randn(n, k_out, ho, wo, generator=g).to(device, dtype)
        dy = torch.randn(n, k_out, ho, wo, generator=g).to(device, dtype)
        backward = mode == "forward+backward"
        leaves = [x, weight, bias] + ([gamma, beta] if fused else [])
        for t in leaves:
            t.requires_grad_(backward)

        if fused:  # diffusers: norm -> SiLU -> conv -> + time embedding -> + shortcut
            def eager(t):
                a = F.silu(F.group_norm(t, groups, gamma, beta, 1e-5))
                return F.conv2d(a, weight, bias, stride, padding) + temb[:, :, None, None] + residual

            def ours(t, backend):
                scale, shift = groupnorm_scale_shift(t, groups, gamma, beta, 1e-5)
                return pruned_conv(t, weight, bias, stride=stride, padding=padding, norm_scale=scale,
                                   norm_shift=shift, temb_bias=temb, residual=residual, backend=backend)
            inputs = [x, weight, bias, gamma, beta]
        else:
            def eager(t):
                return F.conv2d(t, weight, bias, stride, padding)

            def ours(t, backend):
                return pruned_conv(t, weight, bias, stride=stride, padding=padding, backend=backend)
            inputs = [x, weight, bias]

        def wrap(fn, inputs):
            if not backward:
                return lambda: fn(x)
            return lambda: torch.autograd.grad(fn(x), inputs, dy)

        providers = {"torch_eager": wrap(eager, inputs)}
        if compile_it:
            providers["torch_compile"] = wrap(torch.compile(eager, fullgraph=True, dynamic=False), inputs)
        for backend in _our_backends(device):
            if not _available("pruned_conv", backend, x, weight):
                providers[backend] = wrap(lambda t, b=backend: ours(t, b), inputs)
        return providers
    return setup


def pruned_conv_cases(device: torch.device, quick: bool) -> list[Case]:
    # (batch, spec, dtype) triples; GPU: every batch for the two widest-reaching layers in bf16, batch 8 for the
    # rest and for fp32 (sized for gpu_check.sh's time box)
    if device.type == "cpu":
        plan = [(1, spec, torch.float32) for spec in PRUNED_CONV]
        compiled = {(1, PRUNED_CONV[0][0], False, "forward")}
    else:
        plan = [(n, spec, torch.bfloat16) for spec in PRUNED_CONV[:2] for n in (1, 8, 32)]
        plan += [(8, spec, torch.bfloat16) for spec in PRUNED_CONV[2:]]
        plan += [(8, PRUNED_CONV[0], torch.float32)]
        compiled = {(8, PRUNED_CONV[0][0], fused, "forward") for fused in (False, True)}
    if quick and device.type == "cuda":  # every pruned layer against cuDNN on its pruned shape, batch 8, bf16
        plan, compiled = [(8, spec, torch.bfloat16) for spec in PRUNED_CONV], set()
    elif quick:
        plan = plan[:2]
    cases = []
    for n, spec, dtype in plan:
        name, c_in, k_in, c_out, k_out, h, w, k, stride, groups = spec
        for fused in (False, True):
            for mode in ("forward", "forward+backward"):
                elt = torch.tensor([], dtype=dtype).element_size()
                ho, wo = (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1
                backward = mode == "forward+backward"
                x_bytes, w_bytes = n * k_in * h * w * elt, k_out * k_in * k * k * elt
                y_bytes = n * k_out * ho * wo * elt
                # forward: x, kept weight, y (+ residual); backward: dy, x, weight in; dx, dweight out
                bytes_min = x_bytes + w_bytes + y_bytes * (2 if fused else 1)
                if backward:
                    bytes_min += y_bytes + 2 * x_bytes + 2 * w_bytes
                flops = 2 * n * k_out * ho * wo * k_in * k * k * (3 if backward else 1)
                variant = "fused norm+silu/temb/residual" if fused else "plain"
                cases.append(Case(
                    "pruned_conv", f"pruned_conv {name} {k_in}/{c_in}->{k_out}/{c_out} {h}x{w} k{k}s{stride} "
                                   f"batch {n} {str(dtype)[6:]} {variant} {mode}",
                    dict(batch=n, layer=name, c_in=c_in, kept_in=k_in, c_out=c_out, kept_out=k_out,
                         height=h, width=w, kernel=k, stride=stride, fused=fused), dtype, mode,
                    bytes_min, bytes_min, flops,
                    _pc_setup(n, spec, dtype, mode, fused, (n, name, fused, mode) in compiled)))
    return cases


CASE_BUILDERS = [groupnorm_silu_cases, distill_loss_cases, pruned_conv_cases]


# ---- timing and ceilings ------------------------------------------------------------------------------------
def time_fn(fn: Callable[[], object], device: torch.device, min_time_s: float) -> dict:
    """Median and min seconds per call: warm up, then timed batches of calls until min_time_s has passed.
    first_call_s: the first call's wall time (a cold Triton or torch.compile compile lands there)."""
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first_call_s = time.perf_counter() - t0
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        per_call = max(start.elapsed_time(end) / 1e3, 1e-6)
        calls = max(1, min(200, int(0.02 / per_call)))
        samples = []
        deadline = time.perf_counter() + min_time_s
        while len(samples) < 5 or (time.perf_counter() < deadline and len(samples) < 50):
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / calls)
    else:
        samples = []
        deadline = time.perf_counter() + min_time_s
        while len(samples) < 7 or (time.perf_counter() < deadline and len(samples) < 200):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "samples": len(samples),
            "first_call_s": first_call_s}


def measure_ceilings(device: torch.device, min_time_s: float) -> dict:
    """Copy bandwidth of a buffer far larger than the caches, and the throughput of a large matmul."""
    copy_bytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(copy_bytes // 4, device=device, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, min_time_s)
    ceilings = {"copy_bytes": copy_bytes, "copy_gbps": 2 * copy_bytes / t["median_s"] / 1e9}
    del src, dst
    sizes = {torch.float32: 2048 if device.type == "cpu" else 8192}
    if device.type == "cuda":
        sizes[torch.bfloat16] = 8192
    for dtype, size in sizes.items():
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        t = time_fn(lambda: a @ b, device, min_time_s)
        ceilings[f"matmul_{str(dtype)[6:]}_tflops"] = 2 * size ** 3 / t["median_s"] / 1e12
        ceilings[f"matmul_{str(dtype)[6:]}_size"] = size
    if device.type == "cuda":
        ceilings["matmul_float32_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return ceilings


def run_case(case: Case, device: torch.device, ceilings: dict, min_time_s: float) -> None:
    providers = case.setup(device)
    flops_ceiling = ceilings.get(f"matmul_{str(case.dtype)[6:]}_tflops", ceilings["matmul_float32_tflops"])
    for name, fn in providers.items():
        try:
            t = time_fn(fn, device, min_time_s)
        except Exception as error:  # a provider that cannot run this case (e.g. compile failing) is reported
            case.results[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            continue
        seconds = t["median_s"]
        case.results[name] = {
            "median_ms": seconds * 1e3, "min_ms": t["min_s"] * 1e3, "samples": t["samples"],
            "first_call_ms": t["first_call_s"] * 1e3,
            "gbps_min_traffic": case.bytes_min / seconds / 1e9,
            "gbps_kernel_traffic": case.bytes_kernel / seconds / 1e9,
            "fraction_of_copy_bw": case.bytes_min / seconds / 1e9 / ceilings["copy_gbps"],
            "tflops": case.flops / seconds / 1e12,
            "fraction_of_matmul_flops": case.flops / seconds / 1e12 / flops_ceiling,
        }
    if device.type == "cuda":
        torch.cuda.empty_cache()


def speedups(case: Case, device: torch.device) -> dict:
    out = {}
    for ours in _our_backends(device):
        mine = case.results.get(ours, {}).get("median_ms")
        if mine is None:
            continue
        # "_vs_copy": a same-size copy's time over ours, the fraction of copy speed an elementwise op reaches
        for base in ("torch_eager", "torch_eager_inplace", "torch_compile", "copy"):
            theirs = case.results.get(base, {}).get("median_ms")
            if theirs is not None:
                out[f"{ours}_vs_{base}"] = theirs / mine
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/fused_ops-<device>.json)")
    parser.add_argument("--ops", default=None, help="comma-separated op names (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="CPU: two shapes per op (a smoke run); GPU: the headline cases only (SD-1.5 "
                             "GroupNorm+SiLU shapes with their copy-bandwidth ratio, the KD loss at batch 8, "
                             "every pruned conv against cuDNN; bf16, batch 8) with shorter timing")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--min-time", type=float, default=None, help="seconds of timing per provider")
    parser.add_argument("--quiet-wait", type=float, default=60.0, help="CPU: wait up to this long for an idle machine")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    min_time = args.min_time if args.min_time is not None else (
        1.0 if device.type == "cpu" else (0.05 if args.quick else 0.1))
    import safeprune_engine.ops  # noqa: F401  (registers the ops before the cases ask the dispatcher)

    busy_before = wait_for_quiet(args.quiet_wait, 0.3) if device.type == "cpu" else None
    started = time.perf_counter()
    ceilings = measure_ceilings(device, min_time)
    print(f"ceilings: copy {ceilings['copy_gbps']:.1f} GB/s, "
          + ", ".join(f"{k} {v:.2f}" for k, v in ceilings.items() if k.endswith("tflops")))
    out = Path(args.out) if args.out else HERE / "results" / f"fused_ops-{device.type}.json"
    wanted = None if args.ops is None else set(args.ops.split(","))
    cases = [c for build in CASE_BUILDERS for c in build(device, args.quick) if wanted is None or c.op in wanted]
    rows = []
    for case in cases:
        if args.no_compile:
            case.setup = _without_compile(case.setup)
        run_case(case, device, ceilings, min_time)
        row = {"op": case.op, "name": case.name, "params": case.params, "dtype": str(case.dtype)[6:],
               "mode": case.mode, "bytes_min": case.bytes_min, "bytes_kernel": case.bytes_kernel,
               "flops": case.flops, "results": case.results, "speedups": speedups(case, device)}
        rows.append(row)
        timing = ", ".join(f"{p} {r['median_ms']:.3f} ms" if "median_ms" in r else f"{p} error"
                           for p, r in case.results.items())
        gains = ", ".join(f"{k} {v:.2f}x" for k, v in row["speedups"].items())
        print(f"{case.name}: {timing}" + (f" | {gains}" if gains else ""), flush=True)
        if len(rows) % 10 == 0:  # a run cut short by a time limit still leaves its results
            write_json(out, {"benchmark": "fused_ops", "device": device_description(device), "partial": True,
                             "ceilings": ceilings, "cases": rows})
    busy_after = wait_for_quiet(0.0, 1e9, window_s=1.0) if device.type == "cpu" else None
    result = {
        "benchmark": "fused_ops", "device": device_description(device), "device_type": device.type,
        "torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(), "cpu_isa": _cpu_isa(),
        "machine_busy_cpus_before": busy_before, "machine_busy_cpus_after": busy_after,
        "seconds": time.perf_counter() - started, "ceilings": ceilings, "cases": rows,
        "conventions": {"gn_flops_per_element": [GN_FLOPS_FORWARD, GN_FLOPS_BACKWARD],
                        "kd_flops_per_element": [KD_FLOPS_FORWARD, KD_FLOPS_BACKWARD],
                        "fractions": "of the copy bandwidth (over minimal traffic) and of the matmul TFLOP/s; "
                                     "on CPU a case that fits the last-level cache can exceed the DRAM copy "
                                     "ceiling: its own 'copy' provider is the same-size bound"},
    }
    write_json(out, result)
    print(f"wrote {out} ({result['seconds']:.0f} s)")
    return 0


def _without_compile(setup):
    def wrapped(device):
        providers = setup(device)
        providers.pop("torch_compile", None)
        return providers
    return wrapped


def _cpu_isa():
    from safeprune_engine.ops import native

    return None if native.cpu_reasons() else torch.ops.safeprune_C.cpu_isa()


if __name__ == "__main__":
    raise SystemExit(main())
