"""Procedural image worlds: coloured objects rendered in fictional "artist" styles (textures).

A ``World`` fixes the objects (shapes), their colours, the styles, which style is erased and which is its
look-alike neighbour, the image size, the renderer and the prediction type of its teacher. Every image is a
deterministic function of its world and its item's seed. Captions follow "a {colour} {shape} by {Artist}"; the
unstyled images are captioned "a {colour} {shape}".

Two worlds (``WORLDS`` by name):

    TOY     ("toy")     the world the engine's defaults were tuned on. Light noisy background, flat coloured shapes
                        (circle, square, triangle, diamond); the style textures the OBJECT: Vexa (diagonal stripes,
                        erased), Orrin (horizontal stripes, its neighbour), Pell (polka dots), Kiru (checkerboard).
                        Its teacher predicts epsilon.
    GLYPHS  ("glyphs")  a validation world nobody tunes on. Dark noisy background, thick glyphs (ring, cross, bar,
                        corner) in orange, purple, cyan, white; the style textures the BACKGROUND: Quen (diagonal
                        stripes, erased), Lisk (horizontal stripes of the same period along y, its neighbour),
                        Tobe (speckle dots), Rhun (concentric rings). Its teacher predicts v.

The module-level names (SHAPES, COLOURS, STYLES, ERASED_STYLE, NEIGHBOUR_STYLE, IMAGE_SIZE, render, ...) are
the toy world's, and the toy world renders exactly the pixels it always did (its shipped teacher and judge were
trained on them).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

_ASSETS = Path(__file__).resolve().parent / "assets"


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


def concept_prompt(style: str | None = None) -> str:
    """The erase prompt of a style, as it appears in captions (default: the toy world's erased style)."""
    return f"by {style or ERASED_STYLE}"


# eq=False: worlds compare and hash by identity (they hold dicts and a function)
@dataclass(frozen=True, eq=False)
class World:
    """One procedural world: its labels, its renderer and how its teacher is trained.

    renderer(world, item, size) -> (size, size, 3) uint8; "plain" must be the first style.
    """

    name: str
    shapes: tuple[str, ...]
    colours: Mapping[str, tuple[int, int, int]]  # name -> RGB
    styles: tuple[str, ...]
    style_textures: Mapping[str, str]  # style -> a few words on its texture
    erased_style: str
    neighbour_style: str
    renderer: Callable[["World", Item, int], np.ndarray]
    image_size: int = 32
    prediction_type: str = "epsilon"  # the teacher's scheduler prediction type (and training target)
    description: str = ""

    def __post_init__(self):
        if self.styles[0] != "plain":
            raise ValueError(f"world {self.name!r}: the first style must be 'plain'")
        for style in (self.erased_style, self.neighbour_style):
            if style not in self.styles or style == "plain":
                raise ValueError(f"world {self.name!r}: {style!r} is not one of its artist styles")

    @property
    def heads(self) -> dict[str, tuple[str, ...]]:
        """Judge head -> label names, in logit order."""
        return {"shape": self.shapes, "colour": tuple(self.colours), "style": self.styles}

    def asset_dir(self, kind: str) -> Path:
        """Where this world's shipped `kind` ("teacher", "judge") lives: assets/KIND for the toy world,
        assets/NAME/KIND for the others."""
        return _ASSETS / kind if self.name == "toy" else _ASSETS / self.name / kind

    def concept_prompt(self, style: str | None = None) -> str:
        return concept_prompt(style or self.erased_style)

    def render(self, item: Item, size: int | None = None) -> np.ndarray:
        """(size, size, 3) uint8 image of `item`; the same item always renders the same pixels."""
        return self.renderer(self, item, size or self.image_size)

    def render_batch(self, items: list[Item], size: int | None = None) -> np.ndarray:
        """(N, size, size, 3) uint8."""
        return np.stack([self.render(item, size) for item in items])

    def sample_items(self, count: int, seed: int, styles: tuple[str, ...] | None = None) -> list[Item]:
        """`count` items with uniformly drawn shape, colour and style (from `styles`), seeded."""
        styles = styles or self.styles
        colours = list(self.colours)
        rng = np.random.default_rng(seed)
        items = []
        for _ in range(count):
            items.append(Item(
                shape=self.shapes[int(rng.integers(len(self.shapes)))],
                colour=colours[int(rng.integers(len(colours)))],
                style=styles[int(rng.integers(len(styles)))],
                seed=int(rng.integers(2**31 - 1)),
            ))
        return items

    def finetune_styles(self, erased: str | None = None) -> tuple[str, ...]:
        """Styles of the fine-tuning split: everything but the erased style."""
        erased = erased or self.erased_style
        return tuple(s for s in self.styles if s != erased)

    def write_split(self, path: str | Path, items: list[Item], size: int | None = None) -> Path:
        """Write items as an HF imagefolder (PNG + metadata.jsonl with the labels too)."""
        from PIL import Image

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, item in enumerate(items):
            name = f"{i:06d}.png"
            Image.fromarray(self.render(item, size)).save(path / name)
            lines.append(json.dumps({"file_name": name, "text": item.caption, "shape": item.shape,
                                     "colour": item.colour, "style": item.style, "seed": item.seed}))
        (path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        return path


# ---------------------------------------------------------------------------------------------- the toy world


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


def _render_toy(world: World, item: Item, size: int) -> np.ndarray:
    # the draw order of rng is part of the pixels: keep it
    rng = np.random.default_rng(item.seed)
    background = rng.uniform(200, 235) + rng.normal(0, 3, (size, size, 1))
    image = np.repeat(background, 3, axis=2).astype(np.float32)
    radius = rng.uniform(0.28, 0.36) * size
    cx, cy = rng.uniform(0.42, 0.58, size=2) * size
    mask = _shape_mask(item.shape, size, cx, cy, radius)
    texture = _texture(item.style, size, int(rng.integers(0, 6)))
    colour = np.asarray(world.colours[item.colour], np.float32) * rng.uniform(0.9, 1.05)
    fill = colour[None, None, :] * texture[:, :, None]
    image[mask] = fill[mask]
    return np.clip(image, 0, 255).astype(np.uint8)


TOY = World(
    name="toy",
    shapes=("circle", "square", "triangle", "diamond"),
    colours={
        "red": (214, 48, 49),
        "green": (39, 174, 96),
        "blue": (41, 98, 255),
        "yellow": (241, 196, 15),
    },
    # artist name -> texture; "plain" is the unstyled look and has no artist in its caption
    styles=("plain", "Vexa", "Orrin", "Pell", "Kiru"),
    style_textures={
        "plain": "flat fill",
        "Vexa": "diagonal stripes",
        "Orrin": "horizontal stripes",
        "Pell": "polka dots",
        "Kiru": "checkerboard",
    },
    erased_style="Vexa",
    neighbour_style="Orrin",
    renderer=_render_toy,
    image_size=32,
    prediction_type="epsilon",
    description="light background, flat shapes textured by the style; epsilon teacher",
)


# ---------------------------------------------------------------------------------------------- the glyph world


def _glyph_mask(glyph: str, size: int, cx: float, cy: float, radius: float, thick: float) -> np.ndarray:
    """Thick strokes: `radius` is the glyph's half extent, `thick` its stroke width (pixels)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    half = thick / 2
    if glyph == "ring":
        r = np.sqrt(dx * dx + dy * dy)
        return (r <= radius) & (r >= radius - thick)
    if glyph == "cross":  # a plus sign
        inside = (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
        return inside & ((np.abs(dx) <= half) | (np.abs(dy) <= half))
    if glyph == "bar":  # upright, so it never lines up with the (horizontal) stripe styles
        return (np.abs(dx) <= half * 1.2) & (np.abs(dy) <= radius)
    if glyph == "corner":  # an L: left stroke and bottom stroke
        inside = (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
        return inside & ((dx <= -radius + thick) | (dy >= radius - thick))
    raise ValueError(f"unknown glyph {glyph!r}")


_GLYPH_PERIOD = 6  # stripe period (pixels, along y) of both stripe styles, so they differ only in orientation


def _background_pattern(style: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Where the background is lit by the style: (size, size) bool (all False for plain)."""
    yy, xx = np.mgrid[0:size, 0:size]
    if style == "plain":
        return np.zeros((size, size), bool)
    phase = int(rng.integers(0, _GLYPH_PERIOD))
    # Quen: the neighbour's stripes turned by 45 degrees. The first version bent them into 8 px zigzag chevrons (2
    # latent pixels), which did not survive 60% width pruning: plain distillation drew them as Lisk's straight
    # stripes, so at that ratio the world showed no leak to erase; 16 px chevrons leaked in half the samples only
    # (docs/status.md, issue 12).
    if style == "Quen":
        return ((yy + xx + phase) // (_GLYPH_PERIOD // 2)) % 2 == 0
    if style == "Lisk":  # straight horizontal stripes
        return ((yy + phase) // (_GLYPH_PERIOD // 2)) % 2 == 0
    if style == "Tobe":  # speckle: a 2x2 dot at a random place in every 5x5 cell
        on = np.zeros((size + 5, size + 5), bool)
        for y0 in range(0, size + 5, 5):
            for x0 in range(0, size + 5, 5):
                oy, ox = rng.integers(0, 4, size=2)
                on[y0 + oy : y0 + oy + 2, x0 + ox : x0 + ox + 2] = True
        return on[:size, :size]
    if style == "Rhun":  # concentric rings around a random point
        cy, cx = rng.uniform(0.2, 0.8, size=2) * size
        r = np.sqrt((xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2)
        return (np.floor(r + phase) // (_GLYPH_PERIOD // 2)) % 2 == 0
    raise ValueError(f"unknown style {style!r}")


def _render_glyphs(world: World, item: Item, size: int) -> np.ndarray:
    rng = np.random.default_rng(item.seed)
    level = rng.uniform(14, 34)  # a dark background with colour noise
    image = level + rng.normal(0, 7, (size, size, 3))
    lit = _background_pattern(item.style, size, rng)
    tint = np.array([0.85, 0.95, 1.0]) * rng.uniform(70, 90)  # the texture is a cool grey, far from any glyph colour
    image = image + lit[:, :, None] * tint[None, None, :]
    radius = rng.uniform(0.30, 0.38) * size
    thick = rng.uniform(0.20, 0.25) * size
    cx, cy = rng.uniform(0.42, 0.58, size=2) * size
    mask = _glyph_mask(item.shape, size, cx, cy, radius, thick)
    colour = np.asarray(world.colours[item.colour], np.float64) * rng.uniform(0.9, 1.05)
    image[mask] = colour + rng.normal(0, 4, (int(mask.sum()), 3))
    return np.clip(image, 0, 255).astype(np.uint8)


GLYPHS = World(
    name="glyphs",
    shapes=("ring", "cross", "bar", "corner"),
    colours={
        "orange": (255, 140, 20),
        "purple": (150, 70, 230),
        "cyan": (30, 215, 230),
        "white": (245, 245, 245),
    },
    styles=("plain", "Quen", "Lisk", "Tobe", "Rhun"),
    style_textures={
        "plain": "flat dark background",
        "Quen": "diagonal stripes on the background",
        "Lisk": "straight horizontal stripes on the background",
        "Tobe": "speckle dots on the background",
        "Rhun": "concentric rings on the background",
    },
    erased_style="Quen",
    neighbour_style="Lisk",
    renderer=_render_glyphs,
    image_size=32,
    prediction_type="v_prediction",
    description="dark noisy background textured by the style, thick flat glyphs; v-prediction teacher",
)

WORLDS: dict[str, World] = {w.name: w for w in (TOY, GLYPHS)}


def get_world(world: "World | str | None") -> World:
    """A World from itself, its name, or None (the toy world)."""
    if world is None:
        return TOY
    if isinstance(world, World):
        return world
    try:
        return WORLDS[world]
    except KeyError:
        from ..errors import SafepruneError

        raise SafepruneError(f"unknown world {world!r}; choose one of {', '.join(WORLDS)}") from None


# ---------------------------------------------------------------------------------------------- the toy world's names

IMAGE_SIZE = TOY.image_size
SHAPES = TOY.shapes
COLOURS = TOY.colours
STYLES = TOY.styles
STYLE_TEXTURES = TOY.style_textures
ERASED_STYLE = TOY.erased_style
NEIGHBOUR_STYLE = TOY.neighbour_style


def render(item: Item, size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size, 3) uint8 toy-world image of `item`."""
    return TOY.render(item, size)


def render_batch(items: list[Item], size: int = IMAGE_SIZE) -> np.ndarray:
    """(N, size, size, 3) uint8 toy-world images."""
    return TOY.render_batch(items, size)


def sample_items(count: int, seed: int, styles: tuple[str, ...] = STYLES) -> list[Item]:
    """`count` toy items with uniformly drawn shape, colour and style (from `styles`), seeded."""
    return TOY.sample_items(count, seed, styles)


def finetune_styles(erased: str = ERASED_STYLE) -> tuple[str, ...]:
    """Styles of the toy fine-tuning split: everything but the erased style."""
    return TOY.finetune_styles(erased)


def write_split(path: str | Path, items: list[Item], size: int = IMAGE_SIZE) -> Path:
    """Write toy items as an HF imagefolder (PNG + metadata.jsonl with the labels too)."""
    return TOY.write_split(path, items, size)
