"""Measured forward latency of a UNet: the number ``safeprune prune`` prints next to params and MACs."""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn


@torch.inference_mode()
def measure_latency(unet: nn.Module, sample_size: int | None = None, batch_size: int = 1, text_len: int = 77,
                    warmup: int = 2, repeats: int = 5, seed: int = 0) -> float:
    """Median wall time in seconds of one forward on random ``[batch_size, C, s, s]`` latents and
    ``[batch_size, text_len, D]`` text states, after ``warmup`` untimed calls; CUDA is synchronised per call."""
    from .macs import unet_example_inputs

    inputs = unet_example_inputs(unet, sample_size=sample_size, batch_size=batch_size, text_len=text_len)
    generator = torch.Generator().manual_seed(seed)
    for key in ("sample", "encoder_hidden_states"):
        value = inputs[key]
        inputs[key] = torch.randn(value.shape, generator=generator).to(value.device, value.dtype)
    inputs["timestep"] = torch.full_like(inputs["timestep"], 500)
    device = inputs["sample"].device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    was_training = unet.training
    unet.eval()
    try:
        for _ in range(warmup):
            unet(**inputs)
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            unet(**inputs)
            sync()
            times.append(time.perf_counter() - start)
    finally:
        unet.train(was_training)
    return statistics.median(times)
