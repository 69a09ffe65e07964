"""ESD (Gandikota et al., 2023) with the teacher as the frozen reference: negative guidance away from a concept.

target = T(z_t, t, a) - eta * (T(z_t, t, c) - T(z_t, t, a)), loss = ||student(z_t, t, c) - target||^2, where c is
the concept condition and a the anchor (empty prompt, the caption with the concept stripped, or a given text).
ESD-u trains everything except cross-attention (attn2); ESD-x trains only attn2.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import OBJECTIVES, UnlearnObjective, is_cross_attention


def esd_target(teacher_concept: torch.Tensor, teacher_anchor: torch.Tensor, eta: float) -> torch.Tensor:
    """(Bc, C, h, w) each -> the negatively guided target, fp32."""
    anchor = teacher_anchor.float()
    return anchor - eta * (teacher_concept.float() - anchor)


class _ESD(UnlearnObjective):
    teacher_conditions = ("concept", "anchor")
    latents = "noisy"

    def loss(self, student_prediction, teacher_predictions, batch=None):
        target = esd_target(teacher_predictions["concept"], teacher_predictions["anchor"],
                            self.config.effective_eta)
        return F.mse_loss(student_prediction.float(), target)


@OBJECTIVES.register("esd")
class ESDWhole(_ESD):
    """ESD's negative guidance on every student weight (the reference code's upper step)."""


@OBJECTIVES.register("esd-u")
class ESDUnconditional(_ESD):
    def trainable(self, parameter_name: str) -> bool:
        return not is_cross_attention(parameter_name)


@OBJECTIVES.register("esd-x")
class ESDCrossAttention(_ESD):
    def trainable(self, parameter_name: str) -> bool:
        return is_cross_attention(parameter_name)
