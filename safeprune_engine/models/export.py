"""Export a trained student as a complete StableDiffusionPipeline (or, from an SDXL teacher,
StableDiffusionXLPipeline) directory, and load it back.

A width-pruned student is a PrunedUNet2DConditionModel, which diffusers does not know. Two ways to load it:

- With safeprune-engine installed, the exported model_index.json names the unet ("safeprune_engine",
  "PrunedUNet2DConditionModel"). diffusers imports only its own libraries by name and looks any other one up in
  sys.modules, so the package must be imported first::

      import safeprune_engine                              # or: pipe = safeprune_engine.load_pipeline(path)
      pipe = StableDiffusionPipeline.from_pretrained(path)

- Exported with ``remote_code=True``, the unet folder also carries the class as a diffusers custom component
  (``unet/safeprune_pruned_unet.py``, a verbatim copy of models/pruned_unet.py), and the pipeline loads on machines
  without safeprune-engine::

      pipe = DiffusionPipeline.from_pretrained(path, trust_remote_code=True)

  diffusers then always prefers the shipped file (trust_remote_code=True is needed even where safeprune-engine is
  installed); ``safeprune_engine.load_pipeline(path)`` loads it with the installed package's class instead.

A block-removal student (e.g. BK-SDM) is a plain UNet2DConditionModel: plain ``from_pretrained`` loads it, and
``remote_code`` leaves it as it is.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..errors import SafepruneError

# the shipped file's name (without .py) in the unet folder; model_index.json names it as the unet's library
REMOTE_CODE_MODULE = "safeprune_pruned_unet"
PRUNED_CLASS = "PrunedUNet2DConditionModel"


SDXL_PIPELINE = "StableDiffusionXLPipeline"


def assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler, text_encoder_2=None, tokenizer_2=None,
                      force_zeros_for_empty_prompt: bool = True):
    """A StableDiffusionPipeline from its five components, with no safety checker or feature extractor; with
    `text_encoder_2` and `tokenizer_2`, a StableDiffusionXLPipeline (no image encoder)."""
    if text_encoder_2 is not None:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def pipeline_class(path: str | os.PathLike):
    """The diffusers pipeline class a saved pipeline directory names (StableDiffusionXLPipeline or
    StableDiffusionPipeline)."""
    index_path = Path(path) / "model_index.json"
    name = json.loads(index_path.read_text()).get("_class_name") if index_path.is_file() else None
    if name == SDXL_PIPELINE:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline


def export_pipeline(teacher, student, out_dir: str | os.PathLike, dtype: torch.dtype | None = None, *,
                    remote_code: bool = False) -> Path:
    """Write teacher's VAE, text encoder, tokenizer and scheduler with `student` as the UNet (safetensors).

    teacher: a TeacherBundle; student: a (pruned) UNet2DConditionModel. dtype: cast weights before saving.
    remote_code: a PrunedUNet2DConditionModel student also ships its class in the unet folder (see
    ``ship_unet_code``); a plain UNet2DConditionModel student (block removal) is written as it is.
    """
    import copy

    from .pruned_unet import PrunedUNet2DConditionModel

    param = next(student.parameters())
    if param.device.type == "cpu" and dtype in (None, param.dtype):
        unet = student  # written as it is: no second copy of a (2.6B-parameter) student in host memory
    else:
        unet = copy.deepcopy(student).cpu()
        if dtype is not None:
            unet = unet.to(dtype)
    pipe = assemble_pipeline(teacher.vae, teacher.text_encoder, teacher.tokenizer, unet, teacher.scheduler,
                             getattr(teacher, "text_encoder_2", None), getattr(teacher, "tokenizer_2", None),
                             getattr(teacher, "force_zeros_for_empty_prompt", True))
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    if remote_code and isinstance(unet, PrunedUNet2DConditionModel):
        ship_unet_code(out_dir)
    return out_dir


def ship_unet_code(pipeline_dir: str | os.PathLike) -> Path:
    """Make a saved pipeline with a PrunedUNet2DConditionModel unet loadable without safeprune-engine.

    Copies models/pruned_unet.py (torch and diffusers only) verbatim to ``unet/safeprune_pruned_unet.py`` and
    names it as the unet's library in model_index.json: diffusers resolves a ``[module, class]`` entry to
    ``<component folder>/<module>.py`` when that file exists, and runs it only with ``trust_remote_code=True``.
    unet/config.json stays as saved (no ``auto_map``: diffusers warns about that key on every load). Returns the
    written file. Raises SafepruneError when the pipeline's unet is not a PrunedUNet2DConditionModel.
    """
    from . import pruned_unet

    pipeline_dir = Path(pipeline_dir)
    index_path, config_path = pipeline_dir / "model_index.json", pipeline_dir / "unet" / "config.json"
    if not index_path.is_file() or not config_path.is_file():
        raise SafepruneError(f"{pipeline_dir} is not a saved pipeline with a unet folder")
    index, config = json.loads(index_path.read_text()), json.loads(config_path.read_text())
    if config.get("_class_name") != PRUNED_CLASS:
        raise SafepruneError(f"{config_path} is a {config.get('_class_name')}, not a {PRUNED_CLASS}: only "
                             "width-pruned students need their class shipped")
    source = Path(pruned_unet.__file__)
    if source.suffix != ".py":
        raise SafepruneError(f"cannot ship the pruned UNet class: its source {source} is not a .py file")
    target = pipeline_dir / "unet" / f"{REMOTE_CODE_MODULE}.py"
    shutil.copyfile(source, target)
    index["unet"] = [REMOTE_CODE_MODULE, PRUNED_CLASS]
    # the layout diffusers itself writes (ConfigMixin.to_json_string)
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return target


def ships_unet_code(path: str | os.PathLike) -> bool:
    """Whether the pipeline directory at `path` carries the pruned UNet class as remote code (ship_unet_code)."""
    index_path = Path(path) / "model_index.json"
    return index_path.is_file() and json.loads(index_path.read_text()).get("unet", [None])[0] == REMOTE_CODE_MODULE


def resolve_pipeline_dir(path: str | os.PathLike, flag: str = "--model") -> Path:
    """The pipeline directory a user names: a pipeline directory itself, or a run directory (the --out of
    `safeprune run`, whose student is exported to RUN/pipeline). Raises SafepruneError naming `flag` otherwise."""
    given = Path(path)
    if not given.exists():
        raise SafepruneError(f"{flag} {path} does not exist")
    if (given / "model_index.json").is_file():
        return given
    if (given / "pipeline" / "model_index.json").is_file():
        return given / "pipeline"
    if (given / "run_config.json").is_file():
        raise SafepruneError(f"{flag} {path} is a run directory without an exported pipeline yet (its run has "
                             "not finished; continue it with `safeprune run ... --resume latest`)")
    # the built-in default's --out holds one run directory per method
    runs = sorted(str(index.parent.parent) for index in given.glob("*/pipeline/model_index.json"))
    if runs:
        raise SafepruneError(f"{flag} {path} holds run directories, one per method; choose one: {', '.join(runs)}")
    raise SafepruneError(f"{flag} {path} is neither a pipeline directory (no model_index.json) nor a run "
                         "directory (no pipeline/model_index.json)")


def load_pipeline(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, *,
                  unet_dir: str | os.PathLike | None = None):
    """Load an exported (or any local) StableDiffusionPipeline or StableDiffusionXLPipeline directory without
    touching the network.

    A pipeline exported with ``remote_code=True`` is loaded with the installed package's
    PrunedUNet2DConditionModel, not the copy it ships (no code from the directory runs).
    unet_dir: a saved UNet folder (config.json + weights, e.g. a run's OUT/snapshots/step-N) that replaces the
    pipeline's own UNet: the pipeline's VAE, text encoder, tokenizer and scheduler with those weights.
    """
    cls = pipeline_class(path)
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    if unet_dir is None and not ships_unet_code(path):
        return cls.from_pretrained(str(path), **kwargs).to(device)

    from .pruned_unet import load_student_unet

    if unet_dir is not None and not (Path(unet_dir) / "config.json").is_file():
        raise SafepruneError(f"{unet_dir} is not a saved UNet folder (no config.json)")
    # a shipped module would be resolved (and refused without trust_remote_code) even for a passed-in unet, and a
    # replaced unet need not load at all: load the rest without a unet, then build the pipeline around the
    # package's own class
    rest = cls.from_pretrained(str(path), unet=None, **kwargs)
    unet = load_student_unet(Path(unet_dir) if unet_dir is not None else Path(path) / "unet")
    if dtype is not None:
        unet = unet.to(dtype)
    if cls.__name__ == SDXL_PIPELINE:
        options = {"force_zeros_for_empty_prompt": rest.config.force_zeros_for_empty_prompt}
    else:
        options = {"requires_safety_checker": rest.config.requires_safety_checker}
    pipe = cls(**{**rest.components, "unet": unet}, **options)
    return pipe.to(device)
