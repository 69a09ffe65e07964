"""A toy world's judge: a small CNN that reads a rendered (or generated) image's shape, colour and style.

Three heads share one convolutional trunk; the globally pooled trunk output is the feature vector used for a
Frechet distance. Weights ship as safetensors plus a JSON config (no pickle) in ``assets/judge/`` (the toy
world's) and ``assets/glyphs/judge/`` (the glyph world's); the config names the world and its labels.

    judge = load_judge()                              # the shipped toy judge (load_judge(world="glyphs"): glyphs')
    pred = judge.predict(images)                      # uint8 [N, H, W, 3] or float tensor [N, 3, H, W] in [-1, 1]
    pred.labels["style"]                              # ["Vexa", "plain", ...]
    judge.features(images)                            # float64 [N, 128]

``train_judge(seed, world=...)`` trains a fresh one on freshly rendered items of that world (with noise and blur
so it also reads generated images) and measures held-out accuracy per head on items from another seed.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import SafepruneError
from ..eval.judges import ClassifierJudge
from .world import TOY, World, get_world

log = logging.getLogger(__name__)

ASSETS_DIR = TOY.asset_dir("judge")  # the toy world's; World.asset_dir("judge") for any world
CONFIG_NAME = "judge.json"
WEIGHTS_NAME = "model.safetensors"
# the toy world's head -> label names, in logit order (World.heads for any world)
HEADS: dict[str, tuple[str, ...]] = TOY.heads
DEFAULT_CHANNELS = (16, 32, 64, 128)
ACCURACY_BAR = 0.98


class JudgeNet(nn.Module):
    """Conv trunk (3x3 conv, batch norm, ReLU; 2x max-pool between stages) -> global average pool -> heads.

    Input ``[N, 3, S, S]`` float in [-1, 1] (S = 32 for the toy world); ``features`` gives ``[N, channels[-1]]``;
    ``forward`` gives ``{head: logits [N, len(labels)]}``.
    """

    def __init__(self, heads: dict[str, int], channels: tuple[int, ...] = DEFAULT_CHANNELS):
        super().__init__()
        layers: list[nn.Module] = []
        width = 3
        for i, out in enumerate(channels):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            layers += [nn.Conv2d(width, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            width = out
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(width, count) for name, count in heads.items()})
        self.feature_dim = width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` -> ``[N, D]`` pooled trunk features."""
        return self.trunk(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(x)
        return {name: head(feats) for name, head in self.heads.items()}


# ----------------------------------------------------------------------------------------------- augmentation


def _gaussian_kernels(sigmas: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Per-sample normalised 1-D Gaussian kernels ``[N, 2 * radius + 1]`` (sigma 0 -> identity)."""
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    sig = sigmas.clamp_min(1e-3)[:, None]
    kernel = torch.exp(-0.5 * (taps[None, :] / sig) ** 2)
    return kernel / kernel.sum(dim=1, keepdim=True)


def augment(x: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Random blur, brightness/contrast and Gaussian noise, as generated images tend to show.

    x: ``[N, 3, S, S]`` float in [-1, 1]; returns the same shape, clamped to [-1, 1]. Each sample gets a blur of
    sigma in [0, 1.2] (40% of them none), a contrast factor in [0.85, 1.15], a brightness shift of +-0.08 and
    noise of std in [0, 0.08] (scaled by ``strength``).
    """
    n = x.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    sigmas = u(n) * 1.2 * strength * (u(n) < 0.6)
    kernel = _gaussian_kernels(sigmas)  # [N, K]
    k = kernel.shape[1]
    # separable depthwise blur: fold the batch into channels so each sample gets its own kernel
    flat = x.reshape(1, n * 3, *x.shape[2:])
    kx = kernel.repeat_interleave(3, dim=0)
    flat = F.conv2d(F.pad(flat, (k // 2, k // 2, 0, 0), mode="replicate"), kx[:, None, None, :], groups=n * 3)
    flat = F.conv2d(F.pad(flat, (0, 0, k // 2, k // 2), mode="replicate"), kx[:, None, :, None], groups=n * 3)
    x = flat.reshape_as(x)
    contrast = 1 + (u(n, 1, 1, 1) - 0.5) * 0.3 * strength
    brightness = (u(n, 1, 1, 1) - 0.5) * 0.16 * strength
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean + brightness
    noise_std = u(n, 1, 1, 1) * 0.08 * strength
    x = x + torch.randn(x.shape, generator=generator) * noise_std
    return x.clamp(-1, 1)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float ``[N, 3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def _labels_of(items, heads: dict[str, tuple[str, ...]]) -> dict[str, torch.Tensor]:
    return {
        head: torch.tensor([names.index(getattr(item, head)) for item in items])
        for head, names in heads.items()
    }


# ----------------------------------------------------------------------------------------------- train / load


@dataclass
class JudgeTrainReport:
    """What train_judge did: held-out accuracy per head (on items drawn from ``eval_seed``), timing, sizes."""

    accuracy: dict[str, float]
    eval_seed: int
    eval_count: int
    steps: int
    batch_size: int
    seconds: float
    params: int
    extra: dict = field(default_factory=dict)

    def passed(self, bar: float = ACCURACY_BAR) -> bool:
        return all(acc > bar for acc in self.accuracy.values())


def heldout_accuracy(judge: "ClassifierJudge", seed: int, count: int = 2000, augmented: bool = False,
                     world: World | str | None = None) -> dict[str, float]:
    """Accuracy per head of ``judge`` on ``count`` freshly rendered items of ``world`` (default the toy world)
    drawn with ``seed`` (all styles).

    augmented: judge the images after ``augment`` (blur, contrast, noise; seeded by ``seed``), i.e. how well the
    judge reads degraded, generated-looking images.
    """
    world = get_world(world)
    items = world.sample_items(count, seed)
    images = world.render_batch(items)
    if augmented:
        images = augment(_to_tensor(images), torch.Generator().manual_seed(seed))
    pred = judge.predict(images)
    return {
        head: float(np.mean([label == getattr(item, head) for label, item in zip(pred.labels[head], items)]))
        for head in world.heads
    }


def train_judge(
    seed: int = 0,
    steps: int = 800,
    batch_size: int = 128,
    lr: float = 3e-3,
    channels: tuple[int, ...] = DEFAULT_CHANNELS,
    eval_seed: int | None = None,
    eval_count: int = 2000,
    num_threads: int | None = 1,
    log_every: int = 100,
    world: World | str | None = None,
) -> tuple["ClassifierJudge", JudgeTrainReport]:
    """Train a fresh judge on freshly rendered items of ``world`` (default the toy world; a new batch every
    step); return it and its report.

    Every step draws ``batch_size`` items from all shapes, colours and styles (the renderer already jitters
    colour, position and size), renders them at the world's size (32x32) and augments them (blur, contrast,
    noise). AdamW with a one-cycle schedule. Held-out accuracy is measured on ``eval_count`` items from
    ``eval_seed`` (default ``seed + 1_000_003``), a seed never used for training. ``num_threads``: torch threads
    while training (the convs are small; one thread is fastest on a busy machine); None keeps the current setting.
    """
    if steps < 1 or batch_size < 2:
        raise SafepruneError("train_judge needs steps >= 1 and batch_size >= 2")
    eval_seed = seed + 1_000_003 if eval_seed is None else eval_seed
    world = get_world(world)
    heads = world.heads
    old_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        net = JudgeNet({h: len(n) for h, n in heads.items()}, tuple(channels))
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
        rng = np.random.default_rng(seed)
        start = time.perf_counter()
        net.train()
        for step in range(steps):
            items = world.sample_items(batch_size, int(rng.integers(2**31 - 1)))
            x = augment(_to_tensor(world.render_batch(items)), generator)
            targets = _labels_of(items, heads)
            logits = net(x)
            loss = sum(F.cross_entropy(logits[h], targets[h], label_smoothing=0.05) for h in heads)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if log_every and (step + 1) % log_every == 0:
                log.info("judge step %d/%d loss %.4f", step + 1, steps, loss.item())
        seconds = time.perf_counter() - start
        net.eval()
        judge = ToyJudge(net, config=_config(channels, world))
        accuracy = heldout_accuracy(judge, eval_seed, eval_count, world=world)
        augmented = heldout_accuracy(judge, eval_seed, eval_count, augmented=True, world=world)
    finally:
        torch.set_num_threads(old_threads)
    report = JudgeTrainReport(accuracy=accuracy, eval_seed=eval_seed, eval_count=eval_count, steps=steps,
                              batch_size=batch_size, seconds=seconds,
                              params=sum(p.numel() for p in net.parameters()),
                              extra={"seed": seed, "lr": lr, "augmented_accuracy": augmented})
    judge.config["training"] = {k: v for k, v in report.__dict__.items() if k != "extra"} | report.extra
    return judge, report


def _config(channels, world: World = TOY) -> dict:
    return {
        "format": "safeprune-toy-judge",
        "version": 1,
        "world": world.name,
        "image_size": world.image_size,
        "channels": list(channels),
        "labels": {head: list(names) for head, names in world.heads.items()},
        "input": "float [N, 3, S, S] in [-1, 1]",
    }


class ToyJudge(ClassifierJudge):
    """A toy world's judge: a JudgeNet with head labels shape (4), colour (4), style (5) at 32x32.

    Its name is its world's ("toy", "glyphs"); configs saved before worlds existed are the toy world's.
    """

    name = "toy"

    def __init__(self, net: JudgeNet, config: dict | None = None, device: str | torch.device = "cpu"):
        config = config or _config(DEFAULT_CHANNELS)
        labels = {head: tuple(names) for head, names in config["labels"].items()}
        super().__init__(net, labels, image_size=int(config["image_size"]), device=device,
                         features_fn=net.features, name=config.get("world", "toy"))
        self.config = config

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``judge.json`` and ``model.safetensors`` to ``out_dir``; returns the directory."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()
                 if not k.endswith("num_batches_tracked")}
        save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "safeprune-toy-judge"})
        os.chmod(out / WEIGHTS_NAME, 0o644)  # safetensors writes 0600; the judge is a shared, committed asset
        (out / CONFIG_NAME).write_text(json.dumps(self.config, indent=2) + "\n")
        return out


def load_judge(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
               world: World | str | None = None) -> ToyJudge:
    """Load a toy judge from ``path`` (default: the one shipped for ``world``, by default the toy world's in
    ``safeprune_engine/toy/assets/judge``; the glyph world's is in ``assets/glyphs/judge``)."""
    from safetensors.torch import load_file

    root = Path(path) if path is not None else get_world(world).asset_dir("judge")
    config_file, weights_file = root / CONFIG_NAME, root / WEIGHTS_NAME
    if not config_file.is_file() or not weights_file.is_file():
        raise SafepruneError(
            f"no toy judge at {root} (needs {CONFIG_NAME} and {WEIGHTS_NAME}); build one with "
            f"`safeprune toy build-judge --world {get_world(world).name} --out {root}`"
        )
    try:
        config = json.loads(config_file.read_text())
        labels = config["labels"]
        net = JudgeNet({h: len(n) for h, n in labels.items()}, tuple(config["channels"]))
    except (ValueError, KeyError, TypeError) as error:
        raise SafepruneError(f"{config_file} is not a toy judge config ({error})") from error
    state = load_file(str(weights_file))
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise SafepruneError(f"{weights_file} does not match {config_file}: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
    net.eval()
    return ToyJudge(net, config=config, device=device)


def build_judge(out_dir: str | os.PathLike | None = None, seed: int = 0, world: World | str | None = None,
                **train_kwargs) -> tuple[Path, JudgeTrainReport]:
    """Train a judge of ``world`` (``train_judge``), save it to ``out_dir`` (default: the world's package
    assets) and return both."""
    world = get_world(world)
    judge, report = train_judge(seed=seed, world=world, **train_kwargs)
    out = judge.save(out_dir if out_dir is not None else world.asset_dir("judge"))
    return out, report


def format_report(report: JudgeTrainReport) -> str:
    accs = "  ".join(f"{head} {100 * acc:.2f}%" for head, acc in report.accuracy.items())
    text = f"held-out accuracy (seed {report.eval_seed}, {report.eval_count} images): {accs}\n"
    if "augmented_accuracy" in report.extra:
        accs = "  ".join(f"{head} {100 * acc:.2f}%" for head, acc in report.extra["augmented_accuracy"].items())
        text += f"same images blurred/noised: {accs}\n"
    return (text +
            f"{report.params:,} parameters; {report.steps} steps of {report.batch_size} in {report.seconds:.0f} s")


__all__ = ["HEADS", "ASSETS_DIR", "JudgeNet", "ToyJudge", "JudgeTrainReport", "train_judge", "load_judge",
           "build_judge", "heldout_accuracy", "augment", "format_report"]
