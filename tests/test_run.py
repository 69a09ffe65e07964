"""The run layer's promises to an API caller: the teacher and student objects it passes come back exactly as they
were (weights, dtypes, devices, flags, hooks, module classes), and a run without a teacher is refused clearly."""
import pytest
import torch

from safeprune_engine.config import RunConfig
from safeprune_engine.errors import SafepruneError

CAPTIONS = ["a red square", "a blue square", "a green square", "a yellow square"] * 2
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_state_dict_hooks", "_load_state_dict_pre_hooks")


def plain_attributes(module) -> dict:
    """The module's own scalar attributes (training, gradient checkpointing, ...) and the names of all of them: a
    patched forward or a patch record shows up as a new instance attribute."""
    values = {k: v for k, v in vars(module).items() if isinstance(v, (bool, int, float, str, type(None)))}
    return {"names": sorted(vars(module)), "values": values}


def state_of(root: torch.nn.Module) -> dict:
    """Everything about a module tree that a run could change, with tensors copied bit for bit."""
    modules = {}
    for name, module in root.named_modules():
        modules[name] = {
            "class": type(module),
            "training": module.training,
            "attributes": plain_attributes(module),
            "hooks": {d: [(k, id(h)) for k, h in getattr(module, d, {}).items()] for d in HOOK_DICTS},
        }
    tensors = {}
    for name, tensor in list(root.named_parameters()) + list(root.named_buffers()):
        tensors[name] = {
            "id": id(tensor), "dtype": tensor.dtype, "device": tensor.device, "shape": tuple(tensor.shape),
            "stride": tensor.stride(), "requires_grad": tensor.requires_grad, "grad": tensor.grad is not None,
            "bytes": tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).clone(),
        }
    return {"modules": modules, "tensors": tensors}


def assert_same_state(before: dict, after: dict, what: str) -> None:
    assert before["tensors"].keys() == after["tensors"].keys(), f"{what}: parameters or buffers added or removed"
    for name, state in before["tensors"].items():
        now = after["tensors"][name]
        assert torch.equal(now["bytes"], state["bytes"]), f"{what}: the bits of {name} changed"
        for key in ("id", "dtype", "device", "shape", "stride", "requires_grad", "grad"):
            assert now[key] == state[key], f"{what}: {name} {key} {state[key]} -> {now[key]}"
    assert before["modules"].keys() == after["modules"].keys(), f"{what}: submodules added or removed"
    for name, state in before["modules"].items():
        assert after["modules"][name] == state, f"{what}: module {name!r} changed"


# bf16 casts the teacher to bf16 (rounding its weights), --kernels patches both UNets' forwards, --channels-last
# changes strides, and training changes the student: all of it must happen to the run's copies.
@pytest.mark.parametrize("precision,kernels", [("bf16", "off"), ("bf16", "auto")])
def test_train_leaves_the_callers_teacher_and_student_exactly_as_they_were(tmp_path, precision, kernels):
    from safeprune_engine.models.teacher import bundle_from_pipeline
    from safeprune_engine.prune.width import prune
    from safeprune_engine.run import train
    from safeprune_engine.testing import tiny_pipeline, write_image_folder

    teacher = bundle_from_pipeline(tiny_pipeline(seed=int(torch.randint(0, 1000, ()))))
    student, _ = prune(teacher.unet, ratio=0.5)
    student.eval()  # a state the run must not switch (it trains its copy in training mode)
    student.conv_out.weight.requires_grad_(False)
    hook = student.conv_in.register_forward_hook(lambda *_: None)  # the caller's own hook stays, and only it
    data = write_image_folder(tmp_path / "data", CAPTIONS, size=16)
    parts = {"teacher.unet": teacher.unet, "teacher.vae": teacher.vae, "teacher.text_encoder": teacher.text_encoder,
             "student": student}
    before = {name: state_of(module) for name, module in parts.items()}

    config = RunConfig(teacher="in-memory", data=str(data), out=str(tmp_path / "run"), erase=["by monet"],
                       method="bilevel", steps=2, bilevel_inner_steps=1, batch_size=2, resolution=16,
                       esd_pool_size=2, esd_ddim_steps=2, progress=False, lr=1e-3, mixed_precision=precision,
                       kernels=kernels, channels_last=True, device="cpu")
    result = train(config, teacher=teacher, student=student)

    for name, module in parts.items():
        assert_same_state(before[name], state_of(module), name)
    hook.remove()
    # the run trained (and hands back) its own copies
    assert result.teacher is teacher
    assert result.student is not student and result.teacher_unet is not teacher.unet
    trained = dict(result.student.named_parameters())
    assert any(not torch.equal(trained[n], p) for n, p in student.named_parameters())
    assert next(result.teacher_unet.parameters()).dtype == torch.float32  # released back to fp32 after training


def test_a_student_pruned_from_a_bf16_teacher_trains_in_fp32(tmp_path):
    """A teacher loaded in bf16 to fit memory: the pruned student's weights (and optimizer) are fp32, the teacher
    pass stays bf16 (--teacher-dtype)."""
    from safeprune_engine.models.teacher import bundle_from_pipeline
    from safeprune_engine.run import train
    from safeprune_engine.testing import tiny_pipeline, write_image_folder

    teacher = bundle_from_pipeline(tiny_pipeline(seed=0).to(dtype=torch.bfloat16))
    data = write_image_folder(tmp_path / "data", CAPTIONS, size=16)
    config = RunConfig(teacher="in-memory", data=str(data), out=str(tmp_path / "run"), erase=["by monet"],
                       method="bilevel", steps=2, batch_size=2, resolution=16, esd_pool_size=2, esd_ddim_steps=2,
                       progress=False, lr=1e-3, teacher_dtype="bf16", prune_ratio=0.5, device="cpu", log_every=1)
    result = train(config, teacher=teacher)
    assert {p.dtype for p in result.student.parameters()} == {torch.float32}
    assert next(teacher.unet.parameters()).dtype == torch.bfloat16
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in result.history)


def test_train_without_a_teacher_says_where_the_builtin_default_is(tmp_path):
    from safeprune_engine.run import train

    out = tmp_path / "run"
    with pytest.raises(SafepruneError, match=r"no teacher.*--teacher.*safeprune run.*toy\.run_default"):
        train(RunConfig(out=str(out)))
    assert not out.exists()


def test_the_run_package_is_also_the_api_function(tmp_path):
    """`safeprune_engine.run` was the API's alias of train before the run layer took the name: it stays callable."""
    import safeprune_engine as sp
    import safeprune_engine.run

    assert sp.run is safeprune_engine.run and callable(sp.run)
    with pytest.raises(SafepruneError, match="no teacher"):
        sp.run(RunConfig(out=str(tmp_path / "a")))
    with pytest.raises(SafepruneError, match="no teacher"):
        sp.train(out=str(tmp_path / "b"))


def test_builtin_default_runs_under_the_launcher(tmp_path, monkeypatch):
    """The built-in default fills in its settings before it calls the run, so `safeprune run --launcher torchrun
    --nproc 2` without --teacher starts ranks that load and prune the shipped teacher themselves (it used to pass
    its in-memory teacher to train(), which --launcher refuses)."""
    import json

    from safeprune_engine.toy.default_run import run_default

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "default"
    run_default(RunConfig(out=str(out), progress=False, launcher="torchrun", nproc=2, steps=2, device="cpu"),
                methods=("distill-only",), eval_samples=1, eval_steps=2, finetune_images=24,
                explicit={"launcher", "nproc", "steps", "device"})
    summary = json.loads((out / "distill-only" / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["steps_run"] == 2
    checksums = summary["rank_weight_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert (out / "metrics.json").is_file()
