"""The toy worlds' evaluation plug-ins: the ``toy`` and ``glyphs`` judges and prompt sets.

Evaluation never imports the toy world; it finds these by name in its registries. They are registered when
``safeprune_engine.toy`` is imported (its __init__ imports this module; the CLI always does) and, in processes
that never import it, through this package's entry points (pyproject.toml, groups ``safeprune_engine.judges``
and ``safeprune_engine.prompt_sets``). Light on purpose: torch and numpy load only when a plug-in is used.
Each world's judge and prompt set share the world's name (safeprune_engine.toy.world.WORLDS).
"""
from __future__ import annotations

from ..eval.prompts import PromptSet
from ..eval.registries import JUDGES, PROMPT_SETS


@JUDGES.register("toy")
def toy_judge(arg: str | None = None, device="cpu"):
    """The shipped toy-world judge; ``toy:DIR`` loads one saved by ``safeprune toy build-judge --out DIR``."""
    from .judge import load_judge

    return load_judge(arg, device=device)


def _toy_prompts(**options):
    from .prompts import toy_prompts

    return toy_prompts(**options)


def _toy_real_images(spec, count, rng):
    from .prompts import toy_real_images

    return toy_real_images(spec, count, rng)


TOY_PROMPT_SET = PROMPT_SETS.register("toy")(PromptSet(
    prompts=_toy_prompts, real_images=_toy_real_images,
    description="the toy world: erased style, neighbour style, unrelated styles; renders real images"))


@JUDGES.register("glyphs")
def glyphs_judge(arg: str | None = None, device="cpu"):
    """The shipped glyph-world judge; ``glyphs:DIR`` loads one saved by ``safeprune toy build-judge --world glyphs
    --out DIR``."""
    from .judge import load_judge

    return load_judge(arg, device=device, world="glyphs")


def _glyph_prompts(**options):
    from .prompts import toy_prompts

    return toy_prompts(**options, world="glyphs")


def _glyph_real_images(spec, count, rng):
    from .prompts import toy_real_images

    return toy_real_images(spec, count, rng, world="glyphs")


GLYPHS_PROMPT_SET = PROMPT_SETS.register("glyphs")(PromptSet(
    prompts=_glyph_prompts, real_images=_glyph_real_images,
    description="the glyph validation world: erased background style, its neighbour, unrelated styles; renders "
                "real images"))
