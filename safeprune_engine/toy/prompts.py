"""A toy world's evaluation prompt set: erased-style, neighbour-style and unrelated prompts with the labels the
world's judge reads, and real (rendered) images of any prompt's labels for the Frechet distance.

Registered as the ``toy`` prompt set (the default of ``safeprune eval``) and the ``glyphs`` prompt set (the
validation world), see safeprune_engine.toy.plugins. Every function takes ``world`` (a World or its name;
default the toy world).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ..errors import SafepruneError
from ..eval.prompts import ERASED, NEIGHBOUR, UNRELATED, PromptSpec, save_prompts
from .world import Item, World, caption_for, get_world


def toy_prompts(erased: str | None = None, neighbour: str | None = None,
                unrelated_per_style: int = 4, world: World | str | None = None) -> list[PromptSpec]:
    """The prompt set of `world` (default the toy world).

    ``erased``: every shape x colour in the erased style (16 prompts); ``neighbour``: the same in the neighbour
    style (16); ``unrelated``: ``unrelated_per_style`` shape/colour pairs (a Latin-square walk, so every shape
    and colour shows up) for every other style and for plain (unstyled) prompts.
    """
    world = get_world(world)
    shapes, styles = world.shapes, world.styles
    erased = erased or world.erased_style
    neighbour = neighbour or world.neighbour_style
    for style in (erased, neighbour):
        if style not in styles:
            raise SafepruneError(f"unknown {world.name} style {style!r}; choose one of {', '.join(styles)}")
    colours = list(world.colours)

    def spec(shape, colour, style, set_name):
        return PromptSpec(caption_for(shape, colour, style), set_name,
                          {"shape": shape, "colour": colour, "style": style})

    specs = [spec(s, c, erased, ERASED) for s in shapes for c in colours]
    specs += [spec(s, c, neighbour, NEIGHBOUR) for s in shapes for c in colours]
    others = [s for s in styles if s not in (erased, neighbour)]
    count = max(0, min(unrelated_per_style, len(shapes) * len(colours)))
    for k, style in enumerate(others):
        pairs = [(shapes[i % len(shapes)], colours[(i + i // len(shapes) + k) % len(colours)])
                 for i in range(count)]
        specs += [spec(s, c, style, UNRELATED) for s, c in pairs]
    return specs


def toy_prompt_file(path: str | os.PathLike, **kwargs) -> Path:
    """Write ``toy_prompts(**kwargs)`` to ``path`` (JSONL for ``.jsonl``, else a JSON list)."""
    return save_prompts(toy_prompts(**kwargs), path)


_CAPTION = re.compile(r"^a (\w+) (\w+)(?: by (\w+))?$")


def toy_labels(caption: str, world: World | str | None = None) -> dict[str, str] | None:
    """Labels of a caption of `world` ("a red circle by Vexa" -> shape, colour, style), or None if it is not one."""
    world = get_world(world)
    match = _CAPTION.match(caption.strip())
    if not match:
        return None
    colour, shape, style = match.group(1), match.group(2), match.group(3) or "plain"
    if (colour not in world.colours or shape not in world.shapes or style not in world.styles
            or style == "plain" and match.group(3)):
        return None
    return {"shape": shape, "colour": colour, "style": style}


def is_toy_item(labels: dict[str, str], world: World | str | None = None) -> bool:
    """Whether labels name an item of `world` (shape, colour and style all known), i.e. it can be rendered."""
    world = get_world(world)
    return (labels.get("shape") in world.shapes and labels.get("colour") in world.colours
            and labels.get("style") in world.styles)


def toy_real_images(spec: PromptSpec, count: int, rng: np.random.Generator, world: World | str | None = None
                    ) -> np.ndarray | None:
    """``count`` rendered items of `world` (uint8 ``[count, 32, 32, 3]``) of the prompt's labels, seeded from
    ``rng``; None when the labels do not name an item of that world."""
    world = get_world(world)
    if not is_toy_item(spec.labels, world):
        return None
    items = [Item(spec.labels["shape"], spec.labels["colour"], spec.labels["style"], int(rng.integers(2**31 - 1)))
             for _ in range(count)]
    return world.render_batch(items)


__all__ = ["toy_prompts", "toy_prompt_file", "toy_labels", "is_toy_item", "toy_real_images"]
