"""Where the upper level's noisy concept latents come from.

Either concept images (cached latents, noised at a random t like the data), or, with no images, the teacher's
own sampling trajectory for the concept prompt (ESD's original recipe), or, for objectives that train on clean
anchor images (Concept Ablation), whole images the teacher generates from each concept's anchor prompt. Pools
are sampled once, before training, and stored beside the run, so that training steps keep exactly one teacher
forward each. Every batch carries, per row, the --erase concept it belongs to, the anchor of that concept and,
with --preserve prompts, one preserve prompt drawn at random.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from ..models.conditioning import ConditionLayout
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


def concept_of(caption: str, concepts: list[str]) -> int | None:
    """Index of the first concept whose phrase occurs in the caption (case-insensitive), else None."""
    lowered = caption.lower()
    for i, concept in enumerate(concepts):
        if concept.strip().lower() in lowered:
            return i
    return None


def anchor_for(caption: str, concepts: list[str], anchors: list[str]) -> tuple[int, str]:
    """(concept index, anchor text) of one caption, with one anchor per concept (``anchors[i]`` for
    ``concepts[i]``). A caption that names no concept belongs to concept 0 when every concept shares one anchor."""
    from ..errors import SafepruneError

    index = concept_of(caption, concepts)
    if index is None:
        if len(set(anchors)) > 1:
            raise SafepruneError(f"{caption!r} names none of the --erase concepts {concepts}, so its anchor is "
                                 "ambiguous; mention the concept in it or give one --anchor for all")
        index = 0
    return index, anchor_prompt(caption, concepts, anchors[index])


def _noised(scheduler, z0, noise, timesteps):
    return scheduler.add_noise(z0, noise, timesteps)


def _diffusion_target(scheduler, prediction_type: str, z0, noise, timesteps):
    return scheduler.get_velocity(z0, noise, timesteps) if prediction_type == "v_prediction" else noise


def _draw(count: int, batch_size: int, generator, device, row_concept=None, concept: int | None = None):
    """Row indices: uniform over all rows, or over the rows of one concept."""
    if concept is None:
        return torch.randint(0, count, (batch_size,), generator=generator, device=device)
    candidates = (row_concept == concept).nonzero().flatten()
    if candidates.numel() == 0:
        raise ValueError(f"no concept rows for concept {concept}")
    pick = torch.randint(0, candidates.numel(), (batch_size,), generator=generator, device=device)
    return candidates[pick]


def _with_preserve(conditions: dict, preserve_emb, batch_size: int, generator):
    if preserve_emb is not None and preserve_emb.shape[0]:
        which = torch.randint(0, preserve_emb.shape[0], (batch_size,), generator=generator,
                              device=preserve_emb.device)
        conditions["preserve"] = preserve_emb[which]
    return conditions


class ImageConceptSource:
    """Concept batches from a latent cache of images; each image's caption is its concept condition.

    For ESD these are images of the concept; for Concept Ablation, anchor images captioned with the concept.
    concept_emb: (N, L, D) caption embeddings; anchor_emb: (N, L, D) embeddings of each caption's anchor text;
    concept_index: (N,) the --erase concept of each image; preserve_emb: (P, L, D) or None.
    """

    def __init__(self, cache, anchor_emb: torch.Tensor, noise_scheduler, prediction_type: str = "epsilon",
                 concept_index: torch.Tensor | None = None, preserve_emb: torch.Tensor | None = None):
        self.cache = cache
        self.concept_emb = cache.text_emb
        self.anchor_emb = anchor_emb
        self.scheduler = noise_scheduler
        self.prediction_type = prediction_type
        device = anchor_emb.device
        self.concept_index = (torch.zeros(len(cache), dtype=torch.long, device=device) if concept_index is None
                              else concept_index.to(device))
        self.preserve_emb = preserve_emb

    def __len__(self) -> int:
        return len(self.cache)

    def sample(self, batch_size: int, generator: torch.Generator, concept: int | None = None) -> ConceptBatch:
        device = self.concept_emb.device
        index = _draw(len(self.cache), batch_size, generator, device, self.concept_index, concept)
        z0 = self.cache.sample_latents(index, generator)
        noise = torch.randn(z0.shape, generator=generator, device=device, dtype=z0.dtype)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (batch_size,), generator=generator,
                          device=device)
        conditions = {"concept": self.concept_emb[index], "anchor": self.anchor_emb[index]}
        return ConceptBatch(
            latents=_noised(self.scheduler, z0, noise, t),
            timesteps=t,
            conditions=_with_preserve(conditions, self.preserve_emb, batch_size, generator),
            target=_diffusion_target(self.scheduler, self.prediction_type, z0, noise, t),
            concept=self.concept_index[index],
        )


class _PromptPoolSource:
    """Rows of a pool sampled per erase prompt: latents (P, C, h, w); row_prompt (P,) the prompt of each row;
    concept_emb / anchor_emb (K, L, D) one embedding per prompt; prompt_concept (K,) the --erase concept of each
    prompt (default: prompt k is concept k); preserve_emb (P', L, D) or None."""

    def __init__(self, latents, row_prompt, concept_emb, anchor_emb, prompt_concept=None, preserve_emb=None):
        self.latents, self.row_prompt = latents, row_prompt
        self.concept_emb, self.anchor_emb = concept_emb, anchor_emb
        self.prompt_concept = (torch.arange(concept_emb.shape[0], device=concept_emb.device) if prompt_concept is None
                               else prompt_concept)
        self.preserve_emb = preserve_emb

    def __len__(self) -> int:
        return self.latents.shape[0]

    def _embeddings_to(self, device) -> tuple:
        """(concept_emb, anchor_emb, prompt_concept, preserve_emb) on ``device``, for ``to``."""
        return (self.concept_emb.to(device), self.anchor_emb.to(device), self.prompt_concept.to(device),
                None if self.preserve_emb is None else self.preserve_emb.to(device))

    def _draw_rows(self, batch_size: int, generator, concept: int | None):
        """(row indices, each row's prompt, its concept/anchor conditions) for one batch."""
        row_concept = self.prompt_concept[self.row_prompt] if concept is not None else None
        index = _draw(len(self), batch_size, generator, self.latents.device, row_concept, concept)
        which = self.row_prompt[index]
        return index, which, {"concept": self.concept_emb[which], "anchor": self.anchor_emb[which]}


class TrajectoryConceptSource(_PromptPoolSource):
    """Concept batches drawn from a pool of the teacher's own partial sampling trajectories.

    latents: (P, C, h, w) z_t along trajectories; timesteps: (P,); concept_index: (P,) which prompt produced
    each entry; the rest as in _PromptPoolSource.
    """

    def __init__(self, latents, timesteps, concept_index, concept_emb, anchor_emb, prompt_concept=None,
                 preserve_emb=None):
        super().__init__(latents, concept_index, concept_emb, anchor_emb, prompt_concept, preserve_emb)
        self.timesteps, self.concept_index = timesteps, concept_index

    def to(self, device):
        concept_emb, anchor_emb, prompt_concept, preserve_emb = self._embeddings_to(device)
        return type(self)(self.latents.to(device), self.timesteps.to(device), self.concept_index.to(device),
                          concept_emb, anchor_emb, prompt_concept, preserve_emb)

    def sample(self, batch_size: int, generator: torch.Generator, concept: int | None = None) -> ConceptBatch:
        index, _, _ = self._draw_rows(batch_size, generator, concept)
        return self.rows(index, generator)

    def rows(self, index: torch.Tensor, generator: torch.Generator) -> ConceptBatch:
        """The batch of these pool rows (a preserve prompt, when given, drawn at random per row)."""
        which = self.row_prompt[index]
        conditions = {"concept": self.concept_emb[which], "anchor": self.anchor_emb[which]}
        conditions = _with_preserve(conditions, self.preserve_emb, index.shape[0], generator)
        return ConceptBatch(latents=self.latents[index], timesteps=self.timesteps[index], conditions=conditions,
                            concept=self.prompt_concept[which])


class AnchorImageSource(_PromptPoolSource):
    """Concept Ablation's training rows without user images: clean latents the teacher generated from each
    prompt's anchor text, noised at a random t per draw (so the noise and the diffusion target are known) and
    conditioned on the concept prompt.

    latents: (P, C, h, w) clean z0; prompt_index: (P,) the erase prompt each image belongs to; the rest as in
    _PromptPoolSource.
    """

    def __init__(self, latents, prompt_index, concept_emb, anchor_emb, noise_scheduler, prediction_type="epsilon",
                 prompt_concept=None, preserve_emb=None):
        super().__init__(latents, prompt_index, concept_emb, anchor_emb, prompt_concept, preserve_emb)
        self.prompt_index = prompt_index
        self.scheduler, self.prediction_type = noise_scheduler, prediction_type

    def to(self, device):
        concept_emb, anchor_emb, prompt_concept, preserve_emb = self._embeddings_to(device)
        return type(self)(self.latents.to(device), self.prompt_index.to(device), concept_emb, anchor_emb,
                          self.scheduler, self.prediction_type, prompt_concept, preserve_emb)

    def sample(self, batch_size: int, generator: torch.Generator, concept: int | None = None) -> ConceptBatch:
        device = self.latents.device
        index, which, conditions = self._draw_rows(batch_size, generator, concept)
        z0 = self.latents[index]
        noise = torch.randn(z0.shape, generator=generator, device=device, dtype=z0.dtype)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (batch_size,), generator=generator,
                          device=device)
        return ConceptBatch(
            latents=_noised(self.scheduler, z0, noise, t),
            timesteps=t,
            conditions=_with_preserve(conditions, self.preserve_emb, batch_size, generator),
            target=_diffusion_target(self.scheduler, self.prediction_type, z0, noise, t),
            concept=self.prompt_concept[which],
        )


class CachedTargetSource:
    """A fixed pool of concept rows with the teacher's predictions on them, computed once before training, so that
    upper steps run no concept rows through the teacher (ConceptBatch.teacher_predictions carries them).

    batches: the pool's rows as ConceptBatches (every row's latents, timesteps, conditions, target, concept);
    predictions: condition -> (P, C, h, w), the teacher's prediction on every row under that condition. Condition
    embeddings are stored once per distinct embedding (a table and each row's index into it), so a pool of P rows
    costs P latents and P predictions per condition, not P copies of (L, D) text embeddings.
    """

    def __init__(self, batches: list[ConceptBatch], predictions: dict[str, torch.Tensor]):
        if not batches:
            raise ValueError("CachedTargetSource needs at least one row")
        first = batches[0]
        self.latents = torch.cat([b.latents for b in batches])
        self.timesteps = torch.cat([b.timesteps for b in batches])
        self.target = None if first.target is None else torch.cat([b.target for b in batches])
        self.concept = None if first.concept is None else torch.cat([b.concept for b in batches])
        self.tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name in first.conditions:
            stacked = torch.cat([b.conditions[name] for b in batches])
            table, index = torch.unique(stacked.flatten(1), dim=0, return_inverse=True)
            self.tables[name] = (table.reshape(-1, *stacked.shape[1:]), index)
        rows = self.latents.shape[0]
        bad = {k: tuple(v.shape) for k, v in predictions.items() if v.shape[0] != rows}
        if bad:
            raise ValueError(f"predictions for {bad} do not cover the pool's {rows} rows")
        self.predictions = predictions

    def __len__(self) -> int:
        return self.latents.shape[0]

    def nbytes(self) -> int:
        tensors = [self.latents, self.timesteps, self.target, self.concept, *self.predictions.values()]
        tensors += [t for pair in self.tables.values() for t in pair]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def sample(self, batch_size: int, generator: torch.Generator, concept: int | None = None) -> ConceptBatch:
        index = _draw(len(self), batch_size, generator, self.latents.device, self.concept, concept)
        return ConceptBatch(
            latents=self.latents[index], timesteps=self.timesteps[index],
            conditions={name: table[rows[index]] for name, (table, rows) in self.tables.items()},
            target=None if self.target is None else self.target[index],
            concept=None if self.concept is None else self.concept[index],
            teacher_predictions={name: p[index] for name, p in self.predictions.items()},
        )


def pool_batches(source, rows: int, chunk: int, generator: torch.Generator) -> list[ConceptBatch]:
    """The rows of a cached target pool, in chunks: every row of a trajectory pool once (it is fixed already), else
    `rows` draws of the source (concept images or anchor images noised at random timesteps, fixed from now on)."""
    if isinstance(source, TrajectoryConceptSource):
        everything = torch.arange(len(source), device=source.latents.device)
        return [source.rows(index, generator) for index in everything.split(chunk)]
    return [source.sample(min(chunk, rows - start), generator) for start in range(0, rows, chunk)]


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
    final: bool = False,
) -> dict[str, torch.Tensor]:
    """Run DDIM with classifier-free guidance for each concept and keep z at a random stop step per sample.

    concept_emb: (K, L, D); uncond_emb: (1, L, D); latent_shape: (C, h, w). Returns latents (K*pool_size, C, h, w),
    timesteps (K*pool_size,) (the timestep each z belongs to) and concept_index (K*pool_size,). final=True runs
    every trajectory to the end instead and keeps the generated clean latents (timestep 0): anchor images.
    """
    from diffusers import DDIMScheduler
    from tqdm.auto import tqdm

    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(ddim_steps, device=device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    layout = ConditionLayout.of(unet)
    kept_latents, kept_t, kept_concept = [], [], []
    jobs = [(k, start) for k in range(concept_emb.shape[0]) for start in range(0, pool_size, chunk)]
    for k, start in tqdm(jobs, desc="anchor images" if final else "ESD trajectory pool", disable=not progress):
        n = min(chunk, pool_size - start)
        latents = torch.randn((n, *latent_shape), generator=generator).to(device) * scheduler.init_noise_sigma
        if final:
            stop = torch.full((n,), ddim_steps, dtype=torch.long, device=device)
        else:
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
            pred = unet(model_in.to(dtype), t, **layout.kwargs(cond)).sample.float()
            uncond_pred, cond_pred = pred.chunk(2)
            guided = uncond_pred + guidance * (cond_pred - uncond_pred)
            latents = scheduler.step(guided, t, latents).prev_sample
        if final:
            captured, captured_t = latents, torch.zeros(n, dtype=torch.long, device=device)
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


def load_or_sample_trajectory_pool(cache_dir: Path, fingerprint: str, sample_fn,
                                   kind: str = "esd-pool") -> dict[str, torch.Tensor]:
    """Reuse the pool stored under this fingerprint, else sample it and store it atomically."""
    from safetensors.torch import load_file, save_file

    cache_dir = Path(cache_dir)
    path = cache_dir / f"{kind}-{fingerprint}.safetensors"
    if path.is_file():
        return load_file(path)
    pool = sample_fn()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in pool.items()}, tmp)
    tmp.replace(path)
    return pool
