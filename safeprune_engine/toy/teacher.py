"""The toy teacher: a small latent-diffusion model of a toy world, in StableDiffusionPipeline format.

It is trained here, from scratch, on rendered images of every style (the erased one included), so the engine
has a teacher that really draws the concept to erase: "a red circle by Vexa" comes out with Vexa's diagonal
stripes. The shipped weights live in ``assets/teacher/`` (the toy world) and ``assets/glyphs/teacher/`` (the
glyph world) and are reproduced by ``build_teacher`` (or ``safeprune toy build-teacher [--world glyphs] --out
DIR``). Both worlds share the architecture and recipe; only the prediction type follows the world (toy:
epsilon, glyphs: v).

Components (all built from configs, no download):
    vae           AutoencoderKL, (B,3,32,32) in [-1,1] <-> (B,4,8,8) latents (3 encoder stages, 2 downsamples);
                  scaling_factor = 1 / std of the training latents.
    text_encoder  CLIPTextModel, 64 wide, 2 layers, 32 positions; trained together with the UNet.
    tokenizer     the byte-level CLIPTokenizer of ``safeprune_engine.models.tokenizers`` (512 bytes + 2).
    unet          UNet2DConditionModel with SD's block layout (CrossAttnDownBlock2D x2, UNetMidBlock2DCrossAttn,
                  CrossAttnUpBlock2D x2), channels (64, 128), 16 GroupNorm groups (4 and 8 channels a group),
                  4 heads per attention, cross_attention_dim 64.
    scheduler     DDIMScheduler, SD's scaled-linear betas, the world's prediction type, steps_offset=1.

Training, in order: the VAE on rendered images (MSE + a small KL term), the latents of the whole training set
encoded once, then the UNet and the text encoder together on those latents (MSE to epsilon, or to the velocity
``scheduler.get_velocity`` for v-prediction, with min-SNR weighting,
10% empty captions for classifier-free guidance, 5% style-only captions "by {Artist}" so the concept prompt
alone draws the style). All randomness of a step is drawn from a generator seeded by (seed, step), so an
interrupted build resumes from its last checkpoint in ``OUT/.partial`` to the same result.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import SafepruneError
from .world import TOY, World, caption_for, concept_prompt, get_world

log = logging.getLogger(__name__)

TEXT_MAX_LENGTH = 32  # the longest caption is 24 byte tokens with <|startoftext|> and <|endoftext|>
CARD_NAME = "toy_teacher.json"  # training settings, timings and measured quality, next to model_index.json
PARTIAL_DIR = ".partial"
_ASSET_DIR = TOY.asset_dir("teacher")  # the toy world's; World.asset_dir("teacher") for any world

# the sampling settings every quality number below is measured with
EVAL_STEPS = 25
EVAL_GUIDANCE = 4.0


@dataclass(frozen=True)
class TeacherRecipe:
    """Everything that determines the teacher's weights (architecture sizes are fixed in the config builders)."""

    seed: int = 0
    n_images: int = 16000  # rendered training images (uniform over shape x colour x style)
    vae_steps: int = 1200
    vae_batch_size: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6  # per latent element, relative to the per-pixel MSE
    unet_steps: int = 4000
    unet_batch_size: int = 64
    unet_lr: float = 1e-3  # UNet and text encoder, AdamW, linear warm-up then cosine to 10%
    warmup_steps: int = 200
    weight_decay: float = 1e-2
    caption_dropout: float = 0.1  # empty caption, for classifier-free guidance
    style_only_captions: float = 0.05  # "by {Artist}" alone for styled images
    snr_gamma: float = 5.0  # min-SNR weighting of the epsilon loss
    ema_decay: float = 0.995
    checkpoint_every: int = 500  # also when the judge's quick look is logged

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- configs


def vae_config() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=16,
        latent_channels=4,
        sample_size=32,
    )


def text_encoder_config(tokenizer) -> dict:
    from ..models.tokenizers import clip_text_config

    return clip_text_config(tokenizer, hidden_size=64)


def unet_config() -> dict:
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128),
        layers_per_block=1,
        norm_num_groups=16,
        cross_attention_dim=64,
        attention_head_dim=4,  # diffusers' legacy name: this is the number of heads per attention
    )


def scheduler_config(prediction_type: str = "epsilon") -> dict:
    return dict(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def teacher_tokenizer():
    from ..models.tokenizers import byte_clip_tokenizer

    return byte_clip_tokenizer(TEXT_MAX_LENGTH)


def build_components(seed: int = 0, prediction_type: str = "epsilon"):
    """Freshly initialised (vae, text_encoder, tokenizer, unet, scheduler), seeded."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = teacher_tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_config())
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_encoder_config(tokenizer)))
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(**unet_config())
    return vae, text_encoder, tokenizer, unet, DDIMScheduler(**scheduler_config(prediction_type))


# ---------------------------------------------------------------------------------------------- helpers


def _step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    """The generator of one training step: a function of (seed, stage, step) only, so resuming is exact."""
    return torch.Generator().manual_seed((seed * 1_000_003 + stage * 10_007_021 + step) % (2**63 - 1))


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N,H,W,3) uint8 -> (N,3,H,W) float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """(N,3,H,W) float in [-1, 1] -> (N,H,W,3) uint8."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


# ---------------------------------------------------------------------------------------------- training


def train_vae(vae, images: torch.Tensor, recipe: TeacherRecipe, progress: bool = True) -> dict:
    """Trains `vae` in place on (N,3,32,32) images in [-1,1]: MSE + kl_weight * KL per latent element."""
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _lr_factor(s, recipe.vae_steps, min(100, recipe.vae_steps // 10 + 1))
    )
    last = {}
    bar = _progress(range(recipe.vae_steps), progress, desc="teacher vae", unit="step")
    for step in bar:
        g = _step_generator(recipe.seed, 1, step)
        idx = torch.randint(0, images.shape[0], (recipe.vae_batch_size,), generator=g)
        x = images[idx]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        mse = torch.nn.functional.mse_loss(recon, x)
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
        loss = mse + recipe.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        last = {"mse": mse.item(), "kl": kl.item()}
        if progress and step % 20 == 0:
            bar.set_postfix(mse=f"{last['mse']:.4f}", kl=f"{last['kl']:.1f}")
    vae.eval()
    return last


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, std) of (N,3,32,32) images, each (N,4,8,8) float32, unscaled."""
    vae.eval()
    means, stds = [], []
    for i in range(0, images.shape[0], batch_size):
        posterior = vae.encode(images[i : i + batch_size]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


class CaptionTable:
    """Every caption the teacher of `world` is trained on, tokenized once: id -> (L,) token ids."""

    def __init__(self, tokenizer, world: World = TOY):
        captions = [""]
        for style in world.styles:
            if style != "plain":
                captions.append(concept_prompt(style))
            for colour in world.colours:
                for shape in world.shapes:
                    captions.append(caption_for(shape, colour, style))
        self.captions = captions
        self.index = {c: i for i, c in enumerate(captions)}
        self.ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids


def _pick_captions(table: CaptionTable, items, idx: torch.Tensor, recipe: TeacherRecipe, g) -> torch.Tensor:
    """Caption ids of a batch: the full caption, or (dropout) the empty one, or (styled items) "by {Artist}"."""
    u = torch.rand(len(idx), generator=g)
    out = []
    for j, i in enumerate(idx.tolist()):
        item = items[i]
        if u[j] < recipe.caption_dropout:
            out.append(0)
        elif item.style != "plain" and u[j] < recipe.caption_dropout + recipe.style_only_captions:
            out.append(table.index[concept_prompt(item.style)])
        else:
            out.append(table.index[item.caption])
    return torch.tensor(out)


def _ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    with torch.no_grad():
        torch._foreach_mul_(ema, decay)
        torch._foreach_add_(ema, [p.detach() for p in params], alpha=1.0 - decay)


def train_unet(
    unet,
    text_encoder,
    tokenizer,
    latents: tuple[torch.Tensor, torch.Tensor],
    scaling_factor: float,
    items,
    recipe: TeacherRecipe,
    partial: Path | None = None,
    progress: bool = True,
    on_checkpoint: Callable[[int], dict] | None = None,
    world: World = TOY,
) -> dict:
    """Trains `unet` and `text_encoder` together and loads their EMA weights at the end.

    The target is the world's prediction type: epsilon, or (v_prediction) the velocity
    sqrt(a) * noise - sqrt(1 - a) * z0 of ``scheduler.get_velocity``.

    latents: posterior (mean, std) of the training images, each (N,4,8,8), unscaled.
    partial: folder for `unet_state.pt` checkpoints; an existing one is resumed.
    on_checkpoint: called with the step number at every checkpoint while the EMA weights are loaded (e.g. to
        measure quality); what it returns is kept in the returned "curve".
    """
    from diffusers import DDIMScheduler

    table = CaptionTable(tokenizer, world)
    scheduler = DDIMScheduler(**scheduler_config(world.prediction_type))
    velocity = world.prediction_type == "v_prediction"
    if not velocity and world.prediction_type != "epsilon":
        raise SafepruneError(f"the teacher trains epsilon or v_prediction, not {world.prediction_type!r}")
    alphas = scheduler.alphas_cumprod.float()  # (T,) the training noise schedule
    snr = alphas / (1.0 - alphas)
    # min-SNR-gamma weighs the x0 error by min(snr, gamma); the epsilon error is snr times the x0 error and the
    # v error (snr + 1) times, hence the divisors
    weight_base = snr + 1.0 if velocity else snr
    loss_weight = (torch.clamp(snr, max=recipe.snr_gamma) / weight_base if recipe.snr_gamma
                   else torch.ones_like(snr))

    params = [p for p in unet.parameters()] + [p for p in text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _lr_factor(s, recipe.unet_steps, min(recipe.warmup_steps, recipe.unet_steps // 10 + 1))
    )
    ema = [p.detach().clone() for p in params]
    curve: list[dict] = []
    start = 0
    state_path = partial / "unet_state.pt" if partial is not None else None
    if state_path is not None and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_scheduler"])
        for e, saved in zip(ema, state["ema"]):
            e.copy_(saved)
        curve = list(state.get("curve", []))
        start = int(state["step"])
        log.info("resuming the teacher UNet training at step %d", start)

    def save(step: int) -> None:
        if state_path is None:
            return
        _atomic_save({
            "step": step,
            "unet": unet.state_dict(),
            "text_encoder": text_encoder.state_dict(),
            "optimizer": opt.state_dict(),
            "lr_scheduler": sched.state_dict(),
            "ema": ema,
            "curve": curve,
        }, state_path)

    def measure(step: int) -> None:
        if on_checkpoint is None:
            return
        live = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
        unet.eval()
        text_encoder.eval()
        try:
            curve.append({"step": step, **on_checkpoint(step)})
        finally:
            with torch.no_grad():
                for p, v in zip(params, live):
                    p.copy_(v)
            unet.train()
            text_encoder.train()

    mean, std = latents
    unet.train()
    text_encoder.train()
    n = mean.shape[0]
    running, last = None, {}
    bar = _progress(range(start, recipe.unet_steps), progress, desc="teacher unet", unit="step",
                    initial=start, total=recipe.unet_steps)
    for step in bar:
        g = _step_generator(recipe.seed, 2, step)
        idx = torch.randint(0, n, (recipe.unet_batch_size,), generator=g)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scaling_factor
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, alphas.shape[0], (len(idx),), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        ids = table.ids[_pick_captions(table, items, idx, recipe, g)]
        text = text_encoder(ids)[0]
        pred = unet(zt, t, text).sample
        target = scheduler.get_velocity(z0, noise, t) if velocity else noise
        per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema, params, decay)
        value = per_sample.mean().item()
        running = value if running is None else 0.98 * running + 0.02 * value
        last = {"mse": running}
        if progress and step % 20 == 0:
            bar.set_postfix(mse=f"{running:.4f}")
        if recipe.checkpoint_every and (step + 1) % recipe.checkpoint_every == 0 and step + 1 < recipe.unet_steps:
            measure(step + 1)
            save(step + 1)
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.eval()
    text_encoder.eval()
    if on_checkpoint is not None:
        curve.append({"step": recipe.unet_steps, **on_checkpoint(recipe.unet_steps)})
    return {**last, "curve": curve}


# ---------------------------------------------------------------------------------------------- sampling + quality


@torch.no_grad()
def sample_images(
    pipe,
    prompts: list[str],
    steps: int = EVAL_STEPS,
    guidance: float = EVAL_GUIDANCE,
    seed: int = 0,
    batch_size: int = 64,
) -> np.ndarray:
    """(N,32,32,3) uint8 samples of `prompts` (one each) with the pipeline's DDIM sampler, seeded."""
    out = []
    for i in range(0, len(prompts), batch_size):
        generator = torch.Generator().manual_seed(seed + i)
        result = pipe(prompts[i : i + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                      generator=generator, output_type="np")
        out.append((np.asarray(result.images) * 255).round().clip(0, 255).astype(np.uint8))
    return np.concatenate(out)


Predictor = Callable[[np.ndarray], dict]  # (N,32,32,3) uint8 -> {"shape": [...], "colour": [...], "style": [...]}


def default_predictor(world: World | str | None = None) -> Predictor | None:
    """The shipped judge of `world` (default toy) as label lists, or None when that judge is not available."""
    try:
        from .judge import load_judge

        judge = load_judge(world=world)
    except Exception as e:  # the judge is optional here: no judge, no scores
        log.info("no toy judge available (%s: %s); skipping quality scores", type(e).__name__, e)
        return None

    def predict(images: np.ndarray) -> dict:
        labels = judge.predict(images).labels
        return {k: list(labels[k]) for k in ("shape", "colour", "style")}

    return predict


def prompt_grid(repeats: int = 2, styles: tuple[str, ...] | None = None, world: World = TOY):
    """(prompts, labels): every colour x shape x style of `world`, `repeats` times; labels are dicts."""
    prompts, labels = [], []
    for _ in range(repeats):
        for style in styles or world.styles:
            for colour in world.colours:
                for shape in world.shapes:
                    prompts.append(caption_for(shape, colour, style))
                    labels.append({"shape": shape, "colour": colour, "style": style})
    return prompts, labels


def score_images(images: np.ndarray, labels: list[dict], predict: Predictor) -> dict:
    """Accuracy per attribute, overall and per prompted style."""
    pred = predict(images)
    report: dict = {"n": len(labels)}
    for attr in ("shape", "colour", "style"):
        hits = np.array([p == lab[attr] for p, lab in zip(pred[attr], labels)])
        report[attr] = float(hits.mean())
        report[f"{attr}_by_style"] = {
            s: float(hits[[lab["style"] == s for lab in labels]].mean())
            for s in dict.fromkeys(lab["style"] for lab in labels)
        }
    return report


def evaluate_teacher(pipe, predict: Predictor, repeats: int = 2, steps: int = EVAL_STEPS,
                     guidance: float = EVAL_GUIDANCE, seed: int = 1234, world: World = TOY) -> dict:
    """Judge scores of teacher samples for every prompt of `world`'s grid, plus the concept prompts alone."""
    prompts, labels = prompt_grid(repeats, world=world)
    report = score_images(sample_images(pipe, prompts, steps, guidance, seed), labels, predict)
    concept = {}
    for style in world.styles[1:]:
        images = sample_images(pipe, [concept_prompt(style)] * 16, steps, guidance, seed)
        concept[concept_prompt(style)] = float(np.mean([p == style for p in predict(images)["style"]]))
    report["style_only_prompt"] = concept
    report.update({"ddim_steps": steps, "guidance": guidance, "seed": seed})
    return report


# ---------------------------------------------------------------------------------------------- build


def _load_or_train_vae(vae, images, recipe, partial: Path, progress: bool) -> tuple[dict, float]:
    from safetensors.torch import load_file, save_file

    path = partial / "vae.safetensors"
    if path.is_file():
        vae.load_state_dict(load_file(path))
        vae.eval()
        info = json.loads((partial / "vae.json").read_text())
        log.info("reusing the trained teacher VAE from %s", path)
        return info, 0.0
    t0 = time.perf_counter()
    info = train_vae(vae, images, recipe, progress)
    seconds = time.perf_counter() - t0
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, path)
    (partial / "vae.json").write_text(json.dumps(info))
    return info, seconds


def _check_partial(partial: Path, recipe: TeacherRecipe, world: World) -> None:
    settings = partial / "recipe.json"
    wanted = json.dumps({"world": world.name, **recipe.to_dict()}, sort_keys=True)
    if settings.is_file():
        if settings.read_text() != wanted:
            raise SafepruneError(
                f"{partial} holds an interrupted build with other settings ({settings.read_text()}); rerun with "
                f"those settings to resume it, or delete {partial} to start over"
            )
    else:
        partial.mkdir(parents=True, exist_ok=True)
        settings.write_text(wanted)


def build_teacher(
    out_dir: str | os.PathLike,
    seed: int = 0,
    vae_steps: int | None = None,
    unet_steps: int | None = None,
    progress: bool = True,
    *,
    evaluate: bool = True,
    predict: Predictor | None = None,
    world: World | str | None = None,
    **recipe_overrides,
) -> Path:
    """Trains the teacher of `world` (default the toy world) and saves it as a StableDiffusionPipeline folder at
    `out_dir`; its scheduler has the world's prediction type.

    vae_steps, unet_steps: training steps (default: TeacherRecipe's). Other TeacherRecipe fields may be passed as
    keywords (n_images, unet_batch_size, ...). Checkpoints go to out_dir/.partial; running the same call again
    after an interruption resumes there, and the folder is removed once the pipeline is saved.
    evaluate: measure quality with `predict` (default: the world's shipped judge, when present) and record it in
    out_dir/toy_teacher.json together with the settings and the world's name. Returns out_dir.
    """
    from diffusers.utils import logging as diffusers_logging

    world = get_world(world)
    overrides = dict(recipe_overrides, seed=seed)
    if vae_steps is not None:
        overrides["vae_steps"] = vae_steps
    if unet_steps is not None:
        overrides["unet_steps"] = unet_steps
    recipe = TeacherRecipe(**overrides)
    if recipe.vae_steps < 1 or recipe.unet_steps < 1 or recipe.n_images < 1:
        raise SafepruneError("vae_steps, unet_steps and n_images must be at least 1")
    out = Path(out_dir)
    if (out / "model_index.json").is_file() and not (out / PARTIAL_DIR).is_dir():
        raise SafepruneError(f"{out} already holds a pipeline; choose another --out or delete it")
    partial = out / PARTIAL_DIR
    _check_partial(partial, recipe, world)

    t_start = time.perf_counter()
    vae, text_encoder, tokenizer, unet, scheduler = build_components(recipe.seed, world.prediction_type)
    items = world.sample_items(recipe.n_images, seed=recipe.seed)
    images = images_to_tensor(world.render_batch(items))

    vae_info, vae_seconds = _load_or_train_vae(vae, images, recipe, partial, progress)
    latents = encode_latents(vae, images)
    # what the UNet sees: sampled latents times the scaling factor, with unit std
    generator = torch.Generator().manual_seed(recipe.seed)
    sampled = latents[0] + latents[1] * torch.randn(latents[0].shape, generator=generator)
    scaling_factor = float(1.0 / sampled.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    with torch.no_grad():
        recon = vae.decode(latents[0][:512]).sample
    vae_info["eval_mse"] = float(torch.nn.functional.mse_loss(recon, images[:512]))

    from ..models.export import assemble_pipeline

    pipe = assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler)  # shares the modules being trained
    diffusers_logging.disable_progress_bar()
    pipe.set_progress_bar_config(disable=True)
    predict = (predict or default_predictor(world)) if evaluate else None
    on_checkpoint = None
    if predict is not None:
        def on_checkpoint(step: int) -> dict:  # a quick look (one sample per prompt) at every checkpoint
            prompts, labels = prompt_grid(1, world=world)
            scores = score_images(sample_images(pipe, prompts, seed=4321), labels, predict)
            log.info("teacher at step %d: shape %.3f colour %.3f style %.3f (%s)", step, scores["shape"],
                     scores["colour"], scores["style"], scores["style_by_style"])
            return {k: scores[k] for k in ("shape", "colour", "style", "style_by_style")}

    t0 = time.perf_counter()
    unet_info = train_unet(unet, text_encoder, tokenizer, latents, scaling_factor, items, recipe, partial, progress,
                           on_checkpoint=on_checkpoint, world=world)
    unet_seconds = time.perf_counter() - t0
    card = {
        "world": world.name,
        "recipe": recipe.to_dict(),
        "architecture": {"vae": vae_config(), "unet": unet_config(), "text_encoder": text_encoder_config(tokenizer),
                         "scheduler": scheduler_config(world.prediction_type)},
        "params": {name: sum(p.numel() for p in m.parameters())
                   for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))},
        "vae": {**vae_info, "scaling_factor": scaling_factor},
        "unet": unet_info,
        "seconds": {"vae": round(vae_seconds, 1), "unet": round(unet_seconds, 1),
                    "total": round(time.perf_counter() - t_start, 1)},
        "torch_threads": torch.get_num_threads(),
        "reproduce": (f"safeprune toy build-teacher --world {world.name} --out DIR --seed {recipe.seed} "
                      f"--vae-steps {recipe.vae_steps} "
                      f"--unet-steps {recipe.unet_steps} --threads {torch.get_num_threads()}"),
        "quality": None,
    }
    if predict is not None:
        card["quality"] = evaluate_teacher(pipe, predict, world=world)
    pipe.save_pretrained(out, safe_serialization=True)
    (out / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    shutil.rmtree(partial, ignore_errors=True)
    for path in out.rglob("*"):  # safetensors writes 0600; the teacher is a shared, committed asset
        if path.is_file():
            os.chmod(path, 0o644)
    return out


# ---------------------------------------------------------------------------------------------- shipped teacher


def toy_teacher_path(world: World | str | None = None) -> Path:
    """The shipped teacher pipeline folder of `world` (default the toy world: safeprune_engine/toy/assets/teacher;
    the glyph world's is assets/glyphs/teacher)."""
    world = get_world(world)
    folder = world.asset_dir("teacher")
    if not (folder / "model_index.json").is_file():
        raise SafepruneError(
            f"the {world.name} teacher is not in {folder}; build it with "
            f"`safeprune toy build-teacher --world {world.name} --out {folder}`"
        )
    return folder


def load_toy_teacher(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     world: World | str | None = None):
    """The shipped teacher of `world` (default the toy world) as a frozen TeacherBundle."""
    from ..models.teacher import load_teacher

    return load_teacher(toy_teacher_path(world), device=device, dtype=dtype)


def teacher_card(path: str | os.PathLike | None = None, world: World | str | None = None) -> dict:
    """The training settings and measured quality recorded next to a toy teacher (default: the shipped one of
    `world`). Cards written before worlds existed are the toy world's and have no "world" entry."""
    folder = Path(path) if path is not None else toy_teacher_path(world)
    return json.loads((folder / CARD_NAME).read_text())
