"""Memory options in a single process: teacher dtype, gradient checkpointing, channels-last, 8-bit Adam states."""
import io

import pytest
import torch

from safeprune_engine.bilevel.solvers import build_solver
from safeprune_engine.config import RunConfig
from safeprune_engine.data.imagefolder import ImageFolder
from safeprune_engine.memory import FactoredAdamW, optimizer_factory, teacher_precision
from safeprune_engine.models.teacher import bundle_from_pipeline
from safeprune_engine.prune.width import prune
from safeprune_engine.testing import tiny_pipeline, write_image_folder
from safeprune_engine.run.builder import build_engine

CAPTIONS = ["a red square", "a blue square", "a green square", "a yellow square"] * 2


def engine_and_solver(tmp_path, **overrides):
    teacher = bundle_from_pipeline(tiny_pipeline(seed=0))
    student, _ = prune(teacher.unet, ratio=0.5)
    folder = ImageFolder(write_image_folder(tmp_path / "data", CAPTIONS, size=16))
    settings = dict(out=str(tmp_path / "run"), erase=["by monet"], method="alternating", upper_every=2, batch_size=2,
                    resolution=16, steps=4, esd_pool_size=4, esd_ddim_steps=3, progress=False, lr=1e-3,
                    device="cpu")
    settings.update(overrides)
    config = RunConfig(**settings).validate()
    engine = build_engine(config, teacher, student, folder, tmp_path / "cache", latent_size=8, progress=False)
    return engine, build_solver(engine, config, optimizer_factory(config))


def run_steps(solver, steps=2):
    return [solver.step(i) for i in range(steps)]


def test_teacher_dtype_overrides_the_training_dtype(tmp_path):
    assert teacher_precision(RunConfig(mixed_precision="bf16")) == "bf16"
    assert teacher_precision(RunConfig(mixed_precision="bf16", teacher_dtype="fp32")) == "fp32"
    engine, solver = engine_and_solver(tmp_path, teacher_dtype="bf16")
    assert next(engine.teacher.parameters()).dtype == torch.bfloat16
    assert next(engine.student.parameters()).dtype == torch.float32  # the student keeps fp32 weights
    scalars = run_steps(solver)
    assert all(torch.isfinite(torch.tensor(list(s.values()))).all() for s in scalars)


def test_gradient_checkpointing_and_channels_last_keep_the_losses(tmp_path):
    plain_engine, plain = engine_and_solver(tmp_path / "plain")
    lean_engine, lean = engine_and_solver(tmp_path / "lean", gradient_checkpointing=True, channels_last=True)
    assert lean_engine.student.is_gradient_checkpointing and not plain_engine.student.is_gradient_checkpointing
    conv = lean_engine.student.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    for a, b in zip(run_steps(plain), run_steps(lean)):  # step 1 is an upper step: both gradients are covered
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    # Adam moves an element whose gradient is ~0 by +-lr on rounding noise alone, so compare shares, not maxima
    diff = torch.cat([(p - q).abs().reshape(-1) for p, q in zip(plain_engine.student.parameters(),
                                                                 lean_engine.student.parameters())])
    assert (diff > 1e-4).float().mean() < 1e-3 and diff.max() < 1e-2


def test_8bit_adam_solver_optimizers(tmp_path):
    pytest.importorskip("bitsandbytes")
    engine, solver = engine_and_solver(tmp_path, use_8bit_adam=True, outer_optimizer="adamw-8bit")
    assert {type(o).__name__ for o in solver.optimizers.values()} == {"AdamW8bit"}
    before = {n: p.detach().clone() for n, p in engine.student.named_parameters()}
    scalars = run_steps(solver)
    assert all(torch.isfinite(torch.tensor(list(s.values()))).all() for s in scalars)
    moved = [n for n, p in engine.student.named_parameters() if not torch.equal(before[n], p)]
    assert len(moved) > 0.9 * len(before)
    big = max(engine.student.parameters(), key=lambda p: p.numel())
    assert solver.optimizers["lower"].state[big]["state1"].dtype == torch.uint8
    state = solver.state_dict()  # a checkpoint of 8-bit states is tensors and plain values (weights_only loads)
    path = tmp_path / "state.pt"
    torch.save(state, path)
    assert torch.load(path, weights_only=True)["optimizers"]["lower"]["state"]
    # the factory is chosen per run and role: without --use-8bit-adam the lower role gets torch AdamW, and the
    # once-per-period outer role a compact optimizer whatever --use-8bit-adam says (8-bit here: bitsandbytes is in)
    plain = optimizer_factory(RunConfig(erase=["x"]))
    assert type(plain([torch.nn.Parameter(torch.zeros(3))], 1e-3)) is torch.optim.AdamW
    assert type(plain([torch.nn.Parameter(torch.zeros(3))], 1e-3, "outer")).__name__ == "AdamW8bit"
    for name, beta1 in (("factored", 0.9), ("factored-lean", 0.0)):
        made = optimizer_factory(RunConfig(erase=["x"], outer_optimizer=name))([torch.nn.Parameter(torch.zeros(3))],
                                                                               1e-3, "outer")
        assert type(made) is FactoredAdamW and made.defaults["beta1"] == beta1


def adam_reference(param, grads, lr, beta1, beta2=0.999, eps=1e-8, weight_decay=1e-2, clip=1.0):
    """The update FactoredAdamW approximates, written out with a full (unfactored) second moment and an fp32 first
    moment (beta1 = 0: no first moment, the update clipped to RMS <= clip)."""
    value, first, second = param.clone(), torch.zeros_like(param), torch.zeros_like(param)
    for step, grad in enumerate(grads, 1):
        second = beta2 * second + (1 - beta2) * grad * grad
        denom = (second / (1 - beta2 ** step)).sqrt() + eps
        if beta1 > 0:
            first = beta1 * first + (1 - beta1) * grad
            update = first / (1 - beta1 ** step) / denom
        else:
            update = grad / denom
            update = update / max(1.0, float(update.pow(2).mean().sqrt()) / clip)
        value = value * (1 - lr * weight_decay) - lr * update
    return value


@pytest.mark.parametrize("beta1", [0.0, 0.9])
@pytest.mark.parametrize("shape", [(7,), (6, 5), (8, 3, 3, 3)])
def test_factored_adamw_matches_its_definition(shape, beta1):
    """Where the squared gradients are rank one (|G| = a b^T, so row and column means determine them exactly), the
    factored second moment equals the full one and FactoredAdamW takes exactly Adam's steps (with an fp32 first
    moment here); vectors keep a full second moment always. The second-moment state is R + C numbers, not R x C;
    the default first moment is bfloat16, 2 bytes per parameter, and stays within bf16 rounding of the exact one."""
    torch.manual_seed(len(shape))
    rows, cols = shape[0], int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1
    magnitude = (torch.rand(rows, 1) + 0.1) * (torch.rand(1, cols) + 0.1)  # rank one, positive
    grads = [(magnitude * torch.randn(rows, cols).sign()).reshape(shape) * 10 ** -k for k in range(3)]
    start = torch.randn(shape)
    expected = adam_reference(start, grads, lr=1e-2, beta1=beta1)
    for dtype, tolerance in ((torch.float32, 1e-6), (torch.bfloat16, 1e-4)):
        param = torch.nn.Parameter(start.clone())
        optimizer = FactoredAdamW([param], lr=1e-2, beta1=beta1, momentum_dtype=dtype)
        for grad in grads:
            param.grad = grad.clone()
            optimizer.step()
            assert torch.equal(param.grad, grad)  # the step leaves .grad as it was
        torch.testing.assert_close(param.detach(), expected, rtol=1e-5, atol=tolerance)
        state = optimizer.state[param]
        second_numbers = sum(t.numel() for k, t in state.items() if k.startswith("exp_avg_sq"))
        assert second_numbers == (rows if len(shape) == 1 else rows + cols)
        assert ("exp_avg" in state) == (beta1 > 0)
        if beta1 > 0:
            assert state["exp_avg"].dtype == dtype


def test_factored_adamw_trains_and_saves_memory():
    """A general (not rank-one) problem: it still minimises, with a state far below AdamW's, and its state dict is
    tensors that load with weights_only."""
    torch.manual_seed(0)
    target = torch.randn(64, 48)
    weight = torch.nn.Parameter(torch.zeros(64, 48))
    optimizer = FactoredAdamW([weight], lr=3e-2, weight_decay=0.0)  # bf16 first moment: 2 bytes per parameter
    start = float((weight - target).detach().pow(2).mean())
    for _ in range(200):
        optimizer.zero_grad()
        (weight - target).pow(2).mean().backward()
        optimizer.step()
    assert float((weight - target).detach().pow(2).mean()) < 0.05 * start
    state_bytes = sum(t.numel() * t.element_size() for t in optimizer.state[weight].values())
    # bf16 first moment + row and column means + the step count, against AdamW's two fp32 moments (8 bytes each)
    assert state_bytes == 2 * weight.numel() + 4 * (64 + 48) + 4 < 0.3 * 8 * weight.numel()
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    restored = FactoredAdamW([torch.nn.Parameter(weight.detach().clone())], lr=3e-2)
    restored.load_state_dict(torch.load(buffer, weights_only=True))


def test_export_dtype_casts_the_fp32_student(tmp_path):
    from safetensors.torch import load_file

    from safeprune_engine.run import train

    data = write_image_folder(tmp_path / "data", CAPTIONS, size=16)
    config = RunConfig(teacher="tiny", data=str(data), out=str(tmp_path / "run"), method="distill-only", steps=1,
                       batch_size=2, resolution=16, progress=False, export_dtype="bf16", channels_last=True)
    result = train(config, teacher=bundle_from_pipeline(tiny_pipeline(seed=0)))
    exported = load_file(result.pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")
    checkpoint = load_file(result.out_dir / "checkpoints" / "step-00000001" / "student" /
                           "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    assert {t.dtype for t in checkpoint.values()} == {torch.float32}  # checkpoints keep the fp32 weights
    assert all(torch.equal(exported[k], checkpoint[k].to(torch.bfloat16)) for k in exported)
