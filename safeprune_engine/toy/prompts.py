"""The toy world's evaluation prompt set: erased-style, neighbour-style and unrelated prompts with the labels the
toy judge reads, and real (rendered) images of any prompt's labels for the Frechet distance.

Registered as the ``toy`` prompt set (see safeprune_engine.toy.plugins), the default of ``safeprune eval``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ..errors import SafepruneError
from ..eval.prompts import ERASED, NEIGHBOUR, UNRELATED, PromptSpec, save_prompts
from .world import COLOURS, ERASED_STYLE, NEIGHBOUR_STYLE, SHAPES, STYLES, Item, caption_for, render_batch


def toy_prompts(erased: str | None = None, neighbour: str | None = None,
                unrelated_per_style: int = 4) -> list[PromptSpec]:
    """The default toy prompt set.

    ``erased``: every shape x colour in the erased style (16 prompts); ``neighbour``: the same in the neighbour
    style (16); ``unrelated``: ``unrelated_per_style`` shape/colour pairs (a Latin-square walk, so every shape
    and colour shows up) for every other style and for plain (unstyled) prompts.
    """
    erased = erased or ERASED_STYLE
    neighbour = neighbour or NEIGHBOUR_STYLE
    for style in (erased, neighbour):
        if style not in STYLES:
            raise SafepruneError(f"unknown toy style {style!r}; choose one of {', '.join(STYLES)}")
    colours = list(COLOURS)

    def spec(shape, colour, style, set_name):
        return PromptSpec(caption_for(shape, colour, style), set_name,
                          {"shape": shape, "colour": colour, "style": style})

    specs = [spec(s, c, erased, ERASED) for s in SHAPES for c in colours]
    specs += [spec(s, c, neighbour, NEIGHBOUR) for s in SHAPES for c in colours]
    others = [s for s in STYLES if s not in (erased, neighbour)]
    count = max(0, min(unrelated_per_style, len(SHAPES) * len(colours)))
    for k, style in enumerate(others):
        pairs = [(SHAPES[i % len(SHAPES)], colours[(i + i // len(SHAPES) + k) % len(colours)])
                 for i in range(count)]
        specs += [spec(s, c, style, UNRELATED) for s, c in pairs]
    return specs


def toy_prompt_file(path: str | os.PathLike, **kwargs) -> Path:
    """Write ``toy_prompts(**kwargs)`` to ``path`` (JSONL for ``.jsonl``, else a JSON list)."""
    return save_prompts(toy_prompts(**kwargs), path)


_CAPTION = re.compile(r"^a (\w+) (\w+)(?: by (\w+))?$")


def toy_labels(caption: str) -> dict[str, str] | None:
    """Labels of a toy caption ("a red circle by Vexa" -> shape, colour, style), or None if it is not one."""
    match = _CAPTION.match(caption.strip())
    if not match:
        return None
    colour, shape, style = match.group(1), match.group(2), match.group(3) or "plain"
    if colour not in COLOURS or shape not in SHAPES or style not in STYLES or style == "plain" and match.group(3):
        return None
    return {"shape": shape, "colour": colour, "style": style}


def is_toy_item(labels: dict[str, str]) -> bool:
    """Whether labels name a toy-world item (shape, colour and style all known), i.e. it can be rendered."""
    return (labels.get("shape") in SHAPES and labels.get("colour") in COLOURS and labels.get("style") in STYLES)


def toy_real_images(spec: PromptSpec, count: int, rng: np.random.Generator) -> np.ndarray | None:
    """``count`` rendered items (uint8 ``[count, 32, 32, 3]``) of the prompt's labels, seeded from ``rng``; None
    when the labels do not name a toy item."""
    if not is_toy_item(spec.labels):
        return None
    items = [Item(spec.labels["shape"], spec.labels["colour"], spec.labels["style"], int(rng.integers(2**31 - 1)))
             for _ in range(count)]
    return render_batch(items)


__all__ = ["toy_prompts", "toy_prompt_file", "toy_labels", "is_toy_item", "toy_real_images"]
