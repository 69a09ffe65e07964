"""Prompt sets for evaluation: which prompts to sample, which concept set each belongs to, and what a judge
should see in its images.

File format: a JSON list of objects, or JSON Lines (one object per line), each::

    {"prompt": "a red circle by Vexa", "set": "erased", "shape": "circle", "colour": "red", "style": "Vexa"}

- ``prompt`` (required): the text to sample.
- ``set`` (required): ``erased`` (prompts of the concept that should be gone), ``neighbour`` (a similar concept
  that must survive), ``unrelated`` (everything else that must survive), or any other set name.
- every other key is an expected label for the judge head of that name (all optional): for the toy judge
  ``shape``, ``colour`` and ``style``. A ``labels`` object may hold them instead.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SafepruneError

ERASED, NEIGHBOUR, UNRELATED = "erased", "neighbour", "unrelated"
STANDARD_SETS = (ERASED, NEIGHBOUR, UNRELATED)
_RESERVED = {"prompt", "set", "labels"}


@dataclass
class PromptSpec:
    """One prompt of an evaluation set: its text, its set name and the labels a judge should read."""

    prompt: str
    set: str
    labels: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "set": self.set, **self.labels}


def _spec_from(obj, where: str) -> PromptSpec:
    if not isinstance(obj, dict):
        raise SafepruneError(f"{where}: each prompt must be a JSON object with 'prompt' and 'set'")
    prompt, set_name = obj.get("prompt"), obj.get("set")
    if not isinstance(prompt, str) or not prompt.strip():
        raise SafepruneError(f"{where}: 'prompt' is missing or empty")
    if not isinstance(set_name, str) or not set_name.strip():
        raise SafepruneError(f"{where}: 'set' is missing (erased | neighbour | unrelated | any set name)")
    labels = dict(obj.get("labels") or {})
    labels.update({k: v for k, v in obj.items() if k not in _RESERVED})
    bad = {k: v for k, v in labels.items() if not isinstance(v, str)}
    if bad:
        raise SafepruneError(f"{where}: labels must be strings; got {bad}")
    set_name = set_name.strip()
    if set_name == "neighbor":
        set_name = NEIGHBOUR
    return PromptSpec(prompt=prompt, set=set_name, labels=labels)


def parse_prompts(text: str, source: str = "prompts") -> list[PromptSpec]:
    """Prompt specs from the text of a JSON list or JSON Lines file."""
    stripped = text.strip()
    if not stripped:
        raise SafepruneError(f"{source} holds no prompts")
    if stripped.startswith("["):
        try:
            objects = json.loads(stripped)
        except ValueError as error:
            raise SafepruneError(f"{source} is not valid JSON ({error})") from error
        specs = [_spec_from(obj, f"{source} item {i}") for i, obj in enumerate(objects)]
    else:
        specs = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as error:
                raise SafepruneError(f"{source} line {number} is not JSON ({error}); use a JSON list or one "
                                     "object per line") from error
            specs.append(_spec_from(obj, f"{source} line {number}"))
    if not specs:
        raise SafepruneError(f"{source} holds no prompts")
    seen: dict[str, PromptSpec] = {}
    for spec in specs:
        if spec.prompt in seen:
            raise SafepruneError(f"{source}: prompt {spec.prompt!r} appears twice; each prompt once please")
        seen[spec.prompt] = spec
    return specs


def load_prompts(path: str | os.PathLike) -> list[PromptSpec]:
    """Read a prompt file (JSON list or JSONL; see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise SafepruneError(f"prompts file {path} does not exist (a JSON list or JSONL of {{\"prompt\", \"set\", "
                             "labels...}}; `safeprune_engine.eval.toy_prompt_file(path)` writes the toy set)")
    return parse_prompts(path.read_text(), source=str(path))


def save_prompts(prompts: list[PromptSpec], path: str | os.PathLike) -> Path:
    """Write prompts as JSONL (``.jsonl``) or a JSON list (any other suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [spec.to_dict() for spec in prompts]
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        path.write_text(json.dumps(rows, indent=1) + "\n")
    return path


def toy_prompts(erased: str | None = None, neighbour: str | None = None,
                unrelated_per_style: int = 4) -> list[PromptSpec]:
    """The default toy prompt set.

    ``erased``: every shape x colour in the erased style (16 prompts); ``neighbour``: the same in the neighbour
    style (16); ``unrelated``: ``unrelated_per_style`` shape/colour pairs (a Latin-square walk, so every shape
    and colour shows up) for every other style and for plain (unstyled) prompts.
    """
    from ..toy.world import COLOURS, ERASED_STYLE, NEIGHBOUR_STYLE, SHAPES, STYLES, caption_for

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
    from ..toy.world import COLOURS, SHAPES, STYLES

    match = _CAPTION.match(caption.strip())
    if not match:
        return None
    colour, shape, style = match.group(1), match.group(2), match.group(3) or "plain"
    if colour not in COLOURS or shape not in SHAPES or style not in STYLES or style == "plain" and match.group(3):
        return None
    return {"shape": shape, "colour": colour, "style": style}


def is_toy_item(labels: dict[str, str]) -> bool:
    """Whether labels name a toy-world item (shape, colour and style all known), i.e. it can be rendered."""
    from ..toy.world import COLOURS, SHAPES, STYLES

    return (labels.get("shape") in SHAPES and labels.get("colour") in COLOURS and labels.get("style") in STYLES)
