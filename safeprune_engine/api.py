"""The Python API that the CLI wraps: load, prune, train, export.

    import safeprune_engine as sp
    teacher = sp.load_teacher("sd-pipeline/")                       # TeacherBundle
    student, report = sp.prune(teacher.unet, ratio=0.5)              # PrunedUNet2DConditionModel
    result = sp.train(sp.RunConfig(teacher="sd-pipeline/", data="images/", erase=["by Monet"],
                                   method="bilevel", steps=2000, out="runs/monet"))
    pipe = sp.load_pipeline(result.pipeline_dir)                    # plain StableDiffusionPipeline
"""
from __future__ import annotations

from .config import RunConfig


def train(config: RunConfig | None = None, teacher=None, student=None, **overrides):
    """Run one configured job (prune -> cache -> bilevel phase -> export); keyword overrides patch the config.

    teacher: an in-memory TeacherBundle to use instead of loading config.teacher; student: an already pruned
    UNet to train instead of pruning. Neither is changed. Returns a TrainResult (student, pipeline_dir, history,
    prune_report). Without a teacher, the built-in toy default is safeprune_engine.toy.run_default.
    """
    from .run.job import train as run_training

    return run_training(config, teacher=teacher, student=student, **overrides)


run = train
