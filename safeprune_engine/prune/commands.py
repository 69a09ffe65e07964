"""`safeprune prune`: prune a teacher with any registered method, report params / MACs / latency, export it.

    safeprune prune --teacher sd-pipeline/ --prune-method bk-small --out pruned/
    safeprune prune --teacher sd-pipeline/ --prune-method taylor --prune-ratio 0.5 --data images/ --out pruned/

The output is a complete StableDiffusionPipeline directory whose UNet is the student (plus prune_report.json),
ready for `safeprune sample` or for plain diffusers.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import SafepruneError


def register(subparsers) -> None:
    p = subparsers.add_parser("prune", help="prune a teacher's UNet and report params, MACs and latency")
    p.add_argument("--teacher", required=True, help="StableDiffusionPipeline directory")
    p.add_argument("--prune-method", default="magnitude",
                   help="magnitude | taylor | bk-base | bk-small | bk-tiny | sdxl-depth-1.3b | "
                        "sdxl-depth-1b | sdxl-depth-700m (or a plug-in's name)")
    p.add_argument("--prune-ratio", type=float, default=None, help="fraction of width units removed (width methods)")
    p.add_argument("--target-macs", type=float, default=None, help="prune to this fraction of the teacher's MACs")
    p.add_argument("--prune-importance", default="l2", help="magnitude: l2 | l1")
    p.add_argument("--data", default=None, help="image folder with metadata.jsonl (taylor's calibration batches)")
    p.add_argument("--prune-calibration-batches", type=int, default=4, help="taylor: batches of --data to score on")
    p.add_argument("--batch-size", type=int, default=4, help="taylor: images per calibration batch")
    p.add_argument("--resolution", type=int, default=None, help="image size in pixels (default: the teacher's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latency-repeats", type=int, default=5, help="timed forwards per model (median reported)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--plugins", action="append", default=None, help="module that registers a plug-in (repeatable)")
    p.add_argument("--out", required=True, help="output pipeline directory (must not hold anything yet)")
    p.add_argument("--export-remote-code", action="store_true",
                   help="also write the pruned UNet class into the unet folder, so the pipeline loads with "
                        "DiffusionPipeline.from_pretrained(path, trust_remote_code=True) where safeprune-engine is "
                        "not installed (width-pruned students; block-removal ones are plain diffusers models)")
    p.set_defaults(handler=command_prune)


def _check(args, method) -> None:
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SafepruneError(f"--out {out} already exists and is not empty; choose a new --out")
    if method.fixed_architecture:
        if args.target_macs is not None:
            raise SafepruneError(f"--prune-method {args.prune_method} fixes the architecture itself; --target-macs "
                                 "does not apply")
    elif (args.prune_ratio is None) == (args.target_macs is None):
        raise SafepruneError(f"--prune-method {args.prune_method}: give exactly one of --prune-ratio or --target-macs")
    if method.needs_calibration and not args.data:
        raise SafepruneError(f"--prune-method {args.prune_method} scores units on data: give --data DIR")
    if args.latency_repeats < 1:
        raise SafepruneError("--latency-repeats must be at least 1")


def command_prune(args) -> int:
    import json

    import torch

    from ..data.imagefolder import ImageFolder
    from ..models.export import export_pipeline
    from ..models.teacher import load_teacher
    from ..registry import load_plugins
    from .base import PRUNE_METHODS, calibration_batches, prune_unet
    from .latency import measure_latency

    load_plugins(args.plugins or [])
    method = PRUNE_METHODS.get(args.prune_method)
    _check(args, method)
    folder = ImageFolder(args.data) if args.data else None
    teacher = load_teacher(args.teacher)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher.unet.to(device)
    teacher.vae.to(device)
    teacher.text_encoder.to(device)
    vae_factor = 2 ** (len(teacher.vae.config.block_out_channels) - 1)
    resolution = args.resolution or teacher.unet.config.sample_size * vae_factor
    if resolution % vae_factor:
        raise SafepruneError(f"--resolution must be a multiple of {vae_factor}, got {resolution}")
    sample_size = resolution // vae_factor
    calibration = None
    if folder is not None:
        def calibration():
            return calibration_batches(teacher, folder, resolution, args.prune_calibration_batches, args.batch_size,
                                       seed=args.seed, device=device)
    student, report = prune_unet(teacher.unet, args.prune_method, ratio=args.prune_ratio,
                                 target_macs=args.target_macs, importance=args.prune_importance,
                                 sample_size=sample_size, calibration=calibration)
    latency_before = measure_latency(teacher.unet, sample_size, repeats=args.latency_repeats, seed=args.seed)
    latency_after = measure_latency(student, sample_size, repeats=args.latency_repeats, seed=args.seed)
    out = export_pipeline(teacher, student, args.out, remote_code=args.export_remote_code)
    summary = {**report.to_dict(), "latency_s_before": latency_before, "latency_s_after": latency_after,
               "latency_device": str(device)}
    (out / "prune_report.json").write_text(json.dumps(summary, indent=2))

    print(report.summary().splitlines()[0])
    rows = [("params", f"{report.params_before:,}", f"{report.params_after:,}", report.params_fraction),
            ("MACs", f"{report.macs_before:,}", f"{report.macs_after:,}", report.macs_fraction),
            (f"latency ms ({device.type}, batch 1)", f"{latency_before * 1e3:.2f}", f"{latency_after * 1e3:.2f}",
             latency_after / latency_before)]
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  {'teacher':>14}  {'student':>14}  {'student/teacher':>15}")
    for name, before, after, fraction in rows:
        print(f"{name:{width}}  {before:>14}  {after:>14}  {fraction:>15.1%}")
    print(f"wrote {out} (student pipeline; MACs at {sample_size}x{sample_size} latents, attention matmuls included)")
    return 0
