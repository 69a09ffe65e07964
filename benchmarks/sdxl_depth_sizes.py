"""Benchmark: parameters and MACs at 1024x1024 px of the real-size SDXL-base UNet and of each sdxl-depth variant
(safeprune_engine/prune/sdxl_depth.py), next to the published sizes of the models they follow.

MACs are count_macs's (conv + linear + the two attention matmuls, batch 1, 77 text tokens, SDXL's added
conditioning) at 128x128 latents. They are counted twice: on shape-only ``meta`` copies (what PruneReport uses:
no memory, a few seconds) and, unless --meta-only, by a real hooked forward of the random-weight UNet in bf16 on
this machine (SDXL built in bf16, 5.1 GB, never in fp32; the whole run takes a few minutes on a 2-core CPU and
about 9 GiB RSS); the script checks that both counts agree. Parameters are the same either way.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sdxl_depth_sizes.py              # meta + real bf16 forwards
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sdxl_depth_sizes.py --meta-only  # seconds

JSON goes to benchmarks/results/sdxl_depth_sizes.json. The forward times are one hooked bf16 forward on the
machine named in "device", indicative only (a shared CPU; no GPU kernels).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import safeprune_engine  # noqa: F401  (installed, or found next to benchmarks/)
except ImportError:
    sys.path.insert(1, str(HERE.parent))

import torch  # noqa: E402

from harness import device_description, environment, peak_rss_bytes, write_json  # noqa: E402

# where the published numbers come from
SOURCES = {
    "SDXL-base-1.0": "2,567M UNet parameters: KOALA model card's U-Net table, huggingface.co/etri-vilab/koala-700m",
    "Segmind SSD-1B": "1.3B UNet: Gupta et al. 2024, 'Progressive Knowledge Distillation of Stable Diffusion XL "
                      "Using Layer Level Loss', arXiv:2401.02677; encoder transformer depths (0, 2, 4) per "
                      "ComfyUI's model detection table (comfy/supported_models.py, SSD1B)",
    "Segmind-Vega": "0.74B UNet (arXiv:2401.02677); down 247M, mid 31M, up 460M (blog.segmind.com/segmind-vega-2)",
    "KOALA-1B": "1,161M UNet, transformer depths (0, 2, 6): Lee et al., 'KOALA', arXiv:2312.04005, and its model card",
    "KOALA-700M": "782M UNet, transformer depths (0, 2, 5): arXiv:2312.04005 and huggingface.co/etri-vilab/koala-700m",
}
PUBLISHED_REFERENCES = {"SDXL-base-1.0": 2_567_000_000, "Segmind-Vega": 740_000_000}


def parts(unet) -> dict[str, int]:
    """Parameters per part: down_blocks, mid_block, up_blocks, and the rest (conv in/out, embeddings, norm)."""
    out = {"down_blocks": 0, "mid_block": 0, "up_blocks": 0, "rest": 0}
    for name, p in unet.named_parameters():
        head = name.split(".", 1)[0]
        out[head if head in out else "rest"] += p.numel()
    return out


def describe(unet) -> dict:
    from safeprune_engine.prune.sdxl_depth import transformer_depths

    config = unet.config
    depths = transformer_depths(unet)
    return {"layers_per_block": config.layers_per_block,
            "transformer_layers_per_block": list(config.transformer_layers_per_block),
            "mid_block_type": config.mid_block_type, "basic_transformer_blocks": sum(depths.values()),
            "params_by_part": parts(unet)}


def build_bf16_sdxl():
    from diffusers import UNet2DConditionModel

    from safeprune_engine.models.sd_configs import unet_config

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: never a 10 GB fp32 copy
    try:
        torch.manual_seed(0)
        return UNet2DConditionModel(**unet_config("sdxl")).eval()
    finally:
        torch.set_default_dtype(previous)


def timed_macs(unet, sample_size: int) -> tuple[int, float]:
    from safeprune_engine.prune.macs import count_macs

    started = time.perf_counter()
    macs = count_macs(unet, sample_size=sample_size)
    return macs, time.perf_counter() - started


def main() -> None:
    from diffusers import UNet2DConditionModel

    from safeprune_engine.models.sd_configs import unet_config
    from safeprune_engine.prune.base import prune_unet
    from safeprune_engine.prune.sdxl_depth import VARIANTS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample-size", type=int, default=128, help="latent size (128: 1024x1024 px)")
    parser.add_argument("--meta-only", action="store_true", help="count on meta copies only (no real forwards)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=str(HERE / "results" / "sdxl_depth_sizes.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = args.sample_size

    with torch.device("meta"):
        meta_sdxl = UNet2DConditionModel(**unet_config("sdxl"))
    rows = {}
    teacher_row = None
    for variant, spec in VARIANTS.items():
        student, report = prune_unet(meta_sdxl, variant, sample_size=size)
        if teacher_row is None:
            teacher_row = {"params": report.params_before, "macs": report.macs_before,
                           "published_params": PUBLISHED_REFERENCES["SDXL-base-1.0"], **describe(meta_sdxl)}
        rows[variant] = {
            "like": spec.like, "published_params": spec.published_params, "params": report.params_after,
            "params_vs_published": report.params_after / spec.published_params,
            "params_fraction": report.params_fraction, "macs": report.macs_after,
            "macs_fraction": report.macs_fraction, "teacher_modules_removed": len(report.removed),
            "fresh_tensors": len(report.fresh), **describe(student),
        }

    if not args.meta_only:
        sdxl = build_bf16_sdxl()
        macs, seconds = timed_macs(sdxl, size)
        assert macs == teacher_row["macs"], (macs, teacher_row["macs"])
        teacher_row["bf16_forward_s"] = seconds
        for variant, row in rows.items():
            student, _ = prune_unet(sdxl, variant, sample_size=size)
            macs, seconds = timed_macs(student, size)
            assert macs == row["macs"], (variant, macs, row["macs"])
            row["bf16_forward_s"] = seconds
            del student

    result = {
        "benchmark": "sdxl_depth_sizes",
        "device": device_description(torch.device("cpu")),
        "environment": environment(),
        "config": {"sample_size": size, "pixels": size * 8, "batch_size": 1, "text_tokens": 77,
                   "added_conditioning": "text_embeds (1, 1280), time_ids (1, 6)",
                   "macs_counted": "meta copies" + ("" if args.meta_only else " and real bf16 forwards (equal)"),
                   "threads": args.threads},
        "sdxl_base": teacher_row,
        "variants": rows,
        "published_references": {"Segmind-Vega": PUBLISHED_REFERENCES["Segmind-Vega"]},
        "sources": SOURCES,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    path = write_json(args.out, result)

    print(f"SDXL-base UNet and sdxl-depth variants at {size * 8}x{size * 8} px ({size}x{size} latents), batch 1")
    print(f"{'':17} {'params':>15} {'published':>15} {'params/SDXL':>11} {'GMACs':>9} {'MACs/SDXL':>9}  like")
    print(f"{'SDXL-base':17} {teacher_row['params']:>15,} {teacher_row['published_params']:>15,} {1:>11.1%} "
          f"{teacher_row['macs'] / 1e9:>9,.0f} {1:>9.1%}  -")
    for variant, row in rows.items():
        print(f"{variant:17} {row['params']:>15,} {row['published_params']:>15,} {row['params_fraction']:>11.1%} "
              f"{row['macs'] / 1e9:>9,.0f} {row['macs_fraction']:>9.1%}  {row['like']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
