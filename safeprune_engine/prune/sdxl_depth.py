"""``--prune-method sdxl-depth-1.3b | sdxl-depth-1b | sdxl-depth-700m``: depth pruning of SDXL-style UNets.

SDXL's cost sits in its deepest stage: every Transformer2DModel at 1280 channels (``down_blocks.2.attentions.{0,1}``,
``up_blocks.0.attentions.{0,1,2}`` and ``mid_block.attentions.0``) stacks 10 BasicTransformerBlocks, 60 of the
UNet's 70, about 2.1B of its 2.57B parameters. Published compressions of SDXL shorten those stacks, and the
smaller ones also drop resnet+attention pairs. Each variant here is one row of ``VARIANTS``:

- ``sdxl-depth-1.3b`` (in the spirit of Segmind SSD-1B, 1.3B UNet): every 10-layer transformer of the deepest
  stage and of the mid block keeps 4 layers (teacher layers 0, 3, 6, 9); nothing else is removed (36 of 70
  BasicTransformerBlocks go, every resnet stays). Its encoder has SSD-1B's transformer depths (0, 2, 4); SSD-1B
  also trimmed its decoder and mid block unevenly, chosen by layer-level losses on data, which a data-free method
  cannot redo. Measured: 1,316M parameters (SSD-1B: 1.3B).
- ``sdxl-depth-1b`` (in the spirit of KOALA-1B): bk-base first (the second resnet+attention pair of every down
  and every up stage, ``layers_per_block`` 2 -> 1; see ``bk.py``), then the remaining 10-layer transformers
  (``down_blocks.2.attentions.0``, ``up_blocks.0.attentions.{0,1}`` of the student, the mid block's) keep 6 layers
  (teacher layers 0, 2, 4, 5, 7, 9). KOALA-1B's published depths are (0, 2, 6) and its UNet 1,161M parameters;
  this construction measures 1,161.2M.
- ``sdxl-depth-700m`` (in the spirit of KOALA-700M, and near Segmind-Vega's 0.74B): bk-small first (bk-base plus
  the whole mid block), then the remaining 10-layer transformers keep 5 layers (teacher layers 0, 2, 5, 7, 9).
  KOALA-700M's published depths are (0, 2, 5) and its UNet 782M parameters; this one measures 782.8M.

MACs at 1024x1024 px (128x128 latents, ``count_macs`` with added conditioning): SDXL 3,381G; the variants 2,175G,
1,716G and 1,351G (64%, 51%, 40%; ``benchmarks/sdxl_depth_sizes.py``).

Which layers stay: evenly spaced over the stack, the first and the last always among them
(``kept_layers(n, k) = round(i (n - 1) / (k - 1))``). The first layer reads what ``proj_in`` writes and the last
writes what ``proj_out`` reads, so keeping both leaves the copied projections facing the residual-stream
statistics they were trained on; every layer in between adds a residual update, and keeping them evenly spaced
walks the same path in fewer, larger steps, where keeping a contiguous run would skip a whole part of it.
A data-driven choice (drop the layers whose removal changes block outputs least) needs calibration data; these
methods are data-free, like BK-SDM.

Other UNets: the rule is stated on the teacher's own maximum transformer depth D (10 for SDXL): every
Transformer2DModel with D layers keeps ``max(1, round(D * k / 10))`` of them (k = 4, 6, 5 as above); shallower
ones are untouched. A UNet with no Transformer2DModel of more than one layer (SD-1.x/2.x) is refused: it has no
depth to remove (use ``bk-base`` / ``bk-small`` / ``bk-tiny``).

The student is a plain ``UNet2DConditionModel`` built from a standard diffusers config (its
``transformer_layers_per_block`` / ``reverse_transformer_layers_per_block`` carry the new depths, the mid block's
depth follows the deepest down stage's as diffusers builds it), so ``UNet2DConditionModel.from_pretrained`` loads
it with no safeprune code. The time embedding and SDXL's added conditioning (``add_time_proj``,
``add_embedding``) are kept and copied. Every weight is copied from the teacher by name: pair indices shift as in
``bk.teacher_name`` and student ``...transformer_blocks.i`` reads teacher ``...transformer_blocks.kept[i]``. A
student tensor with no teacher counterpart of its shape is left fresh and listed in the report's ``fresh``
(none for these variants). MACs are counted on shape-only ``meta`` copies of teacher and student: exact, as
counts depend on shapes only (the benchmark checks them against real forwards), where a real SDXL forward at
128x128 latents costs about a minute of a 2-core CPU in bf16 (and 10 GB of fp32 weights).
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SafepruneError
from .base import PRUNE_METHODS, PruneMethod, PruneRequest
from .bk import bk_config, removed_blocks, teacher_name
from .macs import count_macs, count_params

SDXL_DEPTH = 10  # layers of SDXL-base's deepest transformers: the scale VariantSpec.deep_layers is written in


@dataclass(frozen=True)
class VariantSpec:
    """One depth variant: ``deep_layers`` of SDXL's 10 kept in the deepest transformers, after removing the
    resnet+attention pairs (and the mid block) of the bk.py variant ``pairs`` (None: no pairs removed)."""

    deep_layers: int
    pairs: str | None
    like: str  # the published model it follows
    published_params: int  # that model's UNet parameters, as published (model card / paper)


VARIANTS = {
    "sdxl-depth-1.3b": VariantSpec(deep_layers=4, pairs=None, like="Segmind SSD-1B", published_params=1_300_000_000),
    "sdxl-depth-1b": VariantSpec(deep_layers=6, pairs="bk-base", like="KOALA-1B", published_params=1_161_000_000),
    "sdxl-depth-700m": VariantSpec(deep_layers=5, pairs="bk-small", like="KOALA-700M", published_params=782_000_000),
}

_TRANSFORMER_LAYER = re.compile(r"^(.*)\.transformer_blocks\.(\d+)\.(.*)$")


def kept_layers(n: int, k: int) -> list[int]:
    """Indices of the ``k`` layers kept of ``n``: evenly spaced, first and last included (see module doc).

    Example: ``kept_layers(10, 4) == [0, 3, 6, 9]``.
    """
    if not 1 <= k <= n:
        raise SafepruneError(f"cannot keep {k} of {n} transformer layers")
    if k == 1:
        return [0]
    return [int(i * (n - 1) / (k - 1) + 0.5) for i in range(k)]


def deep_depth(teacher_depth: int, variant: str) -> int:
    """Layers the variant keeps in a transformer of the teacher's maximum depth ``teacher_depth``."""
    return max(1, int(teacher_depth * _spec(variant).deep_layers / SDXL_DEPTH + 0.5))


def transformer_depths(unet: nn.Module) -> dict[str, int]:
    """``{module name: number of BasicTransformerBlocks}`` of every Transformer2DModel in ``unet``."""
    from diffusers import Transformer2DModel

    return {name: len(m.transformer_blocks) for name, m in unet.named_modules() if isinstance(m, Transformer2DModel)}


def _spec(variant: str) -> VariantSpec:
    if variant not in VARIANTS:
        raise SafepruneError(f"unknown SDXL depth variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[variant]


def _check_teacher(unet: nn.Module, variant: str) -> int:
    """The teacher's maximum transformer depth D; raise SafepruneError if the variant cannot prune ``unet``."""
    from diffusers import UNet2DConditionModel

    if not isinstance(unet, UNet2DConditionModel):
        raise SafepruneError(f"{variant} prunes a diffusers UNet2DConditionModel, got {type(unet).__name__}")
    if getattr(unet.config, "pruned_widths", None):
        raise SafepruneError(f"{variant} removes layers of a dense UNet2DConditionModel; this UNet is already "
                             "width-pruned (use its dense teacher)")
    depths = transformer_depths(unet)
    deepest = max(depths.values(), default=0)
    if deepest < 2:
        raise SafepruneError(
            f"{variant} removes transformer layers from SDXL-style UNets, but this UNet has no Transformer2DModel "
            f"with more than one layer (transformer_layers_per_block={unet.config.transformer_layers_per_block!r}; "
            f"SDXL has (1, 2, 10)): it needs transformer_layers_per_block > 1 in some stage. For SD-1.x/2.x "
            "UNets use bk-base / bk-small / bk-tiny")
    return deepest


def _map_depths(value, deepest: int, kept: int):
    """A ``transformer_layers_per_block``-style config value (an int, or per-block ints or per-layer lists) with
    every depth ``deepest`` made ``kept``."""
    if isinstance(value, (list, tuple)):
        return [_map_depths(v, deepest, kept) for v in value]
    return kept if value == deepest else value


def _drop_pair_entries(value):
    # per-block entries that are per-layer lists lose layer 1 (the dropped pair), as bk.teacher_name shifts it
    if not isinstance(value, (list, tuple)):
        return value
    return [[d for j, d in enumerate(v) if j != 1] if isinstance(v, (list, tuple)) and len(v) > 1 else v
            for v in value]


def sdxl_depth_config(teacher: nn.Module, variant: str) -> dict:
    """The student's UNet2DConditionModel config (a plain dict, no private ``_`` keys) for a depth variant."""
    spec = _spec(variant)
    deepest = _check_teacher(teacher, variant)
    kept = deep_depth(deepest, variant)
    if spec.pairs is not None:
        try:
            config = bk_config(teacher.config, spec.pairs)
        except SafepruneError as exc:
            raise SafepruneError(f"{variant} removes pairs like {spec.pairs}: {exc}") from exc
    else:
        config = {k: v for k, v in dict(teacher.config).items() if not k.startswith("_")}
    for key in ("transformer_layers_per_block", "reverse_transformer_layers_per_block"):
        value = config.get(key)
        if value is None:
            continue
        if spec.pairs is not None:
            value = _drop_pair_entries(value)
        config[key] = _map_depths(value, deepest, kept)
    return config


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def sdxl_depth_student(teacher: nn.Module, variant: str) -> tuple[nn.Module, list[str], list[str]]:
    """Build the depth-pruned student of ``teacher`` and copy the teacher's weights into it.

    Returns ``(student, fresh, removed)``: a UNet2DConditionModel on the teacher's device (``meta`` included) and
    dtype and in its train/eval mode, every parameter trainable; the student keys that kept their fresh
    initialisation; the teacher modules with no counterpart in the student (pairs, mid block, single layers
    ``...transformer_blocks.j``).
    """
    from diffusers import UNet2DConditionModel

    spec = _spec(variant)
    config = sdxl_depth_config(teacher, variant)
    param = next(teacher.parameters())
    # built where the teacher lives and in its dtype: no fp32 CPU copy of a half-precision, GPU or meta teacher
    # (and no .to(dtype), on which diffusers warns)
    with torch.device(param.device), _default_dtype(param.dtype):
        student = UNet2DConditionModel.from_config(config)
    up_offset = len(teacher.up_blocks) - len(student.up_blocks)

    def module_source(name: str) -> str:  # teacher module name of a student module name
        return teacher_name(name + ".", up_offset)[:-1] if spec.pairs is not None else name

    teacher_depths = transformer_depths(teacher)
    layer_sources: dict[str, tuple[str, list[int]]] = {}  # student transformer -> (teacher transformer, kept)
    for name, depth in transformer_depths(student).items():
        source = module_source(name)
        n = teacher_depths.get(source)
        if n is not None and depth <= n:
            layer_sources[name] = (source, kept_layers(n, depth))

    def key_source(key: str) -> str:
        layer = _TRANSFORMER_LAYER.match(key)
        if layer is not None and layer.group(1) in layer_sources:
            source, kept = layer_sources[layer.group(1)]
            index = int(layer.group(2))
            if index < len(kept):
                return f"{source}.transformer_blocks.{kept[index]}.{layer.group(3)}"
        return teacher_name(key, up_offset) if spec.pairs is not None else key

    state = teacher.state_dict()
    fresh = []
    with torch.no_grad():
        for key, tensor in student.state_dict().items():
            origin = state.get(key_source(key))
            if origin is None or origin.shape != tensor.shape:
                fresh.append(key)
            else:
                tensor.copy_(origin)
    student.train(teacher.training).requires_grad_(True)

    removed = removed_blocks(teacher, spec.pairs) if spec.pairs is not None else []
    for source, kept in sorted(layer_sources.values()):
        removed += [f"{source}.transformer_blocks.{j}" for j in range(teacher_depths[source]) if j not in kept]
    return student, fresh, removed


def shape_only_macs(unet: nn.Module, sample_size: int | None = None) -> int:
    """MACs of one forward of ``unet`` (``count_macs``: batch 1, 77 text tokens, added conditioning when the
    config has it) counted on a ``meta`` copy built from its config: exact, and no real compute."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        twin = UNet2DConditionModel.from_config(unet.config)
    return count_macs(twin, sample_size=sample_size)


class _DepthPruning(PruneMethod):
    fixed_architecture = True
    variant = ""

    def prune(self, unet, request: PruneRequest):
        from .width import PruneReport

        student, fresh, removed = sdxl_depth_student(unet, self.variant)
        size = unet.config.sample_size if request.sample_size is None else request.sample_size
        report = PruneReport(
            params_before=count_params(unet), params_after=count_params(student),
            macs_before=shape_only_macs(unet, size), macs_after=shape_only_macs(student, size),
            ratio=None, importance="none", sample_size=size, method=self.variant, removed=removed, fresh=fresh,
        )
        return student, report


@PRUNE_METHODS.register("sdxl-depth-1.3b")
class SDXLDepth1_3B(_DepthPruning):
    variant = "sdxl-depth-1.3b"


@PRUNE_METHODS.register("sdxl-depth-1b")
class SDXLDepth1B(_DepthPruning):
    variant = "sdxl-depth-1b"


@PRUNE_METHODS.register("sdxl-depth-700m")
class SDXLDepth700M(_DepthPruning):
    variant = "sdxl-depth-700m"
