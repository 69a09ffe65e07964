"""The steps of a run: resume, the loop (NaN check, scalars to tensorboard and the history), checkpoints and
snapshots (--snapshot-steps: the student's weights alone, kept whatever --keep-checkpoints says).

A checkpoint holds everything needed to continue bit for bit: the student and projections, the solver's optimizer
states, the data sampler and the random generator, and the objective's own state.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import checkpoint as ckpt
from ..config import RunConfig

log = logging.getLogger("safeprune_engine")


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)  # logged scalars, one dict per logged step
    steps_run: int = 0
    seconds: float = 0.0


def resume_state(resume_path: Path | None, resume_meta: dict | None, engine, solver) -> int:
    """Load a checkpoint's projections, solver, sampler, generator and objective states; returns its step."""
    if resume_path is None:
        return 0
    state = ckpt.load_checkpoint_state(resume_path, engine.device)
    ckpt.load_projections(resume_path, engine.projections)
    solver.load_state_dict(state["solver"])
    engine.sampler.load_state_dict(state["sampler"])
    engine.generator.set_state(state["generator"].cpu())
    if engine.objective is not None and state.get("objective"):
        engine.objective.load_state_dict(state["objective"])
    start_step = int(resume_meta["step"])
    log.info("resumed from %s at step %d", resume_path, start_step)
    return start_step


def checkpoint_writer(session, config: RunConfig, out: Path, engine, solver, meta: dict):
    """step -> checkpoint folder: saves the run's state at `step` (collective on many ranks)."""

    def save(step: int) -> Path:
        objective = engine.objective
        state = {"solver": solver.state_dict(), "sampler": engine.sampler.state_dict(),
                 "generator": engine.generator.get_state(),
                 "objective": objective.state_dict() if objective is not None else {}}
        return session.save_checkpoint(out, step, engine.student, engine.projections, state, meta,
                                       config.keep_checkpoints)

    return save


def scalar_writer(session, out: Path, start_step: int):
    """A tensorboard SummaryWriter on rank 0 (None elsewhere, or when tensorboard is missing)."""
    if not session.is_main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an install dependency, but training must not die for a logger
        log.warning("tensorboard is not installed: no scalar logs")
        return None
    return SummaryWriter(str(out / "tensorboard"), purge_step=start_step)


def log_kernel_choices(engine) -> None:
    """One INFO line per fused op: what --kernels auto chose for the shapes met so far, and what timing cost."""
    if not getattr(engine, "kernel_patches", None):
        return
    from ..ops import autotune

    for line in autotune.summary_lines(new_only=True):
        log.info(line)


def fit(config: RunConfig, session, engine, solver, out: Path, start_step: int, save) -> FitResult:
    """Steps start_step .. config.steps - 1, then the final checkpoint (unless nothing ran and one exists)."""
    from tqdm.auto import tqdm

    objective = engine.objective
    snapshots = set(config.snapshot_steps)
    missed = sorted(n for n in snapshots if n <= start_step and not ckpt.snapshot_path(out, n).is_dir())
    if missed and session.is_main:
        log.warning("--snapshot-steps %s: the run resumed at step %d, after them, and has no snapshot of them",
                    ", ".join(map(str, missed)), start_step)
    writer = scalar_writer(session, out, start_step)
    history: list[dict] = []
    bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps, desc=config.method,
               disable=not (config.progress and session.is_main), dynamic_ncols=True)
    started = time.perf_counter()
    if objective is not None and start_step < config.steps:
        objective.on_train_start(engine, start_step)
    for step in bar:
        scalars = solver.step(step)
        if step == start_step:
            log_kernel_choices(engine)  # the fused ops were timed during this first step (or read from the cache)
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
        # a snapshot before the checkpoint of the same step: resuming from that checkpoint never misses it
        if step + 1 in snapshots and step + 1 < config.steps:
            session.save_snapshot(out, step + 1, engine.student)
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            save(step + 1)
    bar.close()
    elapsed = time.perf_counter() - started
    log_kernel_choices(engine)  # shapes first met after step one (e.g. upper steps)
    if writer is not None:
        writer.close()
    steps_run = config.steps - start_step
    if objective is not None and steps_run > 0:
        objective.on_train_end(engine)  # e.g. UCE's final edit: part of the last checkpoint and the export
    if steps_run > 0 and config.steps in snapshots:  # after the final edit, like the export
        session.save_snapshot(out, config.steps, engine.student)
    if steps_run > 0 or not ckpt.list_checkpoints(out):
        save(config.steps)
    return FitResult(history=history, steps_run=steps_run, seconds=elapsed)
