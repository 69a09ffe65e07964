"""Sample a model on a prompt set with fixed seeds, judge the images and report concept, content and quality
metrics per set, plus the model's size and speed.

    from safeprune_engine.eval import evaluate
    result = evaluate(student_pipe, "toy", judge="toy", reference=teacher_pipe)   # the toy prompt set and judge
    print(result.table()); result.save_json("eval.json"); result.save_grids("grids/")

``model`` (and ``reference``) may be a StableDiffusionPipeline, a pipeline directory, or any callable
``model(prompts: list[str], seeds: list[int]) -> images`` (uint8 ``[N, H, W, 3]`` or another form judges
accept) - the latter is how metrics are checked without a diffusion model.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import SafepruneError
from . import metrics as M
from .judges import Judge, resolve_judge, to_judge_input, to_uint8
from .prompts import ERASED, NEIGHBOUR, UNRELATED, PromptSpec, resolve_prompts
from .registries import PROMPT_SETS

log = logging.getLogger(__name__)

DEFAULT_GUIDANCE = 4.0  # the toy teacher measures its own quality at this scale too
Sampler = Callable[[list, list], Any]


# ------------------------------------------------------------------------------------------------ samplers


class PipelineSampler:
    """``(prompts [B], seeds [B]) -> uint8 [B, S, S, 3]`` over a StableDiffusionPipeline.

    Each image gets its own CPU generator seeded with its seed, so an image depends only on (prompt, seed),
    not on the batch it was drawn in or the device. ``size`` defaults to the UNet's sample size times the
    VAE scale factor.
    """

    def __init__(self, pipe, steps: int = 25, guidance: float = DEFAULT_GUIDANCE, size: int | None = None):
        self.pipe = pipe
        self.steps = int(steps)
        self.guidance = float(guidance)
        self.size = int(size or pipe.unet.config.sample_size * pipe.vae_scale_factor)
        pipe.set_progress_bar_config(disable=True)

    def __call__(self, prompts: list[str], seeds: list[int]) -> np.ndarray:
        import torch

        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        out = self.pipe(list(prompts), num_inference_steps=self.steps, guidance_scale=self.guidance,
                        height=self.size, width=self.size, generator=generators, output_type="np")
        return to_uint8(out.images)

    def stats(self) -> dict:
        """params and MACs of the UNet: ``unet_macs`` of one forward at batch 1, ``sampling_macs_per_image``
        over all steps (twice per step under classifier-free guidance)."""
        from ..prune.macs import count_macs, count_params

        unet = self.pipe.unet
        stats: dict[str, Any] = {"params": count_params(unet), "unet_macs": None, "sampling_macs_per_image": None}
        try:
            macs = count_macs(unet, sample_size=self.size // self.pipe.vae_scale_factor,
                              text_len=self.pipe.tokenizer.model_max_length)
        except Exception as error:  # a metric, not the evaluation: report it missing, say why
            log.warning("could not count the UNet's MACs: %s", error)
            return stats
        cfg = self.guidance > 1 and getattr(unet.config, "time_cond_proj_dim", None) is None
        stats.update(unet_macs=macs, sampling_macs_per_image=macs * self.steps * (2 if cfg else 1))
        return stats


def _as_sampler(model, steps, guidance, size, device) -> tuple[Sampler, dict, str]:
    if isinstance(model, (str, os.PathLike)):
        from ..models.export import load_pipeline

        path = Path(model)
        if not (path / "model_index.json").is_file():
            raise SafepruneError(f"model {path} is not a pipeline directory (no model_index.json)")
        model = load_pipeline(path, device=device or "cpu")
        name = str(path)
    else:
        name = type(model).__name__
    if hasattr(model, "unet") and hasattr(model, "vae"):
        sampler = PipelineSampler(model, steps=steps, guidance=guidance, size=size)
        return sampler, sampler.stats(), name
    if callable(model):
        stats = {"params": None, "unet_macs": None, "sampling_macs_per_image": None}
        unet = getattr(model, "unet", None)
        if unet is not None:
            from ..prune.macs import count_params

            stats["params"] = count_params(unet)
        return model, stats, getattr(model, "__name__", name)
    raise SafepruneError(f"cannot evaluate a {type(model).__name__}: pass a pipeline, a pipeline directory or a "
                         "callable (prompts, seeds) -> images")


# ------------------------------------------------------------------------------------------------ results


@dataclass
class ModelEval:
    """One model's evaluation: headline ``metrics``, per-set metrics, size and speed, images and judgements.

    images: prompt -> uint8 ``[samples_per_prompt, H, W, 3]`` (sample j drawn with seed ``seed + j``);
    judged: prompt -> head -> the judged label of each sample.
    """

    name: str
    metrics: dict[str, float | None]
    sets: dict[str, dict]
    params: int | None
    unet_macs: int | None
    sampling_macs_per_image: int | None
    latency_s_per_image: float
    images: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    judged: dict[str, dict[str, list[str]]] = field(repr=False, default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "metrics": self.metrics, "sets": self.sets, "params": self.params,
                "unet_macs": self.unet_macs, "sampling_macs_per_image": self.sampling_macs_per_image,
                "latency_s_per_image": self.latency_s_per_image, "judged": self.judged}


TABLE_ROWS = (
    ("erased_rate", "erased-concept rate (lower = erased)"),
    ("erased_content_accuracy", "content accuracy, erased prompts"),
    ("neighbour_rate", "neighbour-style rate (keep high)"),
    ("unrelated_accuracy", "accuracy, unrelated prompts"),
    ("fd", "Frechet distance, all prompts"),
    ("fd_retained", "Frechet distance, non-erased sets"),
    ("clip_score", "CLIP score"),
)


def _fmt(value, kind: str = "float") -> str:
    if value is None:
        return "-"
    if kind == "int":
        return f"{value:,}"
    if kind == "mac":
        return f"{value / 1e6:,.1f} M"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"


@dataclass
class EvalResult:
    """What ``evaluate`` returns: the model's ModelEval, the reference's (or None), the prompts, the settings
    (judge, seeds, steps, ...) and the real images the Frechet distances compared against."""

    model: ModelEval
    reference: ModelEval | None
    prompts: list[PromptSpec]
    settings: dict
    real_images: dict[str, np.ndarray] = field(repr=False, default_factory=dict)

    @property
    def images(self) -> dict[str, np.ndarray]:
        """The model's samples: prompt -> uint8 ``[samples_per_prompt, H, W, 3]``."""
        return self.model.images

    @property
    def metrics(self) -> dict[str, float | None]:
        return self.model.metrics

    def to_dict(self) -> dict:
        return {"settings": self.settings, "prompts": [p.to_dict() for p in self.prompts],
                "model": self.model.to_dict(),
                "reference": self.reference.to_dict() if self.reference is not None else None}

    def save_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def table(self) -> str:
        """A plain-text metrics table (model and, when given, reference side by side)."""
        evals = [self.model] + ([self.reference] if self.reference is not None else [])
        columns = ["model"] + (["reference"] if self.reference is not None else [])
        rows: list[tuple[str, list[str]]] = []
        for key, text in TABLE_ROWS:
            if any(e.metrics.get(key) is not None for e in evals):
                rows.append((text, [_fmt(e.metrics.get(key)) for e in evals]))
        for set_name in self.model.sets:
            if set_name not in (ERASED, NEIGHBOUR, UNRELATED):
                rows.append((f"accuracy, set {set_name}", [_fmt(e.sets.get(set_name, {}).get("accuracy"))
                                                           for e in evals]))
        rows.append(("UNet params", [_fmt(e.params, "int") for e in evals]))
        rows.append(("UNet MACs per forward", [_fmt(e.unet_macs, "mac") for e in evals]))
        rows.append(("sampling latency (s / image)", [f"{e.latency_s_per_image:.4f}" for e in evals]))
        width = max(len(r[0]) for r in rows) + 2
        col = max(12, *(len(v) + 2 for _, vals in rows for v in vals))
        lines = ["metric".ljust(width) + "".join(c.rjust(col) for c in columns)]
        lines += [text.ljust(width) + "".join(v.rjust(col) for v in vals) for text, vals in rows]
        s = self.settings
        lines.append(f"({s['judge']} judge; {s['samples_per_prompt']} samples x {s['prompts']} prompts, "
                     f"{s['steps']} steps, guidance {s['guidance']}, seeds {s['seeds'][0]}..{s['seeds'][-1]})")
        return "\n".join(lines)

    def save_grids(self, out_dir: str | os.PathLike, scale: int | None = None) -> list[Path]:
        """One PNG per (model, set): a row per prompt, a column per seed (the same seeds in every grid), plus
        ``real_<set>.png`` of the rendered real images when there are any. Returns the files written."""
        from PIL import Image

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        sources = [("model", self.model.images), ("real", self.real_images)]
        if self.reference is not None:
            sources.insert(1, ("reference", self.reference.images))
        for set_name in dict.fromkeys(p.set for p in self.prompts):
            prompts = [p.prompt for p in self.prompts if p.set == set_name]
            for label, images in sources:
                rows = [images[p] for p in prompts if p in images]
                if not rows:
                    continue
                n = max(len(r) for r in rows)
                h, w = rows[0].shape[1:3]
                grid = np.full((len(rows) * (h + 2), n * (w + 2), 3), 255, np.uint8)
                for i, row in enumerate(rows):
                    for j, image in enumerate(row):
                        image = image if image.shape[:2] == (h, w) else to_uint8(to_judge_input(image, h))[0]
                        grid[i * (h + 2) + 1:i * (h + 2) + 1 + h, j * (w + 2) + 1:j * (w + 2) + 1 + w] = image
                picture = Image.fromarray(grid)
                factor = scale or max(1, 64 // max(h, 1))
                if factor > 1:
                    picture = picture.resize((grid.shape[1] * factor, grid.shape[0] * factor), Image.NEAREST)
                path = out / f"{label}_{set_name}.png"
                picture.save(path)
                written.append(path)
        return written


# ------------------------------------------------------------------------------------------------ evaluate


def _resolve_prompts(prompts) -> list[PromptSpec]:
    if prompts is None or isinstance(prompts, (str, os.PathLike)):
        return resolve_prompts(prompts)
    specs = list(prompts)
    if not specs:
        raise SafepruneError("no prompts to evaluate")
    if not all(isinstance(p, PromptSpec) for p in specs):
        raise SafepruneError("prompts must be PromptSpec objects, a prompt file path, a prompt set name, or None "
                             "for the toy set")
    return specs


def _check_labels(specs: Sequence[PromptSpec], judge: Judge) -> None:
    name = getattr(judge, "name", type(judge).__name__)
    for spec in specs:
        for head, label in spec.labels.items():
            if head in judge.heads and label not in judge.heads[head]:
                raise SafepruneError(f"prompt {spec.prompt!r}: label {head}={label!r} is not one the {name} "
                                     f"judge reads; it knows {', '.join(judge.heads[head])}")
    if not any(h in judge.heads for spec in specs for h in spec.labels):
        log.warning("no prompt label matches a head of the %s judge (%s): only Frechet distances are measured",
                    name, ", ".join(judge.heads))


def _registered_real_images(spec, count: int, seed: int, index: int):
    """The first registered prompt set's real images of ``spec`` (None when no set can draw its labels)."""
    for name in PROMPT_SETS.names():
        source = PROMPT_SETS.get(name).real_images
        if source is not None:
            images = source(spec, count, np.random.default_rng((seed, 104729, index)))
            if images is not None:
                return images
    return None


def _real_images(specs, real_items, count: int, seed: int) -> dict[str, np.ndarray]:
    """prompt -> uint8 real images for the Frechet distance (see evaluate's ``real_items``)."""
    real: dict[str, np.ndarray] = {}
    for index, spec in enumerate(specs):
        if real_items is None:
            images = _registered_real_images(spec, count, seed, index)
            if images is not None:
                real[spec.prompt] = to_uint8(images)
        elif isinstance(real_items, Mapping):
            if spec.prompt in real_items:
                real[spec.prompt] = to_uint8(real_items[spec.prompt])
        elif callable(real_items):
            images = real_items(spec, count, seed)
            if images is not None:
                real[spec.prompt] = to_uint8(images)
        else:
            raise SafepruneError("real_items must be None, a mapping prompt -> images, or a callable "
                                 "(spec, count, seed) -> images")
    return real


def _fd(feats: dict[str, np.ndarray], real_feats: dict[str, np.ndarray], prompts: list[str]) -> float | None:
    prompts = [p for p in prompts if p in real_feats and p in feats]
    if not prompts:
        return None
    a = np.concatenate([feats[p] for p in prompts])
    b = np.concatenate([real_feats[p] for p in prompts])
    if len(a) < 2 or len(b) < 2:
        return None
    return M.frechet_distance(a, b)


def _evaluate_one(name, sampler, stats, specs, judge, seeds, batch_size, real, real_cache, concept_head,
                  warmup: bool) -> ModelEval:
    jobs = [(spec.prompt, s) for spec in specs for s in seeds]
    chunks = []
    if warmup:  # one untimed image first: the first call pays one-off costs (allocations, lazy init)
        sampler([jobs[0][0]], [jobs[0][1]])
    start = time.perf_counter()
    for i in range(0, len(jobs), batch_size):
        batch = jobs[i:i + batch_size]
        images = to_uint8(sampler([p for p, _ in batch], [s for _, s in batch]))
        if len(images) != len(batch):
            raise SafepruneError(f"model {name} returned {len(images)} images for {len(batch)} prompts")
        chunks.append(images)
        log.info("%s: sampled %d/%d images", name, min(i + batch_size, len(jobs)), len(jobs))
    latency = (time.perf_counter() - start) / max(1, len(jobs))
    sizes = {c.shape[1:] for c in chunks}
    if len(sizes) > 1:
        raise SafepruneError(f"model {name} returned images of different sizes: {sorted(sizes)}")
    everything = np.concatenate(chunks)
    n = len(seeds)
    images = {spec.prompt: everything[k * n:(k + 1) * n] for k, spec in enumerate(specs)}

    side = int(everything.shape[1])
    if side not in real_cache:  # real images at the samples' resolution, so both sides look alike
        real_cache[side] = {p: judge.features(im if im.shape[1] == side else to_uint8(to_judge_input(im, side)))
                            for p, im in real.items()}
    real_feats = real_cache[side]

    pred = judge.predict(everything)
    feats_all = judge.features(everything)
    feats = {spec.prompt: feats_all[k * n:(k + 1) * n] for k, spec in enumerate(specs)}
    clip = judge.scores(everything, [p for p, _ in jobs]) if hasattr(judge, "scores") else None
    judged_rows = [pred.row(i) for i in range(len(jobs))]
    judged = {spec.prompt: {h: labels[k * n:(k + 1) * n] for h, labels in pred.labels.items()}
              for k, spec in enumerate(specs)}

    sets: dict[str, dict] = {}
    for set_name in dict.fromkeys(spec.set for spec in specs):
        idx = [k for k, spec in enumerate(specs) if spec.set == set_name]
        rows = [i for k in idx for i in range(k * n, (k + 1) * n)]
        expected = [specs[k].labels for k in idx for _ in range(n)]
        entry = M.set_metrics([judged_rows[i] for i in rows], expected, concept_head)
        entry["prompts"] = len(idx)
        entry["fd"] = _fd(feats, real_feats, [specs[k].prompt for k in idx])
        if clip is not None:
            entry["clip_score"] = float(np.mean(clip[rows]))
        sets[set_name] = entry
    headline = M.headline(sets)
    headline["fd"] = _fd(feats, real_feats, [s.prompt for s in specs])
    headline["fd_retained"] = _fd(feats, real_feats, [s.prompt for s in specs if s.set != ERASED])
    if clip is not None:
        headline["clip_score"] = float(np.mean(clip))
    return ModelEval(name=name, metrics=headline, sets=sets, params=stats.get("params"),
                     unet_macs=stats.get("unet_macs"), sampling_macs_per_image=stats.get("sampling_macs_per_image"),
                     latency_s_per_image=latency, images=images, judged=judged)


def evaluate(
    model,
    prompts: Sequence[PromptSpec] | str | os.PathLike | None = None,
    judge: Judge | str = "toy",
    samples_per_prompt: int = 4,
    steps: int = 25,
    guidance: float = DEFAULT_GUIDANCE,
    seed: int = 0,
    reference=None,
    real_items=None,
    size: int | None = None,
    batch_size: int = 16,
    real_per_prompt: int | None = None,
    concept_head: str = M.CONCEPT_HEAD,
    device: str | None = None,
    warmup: bool = True,
) -> EvalResult:
    """Sample ``model`` (and ``reference``) on ``prompts`` with fixed seeds, judge the images, measure.

    model / reference: a StableDiffusionPipeline, a pipeline directory, or a callable
    ``(prompts: list[str], seeds: list[int]) -> images [B, H, W, 3]``. prompts: PromptSpecs, a prompt file, the
    name of a registered prompt set, or None for the ``toy`` set. judge: a Judge or a spec (``toy``, ``PATH``,
    ``clip:PATH``, ...). Named prompt sets and judges come from evaluation's registries
    (safeprune_engine.eval.registries): the toy ones once the toy world is imported or installed.
    Sample ``j`` of every prompt uses seed ``seed + j`` for every model, so grids line up.
    steps / guidance / size: sampler settings for pipelines (size defaults to the model's).
    real_items: the real images the Frechet distance compares against, per prompt: None asks the registered prompt
    sets (the toy set renders toy-world items of the prompt's labels; prompts no set can draw get none), or a
    mapping prompt -> uint8 images, or a
    callable ``(spec, count, seed) -> images``; ``real_per_prompt`` of them (default max(8, samples_per_prompt)),
    resized to the samples' size first so both sides are seen at the same resolution.
    concept_head: the judge head that names the concept (``style``). warmup: sample one untimed image first so
    the latency (wall time of all sampling calls / images, at ``batch_size`` images per call) excludes one-off
    start-up costs.

    Per set (``result.model.sets``): n, accuracy, head_accuracy, concept_rate, content_accuracy,
    concept_distribution, fd (and clip_score for CLIP). Headline (``result.metrics``): erased_rate,
    erased_content_accuracy, neighbour_rate, unrelated_accuracy, fd, fd_retained (the Frechet distance over the
    sets other than ``erased``). Plus params, MACs and seconds per sampled image of each model.
    """
    if samples_per_prompt < 1:
        raise SafepruneError("samples_per_prompt must be >= 1")
    if steps < 1:
        raise SafepruneError("steps must be >= 1")
    if batch_size < 1:
        raise SafepruneError("batch_size must be >= 1")
    specs = _resolve_prompts(prompts)
    judge = resolve_judge(judge)
    if hasattr(judge, "prepare"):
        judge.prepare(specs)
    _check_labels(specs, judge)
    seeds = [seed + j for j in range(samples_per_prompt)]

    models = [("model", model)] + ([("reference", reference)] if reference is not None else [])
    samplers = [(role,) + _as_sampler(m, steps, guidance, size, device) for role, m in models]

    real_count = real_per_prompt or max(8, samples_per_prompt)
    real = _real_images(specs, real_items, real_count, seed)
    evals: list[ModelEval] = []
    real_cache: dict[int, dict[str, np.ndarray]] = {}
    for _role, sampler, stats, name in samplers:
        evals.append(_evaluate_one(name, sampler, stats, specs, judge, seeds, batch_size, real, real_cache,
                                   concept_head, warmup))
    settings = {"judge": getattr(judge, "name", str(judge)),
                "judge_heads": {h: list(v) for h, v in judge.heads.items()},
                "samples_per_prompt": samples_per_prompt, "seeds": seeds, "steps": steps, "guidance": guidance,
                "prompts": len(specs), "sets": sorted({s.set for s in specs}), "concept_head": concept_head,
                "real_per_prompt": real_count if real else 0, "image_size": _sample_size(evals[0])}
    return EvalResult(model=evals[0], reference=evals[1] if len(evals) > 1 else None, prompts=specs,
                      settings=settings, real_images=real)


def _sample_size(result: ModelEval) -> int:
    return int(next(iter(result.images.values())).shape[1])


__all__ = ["evaluate", "EvalResult", "ModelEval", "PipelineSampler", "DEFAULT_GUIDANCE"]
