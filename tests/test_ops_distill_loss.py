"""Fused distillation loss: every backend against the reference and torch, forward and the student gradients,
pairs of different shapes with lower-precision teachers; gradcheck, opcheck, torch.compile."""
import pytest
import torch
import torch.nn.functional as F

from safeprune_engine.errors import SafepruneError
from safeprune_engine.ops import dispatch
from safeprune_engine.ops.distill_loss import distill_loss
from safeprune_engine.ops.groupnorm_silu import groupnorm_silu
from safeprune_engine.testing import TOLERANCES, kernel_backend_devices

OP = "distill_loss"
# feature-KD maps of a pruned UNet (odd widths), the output, a minimal and a non-aligned pair
SHAPES = [(2, 40, 5, 6), (2, 37, 3, 3), (2, 4, 8, 8), (1,), (3, 200, 7)]
WEIGHTS = [0.5, 1.0, 2.0, 0.25, 1.5]
# (student dtype, teacher dtype)
DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
          (torch.bfloat16, torch.bfloat16)]


def backend_or_skip(backend, *args):
    reasons = dispatch.available_backends(OP, *args).get(backend, ["not registered"])
    if reasons:
        pytest.skip(f"{backend} cannot run {OP} here: " + "; ".join(reasons))


def make_pairs(student_dtype, teacher_dtype, device, shapes=SHAPES, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    students, teachers = [], []
    for shape in shapes:
        t = torch.randn(shape, generator=g)
        s = t + 0.3 * torch.randn(shape, generator=g)
        s, t = s.to(student_dtype), t.to(teacher_dtype)
        if channels_last and len(shape) == 4:
            s, t = s.contiguous(memory_format=torch.channels_last), t.contiguous(memory_format=torch.channels_last)
        students.append(s.to(device))
        teachers.append(t.to(device))
    return students, teachers


def run(students, teachers, weights, backend, upstream=1.7):
    students = [s.detach().clone().requires_grad_() for s in students]
    loss = distill_loss(students, teachers, weights, backend=backend)
    (loss * upstream).backward()
    return loss.detach(), [s.grad for s in students]


def torch_truth(students, teachers, weights, upstream=1.7):
    s64 = [s.detach().double().requires_grad_() for s in students]
    loss = sum(w * F.mse_loss(s, t.double()) for s, t, w in zip(s64, teachers, weights))
    (loss * upstream).backward()
    return loss.detach(), [s.grad for s in s64]


def assert_close(got, want, student_dtype, teacher_dtype, what):
    # the loss is computed in float32 from (possibly rounded) inputs: float32 tolerance on the loss;
    # gradients are rounded to the student dtype
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(got[0].double(), want[0].double(), atol=atol, rtol=rtol, msg=lambda m: f"{what} loss: {m}")
    atol, rtol = TOLERANCES[student_dtype]
    for i, (g, w) in enumerate(zip(got[1], want[1])):
        assert g.dtype == student_dtype
        torch.testing.assert_close(g.double(), w.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what} grad {i}: {m}")


def test_reference_matches_torch():
    students, teachers = make_pairs(torch.float64, torch.float64, "cpu")
    got = run(students, teachers, WEIGHTS, "reference")
    want = torch_truth(students, teachers, WEIGHTS)
    torch.testing.assert_close(got[0], want[0], atol=1e-12, rtol=1e-10)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)


def _cases():
    cases = []
    for backend, device in kernel_backend_devices():
        for s_dtype, t_dtype in DTYPES:
            for channels_last in (False, True):
                cases.append(pytest.param(backend, device, s_dtype, t_dtype, channels_last,
                                          id=f"{backend}-{device}-{str(s_dtype)[6:]}-{str(t_dtype)[6:]}-"
                                             f"{'nhwc' if channels_last else 'nchw'}"))
    return cases


@pytest.mark.parametrize("backend,device,student_dtype,teacher_dtype,channels_last", _cases())
def test_backend_matches_reference(backend, device, student_dtype, teacher_dtype, channels_last):
    students, teachers = make_pairs(student_dtype, teacher_dtype, device, channels_last=channels_last)
    backend_or_skip(backend, students, teachers, WEIGHTS)
    got = run(students, teachers, WEIGHTS, backend)
    assert_close(got, run(students, teachers, WEIGHTS, "reference"), student_dtype, teacher_dtype, backend)
    assert_close(got, torch_truth(students, teachers, WEIGHTS), student_dtype, teacher_dtype, f"{backend} vs torch")
    for s, g in zip(students, got[1]):
        assert g.stride() == s.stride()  # gradients keep the students' layout


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_mixed_dtypes_and_layouts_in_one_call(backend):
    """Pairs with different dtypes, a transposed (non-dense-in-order) pair and an empty pair in one list."""
    g = torch.Generator().manual_seed(3)
    students = [torch.randn(2, 6, 5, generator=g), torch.randn(3, 4, generator=g).t(), torch.randn(0, 3),
                torch.randn(9, generator=g).to(torch.bfloat16)]
    teachers = [torch.randn(2, 6, 5, generator=g).to(torch.bfloat16), torch.randn(4, 3, generator=g),
                torch.randn(0, 3), torch.randn(9, generator=g).to(torch.bfloat16)]
    weights = [1.0, 0.5, 3.0, 2.0]
    backend_or_skip(backend, students, teachers, weights)
    got = run(students, teachers, weights, backend)
    want = run(students, teachers, weights, "reference")
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-4)
    for s, a, b in zip(students, got[1], want[1]):
        atol, rtol = TOLERANCES[s.dtype]
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def test_many_chunks_per_pair_are_summed_exactly():
    """A pair larger than one work chunk (the CPU path cuts every 32768 elements, Triton 16384 in the interpreter)."""
    students, teachers = make_pairs(torch.float32, torch.bfloat16, "cpu", shapes=[(3, 40, 33, 17), (5,)])
    for backend in ("cpp", "triton"):
        if dispatch.available_backends(OP, students, teachers, [1.0, 1.0])[backend]:
            continue
        assert_close(run(students, teachers, [1.0, 0.5], backend), torch_truth(students, teachers, [1.0, 0.5]),
                     torch.float32, torch.bfloat16, backend)


def test_gradcheck_cpp_float64():
    students, teachers = make_pairs(torch.float64, torch.float64, "cpu", shapes=[(2, 3, 2, 2), (3,)])
    backend_or_skip("cpp", students, teachers, [0.7, 1.3])
    inputs = tuple(s.requires_grad_() for s in students)
    assert torch.autograd.gradcheck(
        lambda a, b: distill_loss([a, b], teachers, [0.7, 1.3], backend="cpp"), inputs)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_opcheck(backend):
    students, teachers = make_pairs(torch.float32, torch.bfloat16, "cpu", shapes=[(2, 3, 4, 4), (5,)])
    backend_or_skip(backend, students, teachers, [1.0, 0.5])
    students = [s.requires_grad_() for s in students]
    torch.library.opcheck(torch.ops.safeprune.distill_loss.default, (students, teachers, [1.0, 0.5], backend))


def test_teacher_gets_no_gradient_and_errors_are_clear():
    students, teachers = make_pairs(torch.float32, torch.float32, "cpu", shapes=[(2, 3)])
    teacher = teachers[0].requires_grad_()
    student = students[0].requires_grad_()
    distill_loss([student], [teacher]).backward()
    assert teacher.grad is None and student.grad is not None
    with pytest.raises(SafepruneError, match="pair 0 has student shape"):
        distill_loss([torch.ones(2, 3)], [torch.ones(3, 2)])
    with pytest.raises(SafepruneError, match="1 students, 1 teachers and 2 weights"):
        distill_loss([torch.ones(2)], [torch.ones(2)], [1.0, 2.0])
    with pytest.raises(SafepruneError, match="backend 'cuda' cannot run op 'distill_loss'"):
        distill_loss([torch.ones(2)], [torch.ones(2)], backend="cuda")
    assert distill_loss([], []).item() == 0.0


def test_torch_compile_fullgraph_traces_both_ops():
    """torch.compile(fullgraph=True) goes through the custom ops (fake implementations) forward and backward."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 4, 4, generator=g, requires_grad=True)
    weight, bias = torch.randn(8, generator=g), torch.randn(8, generator=g)
    teacher_features = torch.randn(2, 8, 4, 4, generator=g).to(torch.bfloat16)
    teacher_out = torch.randn(2, 8, generator=g)

    def step(x):
        h = groupnorm_silu(x, 4, weight, bias, 1e-5)
        return distill_loss([h, h.mean(dim=(2, 3))], [teacher_features, teacher_out], [1.0, 0.5])

    eager = step(x)
    (eager_grad,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    (compiled_grad,) = torch.autograd.grad(compiled, x)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)


def test_torch_compile_inductor_fullgraph():
    """The default compiler (inductor) with the ops as opaque calls: same values and gradients as eager."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 8, 4, 4, generator=g, requires_grad=True)
    weight, bias = torch.randn(8, generator=g), torch.randn(8, generator=g)
    teacher = torch.randn(2, 8, 4, 4, generator=g).to(torch.bfloat16)

    def step(x):
        return distill_loss([groupnorm_silu(x * 2, 4, weight, bias, 1e-5)], [teacher], [0.5])

    eager = step(x)
    (eager_grad,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(step, fullgraph=True)(x)
    (compiled_grad,) = torch.autograd.grad(compiled, x)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)


@pytest.mark.parametrize("backend,device", kernel_backend_devices())
def test_more_pairs_than_one_cuda_launch_holds(backend, device):
    """70 pairs (empty ones between): the CUDA backend passes its pair table as launch arguments, 32 pairs per
    launch, so this spans three launches whose partials land at the right offsets; other backends must agree."""
    g = torch.Generator().manual_seed(9)
    shapes = [(0,) if i % 17 == 5 else (1 + (i * 37) % 300,) for i in range(70)]
    shapes[40] = (9000,)  # more than one CUDA chunk (8192) inside a later launch
    students, teachers = make_pairs(torch.float32, torch.bfloat16, device, shapes=shapes, seed=4)
    weights = [0.1 + torch.rand((), generator=g).item() for _ in shapes]
    backend_or_skip(backend, students, teachers, weights)
    loss, grads = run(students, teachers, weights, backend)
    kept = [i for i, s in enumerate(students) if s.numel()]  # empty pairs add 0 (torch's mse of nothing is nan)
    want = torch_truth([students[i] for i in kept], [teachers[i] for i in kept], [weights[i] for i in kept])
    assert_close((loss, [grads[i] for i in kept]), want, torch.float32, torch.bfloat16, backend)
    assert all(grads[i].shape == (0,) for i in range(len(shapes)) if i not in kept)
