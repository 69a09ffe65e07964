"""The upper-level (concept suppression) objective interface. Every ``--erase-method`` is one file in this
package, registered with ``@OBJECTIVES.register("name")``.

An objective says
- which latents it trains on (``latents``): "noisy" (concept images, or the teacher's own sampling trajectories
  for the concept prompt: ESD), "clean" (anchor images, noised each step with a known target: Concept
  Ablation), or None (it edits weights from text embeddings alone: UCE);
- which teacher predictions it needs on those latents (``teacher_conditions``: names of condition embeddings
  in a ConceptBatch). The shared teacher step evaluates every requested condition in the same batched teacher
  forward as the data rows, so a training step keeps exactly one teacher forward;
- its loss, from the student's prediction under the "concept" condition and those teacher predictions;
- which student parameters it may change (``trainable``), optionally element-wise (``gradient_masks``);
- optional lifecycle hooks (``bind``, ``on_train_start``, ``on_step_end``, ``on_train_end``) for objectives
  that need set-up or act between steps, and ``state_dict`` for what a checkpoint must keep.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from ..registry import Registry

OBJECTIVES: Registry = Registry("erase method", discover="safeprune_engine.unlearn",
                                entry_point_group="safeprune_engine.objectives")

LATENT_KINDS = ("noisy", "clean", None)


@dataclass
class ConceptBatch:
    """Noisy latents of the concept plus every condition embedding an objective may ask for.

    latents: (Bc, C, h, w) z_t; timesteps: (Bc,) long; conditions: name -> (Bc, L, D) text embeddings, with at
    least "concept" (what the student is fed) and "anchor" (what the concept is steered towards), and
    "preserve" when --preserve prompts are given. target: (Bc, C, h, w) the diffusion target of z_t (noise or
    velocity), known only when z_t was made from a clean latent. concept: (Bc,) index of the --erase concept
    each row belongs to. teacher_predictions: condition -> (Bc, C, h, w), the teacher's predictions on these rows
    when they come from a pool whose targets were computed once (CachedTargetSource); None: the step's teacher
    forward computes them.
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    conditions: dict[str, torch.Tensor]
    target: torch.Tensor | None = None
    concept: torch.Tensor | None = None
    teacher_predictions: dict[str, torch.Tensor] | None = None


@dataclass
class ConceptPrompts:
    """Text side of the upper level, encoded once. prompts: the K erase prompts (``--erase-prompts`` or
    ``--erase``); concept_emb / anchor_emb: (K, L, D); prompt_concept: (K,) index into ``concepts`` (the
    ``--erase`` values) of each prompt; preserve_emb: (P, L, D) embeddings of the ``--preserve`` prompts."""

    concepts: list[str]
    prompts: list[str]
    anchors: list[str]
    concept_emb: torch.Tensor
    anchor_emb: torch.Tensor
    prompt_concept: torch.Tensor
    preserve: list[str]
    preserve_emb: torch.Tensor

    def to(self, device, dtype: torch.dtype | None = None) -> "ConceptPrompts":
        return ConceptPrompts(self.concepts, self.prompts, self.anchors, self.concept_emb.to(device, dtype),
                              self.anchor_emb.to(device, dtype), self.prompt_concept.to(device), self.preserve,
                              self.preserve_emb.to(device, dtype))


class UnlearnObjective(abc.ABC):
    """Base class; subclasses register with @OBJECTIVES.register("name") and implement ``loss``."""

    teacher_conditions: tuple[str, ...] = ()
    latents: str | None = "noisy"

    def __init__(self, config):
        self.config = config

    def trainable(self, parameter_name: str) -> bool:
        """Whether the upper level may update this student parameter."""
        return True

    @abc.abstractmethod
    def loss(self, student_prediction: torch.Tensor | None, teacher_predictions: dict[str, torch.Tensor],
             batch: ConceptBatch | None = None) -> torch.Tensor:
        """student_prediction: (Bc, C, h, w) under the "concept" condition (None when ``latents`` is None);
        teacher_predictions: condition -> (Bc, C, h, w); returns a scalar fp32 loss."""

    def gradient_masks(self) -> dict[str, torch.Tensor] | None:
        """Optional parameter name -> bool mask of the elements the upper gradient may reach (SalUn)."""
        return None

    # ---- lifecycle (no-ops unless an objective needs them) -------------------------------------------
    def bind(self, engine) -> None:
        """Called once when the TrainingEngine is built (student, teacher, concept source and prompts ready)."""

    def on_train_start(self, engine, start_step: int) -> None:
        """Called by the run before the first step it runs (start_step > 0 when resuming)."""

    def on_step_end(self, engine, steps_done: int) -> None:
        """Called by the run after each step; steps_done counts from 1."""

    def on_train_end(self, engine) -> None:
        """Called by the run after the last step, before the final checkpoint and export."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint must keep to resume bit-for-bit (loaded with weights_only=True)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore ``state_dict()``'s tensors."""

    # ---- measurement ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, engine, concept: int | None = None, batches: int = 2, seed: int = 0, reference=None) -> float:
        """Mean loss on ``batches`` concept batches drawn with their own seed (only rows of --erase concept
        ``concept`` when given): the objective's own value, comparable across training steps. reference: the
        frozen model the targets come from (default the teacher; two-stage's solver holds its own)."""
        generator = torch.Generator(device=engine.device).manual_seed(seed)
        total = 0.0
        for _ in range(batches):
            batch = engine.concepts.sample(engine.config.effective_concept_batch_size, generator, concept=concept)
            teacher = engine.teacher_pass(None, batch, features=False, model=reference)
            with engine.autocast():
                prediction = engine.student_forward(batch.latents, batch.timesteps, batch.conditions["concept"])
            total += float(self.loss(prediction, teacher.concept_predictions, batch))
        return total / batches


def build_objective(config) -> UnlearnObjective:
    return OBJECTIVES.get(config.erase_method)(config)


def is_cross_attention(parameter_name: str) -> bool:
    return ".attn2." in parameter_name


def is_cross_attention_key_value(parameter_name: str) -> bool:
    """attn2's to_k / to_v: the projections of the text condition (what Concept Ablation and UCE edit)."""
    return ".attn2.to_k." in parameter_name or ".attn2.to_v." in parameter_name
