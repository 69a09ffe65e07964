"""The frozen teacher as an optimizer-less DeepSpeed ZeRO-3 engine: each rank keeps 1/N of the teacher UNet's
parameters, and every forward gathers a layer's weights just before it runs and frees them right after.

Only parameters of at least --zero3-persistence-threshold elements (default 100000, DeepSpeed's) are partitioned;
smaller ones (biases, norms) stay whole, which costs little memory and saves many tiny all-gathers.
"""
from __future__ import annotations

import logging

from torch import nn

from ..memory import teacher_precision
from .zero_config import teacher_config

log = logging.getLogger("safeprune_engine")


def shard_teacher(unet: nn.Module, config, context):
    """Partition `unet` (a whole module, on any device) across the ranks, in the teacher precision.

    Returns (module, ds_engine): call the module as before (ZeRO-3 hooks gather its weights in each forward;
    every rank must run the same forwards); keep the engine referenced for as long as the module is used.
    """
    import deepspeed

    unet.eval().requires_grad_(False)
    precision = teacher_precision(config)
    full_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    engine, _, _, _ = deepspeed.initialize(model=unet, config=teacher_config(config, context.world_size, precision))
    module = engine.module
    module.eval()
    log.info("teacher sharded with ZeRO-3 over %d ranks (%s): %.1f MiB of parameters per rank (whole: %.1f MiB "
             "at load)", context.world_size, precision, local_parameter_bytes(module) / 2**20, full_bytes / 2**20)
    return module, engine


def local_parameter_bytes(module: nn.Module) -> int:
    """Bytes of parameters this rank holds (ZeRO-3: its partitions plus the unpartitioned small tensors)."""
    total = 0
    for param in module.parameters():
        tensor = param.ds_tensor if hasattr(param, "ds_tensor") else param
        total += tensor.numel() * tensor.element_size()
    return total
