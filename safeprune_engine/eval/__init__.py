"""Evaluation: sample a model on prompt sets and measure concepts, content and quality with a judge.

    from safeprune_engine.eval import evaluate
    result = evaluate("runs/default/pipeline", "toy", judge="toy", reference="toy-teacher/")
    print(result.table())

Judges and named prompt sets are plug-ins found by name (``JUDGES``, ``PROMPT_SETS``): the ``toy`` ones belong to
the toy world (safeprune_engine.toy.plugins), which registers them when imported or installed; evaluation never
imports it. The import stays light (``safeprune eval`` builds its parser from here): names resolve on first use.
"""
from ..lazy import lazy_exports

# public name -> module that defines it
_LAZY = {
    "evaluate": "safeprune_engine.eval.runner",
    "EvalResult": "safeprune_engine.eval.runner",
    "ModelEval": "safeprune_engine.eval.runner",
    "PipelineSampler": "safeprune_engine.eval.runner",
    "PromptSpec": "safeprune_engine.eval.prompts",
    "load_prompts": "safeprune_engine.eval.prompts",
    "save_prompts": "safeprune_engine.eval.prompts",
    "PromptSet": "safeprune_engine.eval.prompts",
    "named_prompts": "safeprune_engine.eval.prompts",
    "resolve_prompts": "safeprune_engine.eval.prompts",
    "PROMPT_SETS": "safeprune_engine.eval.registries",
    "Judge": "safeprune_engine.eval.judges",
    "ClassifierJudge": "safeprune_engine.eval.judges",
    "Prediction": "safeprune_engine.eval.judges",
    "JUDGES": "safeprune_engine.eval.registries",
    "resolve_judge": "safeprune_engine.eval.judges",
    "load_torch_judge": "safeprune_engine.eval.judges",
    "save_torch_judge": "safeprune_engine.eval.judges",
    "frechet_distance": "safeprune_engine.eval.metrics",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals(), __all__)
