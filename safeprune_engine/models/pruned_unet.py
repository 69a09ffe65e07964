"""A UNet2DConditionModel whose internal widths are smaller than its config's dense ones, and that says so.

The config records, next to every ordinary UNet2DConditionModel argument, ``pruned_widths``: the size of every
shrunk internal dimension. Building the class from that config (``from_config`` / ``from_pretrained``) first
builds the dense UNet and then swaps the listed layers for fresh ones of the recorded size, so a plain
``save_pretrained(safe_serialization=True)`` (config.json + safetensors) is enough to rebuild a pruned model:
no pickled modules, no torch-pruning at load time.

``pruned_widths`` format (JSON-friendly; names are module paths inside the UNet; sizes are absolute)::

    {
      "resnets":     {"down_blocks.0.resnets.0": {"conv1_out": 24, "norm2_groups": 6}},
      "attention":   {"down_blocks.0.attentions.0.transformer_blocks.0.attn1": {"heads": 3}},
      "feedforward": {"down_blocks.0.attentions.0.transformer_blocks.0.ff": {"inner": 96}}
    }

- resnets: a ``ResnetBlock2D``'s ``conv1`` output channels (= ``norm2`` channels = ``conv2`` input channels =
  ``time_emb_proj`` output rows, doubled for ``scale_shift``) and ``norm2.num_groups``.
- attention: the number of heads of a diffusers ``Attention``; the head dim is unchanged, so ``to_q/to_k/to_v``
  have ``heads * head_dim`` output rows and ``to_out[0]`` as many input columns.
- feedforward: a ``FeedForward``'s inner width ``n``: ``net[2]`` has ``n`` input columns, ``net[0].proj`` has
  ``2n`` output rows for gated activations (GEGLU/SwiGLU: ``[hidden, gate]`` halves) and ``n`` otherwise.
Layers not listed keep their dense size. Block outputs are never listed: they keep the dense width.

This file is self-contained (torch and diffusers only): ``export_pipeline(..., remote_code=True)`` copies it
verbatim into an exported pipeline's ``unet`` folder, where diffusers loads it with ``trust_remote_code=True`` on
machines without safeprune-engine.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Mapping

import torch
from torch import nn

from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention

# ModelMixin is imported by name on purpose: diffusers' pipeline loader finds a component's load method through
# getattr(library, "ModelMixin"), so a model_index.json naming this module as the unet's library loads too.
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel


def _error_type() -> type[ValueError]:
    """safeprune-engine's SafepruneError when the package is importable, else a local ValueError subclass.

    Looked up by name, not by an import statement, so that the copy shipped as remote code depends on torch and
    diffusers only: diffusers scans a remote file's import statements and tells users to install what they name.
    """
    try:
        return importlib.import_module("safeprune_engine.errors").SafepruneError
    except ImportError:  # the remote-code copy, on a machine without safeprune-engine
        class SafepruneError(ValueError):
            """Bad pruned_widths (safeprune-engine's error type, where that package is installed)."""

        return SafepruneError


SafepruneError = _error_type()

WIDTH_SECTIONS = ("resnets", "attention", "feedforward")
_SECTION_KEYS = {"resnets": ("conv1_out", "norm2_groups"), "attention": ("heads",), "feedforward": ("inner",)}


# ----------------------------------------------------------------------------------------------- width records
def empty_widths() -> dict[str, dict]:
    """A ``pruned_widths`` record that prunes nothing."""
    return {section: {} for section in WIDTH_SECTIONS}


def normalize_widths(widths: Mapping[str, Any] | None) -> dict[str, dict]:
    """Validate a ``pruned_widths`` record and return a fresh copy with all three sections and int sizes.

    Raises ``SafepruneError`` for unknown sections or keys and for non-positive sizes.
    """
    out = empty_widths()
    if widths is None:
        return out
    if not isinstance(widths, Mapping):
        raise SafepruneError(f"pruned_widths must be a dict with sections {WIDTH_SECTIONS}, got {type(widths)}")
    unknown = set(widths) - set(WIDTH_SECTIONS)
    if unknown:
        raise SafepruneError(f"pruned_widths has unknown sections {sorted(unknown)}; expected {WIDTH_SECTIONS}")
    for section, entries in widths.items():
        for name, spec in (entries or {}).items():
            want = set(_SECTION_KEYS[section])
            if not isinstance(spec, Mapping) or set(spec) != want:
                raise SafepruneError(
                    f"pruned_widths[{section!r}][{name!r}] must have exactly the keys {sorted(want)}, got {spec!r}"
                )
            clean = {}
            for key in _SECTION_KEYS[section]:
                value = spec[key]
                if isinstance(value, bool) or int(value) != value or int(value) < 1:
                    raise SafepruneError(f"pruned_widths[{section!r}][{name!r}][{key!r}] must be an int >= 1")
                clean[key] = int(value)
            out[section][str(name)] = clean
    return out


def merge_widths(base: Mapping[str, Any] | None, update: Mapping[str, Any] | None) -> dict[str, dict]:
    """``base`` with the entries of ``update`` written over it (sizes are absolute, so later wins)."""
    merged = normalize_widths(base)
    for section, entries in normalize_widths(update).items():
        merged[section].update(entries)
    return merged


# ------------------------------------------------------------------------------------ fresh layers of a new size
def _fresh_conv(old: nn.Conv2d, in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=old.groups,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )


def _fresh_linear(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(
        in_features, out_features, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
    )


def _fresh_groupnorm(old: nn.GroupNorm, num_groups: int, num_channels: int) -> nn.GroupNorm:
    ref = old.weight if old.affine else None
    return nn.GroupNorm(
        num_groups,
        num_channels,
        eps=old.eps,
        affine=old.affine,
        device=None if ref is None else ref.device,
        dtype=None if ref is None else ref.dtype,
    )


def set_attention_heads(attn: Attention, heads: int) -> None:
    """Make ``attn``'s bookkeeping match ``heads`` heads of the unchanged head dim (after its layers changed).

    diffusers' processors read ``attn.heads`` to split ``[B, L, heads * head_dim]`` into heads; ``inner_dim``,
    ``inner_kv_dim`` and ``sliceable_head_dim`` are read by attention slicing and fused projections.
    """
    attn.heads = heads
    attn.inner_dim = attn.to_q.out_features
    attn.inner_kv_dim = attn.to_k.out_features
    attn.sliceable_head_dim = heads


def feedforward_layers(ff: FeedForward) -> tuple[nn.Linear, nn.Linear, bool]:
    """``(proj_in, proj_out, gated)`` of a diffusers FeedForward: ``net[0].proj``, the last Linear of ``net``.

    ``gated`` is True when ``proj_in`` makes ``[hidden, gate]`` halves (GEGLU/SwiGLU), i.e. has twice as many
    output rows as ``proj_out`` has input columns.
    """
    proj_in = getattr(ff.net[0], "proj", None)
    proj_out = [m for m in ff.net if isinstance(m, nn.Linear)]
    if not isinstance(proj_in, nn.Linear) or not proj_out:
        raise SafepruneError(f"unsupported FeedForward layout: {ff.net}")
    proj_out = proj_out[-1]
    inner = proj_out.in_features
    if proj_in.out_features == 2 * inner:
        return proj_in, proj_out, True
    if proj_in.out_features == inner:
        return proj_in, proj_out, False
    raise SafepruneError(f"FeedForward proj {proj_in} does not match its output layer {proj_out}")


def resize_resnet(block: ResnetBlock2D, conv1_out: int, norm2_groups: int) -> None:
    """Replace a ResnetBlock2D's inner layers by fresh ones with ``conv1_out`` channels in ``norm2_groups`` groups.

    ``conv1: [C_in -> conv1_out]``, ``norm2: GroupNorm(norm2_groups, conv1_out)``, ``conv2: [conv1_out -> C_out]``,
    ``time_emb_proj: [T -> conv1_out]`` (``2 * conv1_out`` for ``scale_shift``). The block output is unchanged.
    """
    if conv1_out % norm2_groups:
        raise SafepruneError(f"conv1_out={conv1_out} is not a whole number of norm2 groups ({norm2_groups})")
    block.conv1 = _fresh_conv(block.conv1, block.conv1.in_channels, conv1_out)
    block.norm2 = _fresh_groupnorm(block.norm2, norm2_groups, conv1_out)
    block.conv2 = _fresh_conv(block.conv2, conv1_out, block.conv2.out_channels)
    if block.time_emb_proj is not None:
        factor = 2 if block.time_embedding_norm == "scale_shift" else 1
        block.time_emb_proj = _fresh_linear(block.time_emb_proj, block.time_emb_proj.in_features, factor * conv1_out)


def resize_attention(attn: Attention, heads: int) -> None:
    """Replace an Attention's projections by fresh ones for ``heads`` heads of the unchanged head dim.

    ``to_q: [D_q -> heads*d]``, ``to_k/to_v: [D_kv -> heads*d]``, ``to_out[0]: [heads*d -> D_out]``.
    """
    head_dim = attn.to_q.out_features // attn.heads
    inner = heads * head_dim
    attn.to_q = _fresh_linear(attn.to_q, attn.to_q.in_features, inner)
    attn.to_k = _fresh_linear(attn.to_k, attn.to_k.in_features, inner)
    attn.to_v = _fresh_linear(attn.to_v, attn.to_v.in_features, inner)
    attn.to_out[0] = _fresh_linear(attn.to_out[0], inner, attn.to_out[0].out_features)
    set_attention_heads(attn, heads)


def resize_feedforward(ff: FeedForward, inner: int) -> None:
    """Replace a FeedForward's layers by fresh ones of inner width ``inner`` (``2*inner`` proj rows if gated)."""
    proj_in, proj_out, gated = feedforward_layers(ff)
    ff.net[0].proj = _fresh_linear(proj_in, proj_in.in_features, (2 if gated else 1) * inner)
    index = max(i for i, m in enumerate(ff.net) if m is proj_out)
    ff.net[index] = _fresh_linear(proj_out, inner, proj_out.out_features)


def _module_of(root: nn.Module, name: str, kind: type, section: str) -> nn.Module:
    try:
        module = root.get_submodule(name)
    except AttributeError as exc:
        raise SafepruneError(f"pruned_widths[{section!r}] names {name!r}, which is not a module of this UNet") from exc
    if not isinstance(module, kind):
        raise SafepruneError(f"pruned_widths[{section!r}][{name!r}] is a {type(module).__name__}, not {kind.__name__}")
    return module


def apply_widths(unet: nn.Module, widths: Mapping[str, Any] | None) -> None:
    """Shrink the layers named in ``widths`` (a ``pruned_widths`` record) to fresh layers of the recorded size."""
    widths = normalize_widths(widths)
    for name, spec in widths["resnets"].items():
        resize_resnet(_module_of(unet, name, ResnetBlock2D, "resnets"), spec["conv1_out"], spec["norm2_groups"])
    for name, spec in widths["attention"].items():
        resize_attention(_module_of(unet, name, Attention, "attention"), spec["heads"])
    for name, spec in widths["feedforward"].items():
        resize_feedforward(_module_of(unet, name, FeedForward, "feedforward"), spec["inner"])


# ------------------------------------------------------------------------------------------------------- model
def _with_unet_signature(init):
    """Give ``init(self, *args, pruned_widths=None, **kwargs)`` the signature of UNet2DConditionModel's init plus
    ``pruned_widths``.

    register_to_config records, and ConfigMixin.extract_init_dict passes back, only the parameters named in the
    init's signature: a bare ``**kwargs`` would be dropped from config.json and never reach the UNet on
    ``from_pretrained``. Reading the parent's signature keeps every argument of the installed diffusers.
    """
    parent = inspect.signature(UNet2DConditionModel.__init__)
    params = list(parent.parameters.values())
    params.append(inspect.Parameter("pruned_widths", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None))
    init.__signature__ = parent.replace(parameters=params)
    return init


class PrunedUNet2DConditionModel(UNet2DConditionModel):
    """UNet2DConditionModel with pruned internal widths recorded in ``config.pruned_widths``.

    Accepts every ``UNet2DConditionModel`` argument plus ``pruned_widths`` (see the module docstring). Inputs
    and outputs are those of the dense model: ``sample [B, C, H, W]``, ``timestep``, and
    ``encoder_hidden_states [B, L, cross_attention_dim]`` -> ``.sample [B, out_channels, H, W]``.

    Save with ``save_pretrained(dir, safe_serialization=True)``; load with
    ``PrunedUNet2DConditionModel.from_pretrained(dir)`` or as the ``unet`` of a pipeline.
    """

    @register_to_config
    @_with_unet_signature
    def __init__(self, *args, pruned_widths: Mapping[str, Any] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        widths = normalize_widths(pruned_widths)
        apply_widths(self, widths)
        # store the validated, complete form so save_pretrained writes a canonical record
        self.register_to_config(pruned_widths=widths)

    @property
    def pruned_widths(self) -> dict[str, dict]:
        """A copy of the recorded widths: ``{"resnets": ..., "attention": ..., "feedforward": ...}``."""
        return normalize_widths(self.config.pruned_widths)

    @classmethod
    def from_unet(
        cls, unet: UNet2DConditionModel, pruned_widths: Mapping[str, Any] | None = None
    ) -> "PrunedUNet2DConditionModel":
        """Wrap an already-pruned UNet2DConditionModel (same config, shrunk layers) as this class.

        The new model shares ``unet``'s parameter and buffer storage (no copy); it keeps its dtype, device,
        train/eval mode and per-parameter ``requires_grad``. ``pruned_widths`` defaults to ``unet``'s own record
        when it is already a PrunedUNet2DConditionModel, else to "nothing pruned". Custom attention processors
        are not carried over (the defaults are used). Raises ``SafepruneError`` when the widths do not describe
        ``unet``'s layer shapes.
        """
        if pruned_widths is None:
            pruned_widths = unet.config.get("pruned_widths") if hasattr(unet, "config") else None
        config = {k: v for k, v in dict(unet.config).items() if k != "pruned_widths"}
        config["pruned_widths"] = normalize_widths(pruned_widths)
        # build on the meta device (no memory, no init), then adopt the source tensors
        with torch.device("meta"):
            model = cls.from_config(config)
        state = unet.state_dict()
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise SafepruneError(f"pruned_widths do not describe this UNet's layer shapes: {exc}") from exc
        leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if leftover:
            raise SafepruneError(f"from_unet could not fill {leftover[:5]} from the source UNet's state dict")
        source_params = dict(unet.named_parameters())
        for name, param in model.named_parameters():
            param.requires_grad_(source_params[name].requires_grad)
        model.train(unet.training)
        return model


# Public home of the class (as numpy does for its functions). diffusers' save_pretrained records a component's
# library from __module__; the package name, unlike this submodule's, resolves in any process that has run
# `import safeprune_engine` (diffusers only looks libraries up in sys.modules, and this submodule loads lazily).
# A remote-code copy keeps its own module name: that is where its class lives.
if __name__ == "safeprune_engine.models.pruned_unet":
    PrunedUNet2DConditionModel.__module__ = "safeprune_engine"


def load_student_unet(path) -> UNet2DConditionModel:
    """Load a saved student with the class its config names: a PrunedUNet2DConditionModel (width pruning) or a
    plain UNet2DConditionModel (block removal, e.g. BK-SDM, whose config is a standard diffusers one)."""
    import json
    from pathlib import Path

    config = json.loads((Path(path) / "config.json").read_text())
    if config.get("_class_name") == "PrunedUNet2DConditionModel" or "pruned_widths" in config:
        return PrunedUNet2DConditionModel.from_pretrained(path)
    return UNet2DConditionModel.from_pretrained(path)
