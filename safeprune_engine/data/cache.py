"""One encoding pass over a dataset, so training never runs the VAE encoder or the text encoder.

For every image the VAE posterior N(mean, std^2) is stored rather than one latent sample, so each training step can
still draw a fresh z0 = (mean + std * noise) * scaling_factor exactly as online encoding does, for the cost of a
randn. Caption embeddings are stored next to it.

Cache layout (cache_dir/):
    shard-00000.safetensors   latent_mean (n,C,h,w), latent_std (n,C,h,w), text_emb (n,L,D); n <= shard_size;
                              safetensors metadata: fingerprint, start, count
    shard-00001.safetensors   ...
    manifest.json             written last; its presence marks a complete cache (format_version, fingerprint,
                              components, num_items, shards, resolution, scaling_factor, shift_factor, shapes,
                              dtype, captions)

The fingerprint hashes the image folder (metadata + file sizes/mtimes), the resolution, the VAE, the text encoder,
the tokenizer and the format version (for SDXL also the second encoder and tokenizer and the condition layout);
any change rebuilds. SDXL text rows are packed conditions (models.conditioning) whose time ids hold each image's
original size and crop corner; a VAE whose config asks for force_upcast (SDXL's overflows in fp16) encodes in fp32.
The same function caches the concept ("erase") images: give it their ImageFolder and another cache_dir.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch

from ..errors import SafepruneError
from .imagefolder import ImageFolder

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_SHARD = "shard-{:05d}.safetensors"
_TMP_SUFFIX = ".tmp"


def _token_ids(tokenizer, prompts: list[str], device) -> torch.Tensor:
    # padding="max_length" and truncation at the tokenizer's length, as Stable Diffusion's pipelines do
    return tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids.to(device)


def encode_prompts(bundle, prompts: Sequence[str], batch_size: int = 32, resolution: int | None = None,
                   time_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The UNet condition of each prompt, in the text encoder's dtype and on its device.

    SD 1.x/2.x: the text encoder's hidden states text_encoder(ids)[0], (N, L, D).
    SDXL: both encoders' penultimate hidden states side by side and the second encoder's pooled embedding, with
    time ids, packed into one (N, L + k, D) tensor (models.conditioning); the empty prompt is all zeros when the
    pipeline sets force_zeros_for_empty_prompt, as its classifier-free guidance reads it. time_ids: (N, 6) per
    prompt, default (resolution, resolution, 0, 0, resolution, resolution) with resolution defaulting to the
    UNet's native size. Ignored for SD 1.x/2.x.
    The result is an ordinary tensor (not an inference tensor), so it can feed a module that is being trained.
    """
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise SafepruneError("prompts must be a list of strings (wrap a single prompt in a list)")
    if batch_size <= 0:
        raise SafepruneError(f"batch_size must be positive, got {batch_size}")
    if getattr(bundle, "is_sdxl", False):
        return _encode_sdxl(bundle, list(prompts), batch_size, resolution, time_ids)
    tokenizer, text_encoder = bundle.tokenizer, bundle.text_encoder
    param = next(text_encoder.parameters())
    length = tokenizer.model_max_length
    if not prompts:
        return torch.empty(0, length, text_encoder.config.hidden_size, dtype=param.dtype, device=param.device)
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            ids = _token_ids(tokenizer, list(prompts[start : start + batch_size]), param.device)
            chunks.append(text_encoder(ids)[0])
        embeddings = torch.cat(chunks)
    # clone outside inference mode: inference tensors cannot be saved for backward (e.g. by a trained to_k)
    return embeddings.clone()


def _encode_sdxl(bundle, prompts: list[str], batch_size: int, resolution: int | None,
                 time_ids: torch.Tensor | None) -> torch.Tensor:
    from ..models.conditioning import ConditionLayout, TIME_IDS
    from ..models.conditioning import time_ids as default_time_ids

    layout = ConditionLayout.of(bundle.unet)
    param = next(bundle.text_encoder.parameters())
    length = bundle.tokenizer.model_max_length
    if time_ids is None:
        time_ids = default_time_ids(resolution or bundle.native_resolution(), len(prompts))
    if tuple(time_ids.shape) != (len(prompts), TIME_IDS):
        raise SafepruneError(f"time_ids {tuple(time_ids.shape)}: expected ({len(prompts)}, {TIME_IDS})")
    if not prompts:
        return torch.empty(0, length + layout.extra_rows, layout.width, dtype=param.dtype, device=param.device)
    hidden, pooled = [], []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            # penultimate layers of both encoders side by side, the second encoder's projected pooled output: the
            # SDXL pipeline's encode_prompt without clip_skip
            first = bundle.text_encoder(_token_ids(bundle.tokenizer, chunk, param.device), output_hidden_states=True)
            second = bundle.text_encoder_2(_token_ids(bundle.tokenizer_2, chunk, param.device),
                                           output_hidden_states=True)
            hidden.append(torch.cat([first.hidden_states[-2], second.hidden_states[-2].to(param.dtype)], dim=-1))
            pooled.append(second.text_embeds.to(param.dtype))
        hidden, pooled = torch.cat(hidden), torch.cat(pooled)
        if bundle.force_zeros_for_empty_prompt:
            empty = torch.tensor([not p.strip() for p in prompts], device=hidden.device)
            hidden = hidden.masked_fill(empty[:, None, None], 0.0)
            pooled = pooled.masked_fill(empty[:, None], 0.0)
        condition = layout.pack(hidden, pooled, time_ids.to(hidden.device))
    return condition.clone()


def _fingerprint(components: dict) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()[:16]


def _read_manifest(cache_dir: Path) -> dict | None:
    path = cache_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # unreadable: treated as a stale cache
    return manifest if isinstance(manifest, dict) else {}


def _write_atomic(path: Path, data: bytes) -> None:
    # temp file + fsync + rename: readers see either the old file, no file, or the complete new one
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class LatentCache:
    """Cached VAE posteriors and caption embeddings of an image folder.

    latent_mean, latent_std: (N, C, h, w) posterior mean/std of the unscaled VAE latent (h = resolution / 8 for SD).
    text_emb: (N, L, D) caption embeddings (text_encoder output [0]).
    captions: the N captions. scaling_factor / shift_factor: the VAE's, applied by `sample_latents`.
    Tensors keep the dtype the encoders produced; they start on the CPU (see `to`).
    """

    def __init__(
        self,
        latent_mean: torch.Tensor,
        latent_std: torch.Tensor,
        text_emb: torch.Tensor,
        captions: list[str],
        scaling_factor: float,
        shift_factor: float | None = None,
        fingerprint: str = "",
        resolution: int | None = None,
        cache_dir: Path | None = None,
    ):
        n = len(captions)
        if not (latent_mean.shape[0] == latent_std.shape[0] == text_emb.shape[0] == n):
            raise SafepruneError(
                f"latent cache parts disagree on the item count: latent_mean {latent_mean.shape[0]}, latent_std "
                f"{latent_std.shape[0]}, text_emb {text_emb.shape[0]}, captions {n}; rebuild the cache"
            )
        if latent_mean.shape != latent_std.shape:
            raise SafepruneError(f"latent_mean {tuple(latent_mean.shape)} and latent_std {tuple(latent_std.shape)} differ")
        self.latent_mean = latent_mean
        self.latent_std = latent_std
        self.text_emb = text_emb
        self.captions = list(captions)
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = None if shift_factor is None else float(shift_factor)
        self.fingerprint = fingerprint
        self.resolution = resolution
        self.cache_dir = cache_dir

    def __len__(self) -> int:
        return len(self.captions)

    def __repr__(self) -> str:
        return (
            f"LatentCache({len(self)} items, latents {tuple(self.latent_mean.shape[1:])}, "
            f"text {tuple(self.text_emb.shape[1:])}, {self.latent_mean.dtype}, {self.latent_mean.device})"
        )

    @property
    def device(self) -> torch.device:
        return self.latent_mean.device

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "LatentCache":
        """Moves all tensors to `device` (and `dtype`, e.g. fp32 training data from a bf16 teacher's encoders) in
        place and returns self."""
        self.latent_mean = self.latent_mean.to(device, dtype)
        self.latent_std = self.latent_std.to(device, dtype)
        self.text_emb = self.text_emb.to(device, dtype)
        return self

    def sample_latents(self, indices, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled training latents z0 = (mean + std * noise [- shift_factor]) * scaling_factor for `indices`.

        indices: int sequence or LongTensor (B,). generator: a torch.Generator on the cache's device (or None).
        Returns (B, C, h, w) in the cache's dtype, on the cache's device; noise ~ N(0, I) from torch.randn.
        """
        device = self.latent_mean.device
        if generator is not None and generator.device.type != device.type:
            raise SafepruneError(
                f"generator is on {generator.device} but the cache is on {device}; create it with "
                f"torch.Generator(device={str(device)!r}) or move the cache with .to()"
            )
        idx = torch.as_tensor(indices, dtype=torch.long, device=device).reshape(-1)
        mean = self.latent_mean[idx]
        noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
        z = mean + self.latent_std[idx] * noise
        if self.shift_factor is not None:
            z = z - self.shift_factor
        return z * self.scaling_factor

    @classmethod
    def load(cls, cache_dir: str | os.PathLike, expected_fingerprint: str | None = None) -> "LatentCache":
        """Loads a complete cache written by `build_latent_cache` (tensors on the CPU).

        Raises SafepruneError when there is no manifest, the fingerprint differs from `expected_fingerprint`,
        or a shard is missing or does not match the manifest.
        """
        from safetensors import safe_open

        cache_dir = Path(cache_dir)
        manifest = _read_manifest(cache_dir)
        if manifest is None:
            raise SafepruneError(f"{cache_dir} holds no complete latent cache ({MANIFEST} missing); build it first")
        if manifest.get("format_version") != CACHE_FORMAT_VERSION:
            raise SafepruneError(
                f"{cache_dir}/{MANIFEST} has format version {manifest.get('format_version')!r}, this code reads "
                f"{CACHE_FORMAT_VERSION}; rebuild the cache"
            )
        fingerprint = manifest.get("fingerprint")
        if expected_fingerprint is not None and fingerprint != expected_fingerprint:
            raise SafepruneError(
                f"latent cache in {cache_dir} was built for other inputs (fingerprint {fingerprint}, expected "
                f"{expected_fingerprint}); rebuild it"
            )
        parts: dict[str, list[torch.Tensor]] = {"latent_mean": [], "latent_std": [], "text_emb": []}
        position = 0
        for shard in manifest["shards"]:
            path = cache_dir / shard["file"]
            if not path.is_file():
                raise SafepruneError(f"latent cache shard {path} is missing; rebuild the cache")
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("fingerprint") != fingerprint or int(meta.get("start", -1)) != position:
                    raise SafepruneError(f"latent cache shard {path} belongs to another build; rebuild the cache")
                for key in parts:
                    tensor = f.get_tensor(key)
                    if tensor.shape[0] != shard["count"]:
                        raise SafepruneError(f"latent cache shard {path} holds {tensor.shape[0]} items, manifest says "
                                             f"{shard['count']}; rebuild the cache")
                    parts[key].append(tensor)
            position += shard["count"]
        if position != manifest["num_items"]:
            raise SafepruneError(f"latent cache in {cache_dir} has {position} of {manifest['num_items']} items")
        return cls(
            latent_mean=torch.cat(parts["latent_mean"]),
            latent_std=torch.cat(parts["latent_std"]),
            text_emb=torch.cat(parts["text_emb"]),
            captions=manifest["captions"],
            scaling_factor=manifest["scaling_factor"],
            shift_factor=manifest.get("shift_factor"),
            fingerprint=fingerprint,
            resolution=manifest.get("resolution"),
            cache_dir=cache_dir,
        )


def _changed(old: dict, new: dict) -> str:
    old_components = old.get("components") or {}
    diffs = []
    for key, value in new.items():
        before = old_components.get(key)
        if before != value:
            diffs.append(f"{key} {before} -> {value}" if key in ("resolution", "format") else key)
    return ", ".join(diffs) or "unknown"


def build_latent_cache(
    bundle,
    folder: ImageFolder | str | os.PathLike,
    resolution: int,
    cache_dir: str | os.PathLike,
    batch_size: int = 8,
    shard_size: int = 256,
    progress: bool = True,
) -> LatentCache:
    """Encodes every image of `folder` with the teacher's VAE and every caption with its text encoder, once.

    bundle: a TeacherBundle (vae, text_encoder, tokenizer). folder: an ImageFolder (or its path).
    resolution: square training size in pixels, a multiple of the VAE's downsampling factor (8 for SD).
    Loads the cache in `cache_dir` when its fingerprint matches, otherwise (re)builds it; an interrupted build
    leaves no manifest, so the next call rebuilds. Returns a LatentCache with CPU tensors.
    """
    if not isinstance(folder, ImageFolder):
        folder = ImageFolder(folder)
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
        raise SafepruneError(f"resolution must be a positive int (pixels), got {resolution!r}")
    vae = bundle.vae
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % factor:
        raise SafepruneError(
            f"resolution {resolution} is not a multiple of the VAE's downsampling factor {factor}; "
            f"use e.g. {max(factor, resolution // factor * factor)}"
        )
    if batch_size <= 0 or shard_size <= 0:
        raise SafepruneError(f"batch_size and shard_size must be positive, got {batch_size} and {shard_size}")
    cache_dir = Path(cache_dir).expanduser()
    if cache_dir.exists() and not cache_dir.is_dir():
        raise SafepruneError(f"cache_dir {cache_dir} is a file; pass a folder (it is created if missing)")

    components = {
        "images": folder.fingerprint(),
        "resolution": resolution,
        "vae": bundle.fingerprint("vae"),
        "text_encoder": bundle.fingerprint("text_encoder"),
        "tokenizer": bundle.fingerprint("tokenizer"),
        "format": CACHE_FORMAT_VERSION,
    }
    if getattr(bundle, "is_sdxl", False):  # SD caches keep their fingerprints
        components.update(text_encoder_2=bundle.fingerprint("text_encoder_2"),
                          tokenizer_2=bundle.fingerprint("tokenizer_2"), unet_condition=_condition_key(bundle))
    fingerprint = _fingerprint(components)
    manifest = _read_manifest(cache_dir) if cache_dir.is_dir() else None
    if manifest is not None and manifest.get("fingerprint") == fingerprint:
        try:
            cache = LatentCache.load(cache_dir, expected_fingerprint=fingerprint)
            logger.info("loaded latent cache from %s (%d items, fingerprint %s)", cache_dir, len(cache), fingerprint)
            return cache
        except Exception as e:  # any damage (missing/corrupt shard) means: encode again
            logger.warning("latent cache in %s is damaged (%s); rebuilding it", cache_dir, e)
    elif manifest is not None:
        logger.info("latent cache in %s is stale (changed: %s); rebuilding it", cache_dir, _changed(manifest, components))
    else:
        logger.info("building latent cache for %s in %s (%d images)", folder.root, cache_dir, len(folder))

    _encode_to_disk(bundle, folder, resolution, cache_dir, batch_size, shard_size, progress, components, fingerprint)
    return LatentCache.load(cache_dir, expected_fingerprint=fingerprint)


def _condition_key(bundle) -> str:
    """The packed condition's layout (models.conditioning), which the cached text rows follow."""
    from ..models.conditioning import ConditionLayout

    layout = ConditionLayout.of(bundle.unet)
    return f"{layout.width}x{layout.pooled}"


def _encode_dtype(vae) -> torch.dtype:
    """The dtype the VAE encodes in: fp32 when its config asks for an upcast (the SDXL VAE overflows in fp16)."""
    param = next(vae.parameters())
    if param.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        return torch.float32
    return param.dtype


def encode_captions(bundle, folder, indices, resolution: int, batch_size: int = 32) -> torch.Tensor:
    """The UNet conditions of images `indices` of `folder` (encode_prompts of their captions); for SDXL with each
    image's own time ids: its original size and centre-crop corner as `load_image` crops it, the training size."""
    time_ids = None
    if getattr(bundle, "is_sdxl", False):
        rows = [(*folder.size_and_crop(i, resolution), resolution, resolution) for i in indices]
        time_ids = torch.tensor(rows, dtype=torch.float32)
    return encode_prompts(bundle, [folder.captions[i] for i in indices], batch_size, resolution=resolution,
                          time_ids=time_ids)


def _encode_to_disk(bundle, folder, resolution, cache_dir, batch_size, shard_size, progress, components, fingerprint):
    from safetensors.torch import save
    from tqdm.auto import tqdm

    cache_dir.mkdir(parents=True, exist_ok=True)
    # manifest first: from here until the new manifest lands, the folder must not look like a complete cache
    (cache_dir / MANIFEST).unlink(missing_ok=True)
    stale_files = list(cache_dir.glob("shard-*.safetensors")) + list(cache_dir.glob("shard-*.safetensors" + _TMP_SUFFIX))
    for stale in stale_files + list(cache_dir.glob(MANIFEST + _TMP_SUFFIX)):
        stale.unlink()

    vae = bundle.vae
    param = next(vae.parameters())
    encode_dtype = _encode_dtype(vae)
    n = len(folder)
    shards = []
    latent_shape = text_shape = None
    bar = tqdm(total=n, desc=f"encoding {folder.root.name}", unit="img", disable=not progress)
    # PIL decoding and resizing release the GIL, so a few threads keep the encoder fed
    if encode_dtype != param.dtype:  # an fp32 copy (the SDXL VAE is small), so the teacher's own stays as it is
        import copy

        vae = copy.deepcopy(vae).to(encode_dtype)
    with bar, ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for shard_index, shard_start in enumerate(range(0, n, shard_size)):
            shard_end = min(n, shard_start + shard_size)
            means, stds, texts = [], [], []
            for start in range(shard_start, shard_end, batch_size):
                indices = range(start, min(shard_end, start + batch_size))
                images = torch.stack(list(pool.map(lambda i: folder.load_image(i, resolution), indices)))
                with torch.inference_mode():
                    posterior = vae.encode(images.to(device=param.device, dtype=encode_dtype)).latent_dist
                    means.append(posterior.mean.to(param.dtype).cpu())
                    stds.append(posterior.std.to(param.dtype).cpu())
                texts.append(encode_captions(bundle, folder, indices, resolution, batch_size).cpu())
                bar.update(len(indices))
            tensors = {
                "latent_mean": torch.cat(means).contiguous(),
                "latent_std": torch.cat(stds).contiguous(),
                "text_emb": torch.cat(texts).contiguous(),
            }
            latent_shape = list(tensors["latent_mean"].shape[1:])
            text_shape = list(tensors["text_emb"].shape[1:])
            name = _SHARD.format(shard_index)
            metadata = {"fingerprint": fingerprint, "start": str(shard_start), "count": str(shard_end - shard_start)}
            _write_atomic(cache_dir / name, save(tensors, metadata=metadata))
            shards.append({"file": name, "start": shard_start, "count": shard_end - shard_start})

    shift = getattr(vae.config, "shift_factor", None)
    manifest = {
        "format_version": CACHE_FORMAT_VERSION,
        "fingerprint": fingerprint,
        "components": components,
        "num_items": n,
        "shard_size": shard_size,
        "shards": shards,
        "resolution": resolution,
        "scaling_factor": float(vae.config.scaling_factor),
        "shift_factor": None if shift is None else float(shift),
        "latent_shape": latent_shape,
        "text_emb_shape": text_shape,
        "latent_dtype": str(param.dtype).replace("torch.", ""),
        "text_emb_dtype": str(next(bundle.text_encoder.parameters()).dtype).replace("torch.", ""),
        "source": str(folder.root),
        "captions": folder.captions,
    }
    _write_atomic(cache_dir / MANIFEST, json.dumps(manifest, indent=1).encode())
    logger.info("wrote latent cache %s: %d items in %d shards", cache_dir, n, len(shards))
