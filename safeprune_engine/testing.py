"""Offline building blocks for tests and examples: a tiny Stable-Diffusion-shaped pipeline from configs.

Nothing here downloads anything. The tokenizer is the byte-level CLIP tokenizer of
safeprune_engine.models.tokenizers (every byte is a token, no merges).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .models.tokenizers import byte_clip_tokenizer, clip_text_config

# per-dtype (atol, rtol) for comparing a computation with its fp32 reference
TOLERANCES = {
    torch.float64: (1e-10, 1e-7),
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


def tiny_tokenizer(model_max_length: int = 32):
    """The byte-level CLIPTokenizer of the built-in models (safeprune_engine.models.tokenizers), 514 tokens."""
    return byte_clip_tokenizer(model_max_length)


def tiny_unet_config(prediction_sample_size: int = 8, cross_attention_dim: int = 32) -> dict:
    """Config of a ~1M-parameter UNet2DConditionModel with SD's block structure (2 stages)."""
    return dict(
        sample_size=prediction_sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
    )


def tiny_unet(seed: int = 0, **overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**tiny_unet_config(), **overrides})


def tiny_pipeline(seed: int = 0, prediction_type: str = "epsilon", unet_overrides: dict | None = None):
    """A StableDiffusionPipeline with random tiny components: 16 px images <-> 8 px latents."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(**clip_text_config(tokenizer, hidden_size=32)))
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=16,
    )
    unet = tiny_unet(seed=seed, **(unet_overrides or {}))
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    from .models.export import assemble_pipeline

    return assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler)


def save_tiny_pipeline(path: str | os.PathLike, **kwargs) -> Path:
    path = Path(path)
    tiny_pipeline(**kwargs).save_pretrained(path, safe_serialization=True)
    return path


def tiny_sdxl_unet_config(sample_size: int = 8, text_width: int = 32, pooled: int = 32) -> dict:
    """Config of a tiny SDXL-shaped UNet: a plain first stage, a cross-attention stage of two transformer layers,
    cross-attention over both encoders' states side by side (2 x text_width) and SDXL's added conditioning
    ("text_time": the pooled embedding and 6 time ids, each id embedded to 8 channels)."""
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2),
        norm_num_groups=8,
        cross_attention_dim=2 * text_width,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=pooled + 6 * 8,
    )


def tiny_sdxl_pipeline(seed: int = 0, prediction_type: str = "epsilon", unet_overrides: dict | None = None):
    """A StableDiffusionXLPipeline with random tiny components (two text encoders, the second with a projection
    to the pooled embedding; SDXL's Euler scheduler): 16 px images <-> 8 px latents."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(**clip_text_config(tokenizer, hidden_size=32)))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_text_config(tokenizer_2, hidden_size=32),
                                                                projection_dim=32))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, latent_channels=4, sample_size=16, scaling_factor=0.13025, force_upcast=True,
    )
    unet = UNet2DConditionModel(**{**tiny_sdxl_unet_config(), **(unet_overrides or {})})
    # SDXL base's scheduler settings
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                       beta_end=0.012, steps_offset=1, timestep_spacing="leading",
                                       prediction_type=prediction_type)
    from .models.export import assemble_pipeline

    return assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler, text_encoder_2, tokenizer_2)


def save_tiny_sdxl_pipeline(path: str | os.PathLike, **kwargs) -> Path:
    path = Path(path)
    tiny_sdxl_pipeline(**kwargs).save_pretrained(path, safe_serialization=True)
    return path


COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}


def write_image_folder(path: str | os.PathLike, captions: list[str], size: int = 16, seed: int = 0) -> Path:
    """An HF-imagefolder dataset: PNGs plus metadata.jsonl lines {"file_name", "text"}.

    Each image is a coloured square on noise, its colour taken from the first colour word in its caption, so
    the data carries a little signal without needing a renderer.
    """
    from PIL import Image
    import numpy as np

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i, caption in enumerate(captions):
        colour = next((rgb for word, rgb in COLOURS.items() if word in caption), (128, 128, 128))
        pixels = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
        lo, hi = size // 4, 3 * size // 4
        pixels[lo:hi, lo:hi] = colour
        name = f"{i:05d}.png"
        Image.fromarray(pixels).save(path / name)
        lines.append(json.dumps({"file_name": name, "text": caption}))
    (path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return path


def kernel_backend_devices() -> list[tuple[str, str]]:
    """(backend, device) pairs the fused-op tests run: cpp and triton on CPU (Triton through its interpreter),
    triton and cuda on a GPU when one is visible. Whether a pair can run here is the dispatcher's answer."""
    pairs = [("cpp", "cpu"), ("triton", "cpu")]
    if torch.cuda.is_available():
        pairs += [("triton", "cuda"), ("cuda", "cuda")]
    return pairs
