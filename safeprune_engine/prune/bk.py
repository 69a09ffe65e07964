"""``--prune-method bk-base | bk-small | bk-tiny``: BK-SDM block removal (Kim et al., 2023).

- bk-base: one resnet+attention pair fewer in every stage: the second pair of each down stage and of each up
  stage is dropped (``layers_per_block`` n -> n - 1; diffusers gives up stages one more layer than down stages).
- bk-small: bk-base without the mid block (``mid_block_type: null``).
- bk-tiny: bk-small without the innermost stage (last down block, first up block, last channel width).

The student is a plain ``UNet2DConditionModel`` built from a standard diffusers config, so
``UNet2DConditionModel.from_pretrained`` loads it with no safeprune code. Its weights are copied from the
teacher by name, with the names shifted where layers were dropped: student ``...resnets.j`` reads the teacher's
``...resnets.j`` for ``j = 0`` and ``...resnets.(j+1)`` after it (the dropped second pair), and for bk-tiny student
``up_blocks.i`` reads teacher ``up_blocks.(i+1)``. A tensor whose teacher counterpart has another shape keeps
its fresh initialisation and is listed in the report's ``fresh`` (never the case for SD-1.x/2.x, whose two
innermost stages have equal widths).
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import SafepruneError
from .base import PRUNE_METHODS, PruneMethod, PruneRequest
from .macs import count_macs, count_params

VARIANTS = {"bk-base": (False, False), "bk-small": (True, False), "bk-tiny": (True, True)}  # (no mid, no innermost)
# config entries that may be given per down block (down order) or per up block (up order)
_PER_DOWN_BLOCK = ("attention_head_dim", "num_attention_heads", "transformer_layers_per_block", "only_cross_attention",
                   "cross_attention_dim")
_DROPPED_LAYER = 1  # "the second resnet+attention pair" of each stage


def _per_block(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def bk_config(teacher_config, variant: str) -> dict:
    """The student's UNet2DConditionModel config (a plain dict, no private ``_`` keys) for a BK variant."""
    if variant not in VARIANTS:
        raise SafepruneError(f"unknown BK variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    no_mid, no_innermost = VARIANTS[variant]
    config = {k: v for k, v in dict(teacher_config).items() if not k.startswith("_")}
    if config.pop("pruned_widths", None):
        raise SafepruneError(f"{variant} removes blocks of a dense UNet2DConditionModel; this UNet is already "
                             "width-pruned (use its dense teacher)")
    stages = len(config["down_block_types"])
    layers = _per_block(config["layers_per_block"], stages)
    if min(layers) < 2:
        raise SafepruneError(f"{variant} drops one resnet+attention pair per stage, but this UNet has "
                             f"layers_per_block={config['layers_per_block']} (needs at least 2 everywhere)")
    layers = [n - 1 for n in layers]
    if no_mid:
        config["mid_block_type"] = None
    if no_innermost:
        if stages < 2:
            raise SafepruneError(f"{variant} removes the innermost stage, but this UNet has only {stages}")
        config["down_block_types"] = list(config["down_block_types"])[:-1]
        config["up_block_types"] = list(config["up_block_types"])[1:]
        config["block_out_channels"] = list(config["block_out_channels"])[:-1]
        layers = layers[:-1]
        for key in _PER_DOWN_BLOCK:
            if isinstance(config.get(key), (list, tuple)):
                config[key] = list(config[key])[:-1]
        if isinstance(config.get("reverse_transformer_layers_per_block"), (list, tuple)):
            config["reverse_transformer_layers_per_block"] = list(config["reverse_transformer_layers_per_block"])[1:]
    config["layers_per_block"] = layers[0] if len(set(layers)) == 1 else layers
    return config


_LAYER = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.")
_UP = re.compile(r"^up_blocks\.(\d+)\.")


def teacher_name(student_name: str, up_offset: int) -> str:
    """The teacher state-dict key a student key is copied from (see the module docstring)."""
    name = student_name
    up = _UP.match(name)
    if up is not None:
        name = f"up_blocks.{int(up.group(1)) + up_offset}." + name[up.end():]
    layer = _LAYER.match(name)
    if layer is not None:
        kind, block, part, index = layer.group(1), layer.group(2), layer.group(3), int(layer.group(4))
        index = index if index < _DROPPED_LAYER else index + 1
        name = f"{kind}.{block}.{part}.{index}." + name[layer.end():]
    return name


def removed_blocks(teacher: nn.Module, variant: str) -> list[str]:
    """Teacher modules with no counterpart in the student: dropped pairs, the mid block, the innermost stage."""
    no_mid, no_innermost = VARIANTS[variant]
    removed = []
    n_down = len(teacher.down_blocks)
    for prefix, blocks in (("down_blocks", teacher.down_blocks), ("up_blocks", teacher.up_blocks)):
        for i, block in enumerate(blocks):
            whole = no_innermost and ((prefix == "down_blocks" and i == n_down - 1) or (prefix == "up_blocks" and i == 0))
            if whole:
                removed.append(f"{prefix}.{i}")
                continue
            if no_innermost and prefix == "down_blocks" and i == n_down - 2 and block.downsamplers is not None:
                removed.append(f"{prefix}.{i}.downsamplers")  # the new innermost stage does not downsample
            for part in ("resnets", "attentions"):
                if getattr(block, part, None) is not None and len(getattr(block, part)) > _DROPPED_LAYER:
                    removed.append(f"{prefix}.{i}.{part}.{_DROPPED_LAYER}")
    if no_mid and teacher.mid_block is not None:
        removed.append("mid_block")
    return removed


def bk_student(teacher: nn.Module, variant: str) -> tuple[nn.Module, list[str]]:
    """Build the BK student of ``teacher`` and copy the teacher's weights into it.

    Returns ``(student, fresh)``: a UNet2DConditionModel on the teacher's device and dtype and in its train/eval
    mode, every parameter trainable, and the student keys that kept their fresh initialisation.
    """
    from diffusers import UNet2DConditionModel

    config = bk_config(teacher.config, variant)
    param = next(teacher.parameters())
    student = UNet2DConditionModel.from_config(config).to(param.device)
    if param.dtype != torch.float32:  # diffusers warns on every .to(dtype), even a no-op one
        student.to(dtype=param.dtype)
    up_offset = len(teacher.up_blocks) - len(student.up_blocks)
    source = teacher.state_dict()
    fresh = []
    with torch.no_grad():
        for key, tensor in student.state_dict().items():
            origin = source.get(teacher_name(key, up_offset))
            if origin is None or origin.shape != tensor.shape:
                fresh.append(key)
            else:
                tensor.copy_(origin)
    student.train(teacher.training).requires_grad_(True)
    return student, fresh


class _BlockRemoval(PruneMethod):
    fixed_architecture = True
    variant = ""

    def prune(self, unet, request: PruneRequest):
        from .width import PruneReport

        student, fresh = bk_student(unet, self.variant)
        report = PruneReport(
            params_before=count_params(unet), params_after=count_params(student),
            macs_before=count_macs(unet, sample_size=request.sample_size),
            macs_after=count_macs(student, sample_size=request.sample_size),
            ratio=None, importance="none",
            sample_size=unet.config.sample_size if request.sample_size is None else request.sample_size,
            method=self.variant, removed=removed_blocks(unet, self.variant), fresh=fresh,
        )
        return student, report


@PRUNE_METHODS.register("bk-base")
class BKBase(_BlockRemoval):
    variant = "bk-base"


@PRUNE_METHODS.register("bk-small")
class BKSmall(_BlockRemoval):
    variant = "bk-small"


@PRUNE_METHODS.register("bk-tiny")
class BKTiny(_BlockRemoval):
    variant = "bk-tiny"
