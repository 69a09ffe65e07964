"""The pruning-method interface: every ``--prune-method`` is one file in this package, registered by name.

A method turns a teacher UNet into a smaller student and a PruneReport. Methods that score units from data
(``needs_calibration``) receive a few calibration batches of the fine-tuning data; methods that fix the
architecture themselves (``fixed_architecture``, e.g. BK-SDM block removal) ignore the ratio.

    from safeprune_engine.prune.base import PRUNE_METHODS, PruneMethod

    @PRUNE_METHODS.register("random")
    class RandomPruning(PruneMethod):
        def prune(self, unet, request):
            ...                                   # -> (student, PruneReport)
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..errors import SafepruneError
from ..registry import Registry

PRUNE_METHODS: Registry = Registry("prune method", discover="safeprune_engine.prune",
                                   entry_point_group="safeprune_engine.prune_methods")


@dataclass
class CalibrationBatch:
    """A few noisy training rows for data-driven importance. latents: (B, C, h, w) z_t; timesteps: (B,) long;
    text_emb: (B, L, D); target: (B, C, h, w) the noise or the velocity, by the teacher's prediction type."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    text_emb: torch.Tensor
    target: torch.Tensor


@dataclass
class PruneRequest:
    """What the user asked for. Exactly one of ratio / target_macs is set (see ``width.prune``).

    calibration: a callable returning the calibration batches, called only by methods that need them (so
    magnitude pruning never encodes any data).
    """

    ratio: float | None = None
    target_macs: float | None = None
    sample_size: int | None = None
    importance: str = "l2"
    calibration: Callable[[], Sequence[CalibrationBatch]] | None = None
    parts: tuple[str, ...] = ("resnets", "attention", "feedforward")


class PruneMethod(abc.ABC):
    """Base class of pruning methods; subclasses register with ``@PRUNE_METHODS.register("name")``."""

    needs_calibration: bool = False  # wants request.calibration batches
    fixed_architecture: bool = False  # decides the student's size itself (ratio / target_macs unused)

    @abc.abstractmethod
    def prune(self, unet: nn.Module, request: PruneRequest):
        """Return ``(student, PruneReport)``; ``unet`` (the teacher) must be left untouched."""


def prune_unet(
    unet: nn.Module,
    method: str = "magnitude",
    *,
    ratio: float | None = None,
    target_macs: float | None = None,
    importance: str = "l2",
    sample_size: int | None = None,
    calibration: Callable[[], Sequence[CalibrationBatch]] | Sequence[CalibrationBatch] | None = None,
    parts: Iterable[str] = ("resnets", "attention", "feedforward"),
):
    """Prune a copy of ``unet`` with the registered method ``method``; returns ``(student, PruneReport)``.

    Width methods (magnitude, taylor) take exactly one of ``ratio`` / ``target_macs``; block-removal methods
    (bk-base, bk-small, bk-tiny, sdxl-depth-*) take neither and refuse ``target_macs``. ``calibration``: batches
    (or a callable making them) for data-driven methods.
    """
    pruner = PRUNE_METHODS.get(method)()
    if pruner.fixed_architecture:
        if target_macs is not None:
            raise SafepruneError(f"--prune-method {method} fixes the architecture itself; --target-macs does not "
                                 "apply (drop it, or use a width method: magnitude, taylor)")
        ratio = None
    elif ratio is not None and target_macs is not None:
        ratio = None  # target_macs replaces the ratio, as in RunConfig
    make_batches = calibration if callable(calibration) or calibration is None else (lambda: calibration)
    if pruner.needs_calibration and make_batches is None:
        raise SafepruneError(f"--prune-method {method} scores units on data: give calibration batches "
                             "(--data with a few images)")
    request = PruneRequest(ratio=ratio, target_macs=target_macs, sample_size=sample_size, importance=importance,
                           calibration=make_batches, parts=tuple(parts))
    student, report = pruner.prune(unet, request)
    report.method = method
    return student, report


def calibration_batches(teacher, folder, resolution: int, batches: int, batch_size: int, seed: int = 0,
                        device: torch.device | str | None = None) -> list[CalibrationBatch]:
    """``batches`` noisy batches of ``batch_size`` images of ``folder``, encoded with the teacher's VAE and text
    encoder (no cache is written). Images are a seeded random subset, reused cyclically when the folder is
    small; z_t = add_noise(z0, eps, t) at uniform t, target eps or v by the teacher's prediction type.
    """
    from ..data.cache import encode_captions
    from ..data.imagefolder import ImageFolder

    if not isinstance(folder, ImageFolder):
        folder = ImageFolder(folder)
    if batches < 1 or batch_size < 1:
        raise SafepruneError(f"calibration needs at least one batch of one image, got {batches} x {batch_size}")
    vae = teacher.vae
    param = next(vae.parameters())
    device = torch.device(device) if device is not None else next(teacher.unet.parameters()).device
    scheduler = teacher.noise_scheduler()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(folder), generator=generator).tolist()
    out = []
    for b in range(batches):
        index = [order[(b * batch_size + i) % len(order)] for i in range(batch_size)]
        images = torch.stack([folder.load_image(i, resolution) for i in index])
        with torch.inference_mode():
            posterior = vae.encode(images.to(param.device, param.dtype)).latent_dist
            z0 = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(
                param.device, param.dtype)
            shift = getattr(vae.config, "shift_factor", None)
            z0 = ((z0 - shift) if shift is not None else z0) * vae.config.scaling_factor
        z0 = z0.float().to(device)
        noise = torch.randn(z0.shape, generator=generator).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator).to(device)
        target = scheduler.get_velocity(z0, noise, t) if teacher.prediction_type == "v_prediction" else noise
        text = encode_captions(teacher, folder, index, resolution).to(device)
        out.append(CalibrationBatch(latents=scheduler.add_noise(z0, noise, t), timesteps=t, text_emb=text,
                                    target=target))
    return out
