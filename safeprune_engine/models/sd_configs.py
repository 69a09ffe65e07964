"""Real Stable Diffusion architectures, built offline with random weights: SD-1.5, SD-2.1 (v-prediction) and SDXL.

Scale tests and benchmarks use them (no hub here); users can check what a run at real size needs before
downloading a teacher. Shapes follow the public model cards' configs: SD-1.5 (UNet 860M, CLIP ViT-L/14 text
encoder, 512 px, epsilon), SD-2.1 (UNet 865M with linear projections and per-stage head counts, OpenCLIP ViT-H text
encoder of 23 layers, 768 px, v-prediction), SDXL base (UNet 2.6B, 1024 px, CLIP ViT-L/14 and OpenCLIP ViT-bigG/14
text encoders whose penultimate states sit side by side (2048 channels), the second's projected pooled output
(1280) and six size/crop time ids as added conditioning, Euler scheduler).
"""
from __future__ import annotations

import contextlib

from ..errors import SafepruneError

ARCHITECTURES = ("sd15", "sd21", "sdxl")

_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


def unet_config(architecture: str) -> dict:
    """UNet2DConditionModel arguments of the architecture (random weights when built from them)."""
    common = dict(in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32, norm_eps=1e-5,
                  act_fn="silu", flip_sin_to_cos=True, freq_shift=0, downsample_padding=1)
    if architecture == "sd15":
        return dict(common, sample_size=64, down_block_types=_SD_DOWN, up_block_types=_SD_UP,
                    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8)
    if architecture == "sd21":
        # attention_head_dim holds diffusers' per-stage *head counts* here (64 channels per head everywhere)
        return dict(common, sample_size=96, down_block_types=_SD_DOWN, up_block_types=_SD_UP,
                    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024,
                    attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, upcast_attention=True)
    if architecture == "sdxl":
        return dict(common, sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                    addition_embed_type="text_time", addition_time_embed_dim=256,
                    projection_class_embeddings_input_dim=2816)
    raise SafepruneError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")


def vae_config(architecture: str) -> dict:
    """AutoencoderKL arguments (the SD VAE: 8x downsampling, 4 latent channels)."""
    size = {"sd15": 512, "sd21": 768, "sdxl": 1024}[check_architecture(architecture)]
    return dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512), sample_size=size,
                scaling_factor=0.13025 if architecture == "sdxl" else 0.18215)


def text_encoder_config(architecture: str) -> dict:
    """CLIPTextConfig arguments: CLIP ViT-L/14 text (SD-1.5, SDXL's first encoder) or OpenCLIP ViT-H text, 23 layers
    used (SD-2.1)."""
    if check_architecture(architecture) in ("sd15", "sdxl"):
        return dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
    if architecture == "sd21":
        return dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                    num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)
    raise SafepruneError(f"no text encoder config for {architecture!r}")


def text_encoder_2_config(architecture: str) -> dict:
    """CLIPTextConfig arguments of SDXL's second encoder, OpenCLIP ViT-bigG/14 text with its 1280-wide projection
    (a CLIPTextModelWithProjection)."""
    if check_architecture(architecture) != "sdxl":
        raise SafepruneError(f"{architecture} has one text encoder; only sdxl has a second")
    return dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)


def scheduler_config(architecture: str) -> dict:
    """DDIMScheduler arguments: SD's scaled-linear betas; SD-2.1 (768 px) predicts v."""
    check_architecture(architecture)
    return dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                prediction_type="v_prediction" if architecture == "sd21" else "epsilon")


def check_architecture(architecture: str) -> str:
    if architecture not in ARCHITECTURES:
        raise SafepruneError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    return architecture


def build_unet(architecture: str, seed: int = 0, dtype=None):
    """A UNet2DConditionModel of the architecture with random weights, created in `dtype` (default fp32): no fp32
    copy of a 2.6B-parameter UNet exists on the way to a bf16 one."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with created_in(dtype):
        return UNet2DConditionModel(**unet_config(architecture))


@contextlib.contextmanager
def created_in(dtype):
    """A context in which new floating-point parameters are created in `dtype` (None: leave the default)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or previous)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_pipeline(architecture: str, seed: int = 0, unet=None, dtype=None, text_layers: int | None = None):
    """A StableDiffusionPipeline (StableDiffusionXLPipeline for sdxl) of the architecture with random weights,
    assembled offline; dtype: of every module (default fp32); text_layers: fewer transformer layers in the text
    encoders, their widths (what the UNet sees) kept (a scale test of the UNet that cannot hold SDXL's 818M-parameter
    encoders next to it).

    The tokenizers are the byte-level CLIP tokenizer of safeprune_engine.models.tokenizers (77 tokens); token ids
    stay below the real vocabulary size, so the text encoders have their real shapes.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .export import assemble_pipeline
    from .tokenizers import byte_clip_tokenizer

    check_architecture(architecture)
    torch.manual_seed(seed)
    tokenizer = byte_clip_tokenizer(model_max_length=77)
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    depth = {} if text_layers is None else {"num_hidden_layers": text_layers}
    with created_in(dtype):
        text_encoder = CLIPTextModel(CLIPTextConfig(**{**text_encoder_config(architecture), **depth}, **special))
        vae = AutoencoderKL(**vae_config(architecture))
    unet = build_unet(architecture, seed, dtype) if unet is None else unet
    second = {}
    if architecture == "sdxl":
        vae.register_to_config(force_upcast=True)  # the SDXL VAE overflows in fp16
        with created_in(dtype):
            text_encoder_2 = CLIPTextModelWithProjection(
                CLIPTextConfig(**{**text_encoder_2_config(architecture), **depth}, **special))
        second = dict(text_encoder_2=text_encoder_2, tokenizer_2=byte_clip_tokenizer(model_max_length=77))
        scheduler = EulerDiscreteScheduler(**{k: v for k, v in scheduler_config(architecture).items()
                                              if k not in ("clip_sample", "set_alpha_to_one")},
                                           timestep_spacing="leading")
    else:
        scheduler = DDIMScheduler(**scheduler_config(architecture))
    return assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler, **second)
