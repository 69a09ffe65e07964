"""Concept Ablation (Kumari et al., 2023): make the concept prompt produce what the anchor prompt produces.

Training rows are anchor images (``--erase-data``: images of the anchor captioned with the concept prompt; by
default the teacher generates them from each concept's anchor prompt), noised at a random t, and the student
is conditioned on the concept prompt c:

- concept-ablation-model: ||student(z_t, t, c) - sg[T(z_t, t, c_anchor)]||^2 (the teacher's anchor prediction
  rides in the step's one batched teacher forward);
- concept-ablation-noise: ||student(z_t, t, c) - target||^2 with the true noise (or velocity) of z_t.

Both update cross-attention key/value projections only (attn2 to_k / to_v: the paper's default parameter set).
"""
from __future__ import annotations

import torch.nn.functional as F

from ..errors import SafepruneError
from .base import OBJECTIVES, UnlearnObjective, is_cross_attention_key_value


class _ConceptAblation(UnlearnObjective):
    latents = "clean"

    def trainable(self, parameter_name: str) -> bool:
        return is_cross_attention_key_value(parameter_name)


@OBJECTIVES.register("concept-ablation-model")
class ConceptAblationModel(_ConceptAblation):
    teacher_conditions = ("anchor",)

    def loss(self, student_prediction, teacher_predictions, batch=None):
        return F.mse_loss(student_prediction.float(), teacher_predictions["anchor"].float())


@OBJECTIVES.register("concept-ablation-noise")
class ConceptAblationNoise(_ConceptAblation):
    teacher_conditions = ()

    def loss(self, student_prediction, teacher_predictions, batch=None):
        if batch is None or batch.target is None:
            raise SafepruneError("concept-ablation-noise needs concept rows made from clean latents (a known target)")
        return F.mse_loss(student_prediction.float(), batch.target.float())
