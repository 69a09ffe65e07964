"""The upper level's inputs: the encoded concept prompts and the objective's training rows (concept images, or a
pool the teacher samples once)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import RunConfig
from ..models.conditioning import ConditionLayout


def encode_concept_prompts(config: RunConfig, teacher, data_captions: list[str] | None = None):
    """ConceptPrompts: the erase prompts, each one's --erase concept and anchor, and the preserve prompts (--preserve,
    and with --preserve-from-data N the N fine-tuning captions nearest the erase prompts)."""
    from ..data.cache import encode_prompts
    from ..unlearn.base import ConceptPrompts
    from ..unlearn.sources import anchor_for

    def encode(texts):  # at the training resolution: SDXL's time ids of prompts without an image
        return encode_prompts(teacher, texts, resolution=config.resolution)

    prompts = list(config.erase_prompts or config.erase)
    resolved = [anchor_for(p, config.erase, config.anchors) for p in prompts]
    concept_emb = encode(prompts)
    preserve = list(config.preserve)
    if config.preserve_from_data and data_captions:
        preserve += nearest_captions(teacher, data_captions, concept_emb, config.erase, config.preserve_from_data,
                                     seed=config.seed)
    return ConceptPrompts(
        concepts=list(config.erase), prompts=prompts, anchors=[a for _, a in resolved],
        concept_emb=concept_emb, anchor_emb=encode([a for _, a in resolved]),
        prompt_concept=torch.tensor([i for i, _ in resolved], dtype=torch.long),
        preserve=preserve, preserve_emb=encode(preserve),
    )


# captions scored for --preserve-from-data at most (a random subset of larger data sets, seeded)
NEAREST_CANDIDATES = 4096


def nearest_captions(teacher, captions: list[str], concept_emb: torch.Tensor, concepts: list[str], count: int,
                     seed: int = 0) -> list[str]:
    """The `count` distinct fine-tuning captions closest to the erase prompts in the text encoder's space (cosine of
    token-averaged hidden states, best match over the erase prompts), leaving out empty captions and any that name
    an --erase concept. These are the prompts an erasure is most likely to damage on the way (a look-alike style
    the data shows), so holding them to the teacher protects them without naming them by hand."""
    from ..data.cache import encode_prompts

    names = [c.lower() for c in concepts]
    unique = sorted({c for c in captions if c.strip() and not any(n in c.lower() for n in names)})
    if len(unique) > NEAREST_CANDIDATES:
        generator = torch.Generator().manual_seed(seed)
        unique = [unique[i] for i in torch.randperm(len(unique), generator=generator)[:NEAREST_CANDIDATES].tolist()]
    if not unique:
        return []

    tokens = ConditionLayout.of(teacher.unet).hidden  # token rows only (SDXL packs more after them)

    def pooled(emb: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(tokens(emb).float().mean(dim=1), dim=-1)

    scores = (pooled(encode_prompts(teacher, unique)) @ pooled(concept_emb).to(teacher.text_encoder.device).T)
    best = scores.max(dim=1).values
    order = torch.argsort(best, descending=True, stable=True)[:count]
    return [unique[i] for i in order.tolist()]


def make_concept_source(config: RunConfig, teacher, teacher_unet, teacher_fingerprint: str, prompts, objective,
                        cache_dir: Path, latent_size: int, device, progress: bool):
    """The objective's training rows: concept images (--erase-data) or a pool the teacher samples once, either
    partial trajectories of the erase prompts (ESD) or whole images of their anchors (Concept Ablation).

    teacher: the TeacherBundle (encoders, schedulers); teacher_unet: the UNet that samples the pool (the run's
    working copy, on its device); teacher_fingerprint: the teacher UNet's fingerprint, which keys the pool cache.
    """
    from ..data.cache import build_latent_cache, encode_prompts
    from ..data.imagefolder import ImageFolder
    from ..unlearn.sources import (AnchorImageSource, ImageConceptSource, TrajectoryConceptSource, anchor_for,
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
        anchor_emb = encode_prompts(teacher, [a for _, a in resolved], resolution=config.resolution)
        return ImageConceptSource(cache.to(device, torch.float32), anchor_emb.to(device, torch.float32),
                                  teacher.noise_scheduler(),
                                  teacher.prediction_type, torch.tensor([i for i, _ in resolved]), preserve)
    anchor_images = objective.latents == "clean"
    uncond = encode_prompts(teacher, [""], resolution=config.resolution)
    settings = dict(pool=config.esd_pool_size, ddim=config.esd_ddim_steps, guidance=config.esd_guidance,
                    size=latent_size, seed=config.seed)
    if anchor_images:
        settings["final"] = True
    sampled_texts = prompts.anchors if anchor_images else prompts.prompts
    sampled_emb = prompts.anchor_emb if anchor_images else prompts.concept_emb
    fingerprint = trajectory_pool_fingerprint(teacher_fingerprint, sampled_texts, **settings)
    latent_shape = (teacher_unet.config.in_channels, latent_size, latent_size)
    pool = load_or_sample_trajectory_pool(
        cache_dir,
        fingerprint,
        lambda: sample_trajectory_pool(
            teacher_unet, dict(teacher.scheduler.config), sampled_emb.to(device), uncond.to(device),
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
