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


class BlockTaps:
    """Forward hooks that record block outputs while enabled.

    rows: an optional slice of the batch to keep (the teacher's batched forward serves several losses and
    only the data rows feed feature distillation). detach: drop the graph (teacher) or keep it (student).
    """

    def __init__(self, unet: nn.Module):
        self.names = [name for name, _ in feature_blocks(unet)]
        self.outputs: list[torch.Tensor | None] = [None] * len(self.names)
        self.enabled = False
        self.rows: slice | None = None
        self.detach = False
        self._handles = [
            module.register_forward_hook(self._make_hook(i)) for i, (_, module) in enumerate(feature_blocks(unet))
        ]

    def _make_hook(self, index: int):
        def hook(_module, _inputs, output):
            if not self.enabled:
                return
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            if self.rows is not None:
                hidden = hidden[self.rows]
            self.outputs[index] = hidden.detach() if self.detach else hidden

        return hook

    @contextmanager
    def capture(self, rows: slice | None = None, detach: bool = False):
        """Record block outputs for the forwards inside the block; yields the list they land in."""
        self.outputs = [None] * len(self.names)
        self.enabled, self.rows, self.detach = True, rows, detach
        try:
            yield self.outputs
        finally:
            self.enabled, self.rows = False, None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
