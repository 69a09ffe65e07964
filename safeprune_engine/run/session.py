"""The process layout of a run: one object whose hooks are the only places where one process and many ranks differ.

LocalSession is a plain single process (every hook is trivial); DistributedSession is one rank of a job (DDP or
DeepSpeed ZeRO, optionally a ZeRO-3-sharded teacher). The run's stages and its one engine builder call the hooks:
which device, who writes files (is_main, main_first), what is shared between ranks (broadcast, sync_student), where
the frozen teacher lives (place_teacher, shard_teacher), which engine and solver classes (make_engine,
build_solver), and how checkpoints and the final student are gathered.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..errors import SafepruneError
from ..memory import cast_module

log = logging.getLogger("safeprune_engine")


def resolve_device(config) -> torch.device:
    """--device, else cuda when available, else cpu."""
    if config.device:
        return torch.device(config.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def needs_distributed(config, resume_meta: dict | None = None) -> bool:
    """Ranks from a launcher, ZeRO, a sharded teacher, or resuming a ZeRO checkpoint."""
    from ..distributed.runtime import launched

    zero_checkpoint = bool(resume_meta and resume_meta.get("distributed", {}).get("zero_stage"))
    return launched() or config.zero_stage >= 1 or config.teacher_zero3 or zero_checkpoint


def peek_resume_meta(config) -> dict | None:
    """The checkpoint --resume points at, if it can be read (the run reports a bad --resume itself)."""
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
    """A single process: every hook is the plain behaviour."""

    rank, world_size, is_main = 0, 1, True

    def __init__(self, config):
        self.config = config
        self.device = resolve_device(config)

    # ---- coordination ---------------------------------------------------------------------------------------
    def barrier(self) -> None:
        pass

    def main_first(self, work):
        """Run `work` (which may write shared files) and return its value."""
        return work()

    def agree(self, decide):
        """`decide()`'s value, the same on every rank (a timing-based choice must not differ between ranks)."""
        return decide()

    def broadcast(self, module: torch.nn.Module) -> None:
        """Make every rank hold this process's weights of `module`: nothing to do with one process."""

    def sync_student(self, student) -> None:
        pass

    # ---- what the engine builder asks -----------------------------------------------------------------------
    def place_teacher(self, unet: torch.nn.Module) -> None:
        """Put the whole teacher where the one-time passes (cache, trajectory pool, block shapes) run."""
        unet.to(self.device)

    def check_objective(self, objective) -> None:
        """Refuse an objective this layout cannot train (every objective works in one process)."""

    def shard_teacher(self, unet: torch.nn.Module):
        """The frozen teacher partitioned across ranks, or None to keep it whole (always, here)."""
        return None

    def make_engine(self, *args, **kwargs):
        from ..bilevel.engine import TrainingEngine

        return TrainingEngine(*args, **kwargs)

    def build_solver(self, engine, config, make_optimizer):
        from ..bilevel.solvers import build_solver

        return build_solver(engine, config, make_optimizer)

    # ---- after the steps --------------------------------------------------------------------------------------
    def save_checkpoint(self, out, step, student, projections, state, meta, keep) -> Path:
        return ckpt.save_checkpoint(out, step, student, projections, state, meta, keep=keep)

    def save_snapshot(self, out, step, student) -> Path:
        return ckpt.save_snapshot(out, step, student)

    def final_student(self, student):
        return student

    def release_teacher(self, teacher_unet) -> None:
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


def check_objective_supported(objective, config) -> None:
    """Objectives that edit or mask weights directly cannot work on ZeRO-partitioned weights."""
    from ..unlearn.base import UnlearnObjective

    if config.zero_stage < 1 or objective is None:
        return
    if objective.latents is None:
        raise SafepruneError(f"--erase-method {config.erase_method} edits the student's weights in closed form, "
                             "which ZeRO-partitioned weights do not allow; use --zero-stage 0 (data parallel)")
    if type(objective).gradient_masks is not UnlearnObjective.gradient_masks:
        raise SafepruneError(f"--erase-method {config.erase_method} masks gradients element by element through a "
                             "functional forward, which ZeRO-partitioned weights do not allow; use --zero-stage 0")


class DistributedSession:
    """This process is one rank (possibly of a world of one). See safeprune_engine/distributed/__init__.py.

    Order of work across ranks in the engine builder: rank 0 runs the one-time cache pass and samples the
    trajectory pool with the whole teacher while the others wait, then they read both from the (fingerprinted)
    cache folder, which must be on a filesystem every rank sees; rank 0's feature projections are copied to every
    rank; with --teacher-zero3 the teacher is partitioned across the ranks.
    """

    def __init__(self, config):
        from ..distributed.runtime import check_precisions_supported, init_context

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
        self.teacher_engine = None  # the ZeRO-3 teacher's DeepSpeed engine, kept alive while its module is used
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

    # ---- coordination ---------------------------------------------------------------------------------------
    def barrier(self) -> None:
        self.context.barrier()

    def main_first(self, work):
        """Rank 0 runs `work` (which may write shared files), then every other rank runs it (and finds them)."""
        result = work() if self.is_main else None
        self.barrier()
        if not self.is_main:
            result = work()
        return result

    def agree(self, decide):
        """Rank 0 runs `decide()` (a timing-based choice) and every rank takes its value."""
        return self.context.broadcast_object(decide() if self.is_main else None)

    def broadcast(self, module: torch.nn.Module) -> None:
        """Every rank takes rank 0's parameters and buffers of `module`."""
        self.context.broadcast_module(module)

    def sync_student(self, student) -> None:
        """Every rank pruned (or loaded) the same student; make sure, then take rank 0's weights."""
        widths = self.context.all_gather_object(student.config.get("pruned_widths"))
        if any(w != widths[0] for w in widths):
            raise SafepruneError("ranks pruned the teacher to different student architectures; pruning must be "
                                 "deterministic across ranks")
        self.context.broadcast_module(student)

    # ---- what the engine builder asks -----------------------------------------------------------------------
    def place_teacher(self, unet: torch.nn.Module) -> None:
        """Rank 0 runs the one-time passes on its device; with --teacher-zero3 the other ranks keep the whole
        teacher off their accelerator (it is partitioned right after)."""
        if self.is_main or not self.config.teacher_zero3:
            unet.to(self.device)

    def check_objective(self, objective) -> None:
        check_objective_supported(objective, self.config)

    def shard_teacher(self, unet: torch.nn.Module):
        """--teacher-zero3: the teacher as this rank's ZeRO-3 partitions (a module called as before), else None."""
        if not self.config.teacher_zero3:
            return None
        from ..distributed.teacher import shard_teacher

        if self.is_main:
            unet.to("cpu")  # partitions go to each rank's device; the whole copy leaves the accelerator
        module, self.teacher_engine = shard_teacher(unet, self.config, self.context)
        return module

    def make_engine(self, *args, **kwargs):
        from ..distributed.engine import DistributedTrainingEngine

        # under ZeRO the upper forward builds its graph only to the upper parameters (DeepSpeed's backward
        # reaches whatever the graph reaches)
        return DistributedTrainingEngine(*args, context=self.context,
                                         restrict_upper_forward=self.config.zero_stage >= 1, **kwargs)

    def build_solver(self, engine, config, make_optimizer):
        from ..distributed.solver import build_solver

        self.solver = build_solver(engine, config, make_optimizer)
        return self.solver

    # ---- after the steps --------------------------------------------------------------------------------------
    def _zero(self) -> bool:
        return self.config.zero_stage >= 1

    def save_checkpoint(self, out, step, student, projections, state, meta, keep) -> Path | None:
        """Collective: ZeRO gathers the whole student first; rank 0 writes the normal checkpoint layout."""
        zero = state.get("solver", {}).get("zero")
        meta = {**meta, "distributed": {"zero_stage": self.config.zero_stage, "world_size": self.world_size,
                                        "optimizer_format": zero["kind"] if zero else "torch"}}
        if self._zero():
            from ..distill.losses import FeatureProjections
            from ..distributed.solver import gathered_student

            student, projection_state = gathered_student(self.solver, include_projections=True)
            if self.is_main and projections is not None:
                projections = FeatureProjections(projections.student_channels, projections.teacher_channels)
                projections.load_state_dict(projection_state)
        path = None
        if self.is_main:
            path = ckpt.save_checkpoint(out, step, student, projections, state, meta, keep=keep)
        self.barrier()
        return path

    def save_snapshot(self, out, step, student) -> Path | None:
        """Collective: ZeRO gathers the whole student (fp32 masters) first; rank 0 writes the weights."""
        if self._zero():
            from ..distributed.solver import gathered_student

            student = gathered_student(self.solver)
        path = ckpt.save_snapshot(out, step, student) if self.is_main else None
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
            from ..distributed.solver import gathered_student

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
            cast_module(teacher_unet, torch.float32)
        # a ZeRO-3 teacher stays partitioned: its weights are not needed after training
