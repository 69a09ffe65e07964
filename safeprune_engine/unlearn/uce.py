"""UCE, Unified Concept Editing (Gandikota et al., 2024): a closed-form edit of every cross-attention key and
value projection (attn2 to_k / to_v), so that erase prompts map to what their guide (anchor) prompts map to,
while preserve prompts (``--preserve``) and the weights themselves stay put:

    W* = argmin_W'  lam ||W' - W||^2 + sum_e ||W' c_e - W c_guide,e||^2 + sum_p ||W' c_p - W c_p||^2
       = (lam W + sum_e W c_guide,e c_e^T + sum_p W c_p c_p^T) (lam I + sum_e c_e c_e^T + sum_p c_p c_p^T)^-1

The c vectors are the token embeddings (all L positions) of each erase / guide / preserve prompt. The edit runs
at ``--uce-when``: ``before`` training, ``after`` it (distill, then UCE) or ``every:N`` steps. Between edits
the same quadratic, with W fixed at its value at the last edit (or at the start), is the upper-level loss
that the gradient solvers descend, so UCE works with every solver.
"""
from __future__ import annotations

import torch

from ..errors import SafepruneError
from ..models.conditioning import ConditionLayout
from .base import OBJECTIVES, ConceptBatch, UnlearnObjective

_KEY_VALUE = (".attn2.to_k.weight", ".attn2.to_v.weight")


def parse_uce_when(value: str) -> tuple[str, int]:
    """"before" | "after" | "every:N" -> (kind, N); N is 0 unless kind is "every"."""
    if value in ("before", "after"):
        return value, 0
    if isinstance(value, str) and value.startswith("every:"):
        count = value.split(":", 1)[1]
        if count.isdigit() and int(count) >= 1:
            return "every", int(count)
    raise SafepruneError(f"--uce-when must be before, after or every:N (N >= 1 steps), got {value!r}")


def uce_closed_form(weight: torch.Tensor, erase: torch.Tensor, guide: torch.Tensor, preserve: torch.Tensor,
                    lam: float) -> torch.Tensor:
    """The edited matrix. weight: (O, D); erase, guide: (Ne, D) paired rows c_e, c_guide,e; preserve: (Np, D);
    lam > 0. Solved in float64, returned in weight's dtype."""
    w = weight.detach().double()
    ce, cg, cp = erase.double(), guide.double(), preserve.double()
    eye = torch.eye(w.shape[1], dtype=torch.float64, device=w.device)
    lhs = lam * eye + ce.T @ ce + cp.T @ cp  # (D, D), symmetric positive definite
    rhs = lam * w + (w @ cg.T) @ ce + (w @ cp.T) @ cp  # (O, D)
    return torch.linalg.solve(lhs, rhs.T).T.to(weight.dtype)


def uce_objective(weight: torch.Tensor, reference: torch.Tensor, erase: torch.Tensor, guide: torch.Tensor,
                  preserve: torch.Tensor, lam: float) -> torch.Tensor:
    """The quadratic the closed form minimises (with W = reference), as a mean per output row and prompt token:
    (lam ||W - R||^2 + ||C_e W^T - C_g R^T||^2 + ||C_p W^T - C_p R^T||^2) / (O * (Ne + Np)), fp32 scalar."""
    w, r = weight.float(), reference.float()
    total = lam * (w - r).pow(2).sum() + (erase @ w.T - guide @ r.T).pow(2).sum()
    if preserve.shape[0]:
        total = total + (preserve @ (w - r).T).pow(2).sum()
    return total / (w.shape[0] * max(1, erase.shape[0] + preserve.shape[0]))


def _tokens(embeddings: torch.Tensor) -> torch.Tensor:
    """(K, L, D) prompt embeddings -> (K * L, D) fp32 token vectors."""
    return embeddings.detach().float().reshape(-1, embeddings.shape[-1])


@OBJECTIVES.register("uce")
class UnifiedConceptEditing(UnlearnObjective):
    latents = None
    teacher_conditions = ()

    def __init__(self, config):
        super().__init__(config)
        self.when, self.every = parse_uce_when(config.uce_when)
        self.lam = float(config.uce_lambda)
        if self.lam <= 0:
            raise SafepruneError(f"--uce-lambda must be positive, got {self.lam}")
        self.reference: dict[str, torch.Tensor] = {}
        self.student = None

    def trainable(self, parameter_name: str) -> bool:
        return parameter_name.endswith(_KEY_VALUE)

    def layers(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.student.named_parameters() if self.trainable(name)}

    def bind(self, engine) -> None:
        prompts = engine.prompts
        if prompts is None:
            raise SafepruneError("uce needs the encoded erase / guide / preserve prompts (engine.prompts)")
        self.student = engine.student
        if not self.layers():
            raise SafepruneError("uce edits cross-attention to_k / to_v weights, and this student has none")
        device = next(self.student.parameters()).device
        # the key/value projections read the token rows only: an SDXL condition's packed pooled embedding and time
        # ids (models.conditioning) feed the added embedding, not cross-attention; its token rows are both text
        # encoders' states side by side, which is exactly the context to_k / to_v see
        tokens = ConditionLayout.of(self.student).hidden
        length = tokens(prompts.concept_emb).shape[1]
        self.erase = _tokens(tokens(prompts.concept_emb)).to(device)
        self.guide = _tokens(tokens(prompts.anchor_emb)).to(device)
        self.preserve = _tokens(tokens(prompts.preserve_emb)).to(device)
        self.erase_concept = prompts.prompt_concept.to(device).repeat_interleave(length)  # concept of each token
        if not self.reference:
            self.snapshot()

    def snapshot(self) -> None:
        self.reference = {name: p.detach().clone() for name, p in self.layers().items()}

    @torch.no_grad()
    def edit(self) -> None:
        """Apply the closed form to every attn2 to_k / to_v; the pre-edit weights become the new reference."""
        self.snapshot()
        for name, param in self.layers().items():
            param.copy_(uce_closed_form(param, self.erase, self.guide, self.preserve, self.lam))

    def loss(self, student_prediction=None, teacher_predictions=None, batch: ConceptBatch | None = None,
             concept: int | None = None) -> torch.Tensor:
        erase, guide, preserve = self.erase, self.guide, self.preserve
        if concept is not None:
            rows = self.erase_concept == concept
            erase, guide, preserve = erase[rows], guide[rows], preserve[:0]
        layers = self.layers()
        total = sum(uce_objective(p, self.reference[name], erase, guide, preserve, self.lam)
                    for name, p in layers.items())
        return total / len(layers)

    @torch.no_grad()
    def evaluate(self, engine, concept: int | None = None, batches: int = 2, seed: int = 0, reference=None) -> float:
        return float(self.loss(concept=concept))

    def on_train_start(self, engine, start_step: int) -> None:
        if self.when == "before" and start_step == 0:
            self.edit()

    def on_step_end(self, engine, steps_done: int) -> None:
        if self.when == "every" and steps_done % self.every == 0:
            self.edit()

    def on_train_end(self, engine) -> None:
        if self.when == "after":
            self.edit()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"reference.{name}": t.detach().cpu() for name, t in self.reference.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        device = next(self.student.parameters()).device
        self.reference = {k[len("reference."):]: v.to(device) for k, v in state.items() if k.startswith("reference.")}
