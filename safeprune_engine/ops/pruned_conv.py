"""Fused convolution of the pruned student: a conv2d of its (physically sliced) weight with an optional fused
GroupNorm-apply + SiLU prologue and bias / time-embedding / residual epilogue.

The op (``pruned_conv_reference`` is the definition)::

    a   = silu(x * norm_scale[:, :, None, None] + norm_shift[:, :, None, None])   # prologue, when given
    out = (conv2d(a, weight, stride, padding) + bias + temb_bias[:, :, None, None] + residual) * out_scale

Shapes: ``x [N, C_in, H, W]``; ``weight [C_out, C_in, k, k]``; ``bias [C_out]``; ``norm_scale / norm_shift
[N, C_in]`` float32 (float64 for float64 inputs); ``temb_bias [N, C_out]``; ``residual`` and the output
``[N, C_out, Ho, Wo]``. The students are physically sliced (prune/), so the weight is already the pruned one.
The prologue is a GroupNorm whose statistics are already known: ``scale = gamma_c * rstd[n, g(c)]``, ``shift =
beta_c - mean[n, g(c)] * scale`` (:func:`groupnorm_scale_shift`), so the input is normalised and activated as it
is read. The conv zero-pads its input *after* the prologue, as ``F.conv2d(silu(groupnorm(x)))`` does.

Gradients (one autograd path, ``register_autograd`` on ``torch.ops.safeprune.pruned_conv``): x, weight, bias,
norm_scale, norm_shift, temb_bias, residual. The two GEMM-shaped products (grad wrt the input, grad wrt the
weight) run in the chosen backend as ``torch.ops.safeprune.pruned_conv_backward``.

Backends (``safeprune_engine.ops.dispatch``): reference (torch: F.conv2d), cpp (csrc/pruned_conv_cpu.cpp, CPU,
fp32/fp64/fp16/bf16), cuda (csrc/pruned_conv.cu, fp32/fp16/bf16), triton (kernels/pruned_conv.py,
fp32/fp16/bf16). A backend is chosen per call (forward and backward separately) from the ``backend`` argument,
else ``$SAFEPRUNE_KERNELS``, else auto. fp32 on a GPU follows cuDNN's switch for convolutions,
``torch.backends.cudnn.allow_tf32`` (on by default): when it is on the cuda and triton kernels use TF32 tensor
cores as cuDNN would; when it is off they would run exact fp32 products, slower than cuDNN's, so auto passes
them over for fp32 CUDA inputs and the reference (cuDNN) runs; forcing either backend still runs its exact path.
"""
from __future__ import annotations

import abc
import importlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import SafepruneError
from . import dispatch, native

OP = "pruned_conv"
TRITON_MODULE = "safeprune_engine.kernels.pruned_conv"
NATIVE_OPS = ("pruned_conv_forward", "pruned_conv_grad_input", "pruned_conv_grad_weight")
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def output_size(size: int, k: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - k) // stride + 1


# ----------------------------------------------------------------------------------------------- the definition
def pruned_conv_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int = 1, padding: int = 0,
                          norm_scale: Optional[Tensor] = None, norm_shift: Optional[Tensor] = None,
                          temb_bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                          out_scale: float = 1.0) -> Tensor:
    """The op in plain torch (differentiable). The prologue runs in float32 (float64 for float64 inputs) and
    its result is rounded to ``x``'s dtype before the conv, as a separate GroupNorm+SiLU kernel would store it."""
    a = x
    if norm_scale is not None:
        acc = _acc_dtype(x.dtype)
        z = x.to(acc) * norm_scale.to(acc)[:, :, None, None] + norm_shift.to(acc)[:, :, None, None]
        a = F.silu(z).to(x.dtype)
    out = F.conv2d(a, weight, bias, stride=stride, padding=padding)
    if temb_bias is not None:
        out = out + temb_bias.to(out.dtype)[:, :, None, None]
    if residual is not None:
        out = out + residual
    return out * out_scale if out_scale != 1.0 else out


def _reference_backward(grad_out, x, weight, stride, padding, norm_scale, norm_shift, out_scale, need_input,
                        need_weight):
    """(grad_x, grad_weight, grad_norm_scale, grad_norm_shift) of the definition, in plain torch ops (no autograd:
    this runs inside a custom op's kernel, where autograd is off)."""
    prologue = norm_scale is not None
    acc = _acc_dtype(x.dtype)
    if prologue:
        z = x.to(acc) * norm_scale.to(acc)[:, :, None, None] + norm_shift.to(acc)[:, :, None, None]
        a = F.silu(z).to(x.dtype)
    else:
        a = x
    # under autocast a bf16/fp16 x meets fp32 master weights: the conv ran in x's dtype, the weight's gradient
    # is returned in the weight's own dtype
    w = weight.to(x.dtype)
    grad_acc = (grad_out * out_scale if out_scale != 1.0 else grad_out).to(x.dtype)
    grad_a, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_acc, a, w, None, [stride, stride], [padding, padding], [1, 1], False, [0, 0], 1,
        [need_input, need_weight, False])
    grad_x = grad_sc = grad_sh = None
    if need_input:
        if prologue:
            sig = torch.sigmoid(z)
            dz = grad_a.to(acc) * sig * (1 + z * (1 - sig))
            grad_sc = (dz * x.to(acc)).sum(dim=(2, 3))
            grad_sh = dz.sum(dim=(2, 3))
            grad_a = dz * norm_scale.to(acc)[:, :, None, None]
        grad_x = grad_a.to(x.dtype)
    if need_weight:
        grad_w = grad_w.to(weight.dtype)
    return grad_x, grad_w, grad_sc, grad_sh


# ------------------------------------------------------------------------------------------------------ backends
def gpu_tf32_allowed() -> bool:
    """Whether fp32 convolutions on a GPU may use TF32 tensor cores: torch's switch for cuDNN's convolutions
    (``torch.backends.cudnn.allow_tf32``, on by default), the library the reference's conv runs in. The cuda
    and triton kernels follow it (the CUDA glue reads the same flag, ``allowTF32CuDNN``)."""
    return bool(torch.backends.cudnn.allow_tf32)


def exact_fp32_gpu_reasons(*args, **kwargs) -> list[str]:
    """Auto-skip reason of the GPU kernels for fp32 CUDA inputs while TF32 is not allowed: their exact fp32
    products (scalar FMA tiles, IEEE ``tl.dot``) do not use tensor cores, where cuDNN's exact fp32 conv is the
    better kernel, so auto leaves fp32 to the reference. Forcing the backend still runs its exact path."""
    x = args[0] if args else kwargs.get("x")
    if not isinstance(x, Tensor) or x.device.type != "cuda" or x.dtype != torch.float32 or gpu_tf32_allowed():
        return []
    return ["fp32 inputs with TF32 disallowed (torch.backends.cudnn.allow_tf32 is False): the kernel's exact fp32 "
            "products skip the tensor cores, so cuDNN's conv (the reference) runs them; force the backend to use it"]


class PrunedConvBackend(dispatch.Backend, abc.ABC):
    """One implementation: ``__call__`` is the forward; ``backward`` gives the input and weight products."""

    @abc.abstractmethod
    def forward(self, x, weight, bias, stride, padding, norm_scale, norm_shift, temb_bias, residual,
                out_scale) -> Tensor:
        """The op's output ``[N, C_out, Ho, Wo]``."""

    @abc.abstractmethod
    def backward(self, grad_out, x, weight, stride, padding, norm_scale, norm_shift, out_scale, need_input,
                 need_weight) -> tuple:
        """``(grad_x, grad_weight, grad_norm_scale, grad_norm_shift)``, None where not needed."""

    def __call__(self, x, weight, bias, stride, padding, norm_scale, norm_shift, temb_bias, residual, out_scale):
        return self.forward(x, weight, bias, stride, padding, norm_scale, norm_shift, temb_bias, residual,
                            out_scale)


class ReferenceBackend(PrunedConvBackend):
    name = "reference"

    def not_supported_reasons(self, *args, **kwargs):
        return []

    def forward(self, *args):
        return pruned_conv_reference(*args)

    def backward(self, *args):
        return _reference_backward(*args)


class _KernelBackend(PrunedConvBackend):
    """Shared checks of the three kernel backends: devices, dtypes, and what is built/installed."""

    device_types: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = FAST_DTYPES

    @abc.abstractmethod
    def static_reasons(self) -> list[str]:
        """Reasons that do not depend on the inputs (not built, not installed)."""

    def not_supported_reasons(self, *args, **kwargs):
        reasons = self.static_reasons()
        if not args:
            return reasons
        x, weight = args[0], args[1]
        tensors = dispatch.tensors_in(list(args) + list(kwargs.values()))
        reasons += self.device_reasons(tensors)
        reasons += dispatch.dtype_reasons([x, weight], self.dtypes)
        if x.dtype != weight.dtype:
            reasons.append(f"x is {x.dtype} but weight is {weight.dtype}")
        return reasons

    def device_reasons(self, tensors) -> list[str]:
        return dispatch.device_reasons(tensors, self.device_types)


class _NativeBackend(_KernelBackend):
    """The compiled library's kernels (csrc/): the same ops for CPU and CUDA tensors, one library per device."""

    def forward(self, *args):
        return native.op("pruned_conv_forward")(*args)

    def backward(self, grad_out, x, weight, stride, padding, norm_scale, norm_shift, out_scale, need_input,
                 need_weight):
        grad_x = grad_sc = grad_sh = grad_w = None
        if need_input:
            grad_x, grad_sc, grad_sh = native.op("pruned_conv_grad_input")(
                grad_out, x, weight, stride, padding, norm_scale, norm_shift, out_scale)
        if need_weight:
            grad_w = native.op("pruned_conv_grad_weight")(
                grad_out, x, weight, stride, padding, norm_scale, norm_shift, out_scale)
        return grad_x, grad_w, grad_sc, grad_sh


class CppBackend(_NativeBackend):
    name = "cpp"
    device_types = ("cpu",)
    dtypes = FAST_DTYPES + (torch.float64,)

    def static_reasons(self):
        return native.native_reasons(NATIVE_OPS, "CPU")

    def auto_skip_reasons(self, *args, **kwargs):
        # measured on AVX-512 (benchmarks/results/fused_ops-cpu.json): 0.65-1.3x of torch's oneDNN convolution of
        # the same pruned shape, mostly below 1, with or without the fused prologue/epilogue. A CPU measurement:
        # it speaks only for CPU tensors (without inputs, for the CPU this backend runs on)
        tensors = dispatch.tensors_in(list(args) + list(kwargs.values()))
        if tensors and not any(t.device.type == "cpu" for t in tensors):
            return []
        return ["the C++ convolution is slower than torch's oneDNN conv of the same pruned shape on CPU "
                "(measured 0.65-1.3x, mostly < 1); force backend='cpp' to use it"]


class CudaBackend(_NativeBackend):
    """Auto passes it over only for fp32 without TF32 (its exact fp32 path is scalar FMAs): nothing has measured
    its tensor-core paths slower than the reference on a GPU."""

    name = "cuda"
    device_types = ("cuda",)
    dtypes = FAST_DTYPES

    def static_reasons(self):
        return native.native_reasons(NATIVE_OPS, "CUDA")

    def auto_skip_reasons(self, *args, **kwargs):
        return exact_fp32_gpu_reasons(*args, **kwargs)


class TritonBackend(_KernelBackend):
    name = "triton"
    device_types = ("cuda", "cpu")  # cpu only under the interpreter: triton_reasons says so

    def static_reasons(self):
        return dispatch.triton_reasons([], TRITON_MODULE)

    def device_reasons(self, tensors):
        tensors = list(tensors)
        reasons = dispatch.triton_reasons(tensors, TRITON_MODULE)
        if len({t.device for t in tensors}) > 1:
            reasons.append("tensors on different devices: " + ", ".join(sorted({str(t.device) for t in tensors})))
        return reasons

    def auto_skip_reasons(self, *args, **kwargs):
        return exact_fp32_gpu_reasons(*args, **kwargs)

    @staticmethod
    def _kernels():
        return importlib.import_module(TRITON_MODULE)

    @staticmethod
    def _fp32(t):
        return None if t is None else t.float().contiguous()

    def forward(self, x, weight, bias, stride, padding, norm_scale, norm_shift, temb_bias, residual, out_scale):
        temb = None if temb_bias is None else temb_bias.to(x.dtype)
        res = None if residual is None else residual.to(x.dtype)
        b = None if bias is None else bias.to(x.dtype).contiguous()
        return self._kernels().forward(x, weight, b, stride, padding, self._fp32(norm_scale), self._fp32(norm_shift),
                                       temb, res, out_scale, allow_tf32=gpu_tf32_allowed())

    def backward(self, grad_out, x, weight, stride, padding, norm_scale, norm_shift, out_scale, need_input,
                 need_weight):
        kernels = self._kernels()
        sc, sh = self._fp32(norm_scale), self._fp32(norm_shift)
        tf32 = gpu_tf32_allowed()
        grad_x = grad_sc = grad_sh = grad_w = None
        grad_out = grad_out.to(x.dtype)
        if need_input:
            grad_x, grad_sc, grad_sh = kernels.grad_input(grad_out, x, weight, stride, padding, sc, sh, out_scale,
                                                          allow_tf32=tf32)
        if need_weight:
            grad_w = kernels.grad_weight(grad_out, x, weight, stride, padding, sc, sh, out_scale, allow_tf32=tf32)
        return grad_x, grad_w, grad_sc, grad_sh


for _backend in (ReferenceBackend(), CppBackend(), CudaBackend(), TritonBackend()):
    dispatch.register(OP, _backend)


# ------------------------------------------------------------------------------------------- torch.library ops
def _backend_arg(backend: str) -> Optional[str]:
    return backend or None  # "" = $SAFEPRUNE_KERNELS / auto, resolved when the op runs


@torch.library.custom_op("safeprune::pruned_conv", mutates_args=())
def _pruned_conv_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, padding: int,
                    norm_scale: Optional[Tensor], norm_shift: Optional[Tensor], temb_bias: Optional[Tensor],
                    residual: Optional[Tensor], out_scale: float, backend: str) -> Tensor:
    args = (x, weight, bias, stride, padding, norm_scale, norm_shift, temb_bias, residual, out_scale)
    return dispatch.choose(OP, *args, backend=_backend_arg(backend))(*args)


@_pruned_conv_op.register_fake
def _(x, weight, bias, stride, padding, norm_scale, norm_shift, temb_bias, residual, out_scale, backend):
    k = weight.shape[2]
    return x.new_empty((x.shape[0], weight.shape[0], output_size(x.shape[2], k, stride, padding),
                        output_size(x.shape[3], k, stride, padding)))


@torch.library.custom_op("safeprune::pruned_conv_backward", mutates_args=())
def _pruned_conv_backward_op(grad_out: Tensor, x: Tensor, weight: Tensor, stride: int, padding: int,
                             norm_scale: Optional[Tensor], norm_shift: Optional[Tensor], out_scale: float,
                             need_input: bool, need_weight: bool,
                             backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x like x, grad_weight like weight, grad_norm_scale, grad_norm_shift like norm_scale); the ones not
    asked for (need_input / need_weight, or no prologue) are empty tensors."""
    args = (x, weight, None, stride, padding, norm_scale, norm_shift, None, None, out_scale)
    chosen = dispatch.choose(OP, *args, grad_out=grad_out, backend=_backend_arg(backend))
    grads = chosen.backward(grad_out, x, weight, stride, padding, norm_scale, norm_shift, out_scale, need_input,
                            need_weight)
    grad_x, grad_w, grad_sc, grad_sh = grads
    norm_dtype = norm_scale.dtype if norm_scale is not None else x.dtype

    def fresh(grad, like_dtype, tensor_for_device):
        # custom-op outputs must not alias each other or an input: a fresh empty tensor for each missing one
        if grad is None:
            return tensor_for_device.new_empty((0,), dtype=like_dtype)
        return grad.to(like_dtype)

    return (fresh(grad_x, x.dtype, x), fresh(grad_w, weight.dtype, weight), fresh(grad_sc, norm_dtype, x),
            fresh(grad_sh, norm_dtype, x))


@_pruned_conv_backward_op.register_fake
def _(grad_out, x, weight, stride, padding, norm_scale, norm_shift, out_scale, need_input, need_weight, backend):
    prologue = need_input and norm_scale is not None
    norm_dtype = norm_scale.dtype if norm_scale is not None else x.dtype
    return (torch.empty_like(x) if need_input else x.new_empty((0,)),
            torch.empty_like(weight) if need_weight else weight.new_empty((0,)),
            torch.empty_like(norm_scale) if prologue else x.new_empty((0,), dtype=norm_dtype),
            torch.empty_like(norm_shift) if prologue else x.new_empty((0,), dtype=norm_dtype))


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, norm_scale, norm_shift, temb_bias, residual, out_scale, backend = inputs
    ctx.save_for_backward(x, weight, norm_scale, norm_shift)
    ctx.conv = (stride, padding, out_scale, backend)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.temb_dtype = None if temb_bias is None else temb_bias.dtype
    ctx.residual_dtype = None if residual is None else residual.dtype


def _backward(ctx, grad_out):
    x, weight, norm_scale, norm_shift = ctx.saved_tensors
    stride, padding, out_scale, backend = ctx.conv
    # input order: x, weight, bias, stride, padding, norm_scale, norm_shift, temb_bias, residual, out_scale, backend
    needs = ctx.needs_input_grad
    need_input = needs[0] or (norm_scale is not None and (needs[5] or needs[6]))
    need_weight = needs[1]
    grad_x = grad_w = grad_sc = grad_sh = grad_bias = grad_temb = grad_res = None
    if need_input or need_weight:
        gx, gw, gsc, gsh = _pruned_conv_backward_op(grad_out, x, weight, stride, padding, norm_scale, norm_shift,
                                                    out_scale, need_input, need_weight, backend)
        grad_x = gx if needs[0] else None
        grad_w = gw if need_weight else None
        grad_sc = gsc if norm_scale is not None and needs[5] else None
        grad_sh = gsh if norm_scale is not None and needs[6] else None
    if needs[2] or needs[7]:
        per_sample = grad_out.sum(dim=(2, 3), dtype=torch.float32 if grad_out.dtype != torch.float64 else None)
        per_sample = per_sample * out_scale
        if needs[7]:
            grad_temb = per_sample.to(ctx.temb_dtype)
        if needs[2]:
            grad_bias = per_sample.sum(0).to(ctx.bias_dtype)
    if needs[8]:
        grad_res = (grad_out * out_scale).to(ctx.residual_dtype)
    return grad_x, grad_w, grad_bias, None, None, grad_sc, grad_sh, grad_temb, grad_res, None, None


_pruned_conv_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------ public API
def pruned_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, stride: int = 1, padding: int = 0,
                norm_scale: Optional[Tensor] = None, norm_shift: Optional[Tensor] = None,
                temb_bias: Optional[Tensor] = None, residual: Optional[Tensor] = None, out_scale: float = 1.0,
                backend: Optional[str] = None) -> Tensor:
    """Conv2d of a (pruned, physically sliced) weight with optional fused prologue and epilogue.

    Args (shapes as in the module docstring):
        x: ``[N, C_in, H, W]``.
        weight: the ``[C_out, C_in, k, k]`` weight; bias: its ``[C_out]`` bias or None.
        norm_scale, norm_shift: ``[N, C_in]`` prologue ``silu(x * scale + shift)`` (see groupnorm_scale_shift).
        temb_bias: ``[N, C_out]`` added per sample and output channel; residual: ``[N, C_out, Ho, Wo]``.
        out_scale: the sum is multiplied by it (diffusers' ``1 / output_scale_factor``).
        backend: "auto" | "off" | "reference" | "cpp" | "cuda" | "triton"; None = ``$SAFEPRUNE_KERNELS``.

    Returns ``[N, C_out, Ho, Wo]`` in ``x``'s dtype, ``Ho = (H + 2 padding - k) // stride + 1``.
    """
    if backend is not None:
        dispatch.requested_mode(backend)  # a misspelt backend fails here, not deep inside the op
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise SafepruneError(f"pruned_conv needs a square [C_out, C_in, k, k] weight, got {tuple(weight.shape)}")
    if (norm_scale is None) != (norm_shift is None):
        raise SafepruneError("pruned_conv: pass norm_scale and norm_shift together")
    if x.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise SafepruneError(f"pruned_conv: x must be [N, {weight.shape[1]}, H, W] (the weight's input channels), "
                             f"got {tuple(x.shape)}")
    return _pruned_conv_op(x, weight, bias, int(stride), int(padding), norm_scale, norm_shift, temb_bias, residual,
                           float(out_scale), backend or "")


class _GroupStats(torch.autograd.Function):
    """Per-(sample, group) mean and 1/sqrt(var + eps) of ``x [N, C, *]``: torch's own GroupNorm statistics in the
    forward (one fused pass; ``torch.var_mean`` over a few long rows is ~20x slower on CPU), and the closed-form
    gradient ``dx = (dmean - drstd * rstd^3 * (x - mean)) / M`` (M elements per group) in one elementwise pass."""

    @staticmethod
    def forward(ctx, x, num_groups: int, eps: float):
        n, c = x.shape[:2]
        acc = _acc_dtype(x.dtype)
        dense = x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
        _, mean, rstd = torch.ops.aten.native_group_norm(x if dense else x.contiguous(), None, None, n, c,
                                                         x[0, 0].numel(), num_groups, eps)
        mean, rstd = mean.view(n, num_groups).to(acc), rstd.view(n, num_groups).to(acc)
        ctx.save_for_backward(x, mean, rstd)
        ctx.num_groups = num_groups
        return mean, rstd

    @staticmethod
    def backward(ctx, grad_mean, grad_rstd):
        x, mean, rstd = ctx.saved_tensors
        n, groups = mean.shape
        xr = x.reshape(n, groups, -1).to(mean.dtype)
        grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
        grad_rstd = torch.zeros_like(rstd) if grad_rstd is None else grad_rstd
        coef = (grad_rstd * rstd.pow(3))[..., None]
        dx = (grad_mean[..., None] - coef * (xr - mean[..., None])) / xr.shape[2]
        return dx.reshape(x.shape).to(x.dtype), None, None


def groupnorm_scale_shift(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                          eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Per-(sample, channel) ``(scale, shift)`` such that ``groupnorm(x) == x * scale + shift``.

    ``x [N, C, H, W]``; ``weight``/``bias`` the GroupNorm's ``[C]`` affine parameters (None = 1 / 0). Returns two
    ``[N, C]`` tensors in float32 (float64 for float64 x),
    differentiable with respect to x, weight and bias. The statistics are torch's GroupNorm's own.
    """
    n, c = x.shape[:2]
    if c % num_groups:
        raise SafepruneError(f"GroupNorm: {c} channels are not divisible into {num_groups} groups")
    acc = _acc_dtype(x.dtype)
    mean, rstd = _GroupStats.apply(x, num_groups, float(eps))
    per_channel = c // num_groups
    rstd_c = rstd.repeat_interleave(per_channel, dim=1)  # [N, C]
    mean_c = mean.repeat_interleave(per_channel, dim=1)
    gamma = weight.to(acc) if weight is not None else torch.ones(c, dtype=acc, device=x.device)
    beta = bias.to(acc) if bias is not None else torch.zeros(c, dtype=acc, device=x.device)
    scale = rstd_c * gamma
    shift = beta - mean_c * scale
    return scale, shift


class PrunedConv2d(nn.Module):
    """Drop-in for ``nn.Conv2d`` that runs :func:`pruned_conv` on the conv's own parameters.

    ``PrunedConv2d.from_conv(conv)`` reuses ``conv.weight`` / ``conv.bias`` (the same Parameter objects: state
    dict keys ``weight``/``bias``, optimizers and tied copies see one tensor). ``forward(x, norm_scale=None,
    norm_shift=None, temb_bias=None, residual=None, out_scale=1.0)`` takes the fused prologue/epilogue of
    :func:`pruned_conv`; without them it is the plain conv.
    """

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter] = None, stride: int = 1,
                 padding: int = 0, backend: Optional[str] = None):
        super().__init__()
        if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
            raise SafepruneError(f"PrunedConv2d needs a square [C_out, C_in, k, k] weight, got {tuple(weight.shape)}")
        if backend is not None:
            dispatch.requested_mode(backend)
        self.weight = weight
        self.bias = bias
        self.backend = backend
        self.out_channels, self.in_channels, k, _ = weight.shape
        # nn.Conv2d's attributes, for code that reads them off a drop-in (the op needs groups 1, dilation 1)
        self.kernel_size, self.stride, self.padding = (k, k), (int(stride),) * 2, (int(padding),) * 2
        self.dilation, self.groups, self.padding_mode = (1, 1), 1, "zeros"

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, backend: Optional[str] = None) -> "PrunedConv2d":
        """Share ``conv``'s parameters. Raises SafepruneError for what the op does not compute (groups,
        dilation, non-zero padding modes, non-square kernels, strides or paddings)."""
        reasons = unsupported_conv_reasons(conv)
        if reasons:
            raise SafepruneError(f"PrunedConv2d cannot replace {conv}: " + "; ".join(reasons))
        return cls(conv.weight, conv.bias, conv.stride[0], conv.padding[0], backend)

    def forward(self, x: Tensor, norm_scale: Optional[Tensor] = None, norm_shift: Optional[Tensor] = None,
                temb_bias: Optional[Tensor] = None, residual: Optional[Tensor] = None, out_scale: float = 1.0) -> Tensor:
        return pruned_conv(x, self.weight, self.bias, stride=self.stride[0], padding=self.padding[0],
                           norm_scale=norm_scale, norm_shift=norm_shift, temb_bias=temb_bias, residual=residual,
                           out_scale=out_scale, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, bias={self.bias is not None}, backend={self.backend or 'env/auto'}")


def unsupported_conv_reasons(conv: nn.Conv2d) -> list[str]:
    """Why ``conv`` cannot be computed by the pruned conv (empty when it can)."""
    reasons = []
    if conv.groups != 1:
        reasons.append(f"groups={conv.groups}")
    if tuple(conv.dilation) != (1, 1):
        reasons.append(f"dilation={conv.dilation}")
    if conv.padding_mode != "zeros":
        reasons.append(f"padding_mode={conv.padding_mode!r}")
    if isinstance(conv.padding, str):
        reasons.append(f"padding={conv.padding!r}")
    elif conv.padding[0] != conv.padding[1]:
        reasons.append(f"padding={conv.padding}")
    if conv.kernel_size[0] != conv.kernel_size[1]:
        reasons.append(f"kernel_size={conv.kernel_size}")
    if conv.stride[0] != conv.stride[1]:
        reasons.append(f"stride={conv.stride}")
    return reasons
