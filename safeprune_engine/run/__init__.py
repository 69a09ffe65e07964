"""The run layer: load, prune, cache, fit, export, on one process or many ranks.

    from safeprune_engine.run import train
    result = train(RunConfig(teacher="sd-pipeline/", data="images/", erase=["by Monet"], out="runs/monet"))

A run is a sequence of stages, each a plain function that returns what the next one needs (job.py composes them):
  stages.py   prepare_config -> check_inputs -> load_teacher -> check_resume -> resolve_geometry ->
              resolve_student -> write_run_identity; after the steps export_student -> write_summary
  builder.py  build_engine: the one engine builder (cache pass, student, projections, teacher dtype, kernels)
  fit.py      resume_state, the step loop (NaN check, tensorboard, history), checkpoint_writer
Supporting modules: session.py (LocalSession / DistributedSession: the hooks where one process and many ranks
differ), launcher.py (--launcher: the same job as N ranks), concepts.py (concept prompts and rows), rundir.py
(what --out and --resume may hold).

The package itself is callable, as safeprune_engine.run (the API's alias of train) always was: once this package
is imported, `safeprune_engine.run` names it rather than the function.
"""
import sys
import types

from ..lazy import lazy_exports

_LAZY = {
    "train": "safeprune_engine.run.job",
    "TrainResult": "safeprune_engine.run.job",
    "build_engine": "safeprune_engine.run.builder",
    "block_shapes": "safeprune_engine.run.builder",
    "resolve_device": "safeprune_engine.run.session",
    "open_session": "safeprune_engine.run.session",
    "LocalSession": "safeprune_engine.run.session",
}
__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals(), __all__)


class _CallableRunPackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        """safeprune_engine.run(config, teacher=None, student=None, **overrides): the same as train()."""
        return self.train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableRunPackage
