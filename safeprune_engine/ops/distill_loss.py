"""Fused multi-tensor distillation loss: ``sum_i w_i * mean((student_i - teacher_i)^2)`` in one launch.

The pairs are the feature-KD maps plus the output, of different shapes. Teachers may be in a lower precision
(bfloat16/float16) than the students (float32); the loss arithmetic is float32 (float64 when a pair holds a
float64 tensor). Gradients flow to the students only (the teacher is frozen).

Backends (see ``dispatch``): ``cuda`` (csrc/distill_loss.cu), ``triton`` (kernels/distill_loss.py), ``cpp``
(csrc/distill_loss_cpu.cpp), ``reference`` (torch, below: the definition).

Custom ops (namespace "safeprune"):

* ``distill_loss(Tensor[] students, Tensor[] teachers, float[] weights, str? backend) -> Tensor`` (0-d)
* ``distill_loss_backward(Tensor grad, Tensor[] students, Tensor[] teachers, float[] weights, str? backend)
  -> Tensor[]`` (one gradient per student, in its dtype and layout)

:func:`distill_loss` calls these ops under torch.compile; in eager mode it calls the chosen backend's launchers
through a plain autograd.Function (same kernels, without the custom-op call overhead; see _EagerDistillLoss).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from safeprune_engine.errors import SafepruneError
from safeprune_engine.ops import dispatch, native

OP = "distill_loss"
KERNEL_MODULE = "safeprune_engine.kernels.distill_loss"
NATIVE_OPS = ("distill_loss_forward", "distill_loss_backward")
LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)


def _loss_dtype(students) -> torch.dtype:
    return torch.float64 if any(s.dtype == torch.float64 for s in students) else torch.float32


def _acc_dtype(s: torch.Tensor, t: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (s.dtype, t.dtype) else torch.float32


# ---- the reference (the definition) ------------------------------------------------------------------------
def reference_forward(students, teachers, weights):
    """sum_i weights[i] * mean((students[i] - teachers[i])^2), float32 (float64 with a float64 pair)."""
    total = torch.zeros((), dtype=_loss_dtype(students), device=students[0].device if students else "cpu")
    for s, t, w in zip(students, teachers, weights):
        acc = _acc_dtype(s, t)
        if s.numel():
            total = total + w * torch.mean((s.to(acc) - t.to(acc)) ** 2).to(total.dtype)
    return total


def reference_backward(grad, students, teachers, weights):
    """grad * 2 weights[i] / numel_i * (students[i] - teachers[i]) per student, in the student's dtype."""
    grads = []
    for s, t, w in zip(students, teachers, weights):
        acc = _acc_dtype(s, t)
        scale = grad.to(acc) * (2.0 * w / max(s.numel(), 1))
        grads.append((scale * (s.to(acc) - t.to(acc))).to(s.dtype))
    return grads


# ---- backends ----------------------------------------------------------------------------------------------
class DistillLossBackend(dispatch.Backend):
    """A backend with a forward and a backward function; calling it runs the forward."""

    def __init__(self, name, forward, backward, reasons):
        super().__init__(name, forward, reasons)
        self.forward = forward
        self.backward = backward


def _cpp_reasons(*args, **kwargs):
    tensors = dispatch.tensors_in(args)
    return native.native_reasons(NATIVE_OPS, "CPU") + dispatch.device_reasons(tensors, ("cpu",))


def _cuda_reasons(*args, **kwargs):
    tensors = dispatch.tensors_in(args)
    return (native.native_reasons(NATIVE_OPS, "CUDA") + dispatch.device_reasons(tensors, ("cuda",))
            + dispatch.dtype_reasons(tensors, LOW_PRECISION))


def _triton_reasons(*args, **kwargs):
    tensors = dispatch.tensors_in(args)
    reasons = dispatch.triton_reasons(tensors, KERNEL_MODULE) + dispatch.dtype_reasons(tensors, LOW_PRECISION)
    if len({t.device for t in tensors}) > 1:
        reasons += dispatch.device_reasons(tensors, ("cuda", "cpu"))
    return reasons


def _triton_forward(students, teachers, weights):
    from safeprune_engine.kernels import distill_loss as kernels

    return kernels.forward(students, teachers, weights)


def _triton_backward(grad, students, teachers, weights):
    from safeprune_engine.kernels import distill_loss as kernels

    return kernels.backward(grad, students, teachers, weights)


def _native_forward(students, teachers, weights):
    return native.op("distill_loss_forward")(students, teachers, weights)


def _native_backward(grad, students, teachers, weights):
    return native.op("distill_loss_backward")(grad, students, teachers, weights)


for _backend in (
    DistillLossBackend("reference", reference_forward, reference_backward, None),
    DistillLossBackend("cpp", _native_forward, _native_backward, _cpp_reasons),
    DistillLossBackend("triton", _triton_forward, _triton_backward, _triton_reasons),
    DistillLossBackend("cuda", _native_forward, _native_backward, _cuda_reasons),
):
    dispatch.register(OP, _backend)


def _benchmark(backend, args, kwargs, grad):
    """Auto mode's timing: forward (and the students' gradients) on the dispatch call's pairs."""
    students, teachers, weights = args[0], args[1], list(args[2])
    if not grad:
        return lambda: backend.forward(students, teachers, weights)
    seed = torch.ones((), dtype=_loss_dtype(students), device=students[0].device)

    def forward_backward():
        backend.forward(students, teachers, weights)
        return backend.backward(seed, students, teachers, weights)

    return forward_backward


# the pair weights do not change the cost: they stay out of the key
dispatch.register_benchmark(OP, _benchmark, key=lambda args, kwargs: args[:2])


def same_layout(students, teachers):
    """Each pair with equal dense strides, so kernels can walk both in memory order (copies only if needed)."""
    out_s, out_t = [], []
    for s, t in zip(students, teachers):
        dense = s.is_contiguous() or (s.dim() == 4 and s.is_contiguous(memory_format=torch.channels_last))
        if not (dense and s.stride() == t.stride()):
            s, t = s.contiguous(), t.contiguous()
        out_s.append(s)
        out_t.append(t)
    return out_s, out_t


# ---- custom ops --------------------------------------------------------------------------------------------
@torch.library.custom_op("safeprune::distill_loss", mutates_args=())
def distill_loss_op(students: list[torch.Tensor], teachers: list[torch.Tensor], weights: list[float],
                    backend: Optional[str]) -> torch.Tensor:
    students, teachers = same_layout(students, teachers)
    impl = dispatch.choose(OP, students, teachers, weights, backend=backend)
    return impl.forward(students, teachers, list(weights))


@distill_loss_op.register_fake
def _(students, teachers, weights, backend):
    device = students[0].device if students else torch.device("cpu")
    return torch.empty((), dtype=_loss_dtype(students), device=device)


@torch.library.custom_op("safeprune::distill_loss_backward", mutates_args=())
def distill_loss_backward_op(grad: torch.Tensor, students: list[torch.Tensor], teachers: list[torch.Tensor],
                             weights: list[float], backend: Optional[str]) -> list[torch.Tensor]:
    students, teachers = same_layout(students, teachers)
    impl = dispatch.choose(OP, students, teachers, weights, backend=backend)
    return list(impl.backward(grad, students, teachers, list(weights)))


@distill_loss_backward_op.register_fake
def _(grad, students, teachers, weights, backend):
    return [torch.empty_like(s) for s in same_layout(students, teachers)[0]]


def _setup_context(ctx, inputs, output):
    students, teachers, weights, backend = inputs
    ctx.save_for_backward(*students, *teachers)
    ctx.pairs, ctx.weights, ctx.backend = len(students), list(weights), backend


def _backward(ctx, grad):
    saved = ctx.saved_tensors
    students, teachers = list(saved[: ctx.pairs]), list(saved[ctx.pairs:])
    grads = distill_loss_backward_op(grad, students, teachers, ctx.weights, ctx.backend)
    return list(grads), [None] * len(teachers), None, None  # teachers get no gradient


distill_loss_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerDistillLoss(torch.autograd.Function):
    """The same op outside torch.compile, minus the custom-op machinery around it.

    torch.library's autograd wrapper flattens the list arguments with pytree on every call and the op is dispatched
    twice more (forward and backward op, each choosing its backend again): ~0.3 ms per forward + backward on CPU,
    more than the kernels take for a training step's ~10 pairs (measured in benchmarks/distill_losses.py). Here the
    backend is chosen once and its forward/backward launchers (the same ones the custom ops run) are called directly.
    torch.compile traces the custom ops instead (``distill_loss`` picks), so both paths share one set of kernels.
    """

    @staticmethod
    def forward(ctx, impl, weights, pairs, *tensors):
        ctx.save_for_backward(*tensors)
        ctx.impl, ctx.weights, ctx.pairs = impl, weights, pairs
        return impl.forward(list(tensors[:pairs]), list(tensors[pairs:]), weights)

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        students, teachers = list(saved[: ctx.pairs]), list(saved[ctx.pairs:])
        grads = ctx.impl.backward(grad, students, teachers, ctx.weights)
        return (None, None, None, *grads, *([None] * ctx.pairs))  # teachers get no gradient


# ---- public function ---------------------------------------------------------------------------------------
def distill_loss(students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor],
                 weights: Sequence[float] | None = None, backend: str | None = None) -> torch.Tensor:
    """``sum_i weights[i] * mse(students[i], teachers[i])`` over pairs of any shapes, fused into one launch.

    students[i]: any shape, float32 (or float16/bfloat16/float64); teachers[i]: the same shape, any floating
    dtype (typically bf16/fp16 under a float32 student), no gradient. weights: one float per pair (default 1).
    Returns a 0-d float32 tensor (float64 when a pair holds float64). backend: "auto" | "off" | "reference" |
    "triton" | "cuda" | "cpp"; None reads $SAFEPRUNE_KERNELS.
    """
    students, teachers = list(students), list(teachers)
    weights = [1.0] * len(students) if weights is None else [float(w) for w in weights]
    if not (len(students) == len(teachers) == len(weights)):
        raise SafepruneError(f"distill_loss: got {len(students)} students, {len(teachers)} teachers and "
                             f"{len(weights)} weights; they must pair up")
    for i, (s, t) in enumerate(zip(students, teachers)):
        if s.shape != t.shape:
            raise SafepruneError(f"distill_loss: pair {i} has student shape {tuple(s.shape)} but teacher shape "
                                 f"{tuple(t.shape)}")
        if not (s.is_floating_point() and t.is_floating_point()):
            raise SafepruneError(f"distill_loss: pair {i} must be floating point, got {s.dtype} and {t.dtype}")
    if not students:
        return torch.zeros((), dtype=torch.float32)
    teachers = [t.detach() for t in teachers]
    if torch.compiler.is_compiling():
        return distill_loss_op(students, teachers, weights, backend)
    students, teachers = same_layout(students, teachers)
    impl = dispatch.choose(OP, students, teachers, weights, backend=backend)
    return _EagerDistillLoss.apply(impl, weights, len(students), *students, *teachers)
