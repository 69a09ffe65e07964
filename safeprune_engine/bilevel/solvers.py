"""Solvers: how lower (quality) and upper (concept suppression) updates are scheduled. All share one engine.

- bilevel: the paper's first-order penalty method for  min L_cu(θ) s.t. θ ∈ argmin L_ft: every student step
  follows d L_cu + λ·d L_ft. λ is fixed (penalty form) or, with --quality-tolerance, the multiplier of
  L_ft(θ) <= (1 + tol)·min L_ft found by dual ascent against a value model ϑ (constraint form). See Bilevel.
- interleaved: the earlier scheme: K inner student steps on L_ft alone, then one penalised step on
  λ·L_ft + L_cu with its own optimizer (lr_upper). L_cu reaches only every (K+1)-th step.
- alternating: the public reference code. An AdamW step on L_ft every iteration and, every N-th iteration,
  a second AdamW (its own learning rate) step on L_cu over the same weights.
- two-stage: the baseline. Distill for S steps, then erase for E steps with ESD whose frozen reference is
  the distilled student itself (erasing a concept from the model one has, as ESD does).
- distill-only: L_ft only; shows how much of the teacher's concept leaks through distillation.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch

from ..errors import SafepruneError
from ..memory import optimizer_factory
from ..registry import Registry
from .constraint import DualMultiplier
from .engine import LowerLoss, TrainingEngine, accumulate_gradients

SOLVERS: Registry = Registry("method")
# the constraint form's check: every CHECK_EVERY steps, on PROBE_BATCHES fixed batches of the training batch size
CHECK_EVERY = 10
PROBE_BATCHES = 4

# (params, lr, role) -> optimizer: how every optimizer of a solver is built (memory.optimizer_factory picks it per
# run); role "lower" steps every iteration, "outer" once per period (bilevel's outer, alternating's upper step)
OptimizerFactory = Callable[[list, float, str], torch.optim.Optimizer]


def as_float(value) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


class Solver:
    """One `step(iteration)` per training step; returns fp32 scalars to log.

    Everything a solver needs comes through its constructor: the engine (read, never modified), the config and
    make_optimizer, the factory of its optimizers (default memory.optimizer_factory(config)). `runner` is the
    module that runs the student's forwards, handed to the engine's loss calls (None: the student itself; the ZeRO
    solver's DeepSpeed engine once it exists).
    """

    uses_concepts = True

    def __init__(self, engine: TrainingEngine, config, make_optimizer: OptimizerFactory | None = None):
        self.engine, self.config = engine, config
        self.make_optimizer = make_optimizer or optimizer_factory(config)
        self.runner = None
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        # fp16 autocast needs loss scaling against gradient underflow; a disabled scaler is a pass-through
        self.scaler = torch.amp.GradScaler(engine.device.type, enabled=config.mixed_precision == "fp16")

    def zero_grad(self) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def accumulate(self, loss: torch.Tensor, params, scale: float = 1.0) -> None:
        """Upper-level gradient into `params` only (see accumulate_gradients), loss-scaled like backward."""
        accumulate_gradients(self.scaler.scale(loss), params, scale=scale)

    def optimizer_step(self, name: str) -> None:
        self.scaler.step(self.optimizers[name])

    def finish_step(self) -> None:
        self.scaler.update()

    def teacher_step(self, include_concept: bool = False):
        """Sample the step's rows and run the teacher once over them: (data, concept or None, teacher outputs)."""
        engine = self.engine
        data = engine.sample_data_batch()
        concept = engine.sample_concept_batch() if include_concept else None
        return data, concept, engine.teacher_pass(data, concept, features=self.config.w_feat > 0)

    def lower_step(self, include_concept: bool = False):
        """Sample, run the teacher once (with the concept rows when asked) and compute L_ft."""
        data, concept, teacher = self.teacher_step(include_concept)
        return self.engine.lower_loss(data, teacher, runner=self.runner), concept, teacher

    @staticmethod
    def scalars(lower=None, upper=None, **extra) -> dict[str, float]:
        out = {}
        if lower is not None:
            out["loss/ft"] = as_float(lower.total)
            out.update({f"loss/{k}": as_float(v) for k, v in lower.parts.items()})
        if upper is not None:
            out["loss/cu"] = as_float(upper)
        out.update({k: as_float(v) for k, v in extra.items()})
        return out

    # checkpointing: tensors only, so it loads with torch.load(weights_only=True)
    def state_dict(self) -> dict:
        return {"optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


@SOLVERS.register("distill-only")
class DistillOnly(Solver):
    uses_concepts = False

    def __init__(self, engine, config, make_optimizer=None):
        super().__init__(engine, config, make_optimizer)
        self.optimizers["lower"] = self.make_optimizer(engine.lower_parameters(), config.lr)

    def step(self, iteration: int) -> dict[str, float]:
        self.zero_grad()
        lower, _, _ = self.lower_step()
        self.backward(lower.total)
        self.optimizer_step("lower")
        self.finish_step()
        return self.scalars(lower)


@SOLVERS.register("alternating")
class Alternating(Solver):
    def __init__(self, engine, config, make_optimizer=None):
        super().__init__(engine, config, make_optimizer)
        self.optimizers["lower"] = self.make_optimizer(engine.lower_parameters(), config.lr)
        self.optimizers["upper"] = self.make_optimizer(engine.upper_parameters(), config.effective_lr_upper, "outer")

    def is_upper_step(self, iteration: int) -> bool:
        return iteration % self.config.upper_every == self.config.upper_every - 1

    def step(self, iteration: int) -> dict[str, float]:
        upper_now = self.is_upper_step(iteration)
        self.zero_grad()
        lower, concept, teacher = self.lower_step(include_concept=upper_now)
        self.backward(lower.total)
        self.optimizer_step("lower")
        if not upper_now:
            self.finish_step()
            return self.scalars(lower)
        # the upper step sees the weights the lower step just produced, as in the reference loop
        self.zero_grad()
        teacher.release_data()
        upper = self.engine.upper_loss(concept, teacher, runner=self.runner)
        self.accumulate(upper, self.engine.upper_parameters())
        self.optimizer_step("upper")
        self.finish_step()
        return self.scalars(lower, upper)


@SOLVERS.register("bilevel")
class Bilevel(Solver):
    """The paper's first-order penalty method for  min L_cu(θ) s.t. θ ∈ argmin L_ft.

    The penalty objective is  L_cu(θ) + λ·(L_ft(θ) − L_ft(ϑ)), minimised over θ and maximised over ϑ, with K inner
    steps on ϑ per outer step. Its θ-gradient is  d L_cu + λ·d L_ft: the lower level does not depend on θ here,
    so ϑ (which only estimates the value min L_ft) changes no θ gradient. Every student step therefore follows
    d L_cu + λ·d L_ft with one optimizer (lr), the concept rows riding in every step.

    Penalty form (--quality-tolerance none): λ = --bilevel-lambda, fixed, and no ϑ is kept (it would cost a
    model copy and a forward+backward per step and change nothing).
    Constraint form (--quality-tolerance TOL): minimise L_cu subject to L_ft(θ) <= (1 + TOL)·min L_ft. ϑ is kept
    as the value model: a copy of the student trained on L_ft alone, K inner steps per outer step (the first on
    the outer step's own batch and teacher outputs); λ becomes the constraint's multiplier μ, found by dual ascent
    from --bilevel-lambda on a fixed probe set (bilevel.constraint.DualMultiplier), and the student follows
    (d L_cu + μ·d L_ft) / (1 + μ) (see weights()).
    """

    def __init__(self, engine, config, make_optimizer=None):
        super().__init__(engine, config, make_optimizer)
        self.optimizers["student"] = self.make_optimizer(engine.lower_parameters(), config.lr)
        if config.bilevel_joint_forward and not engine.joint_forward_possible:
            raise SafepruneError(f"--bilevel-joint-forward: --erase-method {config.erase_method} does not train the "
                                 "whole student with an unmasked gradient, so its upper gradient must come from a "
                                 "forward of its own; use --erase-method esd, or leave the option off")
        self.dual: DualMultiplier | None = None
        self.value_model = None
        if config.quality_tolerance is not None:
            self.dual = DualMultiplier(config.quality_tolerance, config.bilevel_lambda, rate=config.quality_dual_rate)
            self.value_model = engine.make_value_model()
            # the value model is replicated on every rank (gradients averaged, as in plain data parallelism), also
            # under ZeRO, whose engine partitions the student only: so its optimizer and loss scaler are not among
            # the solver's optimizers, which the many-rank mixins take over
            self.value_optimizer = self.make_optimizer(self.value_model.parameters(), config.lr)
            self.value_scaler = torch.amp.GradScaler(engine.device.type, enabled=config.mixed_precision == "fp16")
            self.probe = engine.probe_batches(PROBE_BATCHES * config.batch_size, seed=config.seed + 2)
        self.probed: dict[str, float] = {}  # the last check's probe-set losses, logged until the next check

    @property
    def multiplier(self) -> float:
        """λ of this step: fixed (penalty form) or the constraint's current multiplier."""
        return self.dual.multiplier if self.dual is not None else self.config.bilevel_lambda

    def weights(self) -> tuple[float, float]:
        """(weight of L_ft, weight of L_cu) in the student's step. Penalty form: (λ, 1). Constraint form:
        (μ, 1) / (1 + μ), the same direction at a scale that does not follow μ: μ moves by orders of magnitude
        within a few hundred steps, AdamW's second moments lag such a change, and its steps would grow with it (a
        rising μ then made the student's L_ft worse, not better)."""
        if self.dual is None:
            return self.config.bilevel_lambda, 1.0
        mu = self.dual.multiplier
        return mu / (1.0 + mu), 1.0 / (1.0 + mu)

    def value_steps(self, data, teacher) -> float:
        """K inner steps of ϑ on L_ft, the first on the outer step's batch and teacher outputs (no teacher pass of its
        own); returns ϑ's L_ft on that batch, measured before its update."""
        paired = None
        context = getattr(self.engine, "context", None)
        for k in range(self.config.bilevel_inner_steps):
            if k > 0:  # later inner steps draw batches of their own
                data, _, teacher = self.teacher_step()
            self.value_optimizer.zero_grad(set_to_none=True)
            loss = self.engine.lower_loss(data, teacher, model=self.value_model)
            self.value_scaler.scale(loss.total).backward()
            if context is not None and context.world_size > 1:
                context.average_gradients(self.value_model.parameters())
            self.value_scaler.step(self.value_optimizer)
            self.value_scaler.update()
            paired = as_float(loss.total) if paired is None else paired
        return paired

    @torch.no_grad()
    def probe_losses(self) -> tuple[float, float]:
        """L_ft of the student and of the value model on the fixed probe set: the mean over its batches, which all
        hold batch_size rows in all. The engine's loss values are global means on many ranks, so every rank gets
        the same numbers (and keeps the same multiplier) without a collective of its own."""
        engine, totals = self.engine, [0.0, 0.0]
        for batch in self.probe:
            teacher = engine.teacher_pass(batch, None, features=self.config.w_feat > 0)
            totals[0] += as_float(engine.lower_loss(batch, teacher, runner=self.runner).total)
            totals[1] += as_float(engine.lower_loss(batch, teacher, model=self.value_model).total)
        return totals[0] / len(self.probe), totals[1] / len(self.probe)

    def check_constraint(self, iteration: int) -> dict[str, float]:
        """Every CHECK_EVERY steps (and at the first): one dual-ascent step from the probe-set losses."""
        if self.dual is None:
            return {}
        if iteration % CHECK_EVERY == 0:
            student_loss, value_loss = self.probe_losses()
            self.dual.update(student_loss, value_loss)
            self.probed = {"constraint/ft_student": student_loss, "constraint/ft_value": value_loss}
        return {**self.dual.scalars(), **self.probed}

    def step(self, iteration: int) -> dict[str, float]:
        checked = self.check_constraint(iteration)
        self.zero_grad()
        data, concept, teacher = self.teacher_step(include_concept=True)
        value_loss = self.value_steps(data, teacher) if self.value_model is not None else None
        if self.config.bilevel_joint_forward:  # one forward over [data | concept], one backward
            lower, upper = self.engine.joint_losses(data, concept, teacher, runner=self.runner)
            w_lower, w_upper = self.weights()
            self.backward(w_lower * lower.total + w_upper * upper)
        else:
            lower = self.engine.lower_loss(data, teacher, runner=self.runner)
            w_lower, w_upper = self.weights()
            self.backward(lower.total * w_lower)
            teacher.release_data()
            upper = self.engine.upper_loss(concept, teacher, runner=self.runner)
            self.accumulate(upper, self.engine.upper_parameters(), scale=w_upper)
        self.optimizer_step("student")
        self.finish_step()
        extra = {"penalty/lambda": self.multiplier, **checked}
        if value_loss is not None:
            extra["loss/ft_value"] = value_loss
        return self.scalars(lower, upper, **extra)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.dual is not None:
            state.update(self.dual.state_dict())
            probed = [self.probed.get("constraint/ft_student", float("nan")),
                      self.probed.get("constraint/ft_value", float("nan"))]
            state["probed"] = torch.tensor(probed, dtype=torch.float64)  # logged until the next check
            state["value_optimizer"] = self.value_optimizer.state_dict()
            state["value_scaler"] = self.value_scaler.state_dict()
            state["value_model"] = {k: v.detach().cpu() for k, v in self.value_model.module.state_dict().items()}
            if self.value_model.projections is not None:
                state["value_projections"] = {k: v.detach().cpu()
                                              for k, v in self.value_model.projections.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        if "outer" in state["optimizers"] and "student" not in state["optimizers"]:
            raise SafepruneError("this checkpoint was written by the earlier interleaved bilevel scheme (inner steps "
                                 "on L_ft, then a penalised outer step); resume it with --method interleaved")
        if (self.dual is not None) != ("dual" in state):
            raise SafepruneError("this checkpoint was written with" + (" no" if self.dual is not None else " a")
                                 + " --quality-tolerance; resume it with the same setting")
        super().load_state_dict(state)
        if self.dual is not None:
            self.dual.load_state_dict(state)
            student_loss, value_loss = state["probed"].tolist()
            self.probed = {} if student_loss != student_loss else {"constraint/ft_student": student_loss,
                                                                   "constraint/ft_value": value_loss}
            self.value_model.module.load_state_dict(state["value_model"])
            self.value_optimizer.load_state_dict(state["value_optimizer"])
            if state.get("value_scaler"):
                self.value_scaler.load_state_dict(state["value_scaler"])
            if self.value_model.projections is not None:
                self.value_model.projections.load_state_dict(state["value_projections"])


@SOLVERS.register("interleaved")
class Interleaved(Solver):
    """The earlier bilevel scheme, kept under its own name: K inner steps move the student ITSELF on L_ft alone
    (lower optimizer, lr), then one outer step follows λ·d L_ft + d L_cu (its own optimizer, lr_upper: in one shared
    state the second moments are set by the far more frequent inner gradients and the outer step's L_cu direction
    would be normalised away). A tracked estimate of min L_ft (EMA, running minimum) is logged as the value gap.
    Not the paper's penalty method (see Bilevel): L_cu reaches only every (K+1)-th step."""

    def __init__(self, engine, config, make_optimizer=None):
        super().__init__(engine, config, make_optimizer)
        self.optimizers["lower"] = self.make_optimizer(engine.lower_parameters(), config.lr)
        self.optimizers["outer"] = self.make_optimizer(engine.lower_parameters(), config.effective_lr_upper, "outer")
        self.value_estimate: float | None = None  # tracked min L_ft
        self.ema_lower: float | None = None

    def is_outer_step(self, iteration: int) -> bool:
        k = self.config.bilevel_inner_steps
        return iteration % (k + 1) == k

    def track_value(self, lower_value: float) -> None:
        # EMA smooths the minibatch noise; the min keeps it a (running) estimate of the lower optimum
        self.ema_lower = lower_value if self.ema_lower is None else 0.9 * self.ema_lower + 0.1 * lower_value
        self.value_estimate = self.ema_lower if self.value_estimate is None else min(self.value_estimate,
                                                                                      self.ema_lower)

    def step(self, iteration: int) -> dict[str, float]:
        lam = self.config.bilevel_lambda
        outer = self.is_outer_step(iteration)
        self.zero_grad()
        if not outer:
            lower, _, _ = self.lower_step()
            self.backward(lower.total)
            self.optimizer_step("lower")
            self.finish_step()
            self.track_value(as_float(lower.total))
            return self.scalars(lower, value_estimate=self.value_estimate)
        data, concept, teacher = self.teacher_step(include_concept=True)
        lower = self.engine.lower_loss(data, teacher, runner=self.runner)
        self.backward(lower.total * lam)
        teacher.release_data()
        upper = self.engine.upper_loss(concept, teacher, runner=self.runner)
        self.accumulate(upper, self.engine.upper_parameters())
        self.optimizer_step("outer")
        self.finish_step()
        value = self.value_estimate if self.value_estimate is not None else as_float(lower.total)
        gap = as_float(lower.total) - value
        return self.scalars(lower, upper, penalty=as_float(upper) + lam * gap, value_gap=gap,
                            value_estimate=value)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["value"] = torch.tensor([
            float("nan") if self.value_estimate is None else self.value_estimate,
            float("nan") if self.ema_lower is None else self.ema_lower,
        ], dtype=torch.float64)
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        value, ema = state["value"].tolist()
        self.value_estimate = None if value != value else value
        self.ema_lower = None if ema != ema else ema


@SOLVERS.register("two-stage")
class TwoStage(Solver):
    def __init__(self, engine, config, make_optimizer=None):
        super().__init__(engine, config, make_optimizer)
        self.distill_steps = config.steps - config.effective_two_stage_erase_steps
        self.optimizers["lower"] = self.make_optimizer(engine.lower_parameters(), config.lr)
        self.optimizers["upper"] = self.make_optimizer(engine.upper_parameters(), config.effective_lr_upper)
        self.reference = None

    def freeze_reference(self) -> None:
        """Snapshot the distilled student as the frozen model ESD steers away from (kept here and passed to the
        engine's teacher_pass explicitly)."""
        self.reference = copy.deepcopy(self.engine.student).eval().requires_grad_(False)

    def step(self, iteration: int) -> dict[str, float]:
        self.zero_grad()
        if iteration < self.distill_steps:
            lower, _, _ = self.lower_step()
            self.backward(lower.total)
            self.optimizer_step("lower")
            self.finish_step()
            return self.scalars(lower)
        if self.reference is None:
            self.freeze_reference()
        engine = self.engine
        concept = engine.sample_concept_batch()
        reference = engine.teacher_pass(None, concept, features=False, model=self.reference)
        upper = engine.upper_loss(concept, reference, runner=self.runner)
        self.accumulate(upper, engine.upper_parameters())
        self.optimizer_step("upper")
        self.finish_step()
        return self.scalars(upper=upper)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.reference is not None:
            state["reference"] = {k: v.detach().cpu() for k, v in self.reference.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "reference" in state:
            self.freeze_reference()
            self.reference.load_state_dict(state["reference"])


def build_solver(engine: TrainingEngine, config, make_optimizer: OptimizerFactory | None = None) -> Solver:
    return SOLVERS.get(config.method)(engine, config, make_optimizer)
