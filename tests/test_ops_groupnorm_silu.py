"""GroupNorm + SiLU: every backend against the reference (the definition) and torch itself, forward and every
gradient, NCHW and channels_last, each dtype; gradcheck, opcheck, torch.compile."""
import pytest
import torch
import torch.nn.functional as F

from safeprune_engine.errors import SafepruneError
from safeprune_engine.ops import dispatch, native
from safeprune_engine.ops.groupnorm_silu import groupnorm_silu
from safeprune_engine.testing import TOLERANCES, kernel_backend_devices

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

OP = "groupnorm_silu"
# (shape, groups): minimal, odd pruned widths (37 with G=1, 40/G=8, 200/G=25), SD-1.5 block shapes scaled down
SHAPES = [
    ((1, 1, 1, 3), 1),
    ((3, 1, 1, 1), 1),  # one value per group: variance 0
    ((2, 40, 5, 6), 8),
    ((1, 37, 7, 5), 1),
    ((2, 200, 3, 3), 25),
    ((2, 64, 8, 8), 32),
    ((1, 320, 4, 4), 32),
]
LOW_PRECISION = [torch.float16, torch.bfloat16]


def make_inputs(shape, dtype, device, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 1.7 + 0.3).to(dtype)
    weight = (torch.randn(shape[1], generator=g) * 0.5 + 1).to(dtype)
    bias = (torch.randn(shape[1], generator=g) * 0.3).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(device), weight.to(device), bias.to(device), dy.to(device)


def run(x, groups, weight, bias, dy, backend):
    """Output and gradients (dx, dweight, dbias) of one backend under the upstream gradient dy."""
    x, weight, bias = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    y = groupnorm_silu(x, groups, weight, bias, 1e-5, backend=backend)
    y.backward(dy)
    return y.detach(), x.grad, weight.grad, bias.grad


def backend_or_skip(backend, *args):
    """Skip, with the dispatcher's reasons, where `backend` cannot run these arguments here."""
    reasons = dispatch.available_backends(OP, *args).get(backend, ["not registered"])
    if reasons:
        pytest.skip(f"{backend} cannot run {OP} here: " + "; ".join(reasons))


def _torch64(x, groups, weight, bias, dy):
    """torch's own GroupNorm + SiLU in float64 on the same (rounded) inputs."""
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    y = F.silu(F.group_norm(x64, groups, w64, b64, 1e-5))
    y.backward(dy.double())
    return y.detach(), x64.grad, w64.grad, b64.grad


def assert_all_close(got, want, dtype, what):
    atol, rtol = TOLERANCES[dtype]
    for name, g, w in zip(("y", "dx", "dweight", "dbias"), got, want):
        torch.testing.assert_close(g.double(), w.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what} {name}: {m}")


# ---- the reference against torch ----------------------------------------------------------------------------
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,groups", SHAPES, ids=[f"{s}g{g}" for s, g in SHAPES])
def test_reference_matches_torch_in_float64(shape, groups, channels_last):
    x, w, b, dy = make_inputs(shape, torch.float64, "cpu", channels_last)
    assert_all_close(run(x, groups, w, b, dy, "reference"), _torch64(x, groups, w, b, dy), torch.float64, "reference")


# ---- every fast backend against the reference ---------------------------------------------------------------
def _cases():
    cases = []
    for backend, device in kernel_backend_devices():
        interpreted = backend == "triton" and device == "cpu"  # the interpreter's cost grows with programs
        for shape, groups in ([s for s in SHAPES if s[0] != (2, 64, 8, 8)] if interpreted else SHAPES):
            for channels_last in (False, True):
                cases.append(pytest.param(backend, device, shape, groups, channels_last, torch.float32,
                                          id=f"{backend}-{device}-{shape}g{groups}-{'nhwc' if channels_last else 'nchw'}-fp32"))
        # low precision: two shapes each layout (one under the interpreter)
        for shape, groups in (((2, 40, 5, 6), 8),) + (() if interpreted else (((2, 64, 8, 8), 32),)):
            for channels_last in (False, True):
                for dtype in LOW_PRECISION:
                    cases.append(pytest.param(backend, device, shape, groups, channels_last, dtype,
                                              id=f"{backend}-{device}-{shape}g{groups}-"
                                                 f"{'nhwc' if channels_last else 'nchw'}-{str(dtype)[6:]}"))
    return cases


@pytest.mark.parametrize("backend,device,shape,groups,channels_last,dtype", _cases())
def test_backend_matches_reference(backend, device, shape, groups, channels_last, dtype):
    x, w, b, dy = make_inputs(shape, dtype, device, channels_last, seed=sum(shape) + channels_last)
    backend_or_skip(backend, x, groups, w, b)
    got = run(x, groups, w, b, dy, backend)
    assert_all_close(got, run(x, groups, w, b, dy, "reference"), dtype, backend)
    assert got[0].dtype == dtype and got[0].stride() == x.stride()  # output keeps x's dtype and layout
    assert got[1].stride() == x.stride()
    if dtype == torch.float32:  # and the definition itself is torch's GroupNorm + SiLU
        assert_all_close(got, _torch64(x, groups, w, b, dy), dtype, f"{backend} vs torch")


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_every_cpu_instruction_set_copy(isa, monkeypatch):
    """The C++ library carries one kernel copy per instruction set; each must agree with the reference."""
    x, w, b, dy = make_inputs((2, 40, 5, 6), torch.float32, "cpu", False)
    backend_or_skip("cpp", x, 8, w, b)
    monkeypatch.setenv("SAFEPRUNE_CPU_ISA", isa)
    used = torch.ops.safeprune_C.cpu_isa()
    assert used in ("generic", "avx2", "avx512") and (used == isa or isa != "generic")
    for channels_last in (False, True):
        x, w, b, dy = make_inputs((2, 40, 5, 6), torch.float32, "cpu", channels_last)
        assert_all_close(run(x, 8, w, b, dy, "cpp"), run(x, 8, w, b, dy, "reference"), torch.float32, isa)


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_every_cpu_copy_where_the_sigmoid_saturates(isa, monkeypatch):
    """Pre-activations far beyond the sigmoid's clamp (|z| up to ~150): silu is z or 0 there, its slope 1 or 0."""
    x, _, _, dy = make_inputs((2, 40, 5, 6), torch.float32, "cpu", False, seed=3)
    w = torch.linspace(-60.0, 60.0, 40)
    b = torch.linspace(-40.0, 40.0, 40).flip(0)
    backend_or_skip("cpp", x, 8, w, b)
    monkeypatch.setenv("SAFEPRUNE_CPU_ISA", isa)
    got, want = run(x, 8, w, b, dy, "cpp"), run(x, 8, w, b, dy, "reference")
    assert got[0].abs().max() > 100 and (got[0] < 0).any()  # the saturated region is really reached
    assert_all_close(got, want, torch.float32, f"{isa} saturated")


def test_float32_weights_with_low_precision_input():
    """Mixed precision: bf16 activations with the float32 GroupNorm parameters a float32 model keeps."""
    x, w, b, dy = make_inputs((2, 40, 5, 6), torch.bfloat16, "cpu", False)
    w, b = w.float(), b.float()
    for backend in ("cpp", "reference"):
        if dispatch.available_backends(OP, x, 8, w, b)[backend]:
            continue
        y, dx, dw, db = run(x, 8, w, b, dy, backend)
        assert y.dtype == torch.bfloat16 and dw.dtype == torch.float32 and db.dtype == torch.float32
        assert_all_close((y, dx, dw, db), _torch64(x, 8, w, b, dy), torch.bfloat16, backend)


# ---- gradcheck, opcheck, compile ----------------------------------------------------------------------------
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gradcheck_cpp_float64(channels_last):
    x, w, b, _ = make_inputs((2, 6, 3, 4), torch.float64, "cpu", channels_last)
    backend_or_skip("cpp", x, 3, w, b)
    inputs = tuple(t.detach().requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda x_, w_, b_: groupnorm_silu(x_, 3, w_, b_, 1e-5, backend="cpp"), inputs)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_opcheck(backend):
    x, w, b, _ = make_inputs((2, 8, 3, 3), torch.float32, "cpu", False)
    backend_or_skip(backend, x, 4, w, b)
    for x_ in (x, x.contiguous(memory_format=torch.channels_last)):
        args = (x_.requires_grad_(), 4, w.requires_grad_(), b.requires_grad_(), 1e-5, backend)
        torch.library.opcheck(torch.ops.safeprune.groupnorm_silu.default, args)


# ---- dispatch and errors --------------------------------------------------------------------------------------
def test_static_auto_rule_picks_cpp_on_cpu_when_built(monkeypatch):
    """Without timing (SAFEPRUNE_AUTOTUNE=0; tests/test_autotune.py covers the measured choice)."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setenv("SAFEPRUNE_AUTOTUNE", "0")
    x, w, b, _ = make_inputs((1, 8, 2, 2), torch.float32, "cpu", False)
    expected = "cpp" if not native.cpu_reasons() else "reference"  # never the Triton interpreter
    assert dispatch.choose(OP, x, 4, w, b).name == expected


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_auto_passes_over_a_cpu_copy_slower_than_torch(isa, monkeypatch):
    """The generic copy is slower than torch's AVX-512 kernels (measured), the avx2/avx512 copies are faster: auto
    picks the reference for the first only when it cannot time them (SAFEPRUNE_AUTOTUNE=0); backend="cpp" still
    runs every copy."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setenv("SAFEPRUNE_AUTOTUNE", "0")
    x, w, b, dy = make_inputs((1, 8, 2, 2), torch.float32, "cpu", False)
    backend_or_skip("cpp", x, 4, w, b)
    monkeypatch.setenv("SAFEPRUNE_CPU_ISA", isa)
    used, capability = native.cpu_isa(), torch.backends.cpu.get_cpu_capability()
    if used != isa:
        pytest.skip(f"this CPU has no {isa} (the kernels use {used})")
    slower = used == "generic" and capability.startswith("AVX512")
    cpp = dispatch.choose(OP, x, 4, w, b, backend="cpp")
    reasons = cpp.auto_skip_reasons(x, 4, w, b)
    assert bool(reasons) == slower
    assert dispatch.choose(OP, x, 4, w, b).name == ("reference" if slower else "cpp")
    if slower:
        assert "generic copy" in reasons[0] and capability in reasons[0]
    assert_all_close(run(x, 4, w, b, dy, "cpp"), run(x, 4, w, b, dy, "reference"), torch.float32, isa)


def test_forced_cuda_on_cpu_raises_with_reasons():
    x, w, b, _ = make_inputs((1, 8, 2, 2), torch.float32, "cpu", False)
    with pytest.raises(SafepruneError, match="backend 'cuda' cannot run op 'groupnorm_silu'.*tensors on cpu"):
        groupnorm_silu(x, 4, w, b, backend="cuda")


@pytest.mark.parametrize("bad", ["groups", "weight", "dtype"])
def test_bad_arguments_are_clear_errors(bad):
    x, w, b, _ = make_inputs((1, 8, 2, 2), torch.float32, "cpu", False)
    with pytest.raises(SafepruneError, match={"groups": "must divide the 8 channels", "weight": "weight must have shape",
                                              "dtype": "floating-point"}[bad]):
        if bad == "groups":
            groupnorm_silu(x, 3, w, b)
        elif bad == "weight":
            groupnorm_silu(x, 4, w[:5], b)
        else:
            groupnorm_silu(x.to(torch.int32), 4, w, b)


def test_default_affine_parameters():
    x, _, _, _ = make_inputs((2, 8, 3, 3), torch.float32, "cpu", False)
    torch.testing.assert_close(groupnorm_silu(x, 4), F.silu(F.group_norm(x, 4)), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_environment_variable_forces_the_reference(device, monkeypatch):
    x, w, b, _ = make_inputs((1, 8, 2, 2), torch.float32, device, False)
    monkeypatch.setenv(dispatch.ENV_VAR, "off")
    assert dispatch.choose(OP, x, 4, w, b).name == "reference"
