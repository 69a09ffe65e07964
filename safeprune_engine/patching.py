"""One verb to run a diffusers UNet2DConditionModel on the fused ops, in place, and one to undo it exactly.

``patch_unet(unet, backend=None, ops=("groupnorm_silu", "conv"))`` works on any UNet2DConditionModel: the dense
teacher or a PrunedUNet2DConditionModel student (whose layers already have their pruned widths: the fused conv
runs on the sliced weights as they are). What it swaps:

- ``"conv"``: every supported ``nn.Conv2d`` becomes a :class:`~safeprune_engine.ops.pruned_conv.PrunedConv2d`
  that shares the conv's Parameter objects (state dict, optimizers and ``.to()`` see the same tensors).
- every ``ResnetBlock2D`` gets a fused forward: norm1/norm2 + SiLU through ``groupnorm_silu`` (when in ``ops``),
  the time-embedding projection added in conv1's epilogue and the shortcut added (and the output scaled by
  ``1 / output_scale_factor``) in conv2's epilogue (when ``"conv"`` is in ``ops``).
- ``"conv_prologue"`` (implies ``"conv"``): the resnets' norm1/norm2 + SiLU are applied inside conv1/conv2 as
  they read their input (GroupNorm statistics from one ``var_mean`` pass, no normalised tensor is stored).
  With dropout active (training with ``p > 0``) conv2's input is normalised and dropped out first instead.
- ``"groupnorm_silu"``: also the UNet's ``conv_norm_out`` + ``conv_act`` pair (a fused GroupNorm+SiLU module
  holding the same parameters, and an Identity).

Resnets that the fused forward does not cover (up/down-sampling inside the block, ``scale_shift`` time
embedding, a non-SiLU activation) are left alone and listed in ``PatchRecord.skipped`` with the reason, as are
convs the op cannot compute (groups, dilation, non-zero padding modes).

``unpatch_unet(unet, record)`` puts every original module and forward back: the state dict is untouched
throughout (no parameter is copied), so outputs after unpatching are bit-identical to before patching.
"""
from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SafepruneError

OPS = ("groupnorm_silu", "conv", "conv_prologue")
DEFAULT_OPS = ("groupnorm_silu", "conv")
PATCH_MARGIN = 0.02  # how much faster a whole patched UNet must be for auto to keep it
_MARK = "_safeprune_patch_record"


@dataclass
class PatchRecord:
    """What :func:`patch_unet` changed, in the order it changed it (what :func:`unpatch_unet` undoes)."""

    backend: Optional[str]
    ops: tuple[str, ...]
    swapped: list[tuple[nn.Module, str, nn.Module, str]] = field(default_factory=list)  # parent, attr, original, name
    forwards: list[tuple[nn.Module, str]] = field(default_factory=list)  # module with a fused forward, its name
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module name, why it was left alone)
    active: bool = True

    @property
    def replaced(self) -> list[str]:
        """Names of every module swapped or given a fused forward."""
        return [name for *_, name in self.swapped] + [name for _, name in self.forwards]

    def summary(self) -> str:
        convs = sum(isinstance(parent_attr_orig[2], nn.Conv2d) for parent_attr_orig in self.swapped)
        norms = len(self.swapped) - convs
        return (f"patched ({', '.join(self.ops)}; backend {self.backend or 'auto/env'}): "
                f"{len(self.forwards)} resnet forwards, {convs} convs, {norms} norm/activation modules; "
                f"{len(self.skipped)} left alone")


class GroupNormSiLU(nn.Module):
    """``silu(group_norm(x))`` through the fused op; holds the GroupNorm's own ``weight``/``bias`` Parameters."""

    def __init__(self, norm: nn.GroupNorm, backend: Optional[str] = None):
        super().__init__()
        self.num_groups, self.num_channels, self.eps = norm.num_groups, norm.num_channels, norm.eps
        self.weight, self.bias = norm.weight, norm.bias
        self.backend = backend

    def forward(self, x):
        from .ops.groupnorm_silu import groupnorm_silu

        return groupnorm_silu(x, self.num_groups, self.weight, self.bias, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, backend={self.backend or 'env/auto'}"


def _resnet_skip_reason(block) -> Optional[str]:
    if not isinstance(block.nonlinearity, nn.SiLU):
        return f"activation {type(block.nonlinearity).__name__} is not SiLU"
    if block.upsample is not None or block.downsample is not None:
        return "resamples between norm1 and conv1"
    if block.time_embedding_norm != "default":
        return f"time_embedding_norm={block.time_embedding_norm!r}"
    for name in ("norm1", "norm2"):
        norm = getattr(block, name)
        if not isinstance(norm, nn.GroupNorm) or not norm.affine:
            return f"{name} is not an affine GroupNorm"
    return None


def _make_resnet_forward(backend: Optional[str], fused_norm: bool, fused_conv: bool, prologue: bool):
    """A ResnetBlock2D forward on the fused ops (same maths as diffusers' ResnetBlock2D.forward)."""
    from .ops.pruned_conv import groupnorm_scale_shift

    def norm_silu(norm: nn.GroupNorm, x):
        if fused_norm:
            from .ops.groupnorm_silu import groupnorm_silu

            return groupnorm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps, backend=backend)
        return F.silu(norm(x))

    def scale_shift(norm: nn.GroupNorm, x):
        return groupnorm_scale_shift(x, norm.num_groups, norm.weight, norm.bias, norm.eps)

    def forward(self, input_tensor, temb, *args, **kwargs):
        # (diffusers' deprecated positional `scale` is ignored there too)
        temb_bias = None
        if self.time_emb_proj is not None and temb is not None:
            t = temb if self.skip_time_act else self.nonlinearity(temb)
            temb_bias = self.time_emb_proj(t)
            if temb_bias.shape[0] != input_tensor.shape[0]:
                temb_bias = temb_bias.expand(input_tensor.shape[0], -1)

        # norm1 -> SiLU -> conv1 (+ time embedding)
        if prologue:
            s1, b1 = scale_shift(self.norm1, input_tensor)
            hidden = self.conv1(input_tensor, norm_scale=s1, norm_shift=b1, temb_bias=temb_bias)
        else:
            hidden = norm_silu(self.norm1, input_tensor)
            if fused_conv:
                hidden = self.conv1(hidden, temb_bias=temb_bias)
            else:
                hidden = self.conv1(hidden)
                if temb_bias is not None:
                    hidden = hidden + temb_bias[:, :, None, None]
        if self.time_emb_proj is None and temb is not None:
            hidden = hidden + temb  # diffusers adds an unprojected temb as given

        shortcut = input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
        out_scale = 1.0 / self.output_scale_factor
        # norm2 -> SiLU -> dropout -> conv2 (+ shortcut, / output_scale_factor)
        dropout_active = self.training and self.dropout.p > 0
        if prologue and not dropout_active:
            s2, b2 = scale_shift(self.norm2, hidden)
            return self.conv2(hidden, norm_scale=s2, norm_shift=b2, residual=shortcut, out_scale=out_scale)
        hidden = self.dropout(norm_silu(self.norm2, hidden))
        if fused_conv:
            return self.conv2(hidden, residual=shortcut, out_scale=out_scale)
        return (shortcut + self.conv2(hidden)) / self.output_scale_factor

    return forward


def check_backend(backend: Optional[str], ops: Iterable[str] = DEFAULT_OPS) -> None:
    """Raise SafepruneError when a forced ``backend`` cannot run the ops behind ``ops`` whatever the inputs
    (library not built, Triton not installed, CPU-only torch): the check a run makes before writing anything."""
    from .ops import dispatch

    mode = dispatch.requested_mode(backend) if backend is not None else None
    if mode not in ("cuda", "triton", "cpp"):
        return
    ops = tuple(ops)
    for op_name in (["pruned_conv"] if {"conv", "conv_prologue"} & set(ops) else []) + (
            ["groupnorm_silu"] if "groupnorm_silu" in ops else []):
        reasons = dispatch.available_backends(op_name).get(mode)
        if reasons is None:
            raise SafepruneError(f"op {op_name!r} has no {mode!r} backend")
        if reasons:
            raise SafepruneError(f"backend {mode!r} cannot run {op_name!r}: {'; '.join(reasons)}")


def _check_args(unet, backend, ops) -> tuple[str, ...]:
    if not isinstance(unet, nn.Module) or not hasattr(unet, "down_blocks"):
        raise SafepruneError(f"patch_unet needs a diffusers UNet2DConditionModel, got {type(unet).__name__}")
    ops = tuple(dict.fromkeys(ops))
    unknown = [op for op in ops if op not in OPS]
    if unknown or not ops:
        raise SafepruneError(f"patch_unet ops {list(ops)}: choose from {OPS}")
    if "conv_prologue" in ops and "conv" not in ops:
        ops = ops + ("conv",)
    check_backend(backend, ops)  # not built / not installed fails now, not at the first forward
    if getattr(unet, _MARK, None) is not None:
        raise SafepruneError("this UNet is already patched; unpatch_unet(unet, record) first")
    return ops


def patch_unet(unet: nn.Module, backend: Optional[str] = None,
               ops: Iterable[str] = DEFAULT_OPS) -> PatchRecord:
    """Swap ``unet``'s matching pieces for the fused ops in place (see the module docstring); return the record.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (or ``PrunedUNet2DConditionModel``), any dtype/device.
        backend: "auto" | "off" | "reference" | "cpp" | "cuda" | "triton" for every patched op; None reads
            ``$SAFEPRUNE_KERNELS`` at each call. A forced backend that is not built raises SafepruneError here.
        ops: subset of ``("groupnorm_silu", "conv", "conv_prologue")``.
    """
    from diffusers.models.resnet import ResnetBlock2D

    from .ops.pruned_conv import PrunedConv2d, unsupported_conv_reasons

    ops = _check_args(unet, backend, tuple(ops))
    record = PatchRecord(backend=backend, ops=ops)
    fused_norm, fused_conv, prologue = "groupnorm_silu" in ops, "conv" in ops, "conv_prologue" in ops
    names = {module: name for name, module in unet.named_modules()}

    def swap(parent: nn.Module, attr: str, replacement: nn.Module):
        original = getattr(parent, attr)
        setattr(parent, attr, replacement)
        record.swapped.append((parent, attr, original, names[original]))

    # resnets: fused forward (+ their convs)
    resnet_forward = _make_resnet_forward(backend, fused_norm, fused_conv, prologue)
    for name, module in list(unet.named_modules()):
        if not isinstance(module, ResnetBlock2D):
            continue
        reason = _resnet_skip_reason(module)
        if reason is None and fused_conv:
            bad = {attr: unsupported_conv_reasons(getattr(module, attr))
                   for attr in ("conv1", "conv2", "conv_shortcut") if getattr(module, attr) is not None}
            bad = {attr: r for attr, r in bad.items() if r}
            if bad:
                reason = "; ".join(f"{attr}: {', '.join(r)}" for attr, r in bad.items())
        if reason is not None:
            record.skipped.append((name, reason))
            continue
        module.forward = types.MethodType(resnet_forward, module)
        record.forwards.append((module, name))

    # every supported conv (the resnets' own included) shares its parameters with a PrunedConv2d
    if fused_conv:
        for parent_name, parent in list(unet.named_modules()):
            for attr, child in list(parent.named_children()):
                if not isinstance(child, nn.Conv2d):
                    continue
                reasons = unsupported_conv_reasons(child)
                if reasons:
                    record.skipped.append((f"{parent_name}.{attr}" if parent_name else attr, ", ".join(reasons)))
                    continue
                swap(parent, attr, PrunedConv2d.from_conv(child, backend=backend))

    # the UNet's final norm + activation pair
    if fused_norm and isinstance(getattr(unet, "conv_norm_out", None), nn.GroupNorm) \
            and isinstance(getattr(unet, "conv_act", None), nn.SiLU) and unet.conv_norm_out.affine:
        swap(unet, "conv_norm_out", GroupNormSiLU(unet.conv_norm_out, backend))
        swap(unet, "conv_act", nn.Identity())

    setattr(unet, _MARK, record)
    return record


def unpatch_unet(unet: nn.Module, record: PatchRecord) -> None:
    """Undo :func:`patch_unet`: original modules and forwards back, each original module in the training mode
    its stand-in had. Raises SafepruneError for a record that does not belong to ``unet`` or was undone."""
    if not record.active:
        raise SafepruneError("this PatchRecord was already undone")
    if getattr(unet, _MARK, None) is not record:
        raise SafepruneError("this PatchRecord belongs to another UNet (or the UNet was patched again)")
    for parent, attr, original, _ in reversed(record.swapped):
        replacement = getattr(parent, attr)
        original.train(replacement.training)
        setattr(parent, attr, original)
    for module, _ in record.forwards:
        module.__dict__.pop("forward", None)
    delattr(unet, _MARK)
    record.active = False


@dataclass
class PatchTiming:
    """What :func:`time_patched_unet` measured: seconds of one forward (+ backward when training) of the UNet with
    its diffusers forwards and with the fused ops."""

    plain_s: float
    patched_s: float
    backward: bool

    def pays_off(self, margin: float = PATCH_MARGIN) -> bool:
        """Whether the fused ops are at least `margin` faster (a tie keeps the diffusers forwards)."""
        return self.patched_s < (1.0 - margin) * self.plain_s

    def summary(self, kept: bool, source: str = "timed now") -> str:
        verdict = "fused ops kept" if kept else "fused ops not kept (not faster than eager)"
        return (f"{verdict}: {self.patched_s * 1e3:.1f} ms vs eager {self.plain_s * 1e3:.1f} ms per "
                f"{'forward+backward' if self.backward else 'forward'} ({self.plain_s / self.patched_s:.2f}x, "
                f"{source})")


def time_patched_unet(unet: nn.Module, inputs: tuple, kwargs: dict, backward: bool, autocast=None,
                      ops: Iterable[str] = DEFAULT_OPS) -> PatchTiming:
    """Median time of one forward (+ backward with ``backward``) of ``unet`` on ``inputs`` with its diffusers
    forwards and with the fused ops on the auto backends (each op timing its backends per call shape on the first
    patched call, cached from then on). The UNet is left unpatched and without gradients; ``kept`` is unset."""
    from .ops.autotune import measure

    device = next(unet.parameters()).device
    context = autocast if autocast is not None else contextlib.nullcontext

    def run():
        with context(), torch.set_grad_enabled(backward):
            out = unet(*inputs, **kwargs).sample
        if backward:
            out.float().square().mean().backward()

    def timed() -> float:
        try:
            return measure(run, device)
        finally:
            if backward:
                for param in unet.parameters():
                    param.grad = None

    # plain, patched, plain, patched: the best of each, so that a slow spell of the machine (another process, a
    # frequency change) during one measurement does not decide
    plain, patched = [], []
    record = patch_unet(unet, backend="auto", ops=ops)
    try:
        run()  # the first patched call times each op's backends for these shapes
    finally:
        unpatch_unet(unet, record)
    for _ in range(2):
        plain.append(timed())
        record = patch_unet(unet, backend="auto", ops=ops)
        try:
            patched.append(timed())
        finally:
            unpatch_unet(unet, record)
    return PatchTiming(plain_s=min(plain), patched_s=min(patched), backward=backward)


def patch_unet_if_faster(unet: nn.Module, inputs: tuple, kwargs: dict, backward: bool, autocast=None,
                         ops: Iterable[str] = DEFAULT_OPS, margin: float = PATCH_MARGIN
                         ) -> tuple[Optional[PatchRecord], PatchTiming]:
    """Patch ``unet`` with the auto backends only if its whole forward (+ backward with ``backward``) on ``inputs``
    then runs at least ``margin`` faster than with the diffusers forwards (time_patched_unet): per-op timing cannot
    see what a patched module costs around the op (its wrapper, layout changes), and a UNet of tiny layers can lose
    overall while every op wins. Returns (the PatchRecord, or None when the UNet was left unpatched, the timing)."""
    timing = time_patched_unet(unet, inputs, kwargs, backward, autocast, ops)
    return (patch_unet(unet, backend="auto", ops=ops) if timing.pays_off(margin) else None), timing


def unet_timing_key(unet: nn.Module, inputs: tuple, kwargs: dict, backward: bool, autocast_dtype, ops) -> str:
    """What a whole-UNet timing depends on besides the device: the architecture (config and parameter shapes and
    dtypes), the inputs' shapes and dtypes, forward or forward+backward, autocast and the fused ops."""
    import hashlib
    import json

    from .ops.autotune import describe

    # bookkeeping keys (_name_or_path: where the weights came from, e.g. a checkpoint on resume) cost nothing
    config = {k: v for k, v in dict(getattr(unet, "config", {}) or {}).items() if not k.startswith("_")}
    params = [(name, describe(p.detach())) for name, p in unet.named_parameters()]
    payload = json.dumps({"class": type(unet).__name__, "config": config, "params": params,
                          "inputs": describe(tuple(inputs)), "kwargs": {k: describe(v) for k, v in kwargs.items()},
                          "backward": backward, "autocast": str(autocast_dtype), "ops": list(ops)},
                         sort_keys=True, default=str)
    return "unet:" + hashlib.sha256(payload.encode()).hexdigest()[:20]
