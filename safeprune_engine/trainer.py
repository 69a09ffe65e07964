"""The run: load -> prune -> cache -> one bilevel training phase -> export, with checkpoints and resume.

Everything that can be wrong with the input is checked before anything is written to the run directory.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import RunConfig
from .errors import SafepruneError

log = logging.getLogger("safeprune_engine")

@dataclass
class TrainResult:
    out_dir: Path
    pipeline_dir: Path | None
    student: torch.nn.Module
    teacher: object  # TeacherBundle
    prune_report: dict
    history: list[dict] = field(default_factory=list)  # logged scalars, one dict per logged step
    steps_run: int = 0


def resolve_device(config: RunConfig) -> torch.device:
    if config.device:
        return torch.device(config.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---- run directory ---------------------------------------------------------------------------------------
def check_run_dir(config: RunConfig) -> None:
    """Refuse an out dir that holds a different run, or the same run with checkpoints but no --resume."""
    out = Path(config.out)
    stored_file = out / "run_config.json"
    if out.exists() and not out.is_dir():
        raise SafepruneError(f"--out {out} exists and is not a directory")
    if not stored_file.is_file():
        if config.resume == "latest":
            raise SafepruneError(f"--resume latest: {out} holds no run to resume")
        if out.is_dir() and any(out.iterdir()) and not (out / "builtin").is_dir():
            raise SafepruneError(f"--out {out} is not empty and holds no safeprune run; choose a new --out")
        return
    stored = RunConfig.from_dict(json.loads(stored_file.read_text()))
    differences = [k for k, v in config.identity().items() if stored.identity().get(k) != v]
    if differences:
        raise SafepruneError(
            f"--out {out} holds a different run (differs in: {', '.join(differences)}); "
            "choose a new --out or repeat the original settings"
        )
    if not config.resume and ckpt.list_checkpoints(out):
        raise SafepruneError(f"--out {out} already holds checkpoints of this run; pass --resume latest to continue")


def with_builtin_defaults(config: RunConfig, need_teacher: bool = True) -> RunConfig:
    """No --teacher: the built-in toy world (shipped teacher, fine-tuning split rendered into the run dir)."""
    if config.teacher is not None or not need_teacher:
        return config
    from .toy.default_run import toy_defaults

    log.info("no --teacher given: using the built-in toy world (shipped toy teacher, erasing its 'Vexa' style)")
    return toy_defaults(config)


def materialize_builtin(config: RunConfig) -> None:
    from .toy.default_run import materialize_toy_data

    materialize_toy_data(config)


# ---- building blocks -----------------------------------------------------------------------------------
def block_shapes(unet, latent_size: int, text_shape: tuple[int, int], device) -> dict[str, tuple[int, int, int]]:
    """Block name -> (C, H, W) of its output, for every block feature distillation can tap, from one forward."""
    from .distill.features import BlockTaps

    taps = BlockTaps(unet)
    param = next(unet.parameters())
    sample = torch.randn(1, unet.config.in_channels, latent_size, latent_size, device=device, dtype=param.dtype)
    text = torch.randn(1, *text_shape, device=device, dtype=param.dtype)
    with torch.no_grad(), taps.capture() as maps:
        unet(sample, torch.tensor([10], device=device), encoder_hidden_states=text)
    taps.remove()
    return {name: tuple(m.shape[1:]) for name, m in zip(taps.names, maps)}


def encode_concept_prompts(config: RunConfig, teacher):
    """ConceptPrompts: the erase prompts, each one's --erase concept and anchor, and the --preserve prompts."""
    from .data.cache import encode_prompts
    from .unlearn.base import ConceptPrompts
    from .unlearn.sources import anchor_for

    prompts = list(config.erase_prompts or config.erase)
    resolved = [anchor_for(p, config.erase, config.anchors) for p in prompts]
    return ConceptPrompts(
        concepts=list(config.erase), prompts=prompts, anchors=[a for _, a in resolved],
        concept_emb=encode_prompts(teacher, prompts), anchor_emb=encode_prompts(teacher, [a for _, a in resolved]),
        prompt_concept=torch.tensor([i for i, _ in resolved], dtype=torch.long),
        preserve=list(config.preserve), preserve_emb=encode_prompts(teacher, list(config.preserve)),
    )


def make_concept_source(config: RunConfig, teacher, prompts, objective, cache_dir: Path, latent_size: int, device,
                        progress: bool):
    """The objective's training rows: concept images (--erase-data) or a pool the teacher samples once, either
    partial trajectories of the erase prompts (ESD) or whole images of their anchors (Concept Ablation)."""
    from .data.cache import build_latent_cache, encode_prompts
    from .data.imagefolder import ImageFolder
    from .unlearn.sources import (AnchorImageSource, ImageConceptSource, TrajectoryConceptSource, anchor_for,
                                  load_or_sample_trajectory_pool, sample_trajectory_pool,
                                  trajectory_pool_fingerprint)

    if objective.latents is None:
        return None
    preserve = prompts.preserve_emb.to(device) if prompts.preserve else None
    if config.erase_data:
        folder = ImageFolder(config.erase_data)
        cache = build_latent_cache(teacher, folder, resolution=config.resolution, cache_dir=cache_dir / "concepts",
                                   progress=progress)
        resolved = [anchor_for(c, config.erase, config.anchors) for c in cache.captions]
        anchor_emb = encode_prompts(teacher, [a for _, a in resolved])
        return ImageConceptSource(cache.to(device), anchor_emb.to(device), teacher.noise_scheduler(),
                                  teacher.prediction_type, torch.tensor([i for i, _ in resolved]), preserve)
    anchor_images = objective.latents == "clean"
    uncond = encode_prompts(teacher, [""])
    settings = dict(pool=config.esd_pool_size, ddim=config.esd_ddim_steps, guidance=config.esd_guidance,
                    size=latent_size, seed=config.seed)
    if anchor_images:
        settings["final"] = True
    sampled_texts = prompts.anchors if anchor_images else prompts.prompts
    sampled_emb = prompts.anchor_emb if anchor_images else prompts.concept_emb
    fingerprint = trajectory_pool_fingerprint(teacher.fingerprint("unet"), sampled_texts, **settings)
    latent_shape = (teacher.unet.config.in_channels, latent_size, latent_size)
    pool = load_or_sample_trajectory_pool(
        cache_dir,
        fingerprint,
        lambda: sample_trajectory_pool(
            teacher.unet, dict(teacher.scheduler.config), sampled_emb.to(device), uncond.to(device),
            config.esd_pool_size, latent_shape, config.esd_ddim_steps, config.esd_guidance, config.seed,
            progress=progress, final=anchor_images,
        ),
        kind="anchor-images" if anchor_images else "esd-pool",
    )
    if anchor_images:
        return AnchorImageSource(pool["latents"], pool["concept_index"], prompts.concept_emb, prompts.anchor_emb,
                                 teacher.noise_scheduler(), teacher.prediction_type, prompts.prompt_concept,
                                 preserve).to(device)
    return TrajectoryConceptSource(pool["latents"], pool["timesteps"], pool["concept_index"], prompts.concept_emb,
                                   prompts.anchor_emb, prompts.prompt_concept, preserve).to(device)


def cast_module(module, dtype: torch.dtype):
    """Cast only when needed (diffusers warns on every .to(dtype), even a no-op one)."""
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    return module


def build_engine(config: RunConfig, teacher, student, data_folder, cache_dir: Path, latent_size: int, device,
                 progress: bool = True):
    """Cache pass + models in their training dtypes + the TrainingEngine that every solver runs on.

    The cache pass encodes the data (and concept images or the concept trajectory pool) once, so training
    steps never run the VAE encoder or the text encoder.
    """
    from .bilevel.engine import TrainingEngine
    from .data.cache import build_latent_cache
    from .distill.features import pair_feature_blocks
    from .distill.losses import FeatureProjections
    from .memory import (apply_student_options, apply_teacher_options, quantize_teacher_int8, teacher_torch_dtype,
                         write_int8_report)
    from .unlearn.base import build_objective

    teacher.unet.to(device)
    data_cache = build_latent_cache(teacher, data_folder, resolution=config.resolution, cache_dir=cache_dir / "data",
                                    progress=progress).to(device)
    objective = concept_source = prompts = None
    if config.method != "distill-only":
        objective = build_objective(config)
        prompts = encode_concept_prompts(config, teacher).to(device)
        concept_source = make_concept_source(config, teacher, prompts, objective, cache_dir, latent_size, device,
                                             progress)
    student.to(device).train()
    student.requires_grad_(True)
    apply_student_options(student, config)
    text_shape = tuple(data_cache.text_emb.shape[1:])
    # pairs of same-sized block outputs: every block for width pruning, the kept stages for block removal
    student_shapes = block_shapes(student, latent_size, text_shape, device)
    teacher_shapes = block_shapes(teacher.unet, latent_size, text_shape, device)
    feature_pairs = pair_feature_blocks(student_shapes, teacher_shapes)
    projections = FeatureProjections([student_shapes[s][0] for s, _ in feature_pairs],
                                     [teacher_shapes[t][0] for _, t in feature_pairs]).to(device)
    # the teacher runs in the training dtype or --teacher-dtype (the trainer casts it back to fp32 before export)
    teacher_unet = cast_module(teacher.unet, teacher_torch_dtype(config)).to(device).eval().requires_grad_(False)
    apply_teacher_options(teacher_unet, config)
    if config.teacher_int8:
        write_int8_report(config.out, quantize_teacher_int8(teacher_unet, latent_size, text_shape, seed=config.seed))
    patches = []  # (unet, PatchRecord): train() undoes them before it hands the models back
    if config.kernels != "off":  # fused ops in both UNets, in place; state dicts and outputs stay the same
        from .patching import patch_unet

        for unet in (student, teacher_unet):
            patches.append((unet, patch_unet(unet, backend=config.kernels)))
            log.info("%s UNet %s", "student" if unet is student else "teacher", patches[-1][1].summary())
    engine = TrainingEngine(student, teacher_unet, teacher.noise_scheduler(), teacher.prediction_type, data_cache,
                            config, concept_source=concept_source, objective=objective, projections=projections,
                            device=device, prompts=prompts, feature_pairs=feature_pairs)
    engine.kernel_patches = patches
    return engine


# ---- the run ---------------------------------------------------------------------------------------------
def launched_result(config: RunConfig, exit_code: int) -> TrainResult:
    """What ranks started by --launcher left in --out (their student is in OUT/pipeline, not in memory here)."""
    if exit_code != 0:
        raise SafepruneError(f"the {config.nproc}-rank run under {config.launcher} failed (exit code {exit_code}); "
                             "its messages are above")
    out = Path(config.out)
    summary = json.loads((out / "summary.json").read_text())
    return TrainResult(out_dir=out, pipeline_dir=out / "pipeline", student=None, teacher=None,
                       prune_report=summary.get("prune", {}), history=summary.get("history", []),
                       steps_run=summary.get("steps_run", 0))


def train(config: RunConfig, teacher=None, student=None) -> TrainResult:
    """Run prune -> cache -> train -> export as configured. Returns the trained student and where it went.

    teacher / student: optional in-memory TeacherBundle and (pruned) UNet to use instead of loading and
    pruning (the Python API's way in); config.teacher is still recorded as the run's identity.
    """
    from tqdm.auto import tqdm

    from .data.imagefolder import ImageFolder
    from .distributed.launcher import launch
    from .distributed.runtime import launched
    from .distributed.session import open_session
    from .models.export import export_pipeline
    from .models.pruned_unet import load_student_unet
    from .models.teacher import load_teacher
    from .prune.base import calibration_batches, prune_unet
    from .prune.macs import count_macs, count_params

    config = with_builtin_defaults(config, need_teacher=teacher is None)
    if config.data is None:
        raise SafepruneError("--data is required with --teacher: an image folder with metadata.jsonl")
    config.validate()
    check_run_dir(config)
    if config.launcher is not None and not launched():  # this same job, as --nproc ranks under the launcher
        if teacher is not None or student is not None:
            raise SafepruneError("--launcher starts new processes, which cannot receive in-memory teacher or "
                                 "student objects; pass --teacher (a folder) instead, or start your script with "
                                 "torchrun / deepspeed yourself")
        return launched_result(config, launch(config))
    session = open_session(config)  # this process's place among the ranks (or a plain single process)
    if session.is_main:
        materialize_builtin(config)
    session.barrier()
    progress = config.progress and session.is_main
    device = session.device

    # -- validate every input before writing anything (beyond the built-in default's own files) --
    data_folder = ImageFolder(config.data)
    if config.erase_data:
        ImageFolder(config.erase_data)
    resume_path = ckpt.resolve_resume(config.out, config.resume) if config.resume else None
    if teacher is None:
        teacher = load_teacher(config.teacher)
    teacher_fingerprint = teacher.fingerprint("unet")  # now: a ZeRO-3-sharded teacher has no whole weights later
    resume_meta = ckpt.load_checkpoint_meta(resume_path) if resume_path else None
    if resume_meta is not None:
        if resume_meta.get("teacher_unet") != teacher_fingerprint:
            raise SafepruneError(f"--resume {resume_path}: the checkpoint was trained from another teacher "
                                 "(architecture or weights differ)")
        stored_identity = resume_meta.get("identity", {})
        differences = [k for k, v in config.identity().items() if stored_identity.get(k) != v]
        if differences:
            raise SafepruneError(f"--resume {resume_path}: checkpoint belongs to a run with other settings "
                                 f"({', '.join(differences)})")

    vae_factor = 2 ** (len(teacher.vae.config.block_out_channels) - 1)
    identity_config = config  # as given: derived values below must not make a rerun look like another run
    if config.resolution is None:
        config = config.replace(resolution=teacher.unet.config.sample_size * vae_factor)
    latent_size = config.resolution // vae_factor

    # -- student: from the checkpoint when resuming, else pruned from the teacher --
    teacher_macs = count_macs(teacher.unet, sample_size=latent_size)
    if resume_path is not None:
        student = load_student_unet(resume_path / "student")
        if student.config.get("pruned_widths") != resume_meta.get("student_widths"):
            raise SafepruneError(f"--resume {resume_path}: the saved student does not match its own record")
        prune_report = resume_meta.get("prune_report", {})
    elif student is None:
        student, report = prune_unet(
            teacher.unet, config.prune_method, ratio=None if config.target_macs else config.prune_ratio,
            target_macs=config.target_macs, importance=config.prune_importance, sample_size=latent_size,
            # data-driven methods (taylor) score units on a few batches of the fine-tuning data
            calibration=lambda: calibration_batches(teacher, data_folder, config.resolution,
                                                    config.prune_calibration_batches, config.batch_size,
                                                    seed=config.seed, device=device))
        prune_report = report.to_dict()
        log.info(report.summary())
    else:
        prune_report = {"params_before": count_params(teacher.unet), "params_after": count_params(student),
                        "macs_before": teacher_macs, "macs_after": count_macs(student, sample_size=latent_size)}

    session.sync_student(student)
    out = Path(config.out)
    if session.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.json").write_text(identity_config.to_json())
        (out / "prune_report.json").write_text(json.dumps(prune_report, indent=2))
    session.barrier()

    cache_dir = Path(config.cache_dir) if config.cache_dir else out / "cache"
    engine = session.build_engine(config, teacher, student, data_folder, cache_dir, latent_size, progress)
    solver = session.build_solver(engine, config)
    projections = engine.projections
    teacher_unet = engine.teacher
    objective = engine.objective

    start_step = 0
    if resume_path is not None:
        state = ckpt.load_checkpoint_state(resume_path, device)
        ckpt.load_projections(resume_path, projections)
        solver.load_state_dict(state["solver"])
        engine.sampler.load_state_dict(state["sampler"])
        engine.generator.set_state(state["generator"].cpu())
        if objective is not None and state.get("objective"):
            objective.load_state_dict(state["objective"])
        start_step = int(resume_meta["step"])
        log.info("resumed from %s at step %d", resume_path, start_step)

    meta = {"identity": identity_config.identity(), "teacher_unet": teacher_fingerprint,
            "student_widths": student.config.get("pruned_widths"), "prune_report": prune_report}

    def save(step: int) -> Path:
        state = {"solver": solver.state_dict(), "sampler": engine.sampler.state_dict(),
                 "generator": engine.generator.get_state(),
                 "objective": objective.state_dict() if objective is not None else {}}
        return session.save_checkpoint(out, step, student, projections, state, meta, config.keep_checkpoints)

    writer = None
    try:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step) if session.is_main else None
    except ImportError:  # tensorboard is an install dependency, but training must not die for a logger
        log.warning("tensorboard is not installed: no scalar logs")

    history: list[dict] = []
    bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps, desc=config.method,
               disable=not progress, dynamic_ncols=True)
    started = time.perf_counter()
    if objective is not None and start_step < config.steps:
        objective.on_train_start(engine, start_step)
    for step in bar:
        scalars = solver.step(step)
        if objective is not None:
            objective.on_step_end(engine, step + 1)  # e.g. a periodic UCE edit, before this step's checkpoint
        for name, value in scalars.items():
            if not math.isfinite(value):
                raise FloatingPointError(f"step {step}: {name} is {value}; lower --lr or use fp32")
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            history.append({"step": step + 1, **scalars})
            if writer is not None:
                for name, value in scalars.items():
                    writer.add_scalar(name, value, step + 1)
            bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in scalars.items() if k.startswith("loss/")})
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            save(step + 1)
    bar.close()
    elapsed = time.perf_counter() - started
    if writer is not None:
        writer.close()
    steps_run = config.steps - start_step
    if objective is not None and steps_run > 0:
        objective.on_train_end(engine)  # e.g. UCE's final edit: part of the last checkpoint and the export
    if steps_run > 0 or not ckpt.list_checkpoints(out):
        save(config.steps)
    session.release_teacher(teacher_unet)
    student = session.final_student(student)  # ZeRO: the whole fp32 student, gathered from the partitions
    pipeline_dir = out / "pipeline"
    if session.is_main:
        from .memory import DTYPES

        export_pipeline(teacher, student, pipeline_dir,
                        dtype=None if config.export_dtype == "fp32" else DTYPES[config.export_dtype])
        summary = {"steps": config.steps, "steps_run": steps_run, "seconds": elapsed, "prune": prune_report,
                   "final": history[-1] if history else {}, "history": history, **session.report()}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    session.barrier()
    if getattr(engine, "kernel_patches", None):
        from .patching import unpatch_unet

        for unet, record in engine.kernel_patches:  # the caller gets plain diffusers modules back
            unpatch_unet(unet, record)
    return TrainResult(out_dir=out, pipeline_dir=pipeline_dir, student=student, teacher=teacher,
                       prune_report=prune_report, history=history, steps_run=steps_run)
