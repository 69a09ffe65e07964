"""Every solver, unchanged, on many ranks: a mixin replaces only the Solver primitives that touch gradients and
optimizers (zero_grad, backward, accumulate, optimizer_step, finish_step, state_dict / load_state_dict).

How the solvers' several optimizers map onto DeepSpeed (ZeroSolverMixin, --zero-stage 1/2/3):
one DeepSpeed engine wraps the student (with the feature projections, when it has any), and its single client
optimizer is a SlotOptimizer holding *all* of the solver's optimizers as slots ("lower", "outer", "upper"). Each
backward goes through the engine (gradients are reduced and partitioned by ZeRO; accumulation is unmanaged, so the
bilevel outer step can add lambda * L_ft and L_cu before its one step); optimizer_step(name) makes slot `name`
active and calls engine.step(), which updates exactly the partitions of the parameters that optimizer covers,
with that optimizer's own learning rate and moments. So the partitioned optimizer states, the gradient
partitioning and the weight partitioning are DeepSpeed's, while the update rule and state of every optimizer stay
the solver's (torch AdamW or bitsandbytes AdamW8bit, from the factory the run passes in).

Alternatives that were rejected: a DeepSpeed engine per optimizer cannot work, since two engines would partition
the same module twice; giving DeepSpeed only the lower optimizer and all-reducing gradients for the others leaves
the other optimizers' states and the weights they update unpartitioned, which ZeRO-3 does not allow at all.

The upper level's restricted gradient (ESD-x trains only attn2, ESD-u everything else) is made by building the
upper forward's graph only to the upper parameters (the others do not require grad during that forward), so the
engine's backward reaches exactly the parameters accumulate_gradients reaches in a single process.

DataParallelSolverMixin (--zero-stage 0): the solver's own optimizers and GradScaler, with gradients averaged
over ranks right before each optimizer step (plain DDP semantics; checkpoints are the single-process format).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SafepruneError
from ..memory import cast_module
from . import zero_state
from .runtime import row_major
from .slot_optimizer import SlotOptimizer
from .zero_config import student_config


class StudentWithProjections(nn.Module):
    """The student UNet and its feature projections as one module, so ZeRO partitions and updates both."""

    def __init__(self, unet: nn.Module, projections: nn.Module):
        super().__init__()
        self.unet, self.projections = unet, projections

    def forward(self, *args, **kwargs):
        return self.unet(*args, **kwargs)


def parameter_names(engine) -> dict[int, str]:
    """id(param) -> stable name: the student's own names, feature projections under "projections."."""
    names = {id(p): name for name, p in engine.student.named_parameters()}
    if engine.projections is not None:
        names.update({id(p): f"projections.{name}" for name, p in engine.projections.named_parameters()})
    return names


def has_parameters(module: nn.Module | None) -> bool:
    return module is not None and any(True for _ in module.parameters())


class DataParallelSolverMixin:
    """Plain data parallelism: average gradients over ranks before each of the solver's own optimizer steps."""

    def optimizer_step(self, name: str) -> None:
        self.engine.context.average_gradients(self.optimizers[name].param_groups[0]["params"])
        super().optimizer_step(name)

    def load_state_dict(self, state: dict) -> None:
        zero = state.get("zero")
        if zero is not None:
            if zero.get("kind") != "named":
                raise SafepruneError("this checkpoint keeps 8-bit Adam states per ZeRO rank; resume it with its "
                                     f"original --zero-stage {zero.get('stage')} and --nproc {zero.get('world_size')}")
            state = {**state, "optimizers": zero_state.optimizer_states_from_named(
                zero, self.optimizers, parameter_names(self.engine))}
        super().load_state_dict(state)


class ZeroSolverMixin:
    """DeepSpeed ZeRO for the student; see the module docstring. The engine is built on first use (first step or
    checkpoint load), so weights restored before that are the ones ZeRO partitions."""

    def __init__(self, engine, config, make_optimizer=None):
        super().__init__(engine, config, make_optimizer)
        if not engine.restrict_upper_forward:
            raise SafepruneError("the ZeRO solver needs an engine built with restrict_upper_forward (the upper "
                                 "gradient must reach only the upper parameters)")
        self.scaler = torch.amp.GradScaler(engine.device.type, enabled=False)  # DeepSpeed scales fp16 itself
        self.ds_engine = None
        self.slots: SlotOptimizer | None = None

    # ---- the DeepSpeed engine ------------------------------------------------------------------------------
    def ensure_engine(self):
        if self.ds_engine is not None:
            return self.ds_engine
        import deepspeed

        engine, config, context = self.engine, self.config, self.engine.context
        module = engine.student
        if has_parameters(engine.projections):
            module = StudentWithProjections(engine.student, engine.projections)
        # ZeRO flattens weights into row-major buffers: channels-last weights go back to the default layout (with
        # --channels-last the engine feeds channels-last activations instead, which convolutions follow)
        for param in module.parameters():
            param.data = row_major(param.data)
        # DeepSpeed's bf16/fp16 modes cast the module before copying fp32 masters; keep the exact fp32 values
        masters = None
        if config.mixed_precision != "no":
            masters = {id(p): p.detach().float().cpu().clone() for p in module.parameters()}
        self.slots = SlotOptimizer(self.optimizers)
        ds_engine, _, _, _ = deepspeed.initialize(model=module, optimizer=self.slots,
                                                  config=student_config(config, context.world_size))
        self.ds_engine = ds_engine
        self.runner = ds_engine  # handed to the engine's loss calls: the student's forwards go through DeepSpeed
        self.access = zero_state.ZeroAccess(ds_engine, self.slots)
        if masters is not None:
            for param in module.parameters():
                self.access.set_master(param, masters[id(param)])
        return ds_engine

    def step(self, iteration: int) -> dict[str, float]:
        self.ensure_engine()
        return super().step(iteration)

    # ---- the primitives the solvers call --------------------------------------------------------------------
    def zero_grad(self) -> None:
        self.engine.release_upper_freeze()
        if self.ds_engine is not None:
            self.ds_engine.zero_grad()

    def backward(self, loss: torch.Tensor) -> None:
        self.ds_engine.backward(loss)

    def accumulate(self, loss: torch.Tensor, params, scale: float = 1.0) -> None:
        expected = {id(p) for p in self.engine.upper_parameters()}  # the set upper_loss built its graph for
        if {id(p) for p in params} != expected:
            raise SafepruneError("under ZeRO the upper gradient can only go to engine.upper_parameters() (the "
                                 "upper forward is built for exactly that set); this solver asked for another set")
        loss = loss * scale if scale != 1.0 else loss
        if loss.requires_grad:
            loss.register_hook(self._release_freeze_when_backward_ends)
        try:
            self.ds_engine.backward(loss)
        finally:
            self.engine.release_upper_freeze()

    def _release_freeze_when_backward_ends(self, grad):
        """The frozen parameters must stay frozen while backward recomputes checkpointed activations (the graph
        must match the forward's), and must require grad again before ZeRO-3 collects the step's gradients at the
        end of backward (it drops those of parameters that do not). An autograd end-of-backward callback queued
        now, from the loss, runs before DeepSpeed's, which are queued later in this backward."""
        torch.autograd.Variable._execution_engine.queue_callback(self.engine.release_upper_freeze)
        return grad

    def optimizer_step(self, name: str) -> None:
        if name not in self.slots.workers:
            raise SafepruneError(f"solver has no optimizer {name!r}")
        self.slots.active = name
        try:
            self.ds_engine.step()
        finally:
            self.slots.active = None

    def finish_step(self) -> None:
        """DeepSpeed updates its fp16 loss scale inside step()."""

    # ---- two-stage's frozen copy of the student -----------------------------------------------------------------
    def freeze_reference(self) -> None:
        """A whole, frozen copy of the current student (gathered from the partitions; fp32 masters, in the
        student's compute dtype), replicated on every rank."""
        self.ensure_engine()
        copy = gathered_student(self, keep_on_all_ranks=True)
        dtype = next(self.engine.student.parameters()).dtype
        self.reference = cast_module(copy, dtype).to(self.engine.device).eval().requires_grad_(False)

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        self.ensure_engine()
        optimizers, self.optimizers = self.optimizers, {}
        try:
            state = super().state_dict()
        finally:
            self.optimizers = optimizers
        context = self.engine.context
        if any(zero_state.is_bitsandbytes(w) for w in self.slots.workers.values()):
            state["zero"] = zero_state.gather_per_rank_states(self.access, context)
        else:
            state["zero"] = zero_state.gather_named_states(self.access, parameter_names(self.engine),
                                                           context.is_main)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.ensure_engine()
        optimizers, self.optimizers = self.optimizers, {}
        try:
            super().load_state_dict({**state, "optimizers": {}})
        finally:
            self.optimizers = optimizers
        names = parameter_names(self.engine)
        zero = state.get("zero")
        if zero is None:  # a single-process or data-parallel checkpoint
            if any(zero_state.is_bitsandbytes(w) for w in self.slots.workers.values()):
                raise SafepruneError("8-bit Adam states of a run without ZeRO cannot be split into ZeRO partitions; "
                                     "resume it with --zero-stage 0")
            zero = zero_state.named_from_optimizer_states(state["optimizers"], self.slots.slot_params, names)
        if zero["kind"] == "named":
            zero_state.restore_named_states(self.access, names, zero)
        else:
            zero_state.restore_per_rank_states(self.access, self.engine.context, zero)


def gathered_student(solver, keep_on_all_ranks: bool = False, include_projections: bool = False):
    """A plain CPU copy of the ZeRO-trained student with whole fp32 master weights (None on ranks other than 0
    unless keep_on_all_ranks). Collective: every rank must call it. With include_projections, returns
    (student, projections_state_dict)."""
    engine = solver.engine
    access = solver.access
    context = engine.context
    keep = keep_on_all_ranks or context.is_main
    student_state, projection_state = {}, {}
    for name, param in engine.student.named_parameters():
        value = access.full_master(param)
        if keep:
            student_state[name] = value.detach().cpu().clone()
    if engine.projections is not None:
        for name, param in engine.projections.named_parameters():
            value = access.full_master(param)
            if keep:
                projection_state[name] = value.detach().cpu().clone()
    if not keep:
        return (None, None) if include_projections else None
    for name, buffer in engine.student.named_buffers():
        student_state[name] = buffer.detach().float().cpu().clone()
    student = engine.student
    with torch.device("meta"):
        copy = type(student).from_config(student.config)
    copy.load_state_dict(student_state, strict=True, assign=True)
    copy.train(student.training)
    return (copy, projection_state) if include_projections else copy


def build_solver(engine, config, make_optimizer=None):
    """The configured solver class with the data-parallel or ZeRO mixin in front (same name, same behaviour).
    make_optimizer: the solvers' optimizer factory (memory.optimizer_factory)."""
    from ..bilevel.solvers import SOLVERS

    base = SOLVERS.get(config.method)
    mixin = ZeroSolverMixin if config.zero_stage >= 1 else DataParallelSolverMixin
    prefix = "Zero" if config.zero_stage >= 1 else "DataParallel"
    cls = type(f"{prefix}{base.__name__}", (mixin, base), {"__doc__": base.__doc__})
    return cls(engine, config, make_optimizer)
