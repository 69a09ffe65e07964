"""Rank set-up: one process per rank, gloo on CPU and NCCL on CUDA, and the few collectives the engine needs.

A launcher (torchrun or deepspeed) starts the ranks and sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT. A single process that asks for ZeRO (or a sharded teacher) without a launcher becomes a world of one,
so every code path is the same with one rank or many.
"""
from __future__ import annotations

import atexit
import glob
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import SafepruneError

log = logging.getLogger("safeprune_engine")

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


_FORMED_ENV: dict[str, str] = {}  # rank variables this process set for itself (a world of one)


def launched() -> bool:
    """True inside a process started by torchrun / deepspeed (or anything that sets the rank variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "RANK" not in _FORMED_ENV


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_single_process_env() -> None:
    """The rank variables of a world of one, for a process that was not started by a launcher."""
    values = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(free_port())}
    for key, value in values.items():
        if key not in os.environ:
            os.environ[key] = value
            _FORMED_ENV[key] = value


def rank_device(config, local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK when CUDA is there (unless --device cpu), else cpu."""
    wanted = (config.device or "").split(":")[0]
    if wanted == "cpu" or (not wanted and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SafepruneError(f"--device {config.device}: CUDA is not available in this process")
    return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))


@dataclass
class DistContext:
    """Where this process stands in the job. device: this rank's device; backend: "gloo" or "nccl"."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    uses_deepspeed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def rows(self, total: int) -> slice:
        """This rank's contiguous share of `total` global batch rows (total must divide evenly)."""
        if total % self.world_size:
            raise SafepruneError(f"a batch of {total} rows does not split evenly over {self.world_size} ranks")
        per_rank = total // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over ranks of a small tensor (a copy; the input is untouched). fp64 so that every rank gets the
        same bits whatever the reduction order."""
        if self.world_size == 1:
            return values.detach().clone()
        total = values.detach().to(torch.float64).clone()
        if self.backend == "nccl":
            total = total.to(self.device)
        dist.all_reduce(total)
        return (total / self.world_size).to(values.device, values.dtype)

    def broadcast_object(self, value, src: int = 0):
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, value) -> list:
        if self.world_size == 1:
            return [value]
        out = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    @torch.no_grad()
    def broadcast_module(self, module: torch.nn.Module, src: int = 0) -> None:
        """Make every rank hold rank `src`'s parameters and buffers (identical architectures required)."""
        if self.world_size == 1:
            return
        for tensor in list(module.parameters()) + list(module.buffers()):
            # collectives need dense row-major tensors (channels-last weights are not)
            data = row_major(tensor.data)
            if self.backend == "nccl":
                data = data.to(self.device)
            dist.broadcast(data, src=src)
            if data is not tensor.data:
                tensor.data.copy_(data)

    @torch.no_grad()
    def average_gradients(self, params, bucket_bytes: int = 64 << 20) -> None:
        """In-place mean over ranks of every .grad in `params`, in flat all-reduces of about bucket_bytes each."""
        if self.world_size == 1:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for param in params:
            if param.grad is not None:
                by_dtype.setdefault(param.grad.dtype, []).append(param.grad)
        for grads in by_dtype.values():
            bucket, size = [], 0
            for grad in grads + [None]:  # None flushes the last bucket
                if grad is not None:
                    bucket.append(grad)
                    size += grad.numel() * grad.element_size()
                if bucket and (grad is None or size >= bucket_bytes):
                    flat = torch.cat([g.reshape(-1) for g in bucket])
                    on_device = flat.to(self.device) if self.backend == "nccl" else flat
                    dist.all_reduce(on_device)
                    on_device /= self.world_size
                    offset = 0
                    for g in bucket:
                        g.copy_(on_device[offset: offset + g.numel()].view_as(g))
                        offset += g.numel()
                    bucket, size = [], 0


def row_major(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` with plain row-major strides (a copy when it has others: channels-last, or odd strides on size-1
    dimensions, which is_contiguous() accepts but byte views and flat buffers do not)."""
    expected, step = [], 1
    for size in reversed(tensor.shape):
        expected.append(step)
        step *= size
    if tuple(reversed(expected)) == tuple(tensor.stride()):
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


_CONTEXT: DistContext | None = None
SHM_BUFFERS = "deepspeed_allreduce_buffer_*_{addr}_{port}_{rank}"


def remove_shm_buffers(addr: str, port: str, rank: int, root: str = "/dev/shm") -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffers (shared-memory files of ~66 MB that DeepSpeed never
    removes: every multi-rank CPU run left two behind, and /dev/shm is RAM). Safe while still mapped: the memory
    goes when the process unmaps it at exit."""
    for path in glob.glob(os.path.join(root, SHM_BUFFERS.format(addr=addr, port=port, rank=rank))):
        try:
            os.unlink(path)
        except OSError:
            pass


def init_context(config, need_deepspeed: bool) -> DistContext:
    """Join (or, for a world of one, form) the process group and pick this rank's device. Idempotent."""
    global _CONTEXT
    if not launched():
        prepare_single_process_env()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = rank_device(config, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if need_deepspeed and device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed picks its accelerator
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if need_deepspeed:
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend)
        else:
            dist.init_process_group(backend=backend)
    elif need_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the existing group
    if dist.get_world_size() != world_size:
        raise SafepruneError(f"the process group has {dist.get_world_size()} ranks but WORLD_SIZE says {world_size}")
    if need_deepspeed:
        from deepspeed.utils import logger as deepspeed_logger

        # DeepSpeed logs config dumps and "untested optimizer" notices at INFO/WARNING on every rank
        deepspeed_logger.setLevel(logging.DEBUG if log.getEffectiveLevel() <= logging.DEBUG else logging.ERROR)
    if need_deepspeed and device.type == "cpu" and world_size > 1:
        atexit.register(remove_shm_buffers, os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), rank)
    uses_deepspeed = need_deepspeed or (_CONTEXT is not None and _CONTEXT.uses_deepspeed)
    _CONTEXT = DistContext(rank, world_size, local_rank, device, dist.get_backend(), uses_deepspeed)
    return _CONTEXT


def current_context() -> DistContext | None:
    """The DistContext of this process once init_context ran, else None."""
    return _CONTEXT


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
