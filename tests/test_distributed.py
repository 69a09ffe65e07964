"""Multi-rank training for real: 2 ranks over gloo on loopback (torchrun), DeepSpeed ZeRO-2/-3 students, a ZeRO-3
teacher, data parallelism, 8-bit Adam and an int8 teacher; plus the pieces they are made of, in one process.

The multi-rank runs are few and short: one CLI launch (ZeRO-2 against a single-process run of the same global
batch), one launch that runs four scenarios in the same two ranks, and one single-rank resume of a 2-rank
checkpoint. DeepSpeed JIT-builds its shm op once into .torch_extensions (kept between runs).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safeprune_engine.config import RunConfig
from safeprune_engine.errors import SafepruneError

ROOT = Path(__file__).resolve().parent.parent
CAPTIONS = ["a red square", "a blue square", "a green square", "a yellow square"] * 2
RUN = ["--erase", "by monet", "--prune-ratio", "0.5", "--resolution", "16", "--batch-size", "4", "--esd-pool-size", "4",
       "--esd-ddim-steps", "3", "--bilevel-inner-steps", "1", "--no-progress", "--lr", "1e-3", "--log-every", "1",
       # the single-process default (factored) cannot run on ZeRO's flat partitions: one optimizer for both sides
       "--outer-optimizer", "adamw"]


def rank_env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               OMP_WAIT_POLICY="PASSIVE")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))  # DeepSpeed's shm op, built once
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_cli(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "safeprune_engine.cli", "run", *args], env=rank_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from safeprune_engine.testing import save_tiny_pipeline, write_image_folder

    root = tmp_path_factory.mktemp("dist-world")
    return {"teacher": str(save_tiny_pipeline(root / "teacher", seed=0)),
            "data": str(write_image_folder(root / "data", CAPTIONS, size=16)), "root": root}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")


def history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "summary.json").read_text())["history"]


def assert_close_weights(a: dict, b: dict, share: float = 1e-3, atol: float = 1e-4, max_abs: float = 0.05):
    """Adam normalises each gradient element, so an element whose gradient is ~0 moves by +-lr on rounding noise:
    a few elements may differ by a few lr; all but `share` of them must agree to atol."""
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k].float() - b[k].float()).abs().reshape(-1) for k in a])
    assert (diff > atol).float().mean().item() <= share, f"{(diff > atol).sum().item()} of {diff.numel()} differ"
    assert diff.max().item() <= max_abs


def assert_losses_match(got: list[dict], want: list[dict], rtol: float = 1e-4):
    assert [h["step"] for h in got] == [h["step"] for h in want]
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in g:
            assert g[key] == pytest.approx(w[key], rel=rtol, abs=1e-6), (g["step"], key, g[key], w[key])


# ---- two ranks ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single_process_run(world):
    """The reference: bilevel in one plain process, global batch 4."""
    out = world["root"] / "single"
    run_cli(["--teacher", world["teacher"], "--data", world["data"], "--method", "bilevel", "--steps", "4",
             "--out", str(out), *RUN])
    return out


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_zero2_two_ranks_match_a_single_process_run(world, single_process_run, launcher):
    """CLI --launcher L --nproc 2 --zero-stage 2: same losses, same student, identical ranks, export loads."""
    out = world["root"] / f"zero2-{launcher}"
    done = run_cli(["--teacher", world["teacher"], "--data", world["data"], "--method", "bilevel", "--steps", "4",
                    "--out", str(out), "--launcher", launcher, "--nproc", "2", "--zero-stage", "2", *RUN])
    assert done.stdout.count("done: 4 steps") == 1  # the parent reports once; the ranks stay quiet
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["zero_stage"] == 2
    checksums = summary["rank_weight_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]  # every rank holds the same parameters
    reference = history(single_process_run)
    assert any("loss/cu" in h for h in reference)  # the comparison covers outer (upper) steps too
    assert_losses_match(history(out), reference)
    assert_close_weights(weights(out), weights(single_process_run))
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline", local_files_only=True)
    assert type(pipe.unet).__name__ == "PrunedUNet2DConditionModel"


def launch_scenarios(world, base: Path, *names: str) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(ROOT / "tests" / "distributed_scenarios.py"), world["teacher"],
               world["data"], str(base), *names]
    done = subprocess.run(command, env=rank_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((base / "facts.json").read_text())["ranks"]


@pytest.fixture(scope="module")
def scenarios(world):
    """Two 2-rank launches: (1) ZeRO-3 student + ZeRO-3 teacher with a checkpoint at step 2, ZeRO-2 with 8-bit Adam,
    data parallel with an int8 teacher; (2) the ZeRO-3 run resumed from step 2, in fresh processes as a real
    restart would be."""
    base = world["root"] / "scenarios"
    base.mkdir()
    facts = launch_scenarios(world, base, "zero3", "adam8", "int8")
    launch_scenarios(world, base, "zero3_resume")
    return base, facts


def free_port() -> int:
    from safeprune_engine.distributed.runtime import free_port as pick

    return pick()


def test_zero3_student_and_teacher_two_ranks(world, scenarios, single_process_run):
    base, facts = scenarios
    run = base / "zero3"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["zero_stage"] == 3 and summary["teacher_zero3"] is True
    assert summary["rank_weight_checksums"][0] == summary["rank_weight_checksums"][1]
    # the teacher really is partitioned: each rank holds half of its parameter bytes
    for rank in facts:
        assert rank["zero3"]["teacher_local_bytes"] * 2 == pytest.approx(rank["zero3"]["teacher_whole_bytes"],
                                                                        rel=1e-3)
    assert_losses_match(history(run), history(single_process_run))
    assert_close_weights(weights(run), weights(single_process_run))


def test_zero3_resume_equals_uninterrupted(scenarios):
    base, _ = scenarios
    straight, resumed = weights(base / "zero3"), weights(base / "zero3_resume")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)  # bit for bit
    assert [h["step"] for h in history(base / "zero3_resume")] == [3, 4]
    assert_losses_match(history(base / "zero3_resume"), history(base / "zero3")[2:], rtol=0)


def test_export_from_zero3_loads_and_matches_the_gathered_weights(scenarios):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    base, _ = scenarios
    gathered = load_file(base / "zero3" / "gathered.safetensors")  # rank 0's whole student after training
    pipe = StableDiffusionPipeline.from_pretrained(base / "zero3" / "pipeline", local_files_only=True)
    exported = pipe.unet.state_dict()
    assert gathered.keys() == exported.keys()
    assert all(torch.equal(gathered[k], exported[k]) for k in gathered)
    final_checkpoint = load_file(base / "zero3" / "checkpoints" / "step-00000004" / "student" /
                                 "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(gathered[k], final_checkpoint[k]) for k in gathered)
    image = pipe("a red square", num_inference_steps=2, height=16, width=16, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (16, 16, 3)


@torch.no_grad()
def lower_objective(student, teacher_dir: str, run: Path, seed: int = 1) -> float:
    """w_diff * L_diff + w_out * L_out (1.0 / 2.0) of `student` on one fixed noising of every item the run cached:
    what the distill-only runs minimise, measured the same way before and after."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from safeprune_engine.data.cache import LatentCache

    teacher = UNet2DConditionModel.from_pretrained(teacher_dir, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(teacher_dir, subfolder="scheduler")
    cache = LatentCache.load(run / "cache" / "data")
    generator = torch.Generator().manual_seed(seed)
    z0 = cache.sample_latents(torch.arange(len(cache)), generator)
    noise = torch.randn(z0.shape, generator=generator)
    t = torch.randint(0, 1000, (len(cache),), generator=generator)
    z_t = scheduler.add_noise(z0, noise, t)
    prediction = student(z_t, t, encoder_hidden_states=cache.text_emb).sample
    target = teacher(z_t, t, encoder_hidden_states=cache.text_emb).sample
    mse = torch.nn.functional.mse_loss
    return float(mse(prediction, noise) + 2.0 * mse(prediction, target))


@pytest.mark.parametrize("scenario", ["adam8", "int8"])
def test_8bit_adam_and_int8_teacher_runs_train(world, scenarios, scenario):
    from safeprune_engine.models.pruned_unet import PrunedUNet2DConditionModel

    base, _ = scenarios
    run = base / scenario
    losses = [h["loss/ft"] for h in history(run)]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    initial = PrunedUNet2DConditionModel.from_pretrained(base / f"{scenario}-initial")
    trained = PrunedUNet2DConditionModel.from_pretrained(run / "pipeline" / "unet")
    before, after = (lower_objective(m, world["teacher"], run) for m in (initial, trained))
    assert after < 0.9 * before, (before, after)
    if scenario == "adam8":  # the states really are 8-bit, kept per rank
        state = torch.load(run / "checkpoints" / "step-00000006" / "state.pt", weights_only=True)["solver"]["zero"]
        assert state["kind"] == "per-rank" and state["world_size"] == 2
        assert state["ranks"][0]["lower"][0]["state1"].dtype == torch.uint8
    else:  # the int8 teacher's added output error is measured and written into the run dir
        report = json.loads((run / "teacher_int8_report.json").read_text())
        assert report["layers"] > 0 and 0 < report["rel_l2"] < 0.05
        assert report["weight_bytes_after"] < report["weight_bytes_before"]


def test_resume_a_two_rank_zero3_checkpoint_on_one_rank_with_zero2(world, scenarios):
    """Whole per-parameter states: a checkpoint resumes under another rank count and ZeRO stage."""
    base, _ = scenarios
    out = world["root"] / "one-rank-resume"
    run_cli(["--teacher", world["teacher"], "--data", world["data"], "--method", "bilevel", "--steps", "4",
             "--out", str(out), "--zero-stage", "2", "--resume",
             str(base / "zero3" / "checkpoints" / "step-00000002"), *RUN])
    assert_close_weights(weights(out), weights(base / "zero3"), share=1e-4, max_abs=1e-3)
    assert_losses_match(history(out), history(base / "zero3")[2:])


# ---- the pieces, in one process -----------------------------------------------------------------------------------
def test_slot_optimizer_steps_each_slot_like_its_own_optimizer():
    """Per-slot AdamW updates over shared weights equal separate torch optimizers, on whole tensors and on flat
    partitions (what ZeRO hands over), with the upper slot over a subset of odd size."""
    from safeprune_engine.distributed.slot_optimizer import SlotOptimizer

    torch.manual_seed(0)
    shapes = [(37, 5), (200,), (3, 3, 7)]
    ref = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    ref_opts = {"lower": torch.optim.AdamW(ref, lr=1e-2, foreach=False),
                "upper": torch.optim.AdamW(ref[1:], lr=5e-2, foreach=False)}
    slots = SlotOptimizer({"lower": torch.optim.AdamW(ours, lr=1e-2, foreach=False),
                           "upper": torch.optim.AdamW(ours[1:], lr=5e-2, foreach=False)})
    assert [g["slots"] for g in slots.param_groups] == [("lower",), ("lower", "upper")]
    for step in range(5):
        slot = "upper" if step % 2 else "lower"
        grads = [torch.randn(s) for s in shapes]
        for params in (ref, ours):
            for p, g in zip(params, grads):
                p.grad = g.clone()
        ref_opts[slot].step()
        slots.active = slot
        slots.step()
    for a, b in zip(ref, ours):
        assert torch.equal(a, b)
    assert float(slots.state[ours[1]]["upper.step"]) == 2 and float(slots.state[ours[0]]["lower.step"]) == 3
    assert "upper.exp_avg" not in slots.state[ours[0]]

    # flat partitions: one tensor per group, as ZeRO's fp32 partitions
    torch.manual_seed(1)
    whole = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    flat_params = [torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in whole[:1]])),
                   torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in whole[1:]]))]
    whole_opt = torch.optim.AdamW(whole, lr=1e-2, foreach=False)
    flat_slots = SlotOptimizer({"lower": torch.optim.AdamW(flat_params, lr=1e-2, foreach=False)})
    for _ in range(3):
        grads = [torch.randn(s) for s in shapes]
        for p, g in zip(whole, grads):
            p.grad = g
        flat_params[0].grad = grads[0].reshape(-1).clone()
        flat_params[1].grad = torch.cat([g.reshape(-1) for g in grads[1:]])
        whole_opt.step()
        flat_slots.active = "lower"
        flat_slots.step()
    torch.testing.assert_close(flat_params[1], torch.cat([p.detach().reshape(-1) for p in whole[1:]]),
                               atol=1e-6, rtol=1e-6)


def test_slot_optimizer_with_8bit_adam_matches_bitsandbytes():
    pytest.importorskip("bitsandbytes")
    from safeprune_engine.distributed.slot_optimizer import SlotOptimizer
    from safeprune_engine.memory import adamw_8bit

    torch.manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(64, 97)), torch.nn.Parameter(torch.randn(37))]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    ref_opt = adamw_8bit(ref, 1e-3)
    slots = SlotOptimizer({"lower": adamw_8bit(ours, 1e-3)})
    for _ in range(3):
        grads = [torch.randn_like(p) for p in ref]
        for params in (ref, ours):
            for p, g in zip(params, grads):
                p.grad = g.clone()
        ref_opt.step()
        slots.active = "lower"
        slots.step()
    for a, b in zip(ref, ours):
        assert torch.equal(a, b)
    assert slots.state[ours[0]]["lower.state1"].dtype == torch.uint8  # 8-bit moments for the large tensor


def test_rows_and_global_values():
    from safeprune_engine.bilevel.engine import DataBatch
    from safeprune_engine.distributed.engine import take_rows, with_value

    batch = DataBatch(latents=torch.randn(6, 4, 3, 3), timesteps=torch.arange(6), text_emb=torch.randn(6, 5, 7),
                      target=torch.randn(6, 4, 3, 3))
    part = take_rows(batch, slice(3, 6), 6)
    assert torch.equal(part.timesteps, torch.arange(3, 6)) and torch.equal(part.text_emb, batch.text_emb[3:])
    x = torch.randn(5, requires_grad=True)
    local = (x ** 2).mean()
    value = torch.tensor(7.25)
    mixed = with_value(local, value)
    assert mixed.item() == 7.25
    mixed.backward()
    torch.testing.assert_close(x.grad, 2 * x.detach() / 5)


def test_each_rank_unlinks_its_own_shared_memory_buffers(tmp_path):
    """DeepSpeed's CPU all-reduce buffers (files in /dev/shm, i.e. RAM) outlive the ranks unless removed: each rank
    removes its own at exit, and only its own (another run on another port keeps its buffers)."""
    from safeprune_engine.distributed.runtime import remove_shm_buffers

    names = [f"deepspeed_allreduce_buffer_0_127.0.0.1_{port}_{rank}" for port in (29500, 29501) for rank in (0, 1)]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    remove_shm_buffers("127.0.0.1", "29500", 1, root=str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n in names if not n.endswith("29500_1"))


def test_deepspeed_configs():
    from safeprune_engine.distributed.zero_config import student_config, teacher_config

    config = RunConfig(erase=["x"], batch_size=8, concept_batch_size=4, zero_stage=3, mixed_precision="bf16",
                       nproc=4, launcher="torchrun", zero3_persistence_threshold=0).validate()
    student = student_config(config, world_size=4)
    assert student["train_batch_size"] == 8 and student["train_micro_batch_size_per_gpu"] == 2
    assert student["zero_optimization"]["stage"] == 3 and student["managed_gradient_accumulation"] is False
    assert student["gradient_clipping"] == 0.0 and student["bf16"]["enabled"] and not student["fp16"]["enabled"]
    assert student["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    teacher = teacher_config(config, 4, "fp16")
    assert teacher["zero_optimization"]["stage"] == 3 and teacher["fp16"]["enabled"] and "optimizer" not in teacher


def test_launch_commands():
    from safeprune_engine.run.launcher import launch_command

    torchrun = launch_command(RunConfig(launcher="torchrun", nproc=4), "/tmp/c.json", 29500)
    assert torchrun[1:3] == ["-m", "torch.distributed.run"]
    assert torchrun[torchrun.index("--nproc_per_node") + 1] == "4"
    assert torchrun[torchrun.index("--master_port") + 1] == "29500"
    assert torchrun[-5:] == ["-m", "safeprune_engine.cli", "run", "--config", "/tmp/c.json"]
    deepspeed = launch_command(RunConfig(launcher="deepspeed", nproc=2), "/tmp/c.json", 29501)
    assert deepspeed[1:3] == ["-m", "deepspeed.launcher.runner"] and "--no_local_rank" in deepspeed
    assert deepspeed[deepspeed.index("--num_gpus") + 1] == "2"
    assert deepspeed[-5:] == ["--module", "safeprune_engine.cli", "run", "--config", "/tmp/c.json"]


@pytest.mark.parametrize("changes,message", [
    (dict(launcher="slurm"), "unknown launcher"),
    (dict(nproc=2), "needs --launcher"),
    (dict(nproc=0, launcher="torchrun"), "--nproc must be"),
    (dict(zero_stage=4), "--zero-stage must be one of"),
    (dict(teacher_dtype="int4"), "unknown teacher dtype"),
    (dict(export_dtype="fp8"), "unknown export dtype"),
    (dict(teacher_int8=True, teacher_zero3=True), "exclude each other"),
    (dict(nproc=3, launcher="torchrun", batch_size=4), "must split evenly"),
    (dict(nproc=2, launcher="torchrun", batch_size=4, concept_batch_size=3), "--concept-batch-size 3"),
])
def test_bad_scale_options_are_refused(changes, message):
    with pytest.raises(SafepruneError, match=message):
        RunConfig(erase=["x"], **changes).validate()


def test_half_precision_deepspeed_cannot_run_is_refused_before_any_rank_starts():
    """DeepSpeed's CPU accelerator trains in bf16 but not fp16: a clear error, not a crash inside the ranks."""
    pytest.importorskip("deepspeed")
    from deepspeed.accelerator import get_accelerator

    from safeprune_engine.distributed.runtime import check_precisions_supported

    if get_accelerator().is_fp16_supported():
        pytest.skip("this accelerator trains in fp16")
    with pytest.raises(SafepruneError, match="does not train in fp16"):
        check_precisions_supported(RunConfig(erase=["x"], zero_stage=2, mixed_precision="fp16"))
    with pytest.raises(SafepruneError, match="ZeRO-3 teacher's dtype fp16"):
        check_precisions_supported(RunConfig(erase=["x"], teacher_zero3=True, teacher_dtype="fp16"))
    check_precisions_supported(RunConfig(erase=["x"], zero_stage=0, mixed_precision="fp16"))  # torch autocast path


def test_launcher_cannot_take_in_memory_models(tmp_path):
    from safeprune_engine.models.teacher import bundle_from_pipeline
    from safeprune_engine.testing import tiny_pipeline, write_image_folder
    from safeprune_engine.run import train

    data = write_image_folder(tmp_path / "data", CAPTIONS, size=16)
    config = RunConfig(teacher="in-memory", data=str(data), out=str(tmp_path / "out"), erase=["by monet"],
                       launcher="torchrun", nproc=2)
    with pytest.raises(SafepruneError, match="cannot receive in-memory teacher"):
        train(config, teacher=bundle_from_pipeline(tiny_pipeline()))
    assert not (tmp_path / "out").exists()


def test_scale_flags_are_cli_flags_and_yaml_keys(tmp_path):
    from safeprune_engine.cli import build_parser, run_config_from_args

    config_file = tmp_path / "run.yaml"
    config_file.write_text("zero-stage: 3\nteacher_zero3: true\nnproc: 2\nlauncher: torchrun\n")
    args = build_parser().parse_args(["run", "--config", str(config_file), "--use-8bit-adam", "--teacher-int8",
                                      "--teacher-dtype", "bf16", "--gradient-checkpointing", "--channels-last",
                                      "--zero-stage", "2"])
    config = run_config_from_args(args)
    assert (config.zero_stage, config.teacher_zero3, config.nproc, config.launcher) == (2, True, 2, "torchrun")
    assert config.use_8bit_adam and config.teacher_int8 and config.gradient_checkpointing and config.channels_last
    assert config.teacher_dtype == "bf16"
    plain = run_config_from_args(build_parser().parse_args(["run"]))
    assert not plain.use_8bit_adam and plain.zero_stage == 0 and plain.launcher is None


def test_int8_teacher_error_is_measured():
    pytest.importorskip("bitsandbytes")
    from safeprune_engine.memory import quantize_teacher_int8
    from safeprune_engine.testing import tiny_unet

    unet = tiny_unet(seed=3).eval()
    linears = sum(isinstance(m, torch.nn.Linear) for m in unet.modules())
    report = quantize_teacher_int8(unet, latent_size=8, text_shape=(32, 32), seed=5, batch=3)
    assert report["layers"] == linears > 0
    assert 0 < report["rel_l2"] < 0.05 and report["max_abs"] > 0
    assert type(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q).__name__ == "Linear8bitLt"
