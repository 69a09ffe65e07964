"""Export a trained student as a complete StableDiffusionPipeline directory, and load it back.

The exported model_index.json names the UNet class ("safeprune_engine", "PrunedUNet2DConditionModel"), so
with safeprune-engine installed the plain diffusers call loads it:

    StableDiffusionPipeline.from_pretrained(path)        # or safeprune_engine.load_pipeline(path)
"""
from __future__ import annotations

import os
from pathlib import Path

import torch


def export_pipeline(teacher, student, out_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write teacher's VAE, text encoder, tokenizer and scheduler with `student` as the UNet (safetensors).

    teacher: a TeacherBundle; student: a (pruned) UNet2DConditionModel. dtype: cast weights before saving.
    """
    import copy

    from diffusers import StableDiffusionPipeline

    unet = copy.deepcopy(student).cpu()
    if dtype is not None:
        unet = unet.to(dtype)
    pipe = StableDiffusionPipeline(
        vae=teacher.vae,
        text_encoder=teacher.text_encoder,
        tokenizer=teacher.tokenizer,
        unet=unet,
        scheduler=teacher.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def load_pipeline(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load an exported (or any local) StableDiffusionPipeline directory without touching the network."""
    from diffusers import StableDiffusionPipeline

    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    pipe = StableDiffusionPipeline.from_pretrained(str(path), **kwargs)
    return pipe.to(device)
