"""Prompt sets for evaluation: which prompts to sample, which concept set each belongs to, and what a judge
should see in its images.

File format: a JSON list of objects, or JSON Lines (one object per line), each::

    {"prompt": "a red circle by Vexa", "set": "erased", "shape": "circle", "colour": "red", "style": "Vexa"}

- ``prompt`` (required): the text to sample.
- ``set`` (required): ``erased`` (prompts of the concept that should be gone), ``neighbour`` (a similar concept
  that must survive), ``unrelated`` (everything else that must survive), or any other set name.
- every other key is an expected label for the judge head of that name (all optional): for the toy judge
  ``shape``, ``colour`` and ``style``. A ``labels`` object may hold them instead.

Named prompt sets are plug-ins (``PROMPT_SETS``, a ``PromptSet`` each): ``safeprune eval --prompts NAME`` and
``evaluate(prompts="NAME")`` use one; the default is ``toy``, which the toy world registers
(``safeprune_engine.toy.prompts`` writes it to a file too).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import SafepruneError
from .registries import PROMPT_SETS

ERASED, NEIGHBOUR, UNRELATED = "erased", "neighbour", "unrelated"
DEFAULT_PROMPT_SET = "toy"
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
        sets = ", ".join(PROMPT_SETS.names()) or "none registered"
        raise SafepruneError(f"prompts file {path} does not exist (a JSON list or JSONL of {{\"prompt\", \"set\", "
                             f"labels...}}; or the name of a prompt set: {sets})")
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


@dataclass
class PromptSet:
    """A named prompt set (a plug-in registered in ``PROMPT_SETS``).

    prompts: ``(**options) -> list[PromptSpec]``. real_images: optional ``(spec, count, rng) -> images | None``:
    ``count`` real images (uint8 ``[count, H, W, 3]``) showing what ``spec``'s labels describe, the Frechet
    distance's reference, drawn with ``rng`` (a numpy Generator seeded per prompt); None for prompts it cannot
    draw. ``evaluate`` asks every registered set's ``real_images`` unless given its own ``real_items``.
    """

    prompts: Callable[..., list[PromptSpec]]
    real_images: Callable[[PromptSpec, int, Any], Any] | None = None
    description: str = ""


def named_prompts(name: str, **options) -> list[PromptSpec]:
    """The prompts of the registered prompt set ``name`` (SafepruneError naming the known ones otherwise)."""
    return list(PROMPT_SETS.get(name).prompts(**options))


def resolve_prompts(source: str | os.PathLike | None) -> list[PromptSpec]:
    """Prompts from a prompt file, a registered prompt set's name, or None (the ``toy`` set).

    An existing file wins over a prompt set of the same name."""
    if source is None:
        return named_prompts(DEFAULT_PROMPT_SET)
    if not Path(source).is_file() and isinstance(source, str) and source in PROMPT_SETS:
        return named_prompts(source)
    return load_prompts(source)
