"""safeprune-engine: prune a diffusion UNet, then recover quality and suppress concepts in one bilevel phase.

The import stays light (no diffusers, deepspeed or triton): public names are resolved lazily.

    >>> import safeprune_engine as sp
    >>> teacher = sp.load_teacher("path/to/sd-pipeline")
    >>> student, report = sp.prune(teacher.unet, ratio=0.5)
    >>> result = sp.train(sp.RunConfig(teacher="path/to/sd-pipeline", data="images/", erase=["by Monet"]))
    >>> sp.export_pipeline(teacher, result.student, "out/pipeline")
"""
from .lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "RunConfig": "safeprune_engine.config",
    "load_teacher": "safeprune_engine.models.teacher",
    "TeacherBundle": "safeprune_engine.models.teacher",
    "PrunedUNet2DConditionModel": "safeprune_engine.models.pruned_unet",
    "prune": "safeprune_engine.prune.width",
    "prune_unet": "safeprune_engine.prune.base",
    "count_macs": "safeprune_engine.prune.macs",
    "train": "safeprune_engine.api",
    "run": "safeprune_engine.api",
    "export_pipeline": "safeprune_engine.models.export",
    "load_pipeline": "safeprune_engine.models.export",
    # diffusers' pipeline loader resolves a component's load method via getattr(library, "ModelMixin"), and
    # exported pipelines name this package as the unet's library
    "ModelMixin": "diffusers",
}

__all__ = sorted(n for n in _LAZY if n != "ModelMixin") + ["__version__"]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals(), __all__)
