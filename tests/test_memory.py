"""Memory options in a single process: teacher dtype, gradient checkpointing, channels-last, 8-bit Adam states."""
import pytest
import torch

from safeprune_engine.bilevel.solvers import build_solver
from safeprune_engine.config import RunConfig
from safeprune_engine.data.imagefolder import ImageFolder
from safeprune_engine.memory import optimizer_factory, teacher_precision
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
    engine, solver = engine_and_solver(tmp_path, use_8bit_adam=True)
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
    # the factory is chosen per run: without --use-8bit-adam it builds torch AdamW
    plain = optimizer_factory(RunConfig(erase=["x"]))
    assert type(plain([torch.nn.Parameter(torch.zeros(3))], 1e-3)) is torch.optim.AdamW


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
