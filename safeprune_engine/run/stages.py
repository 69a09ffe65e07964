"""The stages of a run before and after the steps, each a plain function that returns what the next one needs.

Every input is checked before anything is written to the run directory. The caller's teacher and student are never
changed: the run casts, moves and patches its own working copies.
"""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .. import checkpoint as ckpt
from ..config import RunConfig
from ..errors import SafepruneError
from .rundir import check_resume_matches, check_run_dir

log = logging.getLogger("safeprune_engine")

NO_TEACHER = ("no teacher: pass --teacher DIR (a StableDiffusionPipeline folder) or an in-memory teacher=; the "
              "built-in toy default runs through the CLI (`safeprune run` without --teacher) or "
              "safeprune_engine.toy.run_default")


@dataclass
class RunInputs:
    """The checked inputs a run reads besides the teacher."""

    data_folder: object  # ImageFolder
    resume_path: Path | None
    resume_meta: dict | None


@dataclass
class TeacherSource:
    """bundle: the caller's TeacherBundle (never changed) or the one the run loaded; unet: the frozen UNet the run
    trains against (a working copy of a caller's, else bundle.unet itself); fingerprint: the UNet's weights hash,
    taken before anything touched it."""

    bundle: object
    unet: object
    fingerprint: str


@dataclass
class StudentStart:
    student: object  # the run's own UNet to train
    prune_report: dict


# ---- before anything is written ----------------------------------------------------------------------------------
def prepare_config(config: RunConfig, teacher_given: bool) -> RunConfig:
    """Stage 1: the settings are complete and valid, and --out may take this run."""
    if config.teacher is None and not teacher_given:
        raise SafepruneError(NO_TEACHER)
    if config.data is None:
        raise SafepruneError("--data is required with --teacher: an image folder with metadata.jsonl")
    config.validate()
    check_run_dir(config)
    return config


def check_inputs(config: RunConfig) -> RunInputs:
    """Stage 2: the data folders read, and the checkpoint to resume (if any) found."""
    from ..data.imagefolder import ImageFolder

    data_folder = ImageFolder(config.data)
    if config.erase_data:
        ImageFolder(config.erase_data)
    resume_path = ckpt.resolve_resume(config.out, config.resume) if config.resume else None
    resume_meta = ckpt.load_checkpoint_meta(resume_path) if resume_path else None
    return RunInputs(data_folder, resume_path, resume_meta)


def load_teacher(config: RunConfig, teacher=None) -> TeacherSource:
    """Stage 3: the teacher (the caller's, else loaded from --teacher) and the run's working UNet.

    A caller's UNet is copied, since the run casts it to the training dtype, moves it, patches its kernels and
    (ZeRO-3, int8) partitions or quantizes it; a teacher the run loads itself is used as it is.
    """
    from ..memory import DTYPES
    from ..models.teacher import load_teacher as load

    owned = teacher is None
    # an explicit --teacher-dtype reads the UNet in that dtype: no fp32 copy in host memory (SDXL: 5 GB instead of
    # 10); the student is pruned from those weights and trained in fp32
    unet_dtype = DTYPES[config.teacher_dtype] if config.teacher_dtype else None
    bundle = load(config.teacher, unet_dtype=unet_dtype) if owned else teacher
    fingerprint = bundle.fingerprint("unet")  # now: a ZeRO-3-sharded teacher has no whole weights later
    return TeacherSource(bundle=bundle, unet=bundle.unet if owned else copy.deepcopy(bundle.unet),
                         fingerprint=fingerprint)


def check_resume(config: RunConfig, inputs: RunInputs, teacher: TeacherSource) -> None:
    """Stage 4: a checkpoint to resume belongs to this teacher and these settings."""
    if inputs.resume_meta is not None:
        check_resume_matches(config, inputs.resume_path, inputs.resume_meta, teacher.fingerprint)


def resolve_geometry(config: RunConfig, teacher: TeacherSource) -> tuple[RunConfig, int]:
    """Stage 5: the resolution (default: the teacher's) and the latent size. The returned config holds the derived
    resolution; the config as given stays the run's identity, so a rerun does not look like another run."""
    vae_factor = 2 ** (len(teacher.bundle.vae.config.block_out_channels) - 1)
    if config.resolution is None:
        config = config.replace(resolution=teacher.bundle.unet.config.sample_size * vae_factor)
    return config, config.resolution // vae_factor


def resolve_student(config: RunConfig, teacher: TeacherSource, student, inputs: RunInputs, latent_size: int,
                    device) -> StudentStart:
    """Stage 6: the student to train: from the checkpoint when resuming, a copy of the caller's, else pruned from
    the teacher."""
    from ..models.pruned_unet import load_student_unet
    from ..prune.base import calibration_batches, prune_unet
    from ..prune.macs import count_macs, count_params

    bundle = teacher.bundle
    resume_path, resume_meta = inputs.resume_path, inputs.resume_meta
    if resume_path is not None:
        student = load_student_unet(resume_path / "student")
        if student.config.get("pruned_widths") != resume_meta.get("student_widths"):
            raise SafepruneError(f"--resume {resume_path}: the saved student does not match its own record")
        return StudentStart(student, resume_meta.get("prune_report", {}))
    teacher_macs = count_macs(bundle.unet, sample_size=latent_size)
    if student is None:
        student, report = prune_unet(
            bundle.unet, config.prune_method, ratio=None if config.target_macs else config.prune_ratio,
            target_macs=config.target_macs, importance=config.prune_importance, sample_size=latent_size,
            # data-driven methods (taylor) score units on a few batches of the fine-tuning data
            calibration=lambda: calibration_batches(bundle, inputs.data_folder, config.resolution,
                                                    config.prune_calibration_batches, config.batch_size,
                                                    seed=config.seed, device=device))
        log.info(report.summary())
        return StudentStart(fp32_weights(student), report.to_dict())
    report = {"params_before": count_params(bundle.unet), "params_after": count_params(student),
              "macs_before": teacher_macs, "macs_after": count_macs(student, sample_size=latent_size)}
    return StudentStart(fp32_weights(copy.deepcopy(student)), report)  # the run trains its own copy


def fp32_weights(student):
    """The student in fp32, the dtype its weights are trained in (--mixed-precision computes in bf16/fp16 under
    autocast; the weights and their optimizer stay fp32): a student pruned from a teacher loaded in bf16 or fp16
    (to fit memory) is cast up once, in place."""
    import torch

    if next(student.parameters()).dtype in (torch.bfloat16, torch.float16):
        log.info("student weights cast to fp32 for training (pruned from a %s teacher)",
                 str(next(student.parameters()).dtype).replace("torch.", ""))
        student.to(torch.float32)
    return student


# ---- the run directory ---------------------------------------------------------------------------------------------
def write_run_identity(session, identity_config: RunConfig, prune_report: dict) -> Path:
    """Stage 7: OUT/run_config.json (the settings as given) and OUT/prune_report.json, written by rank 0."""
    out = Path(identity_config.out)
    if session.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.json").write_text(identity_config.to_json())
        (out / "prune_report.json").write_text(json.dumps(prune_report, indent=2))
    session.barrier()
    return out


# ---- after the steps -----------------------------------------------------------------------------------------------
def export_student(session, config: RunConfig, teacher_bundle, student, out: Path) -> Path:
    """Stage 10: OUT/pipeline, the teacher's encoders and scheduler with the student UNet (rank 0 writes it)."""
    from ..memory import DTYPES
    from ..models.export import export_pipeline

    pipeline_dir = out / "pipeline"
    if session.is_main:
        export_pipeline(teacher_bundle, student, pipeline_dir,
                        dtype=None if config.export_dtype == "fp32" else DTYPES[config.export_dtype],
                        remote_code=config.export_remote_code)
    return pipeline_dir


def write_summary(session, config: RunConfig, out: Path, fitted, prune_report: dict) -> dict:
    """Stage 11: OUT/summary.json: steps, time, the prune report and the logged scalars."""
    summary = {"steps": config.steps, "steps_run": fitted.steps_run, "seconds": fitted.seconds,
               "prune": prune_report, "final": fitted.history[-1] if fitted.history else {},
               "history": fitted.history, **session.report()}
    if session.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    session.barrier()
    return summary


def undo_kernel_patches(kernel_patches) -> None:
    """The UNets the run hands back are plain diffusers modules again."""
    if not kernel_patches:
        return
    from ..patching import unpatch_unet

    for unet, record in kernel_patches:
        unpatch_unet(unet, record)
