"""Export a trained student as a complete StableDiffusionPipeline directory, and load it back.

The exported model_index.json names the UNet class ("safeprune_engine", "PrunedUNet2DConditionModel"), so
with safeprune-engine installed the plain diffusers call loads it:

    StableDiffusionPipeline.from_pretrained(path)        # or safeprune_engine.load_pipeline(path)
"""
from __future__ import annotations

import os
from pathlib import Path

import torch


def assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    """A StableDiffusionPipeline from its five components, with no safety checker or feature extractor."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def export_pipeline(teacher, student, out_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write teacher's VAE, text encoder, tokenizer and scheduler with `student` as the UNet (safetensors).

    teacher: a TeacherBundle; student: a (pruned) UNet2DConditionModel. dtype: cast weights before saving.
    """
    import copy

    unet = copy.deepcopy(student).cpu()
    if dtype is not None:
        unet = unet.to(dtype)
    pipe = assemble_pipeline(teacher.vae, teacher.text_encoder, teacher.tokenizer, unet, teacher.scheduler)
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
