"""Build the training engine on every rank: the distributed counterpart of trainer.build_engine.

Order of work across ranks:
1. Rank 0 runs the one-time cache pass (VAE latents, caption embeddings) and, when the upper level needs it,
   samples the teacher's trajectory pool, with the whole teacher in inference mode; the other ranks wait and then
   read both from the (fingerprinted) cache folder, which must be on a filesystem every rank sees.
2. Every rank puts its student on its device and measures block shapes; rank 0's feature projections are copied
   to every rank.
3. The teacher gets its dtype and memory options, and with --teacher-zero3 is partitioned across the ranks.
"""
from __future__ import annotations

import logging

import torch

from ..errors import SafepruneError
from ..memory import (apply_student_options, apply_teacher_options, quantize_teacher_int8, teacher_torch_dtype,
                      write_int8_report)
from .engine import DistributedTrainingEngine

log = logging.getLogger("safeprune_engine")


def main_first(context, work):
    """Rank 0 runs `work` (which may write shared files), then every other rank runs it (and finds them)."""
    result = work() if context.is_main else None
    context.barrier()
    if not context.is_main:
        result = work()
    return result


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


def build_distributed_engine(config, teacher, student, data_folder, cache_dir, latent_size, context, progress):
    """Returns (DistributedTrainingEngine, teacher DeepSpeed engine or None)."""
    from ..data.cache import build_latent_cache
    from ..distill.features import pair_feature_blocks
    from ..distill.losses import FeatureProjections
    from ..trainer import block_shapes, cast_module, encode_concept_prompts, make_concept_source
    from ..unlearn.base import build_objective
    from .teacher import shard_teacher

    device = context.device
    progress = progress and context.is_main
    # 1. one-time passes on rank 0 (encoders and teacher where the trainer puts them), read by the others
    if context.is_main or not config.teacher_zero3:
        teacher.unet.to(device)
    data_cache = main_first(context, lambda: build_latent_cache(
        teacher, data_folder, resolution=config.resolution, cache_dir=cache_dir / "data", progress=progress))
    data_cache = data_cache.to(device)
    objective = concept_source = prompts = None
    if config.method != "distill-only":
        objective = build_objective(config)
        check_objective_supported(objective, config)
        prompts = encode_concept_prompts(config, teacher).to(device)
        concept_source = main_first(context, lambda: make_concept_source(
            config, teacher, prompts, objective, cache_dir, latent_size, device, progress))

    # 2. the student on this rank, block shapes, projections shared from rank 0
    student.to(device).train()
    student.requires_grad_(True)
    apply_student_options(student, config)
    text_shape = tuple(data_cache.text_emb.shape[1:])
    student_shapes = block_shapes(student, latent_size, text_shape, device)
    teacher_device = next(teacher.unet.parameters()).device
    teacher_shapes = block_shapes(teacher.unet, latent_size, text_shape, teacher_device)
    feature_pairs = pair_feature_blocks(student_shapes, teacher_shapes)
    projections = FeatureProjections([student_shapes[s][0] for s, _ in feature_pairs],
                                     [teacher_shapes[t][0] for _, t in feature_pairs]).to(device)
    context.broadcast_module(projections)

    # 3. the teacher: dtype, memory options, sharding
    teacher_engine = None
    if config.teacher_zero3:
        if context.is_main:
            teacher.unet.to("cpu")  # partitions go to each rank's device; the whole copy leaves the accelerator
        teacher_unet, teacher_engine = shard_teacher(teacher.unet, config, context)
    else:
        teacher_unet = cast_module(teacher.unet, teacher_torch_dtype(config)).to(device).eval().requires_grad_(False)
        apply_teacher_options(teacher_unet, config)
        if config.teacher_int8:
            report = quantize_teacher_int8(teacher_unet, latent_size, text_shape, seed=config.seed)
            if context.is_main:
                write_int8_report(config.out, report)
    if config.kernels != "off":  # fused ops, as trainer.build_engine (validate() refuses them with ZeRO-3)
        from ..patching import patch_unet

        for unet in (student, teacher_unet):
            log.info("%s UNet %s", "student" if unet is student else "teacher",
                     patch_unet(unet, backend=config.kernels).summary())
    engine = DistributedTrainingEngine(
        student, teacher_unet, teacher.noise_scheduler(), teacher.prediction_type, data_cache, config,
        concept_source=concept_source, objective=objective, projections=projections, device=device, prompts=prompts,
        feature_pairs=feature_pairs, context=context)
    return engine, teacher_engine
