"""The one engine builder, for one process and for many ranks: cache pass + models in their training dtypes + the
TrainingEngine that every solver runs on. Where ranks make a difference it asks the session (run/session.py).

The cache pass encodes the data (and concept images or the concept trajectory pool) once, so training steps never
run the VAE encoder or the text encoder.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from ..config import RunConfig
from ..models.conditioning import unet_kwargs
from .concepts import encode_concept_prompts, make_concept_source

log = logging.getLogger("safeprune_engine")


def block_shapes(unet, latent_size: int, text_shape: tuple[int, int], device) -> dict[str, tuple[int, int, int]]:
    """Block name -> (C, H, W) of its output, for every block feature distillation can tap, from one forward."""
    from ..distill.features import BlockTaps

    taps = BlockTaps(unet)
    param = next(unet.parameters())
    sample = torch.randn(1, unet.config.in_channels, latent_size, latent_size, device=device, dtype=param.dtype)
    text = torch.randn(1, *text_shape, device=device, dtype=param.dtype)
    with torch.no_grad(), taps.capture() as maps:
        unet(sample, torch.tensor([10], device=device), **unet_kwargs(unet, text))
    taps.remove()
    return {name: tuple(m.shape[1:]) for name, m in zip(taps.names, maps)}


@contextmanager
def encoders_on(teacher, device):
    """The VAE and the text encoder on the training device for the one-time passes, and back where they were
    afterwards: training never runs them, so they hold no accelerator memory during the steps (export and eval use
    them from there)."""
    modules = [m for m in (teacher.vae, teacher.text_encoder, getattr(teacher, "text_encoder_2", None)) if m is not None]
    homes = [next(m.parameters()).device for m in modules]
    try:
        for module in modules:
            module.to(device)
        yield
    finally:
        for module, home in zip(modules, homes):
            module.to(home)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def patch_kernels(config: RunConfig, student, teacher_unet, sample: tuple | None = None, session=None) -> list:
    """--kernels: fused ops in both UNets, in place (state dicts and outputs stay the same). Returns the
    (unet, PatchRecord) pairs the run undoes before it hands the models back.

    auto: each UNet keeps the fused ops only where they make its whole step faster (fused_ops_pay_off); forced
    backends are patched as asked."""
    if not config.patches_kernels:
        if config.kernels == "auto":
            log.info("kernels auto: ZeRO-3 sharding, so the UNets keep their diffusers forwards")
        return []
    from ..patching import patch_unet

    patches = []
    for unet in (student, teacher_unet):
        name = "student" if unet is student else "teacher"
        if config.kernels == "auto" and sample is not None:
            agree = session.agree if session is not None else (lambda decide: decide())
            keep, why = agree(lambda: fused_ops_pay_off(config, unet, sample, backward=unet is student))
            log.info("kernels auto, %s UNet: %s", name, why)
            if not keep:
                continue
        patches.append((unet, patch_unet(unet, backend=config.kernels)))
        log.info("%s UNet %s", name, patches[-1][1].summary())
    return patches


def fused_ops_pay_off(config: RunConfig, unet, sample: tuple, backward: bool) -> tuple:
    """(keep, why): whether the fused ops make `unet`'s step (the student's forward+backward, the teacher's forward)
    faster on one training batch (`sample`: latents, timesteps, text embeddings), timed with and without them
    (patching.time_patched_unet; per-op timing cannot see what a patched module costs around its op, which on a UNet
    of tiny layers outweighs every op's gain). The decision is cached per device with the ops' own decisions
    ($SAFEPRUNE_CACHE_DIR/autotune), so reruns take the same one; SAFEPRUNE_AUTOTUNE=0 keeps the fused ops without
    timing."""
    from ..ops import autotune
    from ..patching import DEFAULT_OPS, PatchTiming, time_patched_unet, unet_timing_key

    if not autotune.enabled():
        return True, "fused ops kept without timing (SAFEPRUNE_AUTOTUNE=0)"
    # the dtypes of training: fp32 latents into the student (under autocast), the teacher's dtype into it
    param = next(unet.parameters())
    dtype = torch.float32 if backward else param.dtype
    latents, timesteps, text = (t.to(param.device) for t in sample)
    inputs, kwargs = (latents.to(dtype), timesteps), unet_kwargs(unet, text.to(dtype))
    context = autotune.device_context(param.device)
    key = unet_timing_key(unet, inputs, kwargs, backward, config.mixed_precision, DEFAULT_OPS)
    entry = autotune.cache().lookup(context, key)
    if entry is not None:
        timing = PatchTiming(entry["ms"]["plain"] / 1e3, entry["ms"]["patched"] / 1e3, backward)
        keep = entry["backend"] == "patched"
        return keep, timing.summary(keep, "cached")
    timing = time_patched_unet(unet, inputs, kwargs, backward, training_autocast(config, param.device))
    keep = timing.pays_off()
    autotune.cache().store(context, key, "patched" if keep else "plain",
                           {"patched": 1e3 * timing.patched_s, "plain": 1e3 * timing.plain_s})
    return keep, timing.summary(keep)


def training_autocast(config: RunConfig, device):
    """A factory of the training step's autocast context (None without mixed precision)."""
    if config.mixed_precision == "no":
        return None
    from ..bilevel.engine import AUTOCAST_DTYPES

    return lambda: torch.autocast(torch.device(device).type, dtype=AUTOCAST_DTYPES[config.mixed_precision])


def timing_sample(data_cache, batch_size: int, latent_size: int, channels: int, seed: int) -> tuple:
    """One training batch's shapes for patch_kernels' timing: random latents and timesteps (a generator of their
    own, so the run's draws stay the same), the first captions' embeddings."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch_size, channels, latent_size, latent_size, generator=generator)
    timesteps = torch.randint(0, 1000, (batch_size,), generator=generator)
    rows = torch.arange(batch_size) % data_cache.text_emb.shape[0]
    return latents, timesteps, data_cache.text_emb[rows.to(data_cache.text_emb.device)].float()


def build_engine(config: RunConfig, teacher, student, data_folder, cache_dir: Path, latent_size: int, session=None,
                 progress: bool = True, teacher_unet=None, teacher_fingerprint: str | None = None):
    """The training engine on this process (one of many ranks, or the only one).

    teacher: the TeacherBundle (encoders and schedulers for the one-time passes); student: the UNet to train (moved,
    switched to training mode and given its memory options here, in place); teacher_unet: the frozen UNet the steps
    run (default teacher.unet; cast, moved and patched in place, so the run passes its own working copy of a
    caller's teacher); teacher_fingerprint: teacher_unet's weights fingerprint (keys the trajectory pool cache;
    default: computed now); session: the process layout (default a LocalSession of config).
    """
    from ..data.cache import build_latent_cache, encode_prompts
    from ..distill.features import pair_feature_blocks
    from ..distill.losses import FeatureProjections
    from ..memory import (apply_student_options, apply_teacher_options, cast_module, quantize_teacher_int8,
                          teacher_torch_dtype, write_int8_report)
    from ..unlearn.base import build_objective
    from ..unlearn.sources import CachedTargetSource

    if session is None:
        from .session import LocalSession

        session = LocalSession(config)
    teacher_unet = teacher.unet if teacher_unet is None else teacher_unet
    if teacher_fingerprint is None:
        if teacher_unet is not teacher.unet:
            raise ValueError("build_engine: pass teacher_fingerprint along with a teacher_unet of your own")
        teacher_fingerprint = teacher.fingerprint("unet")  # before any cast (a fingerprint covers the dtype)
    device = session.device
    progress = progress and session.is_main

    # 1. one-time passes (rank 0 first; the other ranks read what it cached), the encoders' only use
    session.place_teacher(teacher_unet)
    objective = concept_source = prompts = None
    with encoders_on(teacher, device):
        data_cache = session.main_first(lambda: build_latent_cache(
            teacher, data_folder, resolution=config.resolution, cache_dir=cache_dir / "data", progress=progress))
        # training data in fp32 whatever the encoders ran in: the student's weights are fp32 (run/stages.py), and
        # --mixed-precision / --teacher-dtype cast at each forward
        data_cache = data_cache.to(device, torch.float32)
        empty_text_emb = (encode_prompts(teacher, [""], resolution=config.resolution).to(device)
                          if config.caption_dropout > 0 else None)
        if config.method != "distill-only":
            objective = build_objective(config)
            session.check_objective(objective)
            prompts = encode_concept_prompts(config, teacher, data_folder.captions).to(device, torch.float32)
            concept_source = session.main_first(lambda: make_concept_source(
                config, teacher, teacher_unet, teacher_fingerprint, prompts, objective, cache_dir, latent_size,
                device, progress))

    # 2. the student on this device, block shapes, projections (every rank takes rank 0's)
    student.to(device).train()
    student.requires_grad_(True)
    apply_student_options(student, config)
    text_shape = tuple(data_cache.text_emb.shape[1:])
    # pairs of same-sized block outputs: every block for width pruning, the kept stages for block removal
    student_shapes = block_shapes(student, latent_size, text_shape, device)
    teacher_shapes = block_shapes(teacher_unet, latent_size, text_shape, next(teacher_unet.parameters()).device)
    feature_pairs = pair_feature_blocks(student_shapes, teacher_shapes)
    projections = FeatureProjections([student_shapes[s][0] for s, _ in feature_pairs],
                                     [teacher_shapes[t][0] for _, t in feature_pairs]).to(device)
    session.broadcast(projections)

    # 3. the frozen teacher: partitioned across ranks, or whole in the training dtype (or --teacher-dtype)
    sharded = session.shard_teacher(teacher_unet)
    if sharded is not None:
        teacher_unet = sharded
    else:
        teacher_unet = cast_module(teacher_unet, teacher_torch_dtype(config)).to(device).eval().requires_grad_(False)
        apply_teacher_options(teacher_unet, config)
        if config.teacher_int8:
            report = quantize_teacher_int8(teacher_unet, latent_size, text_shape, seed=config.seed)
            if session.is_main:
                write_int8_report(config.out, report)
    sample = timing_sample(data_cache, config.batch_size, latent_size, student.config.in_channels, config.seed)
    kernel_patches = patch_kernels(config, student, teacher_unet, sample, session)  # none under ZeRO-3 (auto; forced: refused)
    engine = session.make_engine(
        student, teacher_unet, teacher.noise_scheduler(), teacher.prediction_type, data_cache, config,
        concept_source=concept_source, objective=objective, projections=projections, device=device, prompts=prompts,
        feature_pairs=feature_pairs, kernel_patches=kernel_patches, empty_text_emb=empty_text_emb)

    # 4. the teacher's upper-level targets on a fixed concept pool, once (two-stage's targets come from the student
    # it freezes mid-run, so they cannot be computed now)
    if config.concept_targets == "cached" and config.method in ("bilevel", "interleaved", "alternating"):
        engine.cache_concept_targets(config.concept_target_pool, progress=progress)
        if isinstance(engine.concepts, CachedTargetSource):
            log.info("concept targets: %d pool rows x %d conditions cached (%.1f MiB)", len(engine.concepts),
                     len(engine.concepts.predictions), engine.concepts.nbytes() / 2**20)
    return engine
