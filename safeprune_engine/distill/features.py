"""Block-output taps: capture the output of every down block, the mid block and every up block of a UNet.

For SD that is 4 + 1 + 4 = 9 maps. Down blocks return (hidden, residuals); only `hidden` is the block output
and only it is kept, so the teacher's skip tensors are never retained (the reference hooks keep whole tuples).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def feature_blocks(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every block whose output feature distillation compares, in forward order."""
    blocks = [(f"down_blocks.{i}", block) for i, block in enumerate(unet.down_blocks)]
    if getattr(unet, "mid_block", None) is not None:
        blocks.append(("mid_block", unet.mid_block))
    blocks += [(f"up_blocks.{i}", block) for i, block in enumerate(unet.up_blocks)]
    return blocks


def pair_feature_blocks(student_shapes: dict[str, tuple], teacher_shapes: dict[str, tuple]) -> list[tuple[str, str]]:
    """Which student block output is distilled from which teacher block output.

    Shapes: block name -> (C, H, W) of its output, in forward order. Down blocks pair from the outermost stage
    (index i with i), up blocks from the outermost stage too (the last with the last), the mid block with the
    mid block; so a student without the innermost stage or the mid block (BK-SDM) pairs every stage it kept.
    Pairs whose spatial sizes differ are dropped (1x1 projections bridge only channel widths).
    """
    def split(shapes):
        names = list(shapes)
        return ([n for n in names if n.startswith("down_blocks.")], [n for n in names if n == "mid_block"],
                [n for n in names if n.startswith("up_blocks.")])

    s_down, s_mid, s_up = split(student_shapes)
    t_down, t_mid, t_up = split(teacher_shapes)
    pairs = list(zip(s_down, t_down)) + list(zip(s_mid, t_mid))
    pairs += list(zip(reversed(s_up), reversed(t_up)))[::-1]
    return [(s, t) for s, t in pairs if tuple(student_shapes[s][1:]) == tuple(teacher_shapes[t][1:])]


class BlockTaps:
    """Forward hooks that record block outputs while enabled.

    names: the blocks to tap, in the order their outputs are listed (default: every block of ``feature_blocks``).
    rows: an optional slice of the batch to keep (the teacher's batched forward serves several losses and
    only the data rows feed feature distillation); copy: keep those rows as a copy, not a view that would keep
    the whole batched output alive. detach: drop the graph (teacher) or keep it (student). The taps hold the
    recorded outputs only while capturing: the caller's list is the only reference afterwards.
    """

    def __init__(self, unet: nn.Module, names: list[str] | None = None):
        blocks = dict(feature_blocks(unet))
        self.names = list(blocks) if names is None else list(names)
        unknown = [n for n in self.names if n not in blocks]
        if unknown:
            raise ValueError(f"no block named {unknown} in this UNet; it has {list(blocks)}")
        self.outputs: list[torch.Tensor | None] = [None] * len(self.names)
        self.enabled = False
        self.rows: slice | None = None
        self.detach = False
        self.copy = False
        self._handles = [blocks[name].register_forward_hook(self._make_hook(i)) for i, name in enumerate(self.names)]

    def _make_hook(self, index: int):
        def hook(_module, _inputs, output):
            if not self.enabled:
                return
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            if self.detach:
                hidden = hidden.detach()
            if self.rows is not None:
                hidden = hidden[self.rows].clone() if self.copy else hidden[self.rows]
            self.outputs[index] = hidden

        return hook

    @contextmanager
    def capture(self, rows: slice | None = None, detach: bool = False, copy: bool = False):
        """Record block outputs for the forwards inside the block; yields the list they land in."""
        self.outputs = [None] * len(self.names)
        self.enabled, self.rows, self.detach, self.copy = True, rows, detach, copy
        try:
            yield self.outputs
        finally:
            self.enabled, self.rows = False, None
            self.outputs = [None] * len(self.names)  # the yielded list stays the caller's; no reference kept here

    def strip_copied_hooks(self, module: nn.Module) -> None:
        """Remove these taps' hooks from a deep copy of the tapped model (deepcopy copies the hook entries, which
        would still record into this object), so the copy can get taps of its own."""
        for sub in module.modules():
            for handle in self._handles:
                sub._forward_hooks.pop(handle.id, None)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
