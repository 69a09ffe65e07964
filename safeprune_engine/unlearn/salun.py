"""SalUn (Fan et al., 2024): restrict any gradient objective to its most salient weights.

The saliency of a weight is |d L_forget / d w|, accumulated over ``--salun-batches`` concept batches at the
start of training, with L_forget the base objective (``--salun-base``, default concept-ablation-model, the
diffusion form of SalUn's forgetting loss). The top ``--salun-topk`` fraction of the base objective's trainable
weights (one global threshold) form the mask; the upper-level gradient reaches only those elements (the
student runs with w_masked = where(mask, w, sg(w)), same values, gradient only through the mask). The mask is
kept in checkpoints, so a resumed run uses the same one.
"""
from __future__ import annotations

import torch

from ..errors import SafepruneError
from .base import OBJECTIVES, UnlearnObjective


def saliency_masks(engine, objective: UnlearnObjective, fraction: float, batches: int, seed: int) -> dict:
    """name -> bool mask of the top ``fraction`` of |grad| over ``objective``'s trainable student weights."""
    params = {name: p for name, p in engine.student.named_parameters() if p.requires_grad and objective.trainable(name)}
    if not params:
        raise SafepruneError(f"salun: the base objective {objective.registry_name} trains no student parameter")
    saliency = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    generator = torch.Generator(device=engine.device).manual_seed(seed)
    for _ in range(batches):
        batch = engine.concepts.sample(engine.config.effective_concept_batch_size, generator)
        teacher = engine.teacher_pass(None, batch, features=False)
        with engine.autocast():
            prediction = engine.student_forward(batch.latents, batch.timesteps, batch.conditions["concept"])
        loss = objective.loss(prediction, teacher.concept_predictions, batch)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for name, grad in zip(params, grads):
            if grad is not None:
                saliency[name] += grad.detach().abs().float()
    flat = torch.cat([s.flatten() for s in saliency.values()])
    keep = max(1, min(flat.numel(), round(fraction * flat.numel())))
    threshold = flat.kthvalue(flat.numel() - keep + 1).values
    masks = {name: (s >= threshold) & (s > 0) for name, s in saliency.items()}
    return {name: m for name, m in masks.items() if m.any()}


@OBJECTIVES.register("salun")
class SaliencyUnlearning(UnlearnObjective):
    def __init__(self, config):
        super().__init__(config)
        if config.salun_base == "salun":
            raise SafepruneError("--salun-base must name another objective, not salun itself")
        self.base = OBJECTIVES.get(config.salun_base)(config)
        if self.base.latents is None:
            raise SafepruneError(f"salun masks gradients of objectives on the student's predictions; "
                                 f"{config.salun_base} edits weights directly (choose e.g. esd-u)")
        if not 0.0 < config.salun_topk <= 1.0:
            raise SafepruneError(f"--salun-topk must be a fraction in (0, 1], got {config.salun_topk}")
        self.teacher_conditions = self.base.teacher_conditions
        self.latents = self.base.latents
        self.masks: dict[str, torch.Tensor] = {}
        self.device = torch.device("cpu")

    def trainable(self, parameter_name: str) -> bool:
        return parameter_name in self.masks

    def gradient_masks(self) -> dict[str, torch.Tensor]:
        return self.masks

    def loss(self, student_prediction, teacher_predictions, batch=None):
        return self.base.loss(student_prediction, teacher_predictions, batch)

    def bind(self, engine) -> None:
        self.base.bind(engine)
        self.device = engine.device
        if not self.masks:
            self.masks = saliency_masks(engine, self.base, self.config.salun_topk, self.config.salun_batches,
                                        self.config.seed)

    def on_train_start(self, engine, start_step: int) -> None:
        self.base.on_train_start(engine, start_step)

    def on_step_end(self, engine, steps_done: int) -> None:
        self.base.on_step_end(engine, steps_done)

    def on_train_end(self, engine) -> None:
        self.base.on_train_end(engine)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"mask.{name}": m.cpu() for name, m in self.masks.items()}
        state.update({f"base.{k}": v for k, v in self.base.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.masks = {k[len("mask."):]: v.to(self.device).bool() for k, v in state.items() if k.startswith("mask.")}
        self.base.load_state_dict({k[len("base."):]: v for k, v in state.items() if k.startswith("base.")})
