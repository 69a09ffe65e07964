"""Benchmark: the distillation part of the lower loss (w_out L_out + w_feat L_feat), forward + backward, at the
block-map shapes of benchmarks/step.py's preset, through the old path (one F.mse_loss per pair, as
output_kd_loss + feature_kd_loss) and through distill.losses.distillation_losses (one fused distill_loss call)
with every backend that runs here.

Shapes come from tapping the preset's teacher UNet and its width-pruned student (step.py's prune ratio) with
BlockTaps at the preset's latent size: the 9 block maps (down 4, mid 1, up 4) plus the 4-channel prediction.
Inputs are random tensors of those shapes (the loss's cost does not depend on the values); student maps and the
prediction are leaves with gradients, FeatureProjections bridge widths that differ, as in training.
Each provider computes the loss and its gradients to the prediction, the maps and the projection weights; the
"+ exact parts" provider adds the second no-grad pass over the maps that exact logging parts would cost.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/distill_losses.py            # CPU, mini preset, 1 thread
JSON goes to benchmarks/results/distill_losses-<device>.json. Ratios are old-path time / provider time (> 1: the
fused path wins), from the median per-call process CPU time (robust on a shared machine) and wall time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import safeprune_engine  # noqa: F401  (installed, or found next to benchmarks/)
except ImportError:
    sys.path.insert(1, str(HERE.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from harness import device_description, environment, time_calls, write_json  # noqa: E402

W_OUT, W_FEAT = 2.0, 0.1  # the RunConfig defaults


def tapped_shapes(preset_name: str, batch: int, prune_ratio: float, seed: int) -> tuple[list, list, tuple]:
    """(student map shapes, teacher map shapes, prediction shape) of step.py's preset, from one tapped forward."""
    from step import PRESETS, build_pipeline

    from safeprune_engine.distill.features import BlockTaps, pair_feature_blocks
    from safeprune_engine.prune.width import prune

    preset = PRESETS[preset_name]
    pipe = build_pipeline(preset, preset["resolution"], "epsilon", seed)
    teacher = pipe.unet.eval()
    student, _ = prune(teacher, ratio=prune_ratio, sample_size=preset["resolution"] // 8)
    latent = preset["resolution"] // 8
    sample = torch.randn(batch, 4, latent, latent)
    text = torch.randn(batch, 77, preset["text_hidden"])
    shapes = {}
    for name, unet in (("teacher", teacher), ("student", student)):
        taps = BlockTaps(unet)
        with torch.no_grad(), taps.capture(detach=True) as maps:
            prediction = unet(sample, torch.tensor([10] * batch), encoder_hidden_states=text).sample
        taps.remove()
        shapes[name] = {n: tuple(m.shape) for n, m in zip(taps.names, maps)}
    pairs = pair_feature_blocks({n: s[1:] for n, s in shapes["student"].items()},
                                {n: s[1:] for n, s in shapes["teacher"].items()})
    return ([shapes["student"][s] for s, _ in pairs], [shapes["teacher"][t] for _, t in pairs],
            tuple(prediction.shape))


def make_providers(student_shapes, teacher_shapes, prediction_shape, teacher_dtype, backends):
    from safeprune_engine.distill.losses import (FeatureProjections, distillation_losses, feature_kd_loss,
                                                 output_kd_loss)

    g = torch.Generator().manual_seed(0)
    tp = torch.randn(prediction_shape, generator=g).to(teacher_dtype)
    sp = torch.randn(prediction_shape, generator=g).requires_grad_()
    t_maps = [torch.randn(s, generator=g).to(teacher_dtype) for s in teacher_shapes]
    s_maps = [torch.randn(s, generator=g).requires_grad_() for s in student_shapes]
    projections = FeatureProjections([s[1] for s in student_shapes], [t[1] for t in teacher_shapes])
    inputs = [sp, *s_maps, *projections.parameters()]

    def old():
        out, feat = output_kd_loss(sp, tp), feature_kd_loss(s_maps, t_maps, projections)
        return torch.autograd.grad(W_OUT * out + W_FEAT * feat, inputs)

    def fused(backend, exact_parts=False):
        def run():
            total, parts = distillation_losses(sp, tp, s_maps, t_maps, projections, W_OUT, W_FEAT, backend=backend)
            if exact_parts:  # what exact logging parts would cost: a second (no-grad) pass over the maps
                with torch.no_grad():
                    parts["feat"] = feature_kd_loss(s_maps, t_maps, projections)
            return torch.autograd.grad(total, inputs)
        return run

    providers = {"old_mse_loss": old}
    for b in backends:
        providers[f"fused_{b}"] = fused(b)
    providers[f"fused_{backends[0]}+exact_parts"] = fused(backends[0], exact_parts=True)
    # sanity: every provider gives the old path's gradients
    want = old()
    for name, fn in providers.items():
        for a, b in zip(fn(), want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    return providers, sum(t.numel() for t in [tp, *t_maps])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mini")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--prune-ratio", type=float, default=0.5)  # step.py's default
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per provider (median of medians)")
    p.add_argument("--out", default=str(HERE / "results" / "distill_losses-cpu.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")

    from safeprune_engine.ops import dispatch

    student_shapes, teacher_shapes, prediction_shape = tapped_shapes(args.preset, args.batch_size,
                                                                     args.prune_ratio, seed=0)
    print(f"{args.preset}: prediction {prediction_shape}; maps (student -> teacher): "
          + ", ".join(f"{s[1:]}->{t[1]}" if s != t else f"{s[1:]}" for s, t in zip(student_shapes, teacher_shapes)))
    probe = [torch.zeros(2)]
    backends = [b for b in ("cpp", "reference") if not dispatch.available_backends("distill_loss", probe, probe,
                                                                                   [1.0]).get(b, ["-"])]
    backends.append("auto")
    results = {}
    for teacher_dtype in (torch.float32, torch.bfloat16):
        key = f"teacher_{str(teacher_dtype)[6:]}"
        providers, elements = make_providers(student_shapes, teacher_shapes, prediction_shape, teacher_dtype, backends)
        runs = {name: [] for name in providers}
        for _ in range(args.rounds):  # interleaved, so drift in machine load hits every provider alike
            for name, fn in providers.items():
                runs[name].append(time_calls(fn, device, warmup=3, steps=args.steps))
        summary = {}
        for name, rs in runs.items():
            summary[name] = {"median_cpu_s": statistics.median(r["median_cpu_s"] for r in rs),
                             "median_s": statistics.median(r["median_s"] for r in rs),
                             "round_median_cpu_s": [r["median_cpu_s"] for r in rs]}
        base = summary["old_mse_loss"]
        for name, s in summary.items():
            s["speedup_cpu"] = base["median_cpu_s"] / s["median_cpu_s"]
            s["speedup_wall"] = base["median_s"] / s["median_s"]
        results[key] = {"teacher_elements": elements, "providers": summary}
        print(f"\nteacher {str(teacher_dtype)[6:]} ({elements:,} elements per side), forward+backward:")
        for name, s in summary.items():
            print(f"  {name:28s} {s['median_cpu_s'] * 1e3:8.3f} ms cpu  {s['median_s'] * 1e3:8.3f} ms wall  "
                  f"old/this {s['speedup_cpu']:.2f}x cpu, {s['speedup_wall']:.2f}x wall")
    data = {"benchmark": "distill_losses", "device": device_description(device), "environment": environment(),
            "config": {**vars(args), "w_out": W_OUT, "w_feat": W_FEAT, "student_map_shapes": student_shapes,
                       "teacher_map_shapes": teacher_shapes, "prediction_shape": prediction_shape,
                       "auto_picks": dispatch.choose("distill_loss", probe, probe, [1.0], backend="auto").name},
            "results": results}
    print(f"\nwrote {write_json(args.out, data)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
