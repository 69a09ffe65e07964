"""``--prune-method magnitude``: width pruning by the L2 (or L1, ``--prune-importance l1``) norm of the weights
that produce each unit (GroupNorm groups of resnet conv1, attention heads, GEGLU units); see ``width.py``."""
from __future__ import annotations

from .base import PRUNE_METHODS, PruneMethod, PruneRequest
from .width import prune


@PRUNE_METHODS.register("magnitude")
class MagnitudePruning(PruneMethod):
    def prune(self, unet, request: PruneRequest):
        return prune(unet, ratio=request.ratio, target_macs=request.target_macs, importance=request.importance,
                     sample_size=request.sample_size, parts=request.parts, method="magnitude")
