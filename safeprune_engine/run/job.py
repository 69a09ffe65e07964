"""train(): one run as a sequence of stages, prepare -> teacher -> student -> run identity -> engine -> solver ->
fit -> export -> summary, on one process or as one of many ranks (the session), or started as ranks (--launcher).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import RunConfig
from ..errors import SafepruneError
from . import stages
from .builder import build_engine
from .fit import checkpoint_writer, fit, resume_state
from .session import open_session


@dataclass
class TrainResult:
    """out_dir: the run directory; pipeline_dir: the exported pipeline; student: the trained student (the run's
    own module; None when ranks started by --launcher trained it); teacher: the TeacherBundle (the caller's,
    unchanged, or the one the run loaded); teacher_unet: the frozen UNet the run trained against (the caller's
    teacher copied; with --teacher-zero3 this rank's partitions)."""

    out_dir: Path
    pipeline_dir: Path | None
    student: torch.nn.Module | None
    teacher: object
    prune_report: dict
    history: list[dict] = field(default_factory=list)  # logged scalars, one dict per logged step
    steps_run: int = 0
    teacher_unet: torch.nn.Module | None = None


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


def launch_ranks(config: RunConfig, teacher, student) -> TrainResult:
    """--launcher: this same job as --nproc ranks under torchrun / deepspeed; waits for them."""
    from .launcher import launch

    if teacher is not None or student is not None:
        raise SafepruneError("--launcher starts new processes, which cannot receive in-memory teacher or "
                             "student objects; pass --teacher (a folder) instead, or start your script with "
                             "torchrun / deepspeed yourself")
    return launched_result(config, launch(config))


def train(config: RunConfig | None = None, teacher=None, student=None, **overrides) -> TrainResult:
    """Run prune -> cache -> train -> export as configured. Returns the trained student and where it went.

    teacher / student: optional in-memory TeacherBundle and (pruned) UNet to use instead of loading and pruning
    (the Python API's way in); config.teacher is still recorded as the run's identity. Neither object is changed:
    the run trains its own copy of the student (TrainResult.student) against its own copy of the teacher's UNet.
    Keyword overrides replace config fields.
    """
    from ..distributed.runtime import launched
    from ..memory import optimizer_factory

    config = config or RunConfig()
    if overrides:
        config = config.replace(**overrides)
    config = stages.prepare_config(config, teacher_given=teacher is not None)
    if config.launcher is not None and not launched():
        return launch_ranks(config, teacher, student)
    session = open_session(config)  # this process's place among the ranks (or a plain single process)
    inputs = stages.check_inputs(config)
    source = stages.load_teacher(config, teacher)
    stages.check_resume(config, inputs, source)
    identity_config = config  # as given: derived values must not make a rerun look like another run
    config, latent_size = stages.resolve_geometry(config, source)
    start = stages.resolve_student(config, source, student, inputs, latent_size, session.device)
    session.sync_student(start.student)
    out = stages.write_run_identity(session, identity_config, start.prune_report)

    cache_dir = Path(config.cache_dir) if config.cache_dir else out / "cache"
    engine = build_engine(config, source.bundle, start.student, inputs.data_folder, cache_dir, latent_size, session,
                          progress=config.progress, teacher_unet=source.unet, teacher_fingerprint=source.fingerprint)
    solver = session.build_solver(engine, config, optimizer_factory(config))
    start_step = resume_state(inputs.resume_path, inputs.resume_meta, engine, solver)
    meta = {"identity": identity_config.identity(), "teacher_unet": source.fingerprint,
            "student_widths": start.student.config.get("pruned_widths"), "prune_report": start.prune_report}
    fitted = fit(config, session, engine, solver, out, start_step, checkpoint_writer(session, config, out, engine,
                                                                                     solver, meta))

    session.release_teacher(engine.teacher)
    student = session.final_student(engine.student)  # ZeRO: the whole fp32 student, gathered from the partitions
    pipeline_dir = stages.export_student(session, config, source.bundle, student, out)
    stages.write_summary(session, config, out, fitted, start.prune_report)
    stages.undo_kernel_patches(engine.kernel_patches)
    return TrainResult(out_dir=out, pipeline_dir=pipeline_dir, student=student, teacher=source.bundle,
                       prune_report=start.prune_report, history=fitted.history, steps_run=fitted.steps_run,
                       teacher_unet=engine.teacher)
