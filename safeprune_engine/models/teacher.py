"""The frozen teacher: a Stable Diffusion 1.x / 2.x or SDXL (base) pipeline split into the parts training needs.

`load_teacher` checks a pipeline folder (or hub id) before touching any weights, so a wrong path, a missing
component or an unsupported model family fails in a second with a message instead of after a multi-GB load.
Everything it returns is in eval mode with gradients off: the teacher is a fixed reference.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import SafepruneError

REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_COMPONENTS = ("text_encoder_2", "tokenizer_2")  # SDXL's second text encoder (with projection) and tokenizer
SDXL_PIPELINE = "StableDiffusionXLPipeline"
SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction")
_MODULE_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
# "owner/name" with hub-legal characters; anything else that does not exist is reported as a missing path
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FINGERPRINT_VERSION = b"safeprune-fingerprint-v1"


def _sha256_file(path: Path, hasher) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            hasher.update(chunk)


def _config_json(config: Any) -> str:
    """A config as canonical JSON, without bookkeeping keys (paths, library versions) that vary per load."""
    # transformers configs are objects with to_dict(), diffusers configs are FrozenDicts
    items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    drop = {"transformers_version", "torch_dtype", "dtype"}
    items = {k: v for k, v in items.items() if not k.startswith("_") and k not in drop}
    return json.dumps(items, sort_keys=True, default=str)


def _param_snapshot(module: torch.nn.Module) -> tuple:
    # Identity, version counter and dtype of every tensor: in-place edits (copy_, add_, load_state_dict) bump
    # _version, replacing a Parameter changes its id and a cast changes the dtype, while .to(device) keeps all
    # three, so a teacher moved to another device keeps its (cheap) disk hash.
    return tuple((name, id(t), t._version, t.dtype) for name, t in module.state_dict(keep_vars=True).items())


@dataclass
class TeacherBundle:
    """A frozen Stable Diffusion (1.x / 2.x / SDXL base) teacher.

    unet: UNet2DConditionModel, (B,4,h,w) latents + (B,) timesteps + a condition -> (B,4,h,w); the condition is
        one tensor per row (models.conditioning: SDXL's pooled embedding and time ids packed after the tokens).
    vae: AutoencoderKL, (B,3,H,W) images in [-1,1] <-> (B,4,H/8,W/8) latents (unscaled).
    text_encoder: CLIPTextModel, (B,L) token ids -> (B,L,D) hidden states (output [0]).
    tokenizer: CLIP tokenizer, L = tokenizer.model_max_length.
    scheduler: the pipeline's own scheduler (for sampling); see `noise_scheduler()` for training.
    prediction_type: "epsilon" or "v_prediction" (what the UNet predicts).
    source: the folder or hub id it came from ("<in-memory pipeline>" for `bundle_from_pipeline`).
    text_encoder_2, tokenizer_2: SDXL's second encoder (CLIPTextModelWithProjection) and tokenizer; None for SD.
    force_zeros_for_empty_prompt: SDXL's pipeline setting: the empty prompt's condition is all zeros (its
        classifier-free guidance reads zeros, so training on the empty prompt must too).
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    prediction_type: str
    source: str
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = False
    # component -> folder it was loaded from, and the parameter snapshot taken right after loading
    component_dirs: dict[str, Path] = field(default_factory=dict, repr=False)
    _snapshots: dict[str, tuple] = field(default_factory=dict, repr=False)
    _fingerprints: dict[str, tuple] = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def components(self) -> tuple[str, ...]:
        """The component names this teacher has (SDXL adds text_encoder_2 and tokenizer_2)."""
        return REQUIRED_COMPONENTS + (SDXL_COMPONENTS if self.is_sdxl else ())

    @property
    def text_encoders(self) -> list:
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]

    def native_resolution(self) -> int:
        """The UNet's native image size in pixels (sample_size x the VAE's downsampling factor)."""
        return int(self.unet.config.sample_size) * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def noise_scheduler(self):
        """A fresh diffusers DDPMScheduler with this teacher's noise schedule, for add_noise / get_velocity.

        Built from the pipeline scheduler's config so betas, num_train_timesteps and prediction_type match;
        sampling-only options of other scheduler classes are ignored.
        """
        from diffusers import DDPMScheduler

        config = {k: v for k, v in dict(self.scheduler.config).items() if not k.startswith("_")}
        config["prediction_type"] = self.prediction_type
        return DDPMScheduler.from_config(config)

    def fingerprint(self, component: str) -> str:
        """A 16-hex-digit hash of a component's class, config and weights (or vocabulary, for the tokenizer).

        Modules loaded from a folder hash their weight files on disk as long as their parameters were not
        modified in place since loading (tracked through tensor version counters; edits made through
        `param.data` bypass that tracking); otherwise the state dict's bytes are hashed. The result is cached
        per component while the weights stay unchanged. Same weights + same dtype -> same fingerprint.
        """
        if component not in self.components:
            raise SafepruneError(
                f"unknown teacher component {component!r}; choose one of {', '.join(self.components)}"
            )
        obj = getattr(self, component)
        if component.startswith("tokenizer"):
            return _tokenizer_fingerprint(obj)
        if component == "scheduler":
            payload = _FINGERPRINT_VERSION + type(obj).__name__.encode() + _config_json(obj.config).encode()
            return hashlib.sha256(payload).hexdigest()[:16]

        snapshot = _param_snapshot(obj)
        cached = self._fingerprints.get(component)
        if cached is not None and cached[0] == snapshot:
            return cached[1]
        hasher = hashlib.sha256(_FINGERPRINT_VERSION)
        hasher.update(type(obj).__name__.encode())
        hasher.update(_config_json(obj.config).encode())
        hasher.update(str(sorted({str(t.dtype) for t in obj.state_dict().values()})).encode())
        folder = self.component_dirs.get(component)
        if folder is not None and self._snapshots.get(component) == snapshot:
            files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
            hasher.update(b"disk")
            for path in files:
                hasher.update(path.name.encode())
                _sha256_file(path, hasher)
        else:
            hasher.update(b"memory")
            for name, tensor in sorted(obj.state_dict().items()):
                t = tensor.detach().to("cpu").contiguous()
                hasher.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
                # view as bytes so bf16 (no numpy dtype) hashes too
                hasher.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        digest = hasher.hexdigest()[:16]
        self._fingerprints[component] = (snapshot, digest)
        return digest


def _tokenizer_fingerprint(tokenizer) -> str:
    hasher = hashlib.sha256(_FINGERPRINT_VERSION)
    hasher.update(type(tokenizer).__name__.encode())
    hasher.update(str(tokenizer.model_max_length).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # padding/truncation are call-time settings the fast tokenizer stores on its backend, not vocabulary
        state.pop("padding", None)
        state.pop("truncation", None)
        hasher.update(json.dumps(state, sort_keys=True).encode())
    else:
        hasher.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
        ranks = getattr(tokenizer, "bpe_ranks", None)
        if ranks:
            hasher.update(json.dumps(sorted((" ".join(k), v) for k, v in ranks.items())).encode())
    hasher.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return hasher.hexdigest()[:16]


def _freeze(*modules) -> None:
    for module in modules:
        module.eval()
        module.requires_grad_(False)


def _check_prediction_type(scheduler_config: dict, where: str) -> str:
    prediction_type = scheduler_config.get("prediction_type") or "epsilon"
    if prediction_type not in SUPPORTED_PREDICTION_TYPES:
        extra = " (x0 prediction is not supported yet)" if prediction_type == "sample" else ""
        raise SafepruneError(
            f"{where}: scheduler prediction_type {prediction_type!r} is not supported{extra}. "
            f"Use a teacher whose scheduler predicts one of {', '.join(SUPPORTED_PREDICTION_TYPES)} "
            "(SD 1.x: epsilon, SD 2.x 768px: v_prediction), or fix prediction_type in scheduler_config.json "
            "if it is wrong."
        )
    return prediction_type


_SDXL_ONLY_BASE = (
    "among SDXL pipelines only the base model's StableDiffusionXLPipeline (two text encoders, pooled text embedding "
    "and size/crop time ids) can be a teacher"
)


def _sdxl_refusal(pipeline_class: str, index: dict, unet_config: dict) -> str | None:
    """Why an SDXL-family pipeline cannot be a teacher (None when it is a supported SDXL base pipeline)."""
    if "XL" in pipeline_class and pipeline_class != SDXL_PIPELINE:
        what = "the SDXL refiner" if "Img2Img" in pipeline_class or "Refiner" in pipeline_class else pipeline_class
        missing = [name for name in ("text_encoder", "tokenizer") if _component_class(index, name) is None]
        extra = f" (it has no {' and no '.join(missing)})" if missing else ""
        return f"{what}{extra} is not supported: {_SDXL_ONLY_BASE}"
    if index.get("requires_aesthetics_score") or unet_config.get("projection_class_embeddings_input_dim") == 2560:
        return f"an SDXL refiner UNet (time ids with an aesthetic score, one text encoder) is not supported: " \
               f"{_SDXL_ONLY_BASE}"
    if unet_config.get("addition_embed_type") not in (None, "text_time"):
        return (f"UNet addition_embed_type {unet_config.get('addition_embed_type')!r} is not supported "
                "(SDXL's is 'text_time')")
    return None


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SafepruneError(f"{what} {path} is not valid JSON ({e}); re-save the pipeline") from None
    if not isinstance(data, dict):
        raise SafepruneError(f"{what} {path} should hold a JSON object, found {type(data).__name__}")
    return data


def _component_class(index: dict, name: str) -> str | None:
    entry = index.get(name)
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]:
        return str(entry[1])
    return None


def _validate_pipeline_dir(root: Path) -> tuple[dict, dict]:
    """Checks a local pipeline folder without loading weights. Returns (model_index, scheduler config)."""
    if not root.exists():
        raise SafepruneError(
            f"teacher path {root} does not exist; pass a Stable Diffusion pipeline folder "
            "(the output of StableDiffusionPipeline.save_pretrained) or a hub id like 'owner/model'"
        )
    if not root.is_dir():
        raise SafepruneError(f"teacher path {root} is a file; pass the pipeline folder that holds model_index.json")
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise SafepruneError(
            f"{root} has no model_index.json, so it is not a diffusers pipeline folder; pass the folder written by "
            "StableDiffusionPipeline.save_pretrained (a single .ckpt/.safetensors checkpoint must be converted "
            "first, e.g. with StableDiffusionPipeline.from_single_file(...).save_pretrained(folder))"
        )
    index = _read_json(index_path, "model_index.json")
    pipeline_class = str(index.get("_class_name", ""))

    # the SDXL family first: refiner and other XL pipelines look complete but need what no teacher here has
    unet_config_path = root / "unet" / "config.json"
    unet_config = _read_json(unet_config_path, "unet config") if unet_config_path.is_file() else {}
    sdxl = bool("XL" in pipeline_class or _component_class(index, "text_encoder_2")
                or (root / "text_encoder_2").is_dir() or unet_config.get("addition_embed_type"))
    if sdxl:
        refusal = _sdxl_refusal(pipeline_class, index, unet_config)
        if refusal:
            raise SafepruneError(f"{root}: {refusal} (model_index.json says {pipeline_class or 'no class'})")
    if _component_class(index, "transformer") and not _component_class(index, "unet"):
        raise SafepruneError(
            f"{root}: {pipeline_class or 'this pipeline'} uses a transformer denoiser, not a UNet; only "
            "Stable Diffusion 1.x / 2.x (UNet2DConditionModel) teachers are supported"
        )

    # every missing component at once, so one fix attempt is enough
    required_files = {
        "unet": "config.json",
        "vae": "config.json",
        "text_encoder": "config.json",
        "scheduler": "scheduler_config.json",
        "tokenizer": None,
    }
    if sdxl:
        required_files.update({"text_encoder_2": "config.json", "tokenizer_2": None})
    missing = []
    for name, config_name in required_files.items():
        folder = root / name
        if _component_class(index, name) is None:
            missing.append(f"{name} (not listed in model_index.json)")
        elif not folder.is_dir():
            missing.append(f"{name} (no {name}/ folder)")
        elif config_name is not None and not (folder / config_name).is_file():
            missing.append(f"{name} (no {name}/{config_name})")
        elif config_name is None and not any(folder.iterdir()):
            missing.append(f"{name} (empty {name}/ folder)")
        elif name in _MODULE_COMPONENTS and not any(
            p.name.endswith(_WEIGHT_SUFFIXES) for p in folder.iterdir()
        ):
            missing.append(f"{name} (no weight file in {name}/)")
    if missing:
        needs = REQUIRED_COMPONENTS + (SDXL_COMPONENTS if sdxl else ())
        raise SafepruneError(
            f"teacher pipeline {root} is missing required components: {', '.join(missing)}. A "
            f"{'Stable Diffusion XL' if sdxl else 'Stable Diffusion'} pipeline folder needs {', '.join(needs)}; "
            "re-save it with save_pretrained"
        )

    expected = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel"}
    if sdxl:
        expected["text_encoder_2"] = "CLIPTextModelWithProjection"
    for name, cls in expected.items():
        config = _read_json(root / name / "config.json", f"{name} config")
        # diffusers configs name their class in _class_name, transformers configs in architectures
        on_disk = [config.get("_class_name")] + list(config.get("architectures") or [])
        for found in [_component_class(index, name)] + on_disk:
            if found and found != cls:
                raise SafepruneError(
                    f"{root}: the {name} class is {found}, but only {cls} is supported as {name} "
                    f"({'SDXL base' if sdxl else 'Stable Diffusion 1.x / 2.x'} layout)"
                )
    scheduler_config = _read_json(root / "scheduler" / "scheduler_config.json", "scheduler config")
    _check_prediction_type(scheduler_config, str(root))
    return index, scheduler_config


def _resolve_source(source: str | os.PathLike) -> tuple[Path, bool]:
    """Local folder for `source`, downloading a hub id when allowed. Returns (folder, is_local_path)."""
    path = Path(source).expanduser()
    text = os.fspath(source)
    if path.exists() or not _HUB_ID.match(text):
        return path, True

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        # model_index.json first, so an unsupported model fails before any weight download
        index_file = Path(hf_hub_download(text, "model_index.json", local_files_only=offline))
        _check_index_only(index_file, text)
        patterns = ["model_index.json"]
        for name in REQUIRED_COMPONENTS + SDXL_COMPONENTS:
            patterns += [f"{name}/*.json", f"{name}/*.txt", f"{name}/*.model"]
        # non-variant safetensors only: SD repos also hold .bin, fp16 and EMA copies of every weight
        patterns += [
            "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model-*.safetensors",
            "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model-*.safetensors",
            "text_encoder/model.safetensors", "text_encoder/model-*.safetensors",
            "text_encoder_2/model.safetensors", "text_encoder_2/model-*.safetensors",
        ]
        folder = snapshot_download(text, allow_patterns=patterns, local_files_only=offline)
    except SafepruneError:
        raise
    except Exception as e:  # hub errors come in many types; all mean "could not get it"
        if offline:
            raise SafepruneError(
                f"teacher {text!r} is not a local folder and is not in the hub cache, and HF_HUB_OFFLINE=1 "
                "forbids downloading it; pass a local pipeline folder or download it once while online"
            ) from None
        raise SafepruneError(
            f"could not fetch teacher {text!r} from the hub ({type(e).__name__}: {e}); check the id and your "
            "access, or pass a local pipeline folder"
        ) from None
    return Path(folder), False


def _check_index_only(index_file: Path, source: str) -> None:
    index = _read_json(index_file, "model_index.json")
    pipeline_class = str(index.get("_class_name", ""))
    if "XL" in pipeline_class or _component_class(index, "text_encoder_2"):
        refusal = _sdxl_refusal(pipeline_class, index, {})
        if refusal:
            raise SafepruneError(f"{source}: {refusal} (model_index.json says {pipeline_class})")
    unet_class = _component_class(index, "unet")
    if unet_class != "UNet2DConditionModel":
        raise SafepruneError(
            f"{source}: the denoiser is {unet_class or 'missing'}, but only UNet2DConditionModel "
            "(Stable Diffusion 1.x / 2.x) teachers are supported"
        )


def load_teacher(
    source: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    unet_dtype: torch.dtype | None = None,
) -> TeacherBundle:
    """Loads a Stable Diffusion 1.x / 2.x or SDXL base pipeline as a frozen TeacherBundle.

    source: a local pipeline folder (model_index.json + unet/ vae/ text_encoder/ tokenizer/ scheduler/, and for SDXL
    text_encoder_2/ tokenizer_2/), or a hub id "owner/name" (downloaded when online; only the hub cache is used when
    HF_HUB_OFFLINE=1).
    device, dtype: where and in which floating dtype the unet, vae and text encoder live; unet_dtype: the UNet's
    own dtype when it differs (a bf16 SDXL UNet is 5 GB of host memory instead of 10).
    The folder is validated before any weight is read; every problem raises SafepruneError.
    """
    root, _ = _resolve_source(source)
    index, scheduler_config = _validate_pipeline_dir(root)

    import diffusers
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=unet_dtype or dtype,
                                                local_files_only=True)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype, local_files_only=True)
    text_encoder = transformers.CLIPTextModel.from_pretrained(
        root, subfolder="text_encoder", dtype=dtype, local_files_only=True
    )
    tokenizer_cls = getattr(transformers, _component_class(index, "tokenizer") or "", None) or transformers.AutoTokenizer
    tokenizer = tokenizer_cls.from_pretrained(root, subfolder="tokenizer", local_files_only=True)
    text_encoder_2 = tokenizer_2 = None
    if _component_class(index, "text_encoder_2"):
        text_encoder_2 = transformers.CLIPTextModelWithProjection.from_pretrained(
            root, subfolder="text_encoder_2", dtype=dtype, local_files_only=True)
        tokenizer_2_cls = (getattr(transformers, _component_class(index, "tokenizer_2") or "", None)
                           or transformers.AutoTokenizer)
        tokenizer_2 = tokenizer_2_cls.from_pretrained(root, subfolder="tokenizer_2", local_files_only=True)
    scheduler_name = _component_class(index, "scheduler") or scheduler_config.get("_class_name", "")
    scheduler_cls = getattr(diffusers, scheduler_name, None)
    if scheduler_cls is None:
        raise SafepruneError(
            f"{root}: scheduler class {scheduler_name!r} is not part of diffusers {diffusers.__version__}; "
            "set scheduler/scheduler_config.json _class_name to a diffusers scheduler (e.g. DDIMScheduler)"
        )
    scheduler = scheduler_cls.from_pretrained(root, subfolder="scheduler", local_files_only=True)

    modules = [m for m in (unet, vae, text_encoder, text_encoder_2) if m is not None]
    for module in modules:
        module.to(device)
    _freeze(*modules)
    bundle = TeacherBundle(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        prediction_type=_check_prediction_type(dict(scheduler.config), str(root)),
        source=os.fspath(source),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", text_encoder_2 is not None)),
    )
    present = [name for name in _MODULE_COMPONENTS if getattr(bundle, name) is not None]
    bundle.component_dirs = {name: root / name for name in present}
    # taken after the move and freeze: neither touches weights, so later fingerprints can use the disk files
    bundle._snapshots = {name: _param_snapshot(getattr(bundle, name)) for name in present}
    return bundle


def bundle_from_pipeline(pipe) -> TeacherBundle:
    """Wraps an in-memory StableDiffusionPipeline or StableDiffusionXLPipeline (no copy: its modules are frozen and
    put in eval mode in place)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet_config = dict(getattr(getattr(pipe, "unet", None), "config", {}) or {})
    sdxl = getattr(pipe, "text_encoder_2", None) is not None or bool(unet_config.get("addition_embed_type"))
    if sdxl:
        refusal = _sdxl_refusal(type(pipe).__name__, dict(getattr(pipe, "config", {}) or {}), unet_config)
        if refusal:
            raise SafepruneError(f"{type(pipe).__name__}: {refusal}")
    missing = [name for name in REQUIRED_COMPONENTS + (SDXL_COMPONENTS if sdxl else ())
               if getattr(pipe, name, None) is None]
    if missing:
        raise SafepruneError(f"pipeline is missing required components: {', '.join(missing)}")
    if not isinstance(pipe.unet, UNet2DConditionModel):
        raise SafepruneError(
            f"the pipeline's unet class is {type(pipe.unet).__name__}; only UNet2DConditionModel teachers are supported"
        )
    if not isinstance(pipe.vae, AutoencoderKL):
        raise SafepruneError(f"the pipeline's vae class is {type(pipe.vae).__name__}; only AutoencoderKL is supported")
    prediction_type = _check_prediction_type(dict(pipe.scheduler.config), type(pipe).__name__)
    _freeze(*[m for m in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
              if m is not None])
    source = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path") or "<in-memory pipeline>"
    return TeacherBundle(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler=pipe.scheduler,
        prediction_type=prediction_type,
        source=str(source),
        text_encoder_2=getattr(pipe, "text_encoder_2", None) if sdxl else None,
        tokenizer_2=getattr(pipe, "tokenizer_2", None) if sdxl else None,
        force_zeros_for_empty_prompt=sdxl and bool(dict(getattr(pipe, "config", {}) or {}).get(
            "force_zeros_for_empty_prompt", True)),
    )
