"""The upper-level (concept suppression) objective interface.

An objective says which teacher predictions it needs on the concept latents (``teacher_conditions``: names of
condition embeddings in a ConceptBatch), computes its loss from the student's prediction under the concept
condition and those teacher predictions, and names the parameters it may change (``trainable``). The shared
teacher step evaluates every requested condition in the same batched teacher forward as the data rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import Registry

OBJECTIVES: Registry = Registry("erase method")


@dataclass
class ConceptBatch:
    """Noisy latents of the concept plus every condition embedding an objective may ask for.

    latents: (Bc, C, h, w) z_t; timesteps: (Bc,) long; conditions: name -> (Bc, L, D) text embeddings, with at
    least "concept" (what the student is fed) and "anchor" (what the concept is steered towards).
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    conditions: dict[str, torch.Tensor]


class UnlearnObjective:
    """Base class; subclasses register with @OBJECTIVES.register("name")."""

    teacher_conditions: tuple[str, ...] = ()

    def __init__(self, config):
        self.config = config

    def trainable(self, parameter_name: str) -> bool:
        """Whether the upper level may update this student parameter."""
        return True

    def loss(self, student_prediction: torch.Tensor, teacher_predictions: dict[str, torch.Tensor]) -> torch.Tensor:
        """student_prediction: (Bc, C, h, w) under the "concept" condition; returns a scalar fp32 loss."""
        raise NotImplementedError


def build_objective(config) -> UnlearnObjective:
    from . import esd  # noqa: F401  (registers the built-in objectives)

    return OBJECTIVES.get(config.erase_method)(config)
