"""What this installation can run: ``python -m safeprune_engine.info``.

Prints the versions of the main dependencies, the compiled libraries (built or why not), the CPU instruction
set the C++ kernels use, whether auto mode times the backends and where it caches its choices, and for each
fused op every backend with the reasons it cannot run here. Checking the backends imports no Triton kernel module
and initialises no GPU beyond asking torch whether one is visible.
"""
from __future__ import annotations

import importlib.metadata
import platform
import sys

PACKAGES = ("torch", "triton", "diffusers", "transformers", "deepspeed", "bitsandbytes", "torch-pruning",
            "safeprune-engine")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def report() -> dict:
    """Versions, native libraries and, per op, {backend: reasons it cannot run (empty = available)}."""
    import torch

    from safeprune_engine import ops
    from safeprune_engine.ops import autotune, dispatch, native

    libraries = {native.CPU_MODULE: native.cpu_reasons(), native.CUDA_MODULE: native.cuda_reasons()}
    cpu_isa = torch.ops.safeprune_C.cpu_isa() if not libraries[native.CPU_MODULE] else None
    backends = {name: dispatch.available_backends(name) for name in ops.OP_NAMES if name in dispatch.registered_ops()}
    return {
        "versions": versions(),
        "torch_cuda": torch.version.cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "libraries": libraries,
        "cpu_isa": cpu_isa,
        "kernel_request": dispatch.requested_mode(),
        "autotune": {"timing": autotune.enabled(), "cache": str(autotune.cache().directory)},
        "backends": backends,
    }


def format_report(info: dict) -> str:
    lines = ["safeprune-engine " + info["versions"]["safeprune-engine"], "", "versions:"]
    lines += [f"  {name:18s} {version}" for name, version in info["versions"].items()]
    lines += ["", f"torch CUDA: {info['torch_cuda'] or 'none (CPU build)'}",
              "GPUs: " + (", ".join(info["cuda_devices"]) or "none visible"), "", "native libraries:"]
    for library, reasons in info["libraries"].items():
        lines.append(f"  {library:26s} " + ("loaded" if not reasons else "unavailable: " + "; ".join(reasons)))
    if info["cpu_isa"]:
        lines.append(f"  CPU kernels use {info['cpu_isa']} (SAFEPRUNE_CPU_ISA=generic|avx2 lowers it)")
    lines += ["", f"kernel backend request ($SAFEPRUNE_KERNELS): {info['kernel_request']}"]
    tune = info["autotune"]
    lines.append("auto times the backends per op shape, decisions cached in " + tune["cache"] if tune["timing"] else
                 "auto takes the first capable backend below ($SAFEPRUNE_AUTOTUNE is off: no timing)")
    lines += ["", "ops (static auto order):"]
    for op, table in info["backends"].items():
        lines.append(f"  {op}:")
        for backend, reasons in table.items():
            lines.append(f"    {backend:10s} " + ("available" if not reasons else "no: " + "; ".join(reasons)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import json

    argv = sys.argv[1:] if argv is None else argv
    info = report()
    print(json.dumps(info, indent=2) if "--json" in argv else format_report(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
