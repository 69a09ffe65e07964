"""The plug-in registries of evaluation: judges and prompt sets, by name.

Kept free of heavy imports, so a plug-in package can register itself on import at no cost (the toy world does,
from ``safeprune_engine.toy``). Besides decorators run at import, installed packages are found through the
entry-point groups below, e.g. in a plug-in's pyproject.toml::

    [project.entry-points."safeprune_engine.judges"]
    mine = "my_pkg.my_judges"          # a module whose decorators register judges on import

- ``JUDGES``: name -> factory ``(arg: str | None, device="cpu") -> Judge`` (``--judge NAME`` / ``NAME:ARG``).
- ``PROMPT_SETS``: name -> ``PromptSet`` (``--prompts NAME``; see safeprune_engine.eval.prompts).
"""
from __future__ import annotations

from ..registry import Registry

JUDGE_ENTRY_POINTS = "safeprune_engine.judges"
PROMPT_SET_ENTRY_POINTS = "safeprune_engine.prompt_sets"

JUDGES: Registry = Registry("judge", entry_point_group=JUDGE_ENTRY_POINTS)
PROMPT_SETS: Registry = Registry("prompt set", entry_point_group=PROMPT_SET_ENTRY_POINTS)
