"""Pruned convolution: every available backend against the torch reference (the definition), forward and every
gradient, on fresh random inputs; float64 gradcheck of the C++ path; opcheck; torch.compile; the module and the
dispatcher's choices for this op."""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from safeprune_engine.errors import SafepruneError
from safeprune_engine.ops import dispatch
from safeprune_engine.ops.pruned_conv import (OP, PrunedConv2d, groupnorm_scale_shift, output_size, pruned_conv,
                                              pruned_conv_reference)

KERNEL_BACKENDS = ("cpp", "triton", "cuda")
BACKENDS = ("reference",) + KERNEL_BACKENDS  # the reference's own backward formula is checked against autograd too
# max |error| allowed, relative to max |reference| of the same tensor (outputs and gradients are sums of many
# products, so an absolute/relative elementwise rule is either loose on large values or tight near zero)
RELATIVE_TOL = {torch.float64: 1e-10, torch.float32: 3e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


@pytest.fixture(autouse=True)
def exact_fp32_on_gpu():
    # TF32 would need 1e-3 tolerances; the kernels follow torch's cuDNN switch, so turn it off for the comparison
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


def device_for(backend: str) -> str:
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def skip_unless_available(backend: str, *args):
    reasons = dispatch.available_backends(OP, *args)[backend]
    if reasons:
        pytest.skip(f"{backend} backend unavailable here: {'; '.join(reasons)}")


@dataclass(frozen=True)
class Case:
    name: str
    n: int
    c_in: int
    c_out: int
    h: int
    w: int
    k: int
    stride: int
    padding: int
    prologue: bool = False
    epilogue: bool = False   # bias + temb + residual + out_scale
    tiny: bool = True        # small enough for the Triton interpreter

    def __str__(self):
        return self.name


# pruned students have odd widths (kept channels of a 320/640/1280 layer): shapes off every tile size
CASES = [
    Case("minimal", 1, 1, 1, 3, 3, 3, 1, 1),
    Case("odd_37_to_41_3x3_fused", 2, 37, 41, 8, 9, 3, 1, 1, prologue=True, epilogue=True),
    Case("odd_37_to_29_s2_fused", 2, 37, 29, 9, 11, 3, 2, 1, prologue=True, epilogue=True),
    Case("shortcut_1x1", 2, 25, 32, 8, 8, 1, 1, 0, epilogue=True),
    Case("1x1_s2", 1, 13, 22, 10, 7, 1, 2, 0),
    # SD-1.5 resnet conv2 of the 320-wide stage scaled down by 8 (200 kept of 320 -> 25), 64x64 -> 16x16
    Case("sd_320_scaled_25_to_40", 2, 25, 40, 16, 16, 3, 1, 1, prologue=True, epilogue=True),
    # SD-1.5 downsampler (3x3 stride 2) scaled down
    Case("sd_downsample_scaled", 1, 40, 40, 16, 16, 3, 2, 1),
    # real pruned widths (200 kept of 320 in, 320 out), small image: C++ only (too slow for the interpreter)
    Case("pruned_200_to_320", 1, 200, 320, 8, 8, 3, 1, 1, prologue=True, epilogue=True, tiny=False),
]


def make_inputs(case: Case, dtype: torch.dtype, device: str, seed: int = 0):
    """Fresh random inputs (leaf tensors) for `case` in `dtype` (the prologue's scale/shift in fp32/fp64)."""
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def rand(*shape, dt=dtype, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset).to(device, dt).requires_grad_()

    ho, wo = output_size(case.h, case.k, case.stride, case.padding), output_size(case.w, case.k, case.stride, case.padding)
    fan_in = case.c_in * case.k * case.k
    inputs = dict(
        x=rand(case.n, case.c_in, case.h, case.w),
        weight=rand(case.c_out, case.c_in, case.k, case.k, scale=fan_in ** -0.5),
        stride=case.stride, padding=case.padding,
    )
    if case.prologue:
        inputs["norm_scale"] = rand(case.n, case.c_in, dt=acc, scale=0.3, offset=1.0)
        inputs["norm_shift"] = rand(case.n, case.c_in, dt=acc, scale=0.5)
    if case.epilogue:
        inputs["bias"] = rand(case.c_out)
        inputs["temb_bias"] = rand(case.n, case.c_out)
        inputs["residual"] = rand(case.n, case.c_out, ho, wo)
        inputs["out_scale"] = 0.75
    return inputs


def differentiable(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}


def as_float64_reference(inputs: dict) -> dict:
    """The same values in float64 (fresh leaves), for the exact reference."""
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            out[key] = value.detach().double().requires_grad_(value.requires_grad)
        else:
            out[key] = value
    return out


def reference_call(inputs: dict) -> torch.Tensor:
    args = dict(inputs)
    return pruned_conv_reference(args.pop("x"), args.pop("weight"), args.pop("bias", None), **args)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item()
    err = (actual.double() - expected.double()).abs().max().item()
    tol = RELATIVE_TOL[dtype] * max(scale, 1e-12)
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g} (max |ref| {scale:.3g}, {dtype})"


def backend_dtypes(backend):
    if backend == "reference":
        return [torch.float32, torch.bfloat16]
    return [torch.float32, torch.float16, torch.bfloat16] + ([torch.float64] if backend == "cpp" else [])


PARAMS = [pytest.param(b, c, d, id=f"{b}-{c}-{str(d).replace('torch.', '')}")
          for b in BACKENDS for c in CASES for d in backend_dtypes(b)
          if c.tiny or b != "triton"]


@pytest.mark.parametrize("backend,case,dtype", PARAMS)
def test_backend_matches_reference_forward_and_every_gradient(backend, case, dtype):
    device = device_for(backend)
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    inputs = make_inputs(case, dtype, device, seed=zlib.crc32(case.name.encode()) % 1000)
    args = dict(inputs)
    x, weight = args.pop("x"), args.pop("weight")
    skip_unless_available(backend, x, weight)

    out = pruned_conv(x, weight, args.pop("bias", None), backend=backend, **args)
    ref_inputs = as_float64_reference(inputs)
    expected = reference_call(ref_inputs)
    assert out.dtype == dtype
    assert_close_rel(out, expected, dtype, "output")

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    leaves = differentiable(inputs)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(device, dtype))
    ref_leaves = differentiable(ref_inputs)
    ref_grads = torch.autograd.grad(expected, list(ref_leaves.values()), grad_out.to(device))
    for (name, leaf), grad, ref_grad in zip(leaves.items(), grads, ref_grads):
        assert grad.dtype == leaf.dtype, f"grad {name} dtype"
        assert_close_rel(grad, ref_grad, dtype, f"grad {name}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_channels_last_input(backend):
    device = device_for(backend)
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    case = CASES[2]  # stride 2, prologue and epilogue
    inputs = make_inputs(case, torch.float32, device, seed=7)
    x = inputs["x"].detach().to(memory_format=torch.channels_last).requires_grad_()
    inputs["x"] = x
    args = dict(inputs)
    skip_unless_available(backend, x, args["weight"])
    out = pruned_conv(args.pop("x"), args.pop("weight"), args.pop("bias"), backend=backend, **args)
    ref_inputs = as_float64_reference(inputs)
    expected = reference_call(ref_inputs)
    assert_close_rel(out, expected, torch.float32, "output")
    grad_out = torch.randn_like(expected).to(memory_format=torch.channels_last)
    (gx,) = torch.autograd.grad(out, [x], grad_out.float())
    (ref_gx,) = torch.autograd.grad(expected, [ref_inputs["x"]], grad_out)
    assert_close_rel(gx, ref_gx, torch.float32, "grad x")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_tf32_follows_torch_switch(backend):
    """With cuDNN's TF32 allowed (torch's default) the GPU kernels use TF32 tensor cores too: ~1e-3 agreement."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    case = CASES[1]
    inputs = make_inputs(case, torch.float32, "cuda", seed=13)
    skip_unless_available(backend, inputs["x"], inputs["weight"])
    torch.backends.cudnn.allow_tf32 = True  # the autouse fixture restores it
    args = dict(inputs)
    out = pruned_conv(args.pop("x"), args.pop("weight"), args.pop("bias"), backend=backend, **args)
    expected = reference_call(as_float64_reference(inputs))
    err = (out.double() - expected).abs().max().item()
    assert err <= 5e-3 * expected.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_forward_and_backward_never_wait_on_the_device(backend, dtype):
    """The op's glue reads no tensor values on the host: torch's sync debug mode raises on any device->host
    synchronisation during a forward and backward (prologue and every epilogue term)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    inputs = make_inputs(CASES[2], dtype, "cuda", seed=17)
    skip_unless_available(backend, inputs["x"], inputs["weight"])
    leaves = list(differentiable(inputs).values())

    def step():
        args = dict(inputs)
        out = pruned_conv(args.pop("x"), args.pop("weight"), args.pop("bias"), backend=backend, **args)
        return torch.autograd.grad(out, leaves, torch.ones_like(out))

    step()  # compile and load once, outside the check
    torch.cuda.synchronize()
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        grads = step()
    finally:
        torch.cuda.set_sync_debug_mode(old)
    assert len(grads) == len(leaves) and all(bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_cpp_lower_instruction_sets_match(isa, monkeypatch):
    """Every ISA copy of the C++ micro-kernels (SAFEPRUNE_CPU_ISA forces a lower one) computes the same op."""
    skip_unless_available("cpp")
    case = CASES[1]
    inputs = make_inputs(case, torch.float32, "cpu", seed=3)
    monkeypatch.setenv("SAFEPRUNE_CPU_ISA", isa)
    args = dict(inputs)
    out = pruned_conv(args.pop("x"), args.pop("weight"), args.pop("bias"), backend="cpp", **args)
    leaves = differentiable(inputs)
    grads = torch.autograd.grad(out.sum(), list(leaves.values()))
    ref_inputs = as_float64_reference(inputs)
    expected = reference_call(ref_inputs)
    ref_grads = torch.autograd.grad(expected.sum(), list(differentiable(ref_inputs).values()))
    assert_close_rel(out, expected, torch.float32, f"output ({isa})")
    for name, grad, ref in zip(leaves, grads, ref_grads):
        assert_close_rel(grad, ref, torch.float32, f"grad {name} ({isa})")


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4]], ids=str)
def test_cpp_gradcheck_float64(case):
    skip_unless_available("cpp")
    small = Case(case.name, 1, min(case.c_in, 5), min(case.c_out, 4), 5, 6, case.k, case.stride, case.padding,
                 case.prologue, case.epilogue)
    inputs = make_inputs(small, torch.float64, "cpu", seed=11)
    leaves = differentiable(inputs)
    fixed = {k: v for k, v in inputs.items() if k not in leaves}

    def fn(*tensors):
        kw = dict(fixed, **dict(zip(leaves, tensors)))
        return pruned_conv(kw.pop("x"), kw.pop("weight"), kw.pop("bias", None), backend="cpp", **kw)

    assert torch.autograd.gradcheck(fn, tuple(leaves.values()), eps=1e-6, atol=1e-7)


def _op_args(inputs: dict, backend: str) -> tuple:
    d = {k: (v.detach().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
         for k, v in inputs.items()}
    return (d["x"], d["weight"], d.get("bias"), d["stride"], d["padding"], d.get("norm_scale"), d.get("norm_shift"),
            d.get("temb_bias"), d.get("residual"), d.get("out_scale", 1.0), backend)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_opcheck(backend):
    if backend != "reference":
        skip_unless_available(backend)
    inputs = make_inputs(Case("opcheck", 2, 7, 6, 6, 5, 3, 2, 1, prologue=True, epilogue=True), torch.float32, "cpu",
                         seed=5)
    args = _op_args(inputs, backend)
    torch.library.opcheck(torch.ops.safeprune.pruned_conv.default, args)
    # the backward op has no derivative of its own (double backward is not supported): plain tensors
    x, weight, norm_scale, norm_shift = (t.detach() for t in (args[0], args[1], args[5], args[6]))
    grad_out = torch.randn(2, 6, 3, 3)
    backward_args = (grad_out, x, weight, 2, 1, norm_scale, norm_shift, 0.75, True, True, backend)
    torch.library.opcheck(torch.ops.safeprune.pruned_conv_backward.default, backward_args)


def test_torch_compile_fullgraph_forward_and_backward():
    skip_unless_available("cpp")
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 3, padding=1)
    module = PrunedConv2d.from_conv(conv, backend="cpp")
    norm = nn.GroupNorm(4, 8)

    def block(x, temb, residual):
        scale, shift = groupnorm_scale_shift(x, 4, norm.weight, norm.bias, norm.eps)
        return module(x, norm_scale=scale, norm_shift=shift, temb_bias=temb, residual=residual)

    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    temb, residual = torch.randn(2, 4), torch.randn(2, 4, 6, 6)
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(x, temb, residual)
    expected = block(x, temb, residual)
    torch.testing.assert_close(out, expected)
    (gx,) = torch.autograd.grad(out.square().sum(), [x])
    (ref_gx,) = torch.autograd.grad(expected.square().sum(), [x])
    torch.testing.assert_close(gx, ref_gx)


# ----------------------------------------------------------------------------------------------- the module
def test_pruned_conv2d_is_a_drop_in_for_conv2d_and_shares_its_parameters():
    torch.manual_seed(0)
    conv = nn.Conv2d(13, 11, 3, stride=2, padding=1)
    module = PrunedConv2d.from_conv(conv, backend="reference")
    assert module.weight is conv.weight and module.bias is conv.bias
    assert list(module.state_dict()) == list(conv.state_dict()) == ["weight", "bias"]
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
        assert getattr(module, attr) == getattr(conv, attr), attr
    x = torch.randn(2, 13, 9, 10)
    torch.testing.assert_close(module(x), conv(x))
    module(x).sum().backward()
    grad = conv.weight.grad.clone()
    conv.weight.grad = None
    conv(x).sum().backward()
    torch.testing.assert_close(grad, conv.weight.grad)


def test_pruned_conv2d_rejects_bad_inputs_and_unsupported_convs():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    with pytest.raises(SafepruneError, match="groups=2"):
        PrunedConv2d.from_conv(nn.Conv2d(8, 8, 3, groups=2))
    with pytest.raises(SafepruneError, match="dilation"):
        PrunedConv2d.from_conv(nn.Conv2d(8, 8, 3, dilation=2))
    with pytest.raises(SafepruneError, match=r"x must be \[N, 8, H, W\]"):
        PrunedConv2d.from_conv(conv)(torch.randn(1, 4, 5, 5))
    with pytest.raises(SafepruneError, match="backend argument is 'fast'"):
        pruned_conv(torch.randn(1, 8, 5, 5), conv.weight, backend="fast")


def test_groupnorm_scale_shift_is_groupnorm():
    torch.manual_seed(2)
    x = torch.randn(2, 12, 5, 7, dtype=torch.float64) * 3 + 1
    norm = nn.GroupNorm(4, 12, eps=1e-6).double()
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    scale, shift = groupnorm_scale_shift(x, 4, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(x * scale[:, :, None, None] + shift[:, :, None, None], norm(x))
    # the statistics' hand-written backward
    xs = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t, w, b: groupnorm_scale_shift(t, 4, w, b, 1e-6),
                                    (xs[:1, :, :3, :4].detach().requires_grad_(), norm.weight, norm.bias))
    assert torch.autograd.gradcheck(lambda t: groupnorm_scale_shift(t, 4, None, None, 1e-6)[1],
                                    (xs[:1, :, :3, :4].detach().requires_grad_(),))


def test_prologue_equals_groupnorm_silu_then_conv():
    """The fused form of diffusers' norm -> SiLU -> conv, with padding applied after the activation."""
    torch.manual_seed(3)
    norm, conv = nn.GroupNorm(4, 16), nn.Conv2d(16, 8, 3, padding=1)
    nn.init.normal_(norm.bias)  # silu(shift) != 0 would show up at the border if padding came first
    x = torch.randn(2, 16, 6, 6)
    scale, shift = groupnorm_scale_shift(x, 4, norm.weight, norm.bias, norm.eps)
    for backend in ("reference", "cpp"):
        if dispatch.available_backends(OP, x, conv.weight)[backend]:
            continue
        out = pruned_conv(x, conv.weight, conv.bias, padding=1, norm_scale=scale, norm_shift=shift, backend=backend)
        torch.testing.assert_close(out, conv(F.silu(norm(x))), atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------- dispatch
def _on_cuda(*shapes, dtype=torch.float32):
    """Inputs on a CUDA device as the dispatcher sees them (device, dtype, shape), without a GPU: fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return [torch.empty(shape, dtype=dtype, device="cuda") for shape in shapes]


def _declare_built(monkeypatch, *names):
    """Declare the named GPU backends built and a device visible (this machine may have neither): what remains
    is what the inputs decide."""
    backends = dispatch._backends(OP)
    for name in names:
        monkeypatch.setattr(type(backends[name]), "static_reasons", lambda self: [])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_cuda_inputs_get_a_cuda_capable_backend_without_cpu_derived_skips(dtype, monkeypatch):
    """The cpp skip (slower than oneDNN, a CPU measurement) must not reach CUDA inputs: auto picks the CUDA conv
    when it is built, else Triton, never the reference for these inputs (fp32 under torch's default TF32)."""
    torch.backends.cudnn.allow_tf32 = True  # torch's default; the autouse fixture restores the test setting
    backends = dispatch._backends(OP)
    assert list(dispatch.available_backends(OP)) == ["cuda", "triton", "cpp", "reference"]
    x, w, temb = _on_cuda((2, 5, 7, 7), (6, 5, 3, 3), (2, 6), dtype=dtype)
    assert x.device.type == "cuda"
    for name in ("cuda", "triton"):
        assert backends[name].auto_skip_reasons(x, w) == [], name
        assert backends[name].auto_skip_reasons(x, w, None, 1, 1, None, None, temb) == [], name
    # the only things that can keep auto from a GPU kernel hold for any input: not built, no device
    assert backends["cuda"].not_supported_reasons(x, w) == backends["cuda"].static_reasons()
    assert backends["triton"].not_supported_reasons(x, w) == backends["triton"].static_reasons()
    assert any("tensors on cuda, needs cpu" in r for r in dispatch.available_backends(OP, x, w)["cpp"])
    _declare_built(monkeypatch, "cuda", "triton")
    assert dispatch.choose(OP, x, w).name == "cuda"
    assert dispatch.choose(OP, x, w, backend="auto").name == "cuda"
    # the backward's choice (grad_out as a keyword) is the same
    assert dispatch.choose(OP, x, w, grad_out=_on_cuda((2, 6, 7, 7), dtype=dtype)[0]).name == "cuda"
    monkeypatch.setattr(type(backends["cuda"]), "static_reasons", lambda self: ["not built"])
    assert dispatch.choose(OP, x, w).name == "triton"


def test_fp32_on_gpu_without_tf32_goes_to_cudnn_under_auto(monkeypatch):
    """fp32 CUDA inputs: the GPU kernels use TF32 when torch lets cuDNN's convs use it; when it does not, their
    exact fp32 products (no tensor cores) are not chosen by auto, the reference (cuDNN) runs. Forcing still runs
    them, and half-precision inputs are unaffected."""
    backends = dispatch._backends(OP)
    _declare_built(monkeypatch, "cuda", "triton")
    x, w = _on_cuda((1, 4, 6, 6), (8, 4, 3, 3))
    xb, wb = _on_cuda((1, 4, 6, 6), (8, 4, 3, 3), dtype=torch.bfloat16)

    torch.backends.cudnn.allow_tf32 = False  # (the autouse fixture restores it)
    for name in ("cuda", "triton"):
        skip = backends[name].auto_skip_reasons(x, w)
        assert len(skip) == 1 and "TF32" in skip[0] and "cudnn.allow_tf32" in skip[0], (name, skip)
        assert backends[name].auto_skip_reasons(xb, wb) == [], name
        assert dispatch.choose(OP, x, w, backend=name).name == name  # forced: runs the exact path
    assert dispatch.choose(OP, x, w).name == "reference"
    assert dispatch.choose(OP, x, w, grad_out=_on_cuda((1, 8, 6, 6))[0]).name == "reference"
    assert dispatch.choose(OP, xb, wb).name == "cuda"
    # CPU fp32 is not the GPU rule's business (cpp keeps its own measured reason, triton never runs under auto)
    assert backends["triton"].auto_skip_reasons(torch.randn(1, 4, 6, 6), torch.randn(8, 4, 3, 3)) == []

    torch.backends.cudnn.allow_tf32 = True
    assert backends["cuda"].auto_skip_reasons(x, w) == backends["triton"].auto_skip_reasons(x, w) == []
    assert dispatch.choose(OP, x, w).name == "cuda"
    # the switch is cuDNN's (convolutions), not the matmul one
    old_matmul = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert dispatch.choose(OP, x, w).name == "cuda"
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = True
        assert dispatch.choose(OP, x, w).name == "reference"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_matmul


def test_auto_skips_the_cpp_conv_only_on_cpu(monkeypatch):
    cpp = dispatch._backends(OP)["cpp"]
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3)
    table = dispatch.available_backends(OP, x, w)
    assert any("cuda" in r for r in table["cuda"])
    skip = cpp.auto_skip_reasons(x, w)
    assert len(skip) == 1 and "slower than torch's oneDNN conv" in skip[0] and "measured" in skip[0]
    assert dispatch.choose(OP, x, w).name == "reference"
    if not table["cpp"]:
        assert dispatch.choose(OP, x, w, backend="cpp").name == "cpp"
    assert dispatch.choose(OP, x, w, backend="off").name == "reference"
    with pytest.raises(SafepruneError, match="backend 'cuda' cannot run op 'pruned_conv'"):
        pruned_conv(x, w, padding=1, backend="cuda")
    x64, w64 = x.double(), w.double()
    assert any("float64" in r for r in dispatch.available_backends(OP, x64, w64)["triton"])
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    torch.testing.assert_close(pruned_conv(x, w, padding=1), F.conv2d(x, w, padding=1))


@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "groupnorm-silu-prologue"])
def test_autocast_bf16_input_with_fp32_weight_matches_torch_autocast(prologue):
    """Mixed precision training: a bf16 activation meets the fp32 master weight under autocast. The op computes in
    bf16 like torch's autocast conv, gives x's gradient in bf16 and the weight's in fp32 (a dtype mismatch used to
    crash the weight-gradient scatter)."""
    from torch.nn import functional as F

    from safeprune_engine.ops.pruned_conv import pruned_conv

    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 6, 9, 9, generator=gen).bfloat16()
    weight = torch.randn(5, 6, 3, 3, generator=gen) * 0.2
    bias = torch.randn(5, generator=gen)
    scale, shift = torch.rand(2, 6, generator=gen) + 0.5, torch.randn(2, 6, generator=gen) * 0.1
    upstream = torch.randn(2, 5, 9, 9, generator=gen)

    def run(use_op):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, weight, bias))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if use_op:
                out = pruned_conv(xs, ws, bs, padding=1, norm_scale=scale if prologue else None,
                                  norm_shift=shift if prologue else None)
            else:
                a = xs
                if prologue:  # fp32 prologue rounded to bf16, as the op defines it
                    a = F.silu(xs.float() * scale[:, :, None, None] + shift[:, :, None, None]).bfloat16()
                out = F.conv2d(a, ws, bs, padding=1)
        (out.float() * upstream).sum().backward()
        return out, xs.grad, ws.grad, bs.grad

    ours, theirs = run(True), run(False)
    assert ours[0].dtype == theirs[0].dtype == torch.bfloat16
    assert ours[1].dtype == torch.bfloat16 and ours[2].dtype == ours[3].dtype == torch.float32
    for mine, ref in zip(ours, theirs):
        torch.testing.assert_close(mine.float(), ref.float(), atol=0.1, rtol=2e-2)
