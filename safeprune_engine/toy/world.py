"""A procedural image world: coloured shapes rendered in fictional "artist" styles (textures).

Every image is a deterministic function of its seed. Captions follow "a {colour} {shape} by {Artist}";
the unstyled images (flat fill) are captioned "a {colour} {shape}". The style to erase is ERASED_STYLE
(diagonal stripes); NEIGHBOUR_STYLE (horizontal stripes) looks similar and must survive erasure.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (214, 48, 49),
    "green": (39, 174, 96),
    "blue": (41, 98, 255),
    "yellow": (241, 196, 15),
}
# artist name -> texture; "plain" is the unstyled look and has no artist in its caption
STYLES = ("plain", "Vexa", "Orrin", "Pell", "Kiru")
STYLE_TEXTURES = {
    "plain": "flat fill",
    "Vexa": "diagonal stripes",
    "Orrin": "horizontal stripes",
    "Pell": "polka dots",
    "Kiru": "checkerboard",
}
ERASED_STYLE = "Vexa"
NEIGHBOUR_STYLE = "Orrin"


@dataclass(frozen=True)
class Item:
    """One rendered image's labels and caption."""

    shape: str
    colour: str
    style: str
    seed: int

    @property
    def caption(self) -> str:
        base = f"a {self.colour} {self.shape}"
        return base if self.style == "plain" else f"{base} by {self.style}"


def caption_for(shape: str, colour: str, style: str) -> str:
    return Item(shape, colour, style, 0).caption


def concept_prompt(style: str = ERASED_STYLE) -> str:
    """The erase prompt of a style, as it appears in captions."""
    return f"by {style}"


def _shape_mask(shape: str, size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        return (np.abs(dx) <= radius * 0.85) & (np.abs(dy) <= radius * 0.85)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= radius * 1.15
    if shape == "triangle":  # apex up
        top, bottom = cy - radius, cy + radius * 0.8
        inside_rows = (yy >= top) & (yy <= bottom)
        half_width = (yy - top) / (bottom - top) * radius * 1.1
        return inside_rows & (np.abs(dx) <= half_width)
    raise ValueError(f"unknown shape {shape!r}")


def _texture(style: str, size: int, phase: int) -> np.ndarray:
    """1.0 where the object shows its colour, a darker factor elsewhere; (size, size) float32."""
    yy, xx = np.mgrid[0:size, 0:size]
    if style == "plain":
        return np.ones((size, size), np.float32)
    if style == "Vexa":
        on = ((xx + yy + phase) // 3) % 2 == 0
    elif style == "Orrin":
        on = ((yy + phase) // 3) % 2 == 0
    elif style == "Pell":
        on = ((xx + phase) % 6 - 2.5) ** 2 + ((yy + phase) % 6 - 2.5) ** 2 > 3.0
    elif style == "Kiru":
        on = (((xx + phase) // 4) + ((yy + phase) // 4)) % 2 == 0
    else:
        raise ValueError(f"unknown style {style!r}")
    return np.where(on, 1.0, 0.3).astype(np.float32)


def render(item: Item, size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size, 3) uint8 image of `item`; the same item always renders the same pixels."""
    rng = np.random.default_rng(item.seed)
    background = rng.uniform(200, 235) + rng.normal(0, 3, (size, size, 1))
    image = np.repeat(background, 3, axis=2).astype(np.float32)
    radius = rng.uniform(0.28, 0.36) * size
    cx, cy = rng.uniform(0.42, 0.58, size=2) * size
    mask = _shape_mask(item.shape, size, cx, cy, radius)
    texture = _texture(item.style, size, int(rng.integers(0, 6)))
    colour = np.asarray(COLOURS[item.colour], np.float32) * rng.uniform(0.9, 1.05)
    fill = colour[None, None, :] * texture[:, :, None]
    image[mask] = fill[mask]
    return np.clip(image, 0, 255).astype(np.uint8)


def sample_items(count: int, seed: int, styles: tuple[str, ...] = STYLES) -> list[Item]:
    """`count` items with uniformly drawn shape, colour and style (from `styles`), seeded."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(count):
        items.append(Item(
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
            colour=list(COLOURS)[int(rng.integers(len(COLOURS)))],
            style=styles[int(rng.integers(len(styles)))],
            seed=int(rng.integers(2**31 - 1)),
        ))
    return items


def finetune_styles(erased: str = ERASED_STYLE) -> tuple[str, ...]:
    """Styles of the fine-tuning split: everything but the erased style."""
    return tuple(s for s in STYLES if s != erased)


def write_split(path: str | Path, items: list[Item], size: int = IMAGE_SIZE) -> Path:
    """Write items as an HF imagefolder (PNG + metadata.jsonl with the labels too)."""
    from PIL import Image

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, item in enumerate(items):
        name = f"{i:06d}.png"
        Image.fromarray(render(item, size)).save(path / name)
        lines.append(json.dumps({"file_name": name, "text": item.caption, "shape": item.shape,
                                 "colour": item.colour, "style": item.style, "seed": item.seed}))
    (path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return path


def render_batch(items: list[Item], size: int = IMAGE_SIZE) -> np.ndarray:
    """(N, size, size, 3) uint8."""
    return np.stack([render(item, size) for item in items])
