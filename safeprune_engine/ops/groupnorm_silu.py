"""GroupNorm (affine) followed by SiLU, as one op: ``silu(group_norm(x, G, weight, bias, eps))``.

Backends (see ``dispatch``): ``cuda`` (csrc/groupnorm_silu.cu), ``triton`` (kernels/groupnorm_silu.py),
``cpp`` (csrc/groupnorm_silu_cpu.cpp) and ``reference`` (torch, below: the definition). Every backend computes
the statistics and the arithmetic in float32 (float64 for float64 inputs) and returns y in x's dtype and layout.

Custom ops (namespace "safeprune", traceable by torch.compile, differentiable through register_autograd):

* ``groupnorm_silu(x, num_groups, weight, bias, eps, backend) -> (y, mean, rstd)``
* ``groupnorm_silu_backward(dy, x, weight, bias, mean, rstd, num_groups, backend) -> (dx, dweight, dbias)``

x: (N, C, *) with C divisible by num_groups; weight, bias: (C,) in x's dtype or float32; mean, rstd:
(N, num_groups) float32 (float64 for float64 x). ``backend`` None means $SAFEPRUNE_KERNELS / auto.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from safeprune_engine.errors import SafepruneError
from safeprune_engine.ops import dispatch, native

OP = "groupnorm_silu"
KERNEL_MODULE = "safeprune_engine.kernels.groupnorm_silu"
NATIVE_OPS = ("groupnorm_silu_forward", "groupnorm_silu_backward")
LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)


# ---- the reference (the definition) ------------------------------------------------------------------------
def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def reference_forward(x, num_groups, weight, bias, eps):
    """torch GroupNorm + SiLU computed in float32 (float64 for float64 x), rounded to x's dtype."""
    acc = _stats_dtype(x)
    xa = x.to(acc)
    var, mean = torch.var_mean(xa.reshape(x.shape[0], num_groups, -1), dim=-1, unbiased=False)
    y = F.silu(F.group_norm(xa, num_groups, weight.to(acc), bias.to(acc), eps))
    y = y.to(x.dtype).contiguous(memory_format=_memory_format(x))
    return y, mean, torch.rsqrt(var + eps)


def reference_backward(dy, x, weight, bias, mean, rstd, num_groups):
    """Gradients of ``reference_forward`` from the saved statistics, in float32 (float64 for float64 x).

    With xhat = (x - mean) rstd, z = xhat gamma + beta, s = sigmoid(z), dz = dy s (1 + z (1 - s)):
    dbeta = sum dz, dgamma = sum dz xhat, dx = rstd (g - mean_group(g) - xhat mean_group(g xhat)), g = gamma dz.
    """
    acc = _stats_dtype(x)
    n, c = x.shape[0], x.shape[1]
    grouped = (n, num_groups, c // num_groups, -1)
    xa = x.to(acc).reshape(grouped)
    gamma = weight.to(acc).reshape(1, num_groups, -1, 1)
    beta = bias.to(acc).reshape(1, num_groups, -1, 1)
    xhat = (xa - mean.to(acc)[..., None, None]) * rstd.to(acc)[..., None, None]
    z = xhat * gamma + beta
    s = torch.sigmoid(z)
    dz = dy.to(acc).reshape(grouped) * s * (1 + z * (1 - s))
    g = dz * gamma
    dx = rstd.to(acc)[..., None, None] * (
        g - g.mean(dim=(2, 3), keepdim=True) - xhat * (g * xhat).mean(dim=(2, 3), keepdim=True))
    dweight = (dz * xhat).sum(dim=(0, 3)).reshape(c)
    dbias = dz.sum(dim=(0, 3)).reshape(c)
    dx = dx.reshape(x.shape).to(x.dtype).contiguous(memory_format=_memory_format(x))
    return dx, dweight.to(weight.dtype), dbias.to(bias.dtype)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels read it: NCHW-contiguous, or channels_last when it already is (no copy then)."""
    return x.contiguous(memory_format=_memory_format(x))


# ---- backends ----------------------------------------------------------------------------------------------
class GroupNormSiLUBackend(dispatch.Backend):
    """A backend with a forward and a backward function; calling it runs the forward."""

    def __init__(self, name, forward, backward, reasons, auto_reasons=None):
        super().__init__(name, forward, reasons, auto_reasons)
        self.forward = forward
        self.backward = backward


def _inputs(args) -> list[torch.Tensor]:
    return dispatch.tensors_in(args)


def _cpp_reasons(*args, **kwargs) -> list[str]:
    tensors = _inputs(args)
    return (native.native_reasons(NATIVE_OPS, "CPU") + dispatch.device_reasons(tensors, ("cpu",))
            + dispatch.dtype_reasons(tensors[:1], LOW_PRECISION + (torch.float64,)))


def _cuda_reasons(*args, **kwargs) -> list[str]:
    tensors = _inputs(args)
    return (native.native_reasons(NATIVE_OPS, "CUDA") + dispatch.device_reasons(tensors, ("cuda",))
            + dispatch.dtype_reasons(tensors[:1], LOW_PRECISION))


def _triton_reasons(*args, **kwargs) -> list[str]:
    tensors = _inputs(args)
    reasons = dispatch.triton_reasons(tensors, KERNEL_MODULE) + dispatch.dtype_reasons(tensors[:1], LOW_PRECISION)
    if len(tensors) > 1 and len({t.device for t in tensors}) > 1:
        reasons += dispatch.device_reasons(tensors, ("cuda", "cpu"))
    if args and isinstance(args[0], torch.Tensor) and len(args) > 1 and isinstance(args[1], int) and args[1] > 0:
        channels_per_group = args[0].shape[1] // args[1] if args[0].dim() > 1 else 0
        if channels_per_group > 4096:
            reasons.append(f"{channels_per_group} channels per group exceed the Triton tile limit of 4096")
    return reasons


def _triton_forward(x, num_groups, weight, bias, eps):
    from safeprune_engine.kernels import groupnorm_silu as kernels

    return kernels.forward(x, num_groups, weight.contiguous(), bias.contiguous(), eps)


def _triton_backward(dy, x, weight, bias, mean, rstd, num_groups):
    from safeprune_engine.kernels import groupnorm_silu as kernels

    return kernels.backward(dy, x, weight.contiguous(), bias.contiguous(), mean, rstd, num_groups)


def _native_forward(x, num_groups, weight, bias, eps):
    return native.op("groupnorm_silu_forward")(x, num_groups, weight, bias, eps)


def _native_backward(dy, x, weight, bias, mean, rstd, num_groups):
    return native.op("groupnorm_silu_backward")(dy, x, weight, bias, mean, rstd, num_groups)


for _backend in (
    GroupNormSiLUBackend("reference", reference_forward, reference_backward, None),
    GroupNormSiLUBackend("cpp", _native_forward, _native_backward, _cpp_reasons, native.baseline_copy_reasons),
    GroupNormSiLUBackend("triton", _triton_forward, _triton_backward, _triton_reasons),
    GroupNormSiLUBackend("cuda", _native_forward, _native_backward, _cuda_reasons),
):
    dispatch.register(OP, _backend)


def _benchmark(backend, args, kwargs, grad):
    """Auto mode's timing: the forward dispatch call passes (x, G, w, b, eps), the backward one (x, G, w, b)."""
    x, num_groups, weight, bias = args[:4]
    eps = args[4] if len(args) > 4 else 1e-5
    if not grad:
        return lambda: backend.forward(x, num_groups, weight, bias, eps)

    def forward_backward():
        y, mean, rstd = backend.forward(x, num_groups, weight, bias, eps)
        return backend.backward(y, x, weight, bias, mean, rstd, num_groups)  # y: an upstream gradient like dy

    return forward_backward


dispatch.register_benchmark(OP, _benchmark, key=lambda args, kwargs: args[:4])


# ---- custom ops --------------------------------------------------------------------------------------------
@torch.library.custom_op("safeprune::groupnorm_silu", mutates_args=())
def groupnorm_silu_op(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                      backend: Optional[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = kernel_layout(x)
    impl = dispatch.choose(OP, x, num_groups, weight, bias, eps, backend=backend)
    return tuple(impl.forward(x, num_groups, weight, bias, eps))


@groupnorm_silu_op.register_fake
def _(x, num_groups, weight, bias, eps, backend):
    stats = x.new_empty((x.shape[0], num_groups), dtype=_stats_dtype(x))
    return torch.empty_like(x, memory_format=_memory_format(x)), stats, torch.empty_like(stats)


@torch.library.custom_op("safeprune::groupnorm_silu_backward", mutates_args=())
def groupnorm_silu_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                               mean: torch.Tensor, rstd: torch.Tensor, num_groups: int,
                               backend: Optional[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = kernel_layout(x)
    dy = dy.contiguous(memory_format=_memory_format(x))
    impl = dispatch.choose(OP, x, num_groups, weight, bias, backend=backend)
    return tuple(impl.backward(dy, x, weight, bias, mean, rstd, num_groups))


@groupnorm_silu_backward_op.register_fake
def _(dy, x, weight, bias, mean, rstd, num_groups, backend):
    return torch.empty_like(x, memory_format=_memory_format(x)), torch.empty_like(weight), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, _eps, backend = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups, ctx.backend = num_groups, backend


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = groupnorm_silu_backward_op(dy, x, weight, bias, mean, rstd, ctx.num_groups, ctx.backend)
    return dx, None, dweight, dbias, None, None


groupnorm_silu_op.register_autograd(_backward, setup_context=_setup_context)


# ---- public function ---------------------------------------------------------------------------------------
def groupnorm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, eps: float = 1e-5, backend: str | None = None) -> torch.Tensor:
    """``silu(group_norm(x, num_groups, weight, bias, eps))`` in one fused pass.

    x: (N, C, *) float32/float16/bfloat16 (float64 on the cpp and reference backends), NCHW or channels_last;
    weight, bias: (C,) in x's dtype or float32 (None: ones / zeros). Returns y with x's shape, dtype and layout.
    backend: "auto" | "off" | "reference" | "triton" | "cuda" | "cpp"; None reads $SAFEPRUNE_KERNELS.
    """
    if x.dim() < 2:
        raise SafepruneError(f"groupnorm_silu: x must be (N, C, ...), got shape {tuple(x.shape)}")
    channels = x.shape[1]
    if num_groups <= 0 or channels % num_groups:
        raise SafepruneError(f"groupnorm_silu: num_groups={num_groups} must divide the {channels} channels")
    if not x.is_floating_point():
        raise SafepruneError(f"groupnorm_silu: x must be a floating-point tensor, got {x.dtype}")
    weight = torch.ones(channels, dtype=x.dtype, device=x.device) if weight is None else weight
    bias = torch.zeros(channels, dtype=x.dtype, device=x.device) if bias is None else bias
    for name, t in (("weight", weight), ("bias", bias)):
        if tuple(t.shape) != (channels,):
            raise SafepruneError(f"groupnorm_silu: {name} must have shape ({channels},), got {tuple(t.shape)}")
        if t.dtype not in (x.dtype, torch.float32):
            raise SafepruneError(f"groupnorm_silu: {name} dtype must be x's ({x.dtype}) or float32, got {t.dtype}")
    return groupnorm_silu_op(kernel_layout(x), num_groups, weight, bias, float(eps), backend)[0]
