"""Where the upper level's noisy concept latents come from.

Either concept images (cached latents, noised at a random t like the data), or, with no images, the teacher's
own sampling trajectory for the concept prompt (ESD's original recipe). The trajectory is sampled once, before
training, into a pool stored beside the run, so that training steps keep exactly one teacher forward each.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from .base import ConceptBatch


def strip_concept(caption: str, concepts: list[str]) -> str:
    """The caption with every concept phrase removed (case-insensitive), whitespace tidied."""
    text = caption
    for concept in concepts:
        text = re.sub(re.escape(concept.strip()), " ", text, flags=re.IGNORECASE)
    return re.sub(r"\s+", " ", text).strip(" ,")


def anchor_prompt(caption: str, concepts: list[str], anchor: str) -> str:
    """The anchor text for one concept caption: "empty" -> "", "strip" -> caption minus concept, else `anchor`."""
    if anchor == "empty":
        return ""
    if anchor == "strip":
        return strip_concept(caption, concepts)
    return anchor


def _noised(scheduler, z0, noise, timesteps):
    return scheduler.add_noise(z0, noise, timesteps)


class ImageConceptSource:
    """Concept batches from a latent cache of concept images; each image's caption is its concept condition.

    concept_emb: (N, L, D) caption embeddings; anchor_emb: (N, L, D) embeddings of each caption's anchor text.
    """

    def __init__(self, cache, anchor_emb: torch.Tensor, noise_scheduler):
        self.cache = cache
        self.concept_emb = cache.text_emb
        self.anchor_emb = anchor_emb
        self.scheduler = noise_scheduler

    def __len__(self) -> int:
        return len(self.cache)

    def sample(self, batch_size: int, generator: torch.Generator) -> ConceptBatch:
        device = self.concept_emb.device
        index = torch.randint(0, len(self.cache), (batch_size,), generator=generator, device=device)
        z0 = self.cache.sample_latents(index, generator)
        noise = torch.randn(z0.shape, generator=generator, device=device, dtype=z0.dtype)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (batch_size,), generator=generator,
                          device=device)
        return ConceptBatch(
            latents=_noised(self.scheduler, z0, noise, t),
            timesteps=t,
            conditions={"concept": self.concept_emb[index], "anchor": self.anchor_emb[index]},
        )


class TrajectoryConceptSource:
    """Concept batches drawn from a pool of the teacher's own partial sampling trajectories.

    latents: (P, C, h, w) z_t along trajectories; timesteps: (P,); concept_index: (P,) which prompt produced
    each entry; concept_emb / anchor_emb: (K, L, D) one embedding per erase prompt.
    """

    def __init__(self, latents, timesteps, concept_index, concept_emb, anchor_emb):
        self.latents, self.timesteps, self.concept_index = latents, timesteps, concept_index
        self.concept_emb, self.anchor_emb = concept_emb, anchor_emb

    def __len__(self) -> int:
        return self.latents.shape[0]

    def to(self, device):
        return TrajectoryConceptSource(
            self.latents.to(device), self.timesteps.to(device), self.concept_index.to(device),
            self.concept_emb.to(device), self.anchor_emb.to(device),
        )

    def sample(self, batch_size: int, generator: torch.Generator) -> ConceptBatch:
        device = self.latents.device
        index = torch.randint(0, len(self), (batch_size,), generator=generator, device=device)
        which = self.concept_index[index]
        return ConceptBatch(
            latents=self.latents[index],
            timesteps=self.timesteps[index],
            conditions={"concept": self.concept_emb[which], "anchor": self.anchor_emb[which]},
        )


@torch.inference_mode()
def sample_trajectory_pool(
    unet,
    scheduler_config: dict,
    concept_emb: torch.Tensor,
    uncond_emb: torch.Tensor,
    pool_size: int,
    latent_shape: tuple[int, int, int],
    ddim_steps: int,
    guidance: float,
    seed: int,
    chunk: int = 16,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Run DDIM with classifier-free guidance for each concept and keep z at a random stop step per sample.

    concept_emb: (K, L, D); uncond_emb: (1, L, D); latent_shape: (C, h, w). Returns latents (K*pool_size, C, h, w),
    timesteps (K*pool_size,) (the timestep each z belongs to) and concept_index (K*pool_size,).
    """
    from diffusers import DDIMScheduler
    from tqdm.auto import tqdm

    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(ddim_steps, device=device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    kept_latents, kept_t, kept_concept = [], [], []
    jobs = [(k, start) for k in range(concept_emb.shape[0]) for start in range(0, pool_size, chunk)]
    for k, start in tqdm(jobs, desc="ESD trajectory pool", disable=not progress):
        n = min(chunk, pool_size - start)
        latents = torch.randn((n, *latent_shape), generator=generator).to(device) * scheduler.init_noise_sigma
        stop = torch.randint(0, ddim_steps, (n,), generator=generator).to(device)
        cond = torch.cat([uncond_emb.expand(n, -1, -1), concept_emb[k : k + 1].expand(n, -1, -1)]).to(device, dtype)
        captured = torch.empty_like(latents)
        captured_t = torch.empty(n, dtype=torch.long, device=device)
        for i, t in enumerate(scheduler.timesteps):
            at_stop = stop == i
            captured[at_stop] = latents[at_stop]
            captured_t[at_stop] = int(t)
            if i == int(stop.max()):
                break
            model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            pred = unet(model_in.to(dtype), t, encoder_hidden_states=cond).sample.float()
            uncond_pred, cond_pred = pred.chunk(2)
            guided = uncond_pred + guidance * (cond_pred - uncond_pred)
            latents = scheduler.step(guided, t, latents).prev_sample
        kept_latents.append(captured.float().cpu())
        kept_t.append(captured_t.cpu())
        kept_concept.append(torch.full((n,), k, dtype=torch.long))
    return {
        "latents": torch.cat(kept_latents),
        "timesteps": torch.cat(kept_t),
        "concept_index": torch.cat(kept_concept),
    }


def trajectory_pool_fingerprint(unet_fingerprint: str, prompts: list[str], **settings) -> str:
    payload = json.dumps({"unet": unet_fingerprint, "prompts": prompts, **settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_or_sample_trajectory_pool(cache_dir: Path, fingerprint: str, sample_fn) -> dict[str, torch.Tensor]:
    """Reuse the pool stored under this fingerprint, else sample it and store it atomically."""
    from safetensors.torch import load_file, save_file

    cache_dir = Path(cache_dir)
    path = cache_dir / f"esd-pool-{fingerprint}.safetensors"
    if path.is_file():
        return load_file(path)
    pool = sample_fn()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in pool.items()}, tmp)
    tmp.replace(path)
    return pool
