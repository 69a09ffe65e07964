"""What the trainer asks of the process layout: one object, LocalSession for a plain single-process run and
DistributedSession for ranks (DDP or DeepSpeed ZeRO, optionally a ZeRO-3-sharded teacher).

The trainer runs the same code either way and calls the session where ranks make a difference: which device,
who writes files, how the engine and solver are built, how checkpoints and the final student are gathered.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..errors import SafepruneError

log = logging.getLogger("safeprune_engine")


def needs_distributed(config, resume_meta: dict | None = None) -> bool:
    """Ranks from a launcher, ZeRO, a sharded teacher, or resuming a ZeRO checkpoint."""
    from .runtime import launched

    zero_checkpoint = bool(resume_meta and resume_meta.get("distributed", {}).get("zero_stage"))
    return launched() or config.zero_stage >= 1 or config.teacher_zero3 or zero_checkpoint


def peek_resume_meta(config) -> dict | None:
    """The checkpoint --resume points at, if it can be read (the trainer reports a bad --resume itself)."""
    if not config.resume:
        return None
    try:
        return ckpt.load_checkpoint_meta(ckpt.resolve_resume(config.out, config.resume))
    except (SafepruneError, OSError, ValueError):
        return None


def open_session(config):
    """DistributedSession when ranks, ZeRO or a ZeRO checkpoint are involved, else LocalSession."""
    if needs_distributed(config, peek_resume_meta(config)):
        return DistributedSession(config)
    return LocalSession(config)


class LocalSession:
    """A single process: every hook is the trainer's plain behaviour."""

    rank, world_size, is_main = 0, 1, True

    def __init__(self, config):
        from ..trainer import resolve_device

        self.config = config
        self.device = resolve_device(config)

    def barrier(self) -> None:
        pass

    def sync_student(self, student) -> None:
        pass

    def build_engine(self, config, teacher, student, data_folder, cache_dir, latent_size, progress):
        from ..trainer import build_engine

        return build_engine(config, teacher, student, data_folder, cache_dir, latent_size, self.device, progress)

    def build_solver(self, engine, config):
        from ..bilevel.solvers import build_solver
        from ..memory import solver_optimizers

        with solver_optimizers(config):
            return build_solver(engine, config)

    def save_checkpoint(self, out, step, student, projections, state, meta, keep) -> Path:
        return ckpt.save_checkpoint(out, step, student, projections, state, meta, keep=keep)

    def final_student(self, student):
        return student

    def release_teacher(self, teacher_unet) -> None:
        from ..trainer import cast_module

        cast_module(teacher_unet, torch.float32)

    def report(self) -> dict:
        return {"ranks": 1}


def weight_checksum(module) -> str:
    """sha256 of every parameter's bytes in name order (the weights this rank computes with)."""
    import hashlib

    hasher = hashlib.sha256()
    for name, param in module.named_parameters():
        tensor = param.detach().cpu().contiguous()
        hasher.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()[:16]


def check_precisions_supported(config) -> None:
    """DeepSpeed runs half-precision engines only where its accelerator supports them (its CPU accelerator: bf16)."""
    from deepspeed.accelerator import get_accelerator

    from ..memory import teacher_precision

    accelerator = get_accelerator()
    wanted = []
    if config.zero_stage >= 1 and config.mixed_precision in ("bf16", "fp16"):
        wanted.append(("--mixed-precision", config.mixed_precision))
    if config.teacher_zero3 and teacher_precision(config) in ("bf16", "fp16"):
        wanted.append(("the ZeRO-3 teacher's dtype", teacher_precision(config)))
    for what, precision in wanted:
        supported = accelerator.is_bf16_supported() if precision == "bf16" else accelerator.is_fp16_supported()
        if not supported:
            raise SafepruneError(f"{what} {precision}: DeepSpeed's {accelerator.device_name()} accelerator does not "
                                 f"train in {precision}; use bf16 or fp32 there, or --zero-stage 0 without "
                                 "--teacher-zero3 (torch autocast)")


class DistributedSession:
    """This process is one rank (possibly of a world of one). See safeprune_engine/distributed/__init__.py."""

    def __init__(self, config):
        from .runtime import init_context

        need_deepspeed = config.zero_stage >= 1 or config.teacher_zero3
        if need_deepspeed:
            try:
                import deepspeed  # noqa: F401
            except ImportError as error:
                raise SafepruneError(f"--zero-stage {config.zero_stage} / --teacher-zero3 need DeepSpeed (pip install "
                                     f"'safeprune-engine[scale]'): {error}") from None
        self.config = config
        self.context = init_context(config, need_deepspeed)
        if need_deepspeed:
            check_precisions_supported(config)
        self.rank, self.world_size = self.context.rank, self.context.world_size
        self.is_main = self.context.is_main
        self.device = self.context.device
        self.solver = None
        self.teacher_engine = None
        if config.nproc > 1 and config.nproc != self.world_size:
            log.warning("--nproc %d but the launcher started %d ranks; using %d", config.nproc, self.world_size,
                        self.world_size)
        if not self.is_main:
            logging.getLogger("safeprune_engine").setLevel(logging.WARNING)  # one rank reports
        for name in ("batch_size", "concept_batch_size"):
            value = getattr(config, name)
            if value is not None and value % self.world_size:
                raise SafepruneError(f"--{name.replace('_', '-')} {value} is the global batch and must split evenly "
                                     f"over {self.world_size} ranks")

    def barrier(self) -> None:
        self.context.barrier()

    def sync_student(self, student) -> None:
        """Every rank pruned (or loaded) the same student; make sure, then take rank 0's weights."""
        widths = self.context.all_gather_object(student.config.get("pruned_widths"))
        if any(w != widths[0] for w in widths):
            raise SafepruneError("ranks pruned the teacher to different student architectures; pruning must be "
                                 "deterministic across ranks")
        self.context.broadcast_module(student)

    def build_engine(self, config, teacher, student, data_folder, cache_dir, latent_size, progress):
        from .builder import build_distributed_engine

        engine, self.teacher_engine = build_distributed_engine(config, teacher, student, data_folder, cache_dir,
                                                               latent_size, self.context, progress)
        return engine

    def build_solver(self, engine, config):
        from .solver import build_solver

        self.solver = build_solver(engine, config)
        return self.solver

    def _zero(self) -> bool:
        return self.config.zero_stage >= 1

    def save_checkpoint(self, out, step, student, projections, state, meta, keep) -> Path | None:
        """Collective: ZeRO gathers the whole student first; rank 0 writes the normal checkpoint layout."""
        zero = state.get("solver", {}).get("zero")
        meta = {**meta, "distributed": {"zero_stage": self.config.zero_stage, "world_size": self.world_size,
                                        "optimizer_format": zero["kind"] if zero else "torch"}}
        if self._zero():
            from ..distill.losses import FeatureProjections
            from .solver import gathered_student

            student, projection_state = gathered_student(self.solver, include_projections=True)
            if self.is_main and projections is not None:
                projections = FeatureProjections(projections.student_channels, projections.teacher_channels)
                projections.load_state_dict(projection_state)
        path = None
        if self.is_main:
            path = ckpt.save_checkpoint(out, step, student, projections, state, meta, keep=keep)
        self.barrier()
        return path

    def final_student(self, student):
        """The trained student, whole, on every rank (ZeRO: fp32 masters gathered from the partitions).

        Also records a checksum of the weights each rank computes with (ZeRO-3: gathered layer by layer), so a
        run shows that its ranks ended on identical parameters."""
        self.rank_checksums = self.context.all_gather_object(self._local_checksum(student))
        if len(set(self.rank_checksums)) > 1:
            log.warning("ranks ended with different student weights: %s", self.rank_checksums)
        if self._zero() and self.solver is not None and self.solver.ds_engine is not None:
            from .solver import gathered_student

            return gathered_student(self.solver, keep_on_all_ranks=True)
        return student

    def _local_checksum(self, student) -> str:
        params = list(student.parameters())
        if any(hasattr(p, "ds_tensor") for p in params):
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return weight_checksum(student)
        return weight_checksum(student)

    def report(self) -> dict:
        return {"ranks": self.world_size, "zero_stage": self.config.zero_stage,
                "teacher_zero3": self.config.teacher_zero3,
                "rank_weight_checksums": getattr(self, "rank_checksums", None)}

    def release_teacher(self, teacher_unet) -> None:
        if self.teacher_engine is None:
            from ..trainer import cast_module

            cast_module(teacher_unet, torch.float32)
        # a ZeRO-3 teacher stays partitioned: its weights are not needed after training
