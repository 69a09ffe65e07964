"""Count multiply-accumulates (MACs) and parameters of a diffusers UNet by running one forward with hooks.

What is counted (one MAC = one multiply + one add):
- every ``nn.Conv1d/2d/3d``: ``output.numel() * in_channels / groups * prod(kernel_size)``;
- every ``nn.Linear``: ``output.numel() * in_features``;
- for every diffusers ``Attention``, the two matmuls its projections do not cover:
  ``Q K^T`` and ``softmax(.) V``, i.e. ``B * heads * Lq * Lk * (head_dim_qk + head_dim_v)``, which is
  ``2 * B * heads * Lq * Lk * head_dim`` for the usual equal head dims.
Norms, activations, softmax and element-wise ops are not counted (they are a small fraction and not MACs).

The forward only needs shapes, so it also works on a model built on the ``meta`` device (no memory, no
compute; about 0.2 s for an SD-1.5-sized UNet at 64x64 latents on CPU).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def count_params(module: nn.Module) -> int:
    """Number of parameters of ``module`` (each shared parameter once)."""
    return sum(p.numel() for p in module.parameters())


def _is_attention(module: nn.Module) -> bool:
    # diffusers' Attention class; matched by type so this file does not import diffusers eagerly
    from diffusers.models.attention_processor import Attention

    return isinstance(module, Attention)


def count_macs_by_module(module: nn.Module, *args: Any, **kwargs: Any) -> dict[str, int]:
    """MACs of one call ``module(*args, **kwargs)`` per submodule name, counted by hooks under ``torch.no_grad()``.

    Keys are names from ``module.named_modules()`` (``""`` is ``module`` itself); only counted layers appear:
    conv and linear layers with their own MACs, and each diffusers ``Attention`` with its two attention matmuls
    (its projections are listed under their own names). A layer called several times is summed. The inputs
    must be on the module's device (``meta`` is fine).
    """
    counts: dict[str, int] = {}
    handles = []
    # latest to_q / to_k / to_v output shapes per Attention call, read by the Attention post-hook
    qkv_shapes: dict[int, dict[str, torch.Size]] = {}

    def add(name: str, macs: int) -> None:
        counts[name] = counts.get(name, 0) + int(macs)

    def conv_hook(name):
        def hook(mod: nn.modules.conv._ConvNd, inputs, output):
            add(name, output.numel() * (mod.in_channels // mod.groups) * math.prod(mod.kernel_size))

        return hook

    def linear_hook(name):
        def hook(mod: nn.Linear, inputs, output):
            add(name, output.numel() * mod.in_features)

        return hook

    def proj_hook(attn_id: int, key: str):
        def hook(mod, inputs, output):
            qkv_shapes.setdefault(attn_id, {})[key] = output.shape

        return hook

    def attention_hook(name):
        def hook(mod, inputs, output):
            shapes = qkv_shapes.pop(id(mod), {})
            if not {"q", "k", "v"} <= shapes.keys():
                return  # a processor that bypasses to_q/to_k/to_v (e.g. fused qkv): nothing to count safely
            q, k, v = shapes["q"], shapes["k"], shapes["v"]
            heads = mod.heads
            batch = math.prod(q[:-2])  # [B, Lq, inner] -> B
            lq, lk = q[-2], k[-2]
            add(name, batch * heads * lq * lk * (k[-1] // heads + v[-1] // heads))

        return hook

    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.conv._ConvNd) and not sub.transposed:
            handles.append(sub.register_forward_hook(conv_hook(name)))
        elif isinstance(sub, nn.Linear):
            handles.append(sub.register_forward_hook(linear_hook(name)))
        elif _is_attention(sub):
            for key in ("q", "k", "v"):
                proj = getattr(sub, f"to_{key}", None)
                if proj is not None:
                    handles.append(proj.register_forward_hook(proj_hook(id(sub), key)))
            handles.append(sub.register_forward_hook(attention_hook(name)))
    try:
        with torch.no_grad():
            module(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return counts


def count_module_macs(module: nn.Module, *args: Any, **kwargs: Any) -> int:
    """Total MACs of one call ``module(*args, **kwargs)`` (see ``count_macs_by_module``).

    Example: for ``nn.Linear(8, 16)`` and input ``[2, 5, 8]`` the count is ``2 * 5 * 16 * 8``.
    """
    return sum(count_macs_by_module(module, *args, **kwargs).values())


def unet_example_inputs(
    unet: nn.Module, sample_size: int | tuple[int, int] | None = None, batch_size: int = 1, text_len: int = 77
) -> dict[str, torch.Tensor]:
    """Zero inputs for one UNet2DConditionModel forward, on the UNet's device and dtype.

    Returns ``sample [B, in_channels, H, W]``, ``timestep [B]`` and
    ``encoder_hidden_states [B, text_len, cross_attention_dim]`` (plus SDXL's ``added_cond_kwargs``
    ``text_embeds [B, D]`` and ``time_ids [B, 6]`` when the config asks for them); ``H, W`` come from
    ``sample_size`` (default ``unet.config.sample_size``).
    """
    cfg = unet.config
    size = cfg.sample_size if sample_size is None else sample_size
    if size is None:
        from ..errors import SafepruneError

        raise SafepruneError("unet.config.sample_size is None: pass sample_size= (latent height/width) explicitly")
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    cross_dim = cfg.cross_attention_dim
    if isinstance(cross_dim, (list, tuple)):
        cross_dim = cross_dim[0]
    if getattr(cfg, "encoder_hid_dim", None) is not None:
        cross_dim = cfg.encoder_hid_dim  # the UNet projects text features itself in this setup
    inputs = {
        "sample": torch.zeros(batch_size, cfg.in_channels, height, width, device=device, dtype=dtype),
        "timestep": torch.zeros(batch_size, device=device, dtype=torch.long),
        "encoder_hidden_states": torch.zeros(batch_size, text_len, cross_dim, device=device, dtype=dtype),
    }
    if getattr(cfg, "addition_embed_type", None) == "text_time":
        # SDXL-style micro-conditioning: pooled text embeds + 6 time ids, each id embedded to addition_time_embed_dim
        n_ids = 6
        text_dim = cfg.projection_class_embeddings_input_dim - n_ids * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(batch_size, text_dim, device=device, dtype=dtype),
            "time_ids": torch.zeros(batch_size, n_ids, device=device, dtype=dtype),
        }
    return inputs


def count_macs(
    unet: nn.Module, sample_size: int | tuple[int, int] | None = None, batch_size: int = 1, text_len: int = 77
) -> int:
    """MACs of one UNet2DConditionModel forward on latents ``[batch_size, C, sample_size, sample_size]``.

    ``sample_size`` defaults to ``unet.config.sample_size``; the text condition is
    ``[batch_size, text_len, cross_attention_dim]``. The UNet may live on the ``meta`` device.
    """
    inputs = unet_example_inputs(unet, sample_size=sample_size, batch_size=batch_size, text_len=text_len)
    return count_module_macs(unet, **inputs)
