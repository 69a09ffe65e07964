"""Structured width pruning of a diffusers UNet2DConditionModel (APTP-style: internal widths only).

Three kinds of prunable units, each removed whole so that every block output keeps the teacher's width:

- resnets: a ``ResnetBlock2D``'s ``conv1`` output channels, in whole ``norm2`` GroupNorm groups. Removing a whole
  group leaves the statistics of the kept groups untouched, so the kept channels after ``norm2`` are exactly
  the teacher's. ``conv2`` input channels and ``time_emb_proj`` output rows follow.
- attention: heads of every diffusers ``Attention`` (``to_q/to_k/to_v`` output rows of the head,
  ``to_out[0]`` input columns); the head dim is unchanged.
- feedforward: inner units of a ``FeedForward``; for GEGLU/SwiGLU unit ``j`` is row ``j`` of the hidden half
  AND row ``j`` of the gate half of ``net[0].proj``, plus input column ``j`` of ``net[2]``. torch-pruning's
  dependency graph does not know this pairing (it over-prunes the proj), so the pairing is done here and
  torch-pruning's low-level per-layer functions only apply the index choices.

Importance of a unit is the sum over its channels of the L2 (``"l2"``) or L1 (``"l1"``) norm of the weights
that produce the channel: ``conv1`` filters; ``to_q``, ``to_k`` and ``to_v`` rows; both GEGLU rows. Any other
score (e.g. first-order Taylor, ``safeprune_engine.prune.taylor``) can be passed as a callable instead.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence, Union

import torch
from torch import nn

from ..errors import SafepruneError
from .macs import count_params

if TYPE_CHECKING:
    from ..models.pruned_unet import PrunedUNet2DConditionModel

PARTS = ("resnets", "attention", "feedforward")
IMPORTANCES = ("l1", "l2")

# a custom importance: (section, module name, module) -> score per unit, shape [n_units]; its ``name`` attribute
# (if any) is what the report records
UnitScores = Callable[[str, str, nn.Module], torch.Tensor]


# ------------------------------------------------------------------------------------------------------ report
@dataclass
class PruneReport:
    """What ``prune`` did. MACs are for one forward at ``sample_size`` latents, batch 1, 77 text tokens.

    ``kept`` maps ``{"resnets" | "attention" | "feedforward": {module name: kept unit indices}}`` in the
    teacher's numbering (GroupNorm groups, heads, FF units), e.g. to map student features onto the teacher's.
    """

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    ratio: float | None  # None for methods that fix the architecture themselves (BK-SDM block removal)
    importance: str = "l2"
    target_macs: float | None = None
    sample_size: int | tuple[int, int] | None = None
    pruned_widths: dict = field(default_factory=dict)
    kept: dict = field(default_factory=dict)
    method: str = "magnitude"  # the --prune-method that made the student
    removed: list = field(default_factory=list)  # teacher modules with no counterpart in the student (block removal)
    fresh: list = field(default_factory=list)  # student tensors not copied from the teacher (initialised anew)

    @property
    def params_fraction(self) -> float:
        return self.params_after / self.params_before

    @property
    def macs_fraction(self) -> float:
        return self.macs_after / self.macs_before

    def summary(self) -> str:
        """One line per fact, e.g. for logs."""
        n_layers = sum(len(v) for v in self.pruned_widths.values())
        target = "" if self.target_macs is None else f" (target {self.target_macs:.1%} of MACs)"
        if self.ratio is None:
            headline = (f"{self.method}: {len(self.removed)} teacher blocks removed, "
                        f"{len(self.fresh)} student tensors initialised anew (the rest copied from the teacher)")
        else:
            headline = (f"{self.method} width pruning: uniform ratio {self.ratio:.4f}{target}, importance "
                        f"{self.importance}, {n_layers} layers shrunk")
        return "\n".join(
            [
                headline,
                f"params: {self.params_before:,} -> {self.params_after:,} ({self.params_fraction:.1%})",
                f"MACs:   {self.macs_before:,} -> {self.macs_after:,} ({self.macs_fraction:.1%})"
                f" at sample_size {self.sample_size}",
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field plus the two fractions."""
        out = asdict(self)
        out["params_fraction"] = self.params_fraction
        out["macs_fraction"] = self.macs_fraction
        return out


# ------------------------------------------------------------------------------------------ finding the units
def _supported_attention(attn) -> bool:
    # plain self/cross attention only: separate q/k/v/out projections, equal q/k/v widths, no per-layer norms
    # over all heads, no added-kv projections (those would need their own rows pruned too)
    if attn.to_k is None or attn.to_v is None or attn.to_out is None:
        return False
    if getattr(attn, "fused_projections", False) or attn.added_kv_proj_dim is not None:
        return False
    if attn.norm_q is not None or attn.norm_k is not None:
        return False
    inner = attn.to_q.out_features
    return attn.to_k.out_features == inner and attn.to_v.out_features == inner and inner % attn.heads == 0


def prunable_layers(unet: nn.Module, parts: Iterable[str] = PARTS) -> list[tuple[str, str, nn.Module, int]]:
    """The layers ``prune`` can shrink: ``(section, module name, module, number of units)``, units >= 2."""
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    from ..models.pruned_unet import feedforward_layers

    parts = set(parts)
    layers = []
    for name, module in unet.named_modules():
        if "resnets" in parts and isinstance(module, ResnetBlock2D):
            ok = (
                module.time_embedding_norm in ("default", "scale_shift")
                and module.conv1.groups == 1
                and module.norm2.num_channels == module.conv1.out_channels
            )
            if ok and module.norm2.num_groups >= 2:
                layers.append(("resnets", name, module, module.norm2.num_groups))
        elif "attention" in parts and isinstance(module, Attention):
            if _supported_attention(module) and module.heads >= 2:
                layers.append(("attention", name, module, module.heads))
        elif "feedforward" in parts and isinstance(module, FeedForward):
            _, proj_out, _ = feedforward_layers(module)
            if proj_out.in_features >= 2:
                layers.append(("feedforward", name, module, proj_out.in_features))
    return layers


def _row_norms(weight: torch.Tensor, importance: str) -> torch.Tensor:
    """[rows, ...] -> [rows]: per output row/filter L1 or L2 norm, in fp32."""
    flat = weight.detach().float().flatten(1)
    return flat.abs().sum(1) if importance == "l1" else flat.pow(2).sum(1).sqrt()


def unit_importance(section: str, module: nn.Module, importance: str = "l2") -> torch.Tensor:
    """Score per unit, shape ``[n_units]``: summed L1/L2 norms of the weights producing the unit's channels."""
    if section == "resnets":
        groups = module.norm2.num_groups
        return _row_norms(module.conv1.weight, importance).view(groups, -1).sum(1)
    if section == "attention":
        heads = module.heads
        return sum(
            _row_norms(proj.weight, importance).view(heads, -1).sum(1)
            for proj in (module.to_q, module.to_k, module.to_v)
        )
    if section == "feedforward":
        from ..models.pruned_unet import feedforward_layers

        proj_in, proj_out, gated = feedforward_layers(module)
        rows = _row_norms(proj_in.weight, importance)
        inner = proj_out.in_features
        return rows[:inner] + rows[inner:] if gated else rows
    raise SafepruneError(f"unknown section {section!r}; expected one of {PARTS}")


def units_to_remove(n_units: int, ratio: float) -> int:
    """``round(ratio * n_units)`` (halves up), capped so that at least one unit stays."""
    return min(n_units - 1, int(math.floor(ratio * n_units + 0.5)))


def _keep_top(scores: torch.Tensor, n_keep: int) -> list[int]:
    # stable sort: equal scores keep the lower index; kept units stay in their original order
    order = torch.sort(scores, descending=True, stable=True).indices[:n_keep]
    return sorted(order.tolist())


# ------------------------------------------------------------------- applying index choices (torch-pruning)
def _tp():
    import torch_pruning as tp

    return tp


def _prune_layer(fn, layer: nn.Module, remove: Sequence[int]) -> None:
    # torch-pruning re-wraps every pruned tensor as a fresh nn.Parameter (requires_grad=True): keep the flag
    flags = {name: p.requires_grad for name, p in layer.named_parameters(recurse=False)}
    if remove:
        fn(layer, list(remove))
    for name, p in layer.named_parameters(recurse=False):
        p.requires_grad_(flags.get(name, True))


def _complement(n: int, keep: Iterable[int]) -> list[int]:
    keep = set(keep)
    if not keep or min(keep) < 0 or max(keep) >= n:
        raise SafepruneError(f"kept unit indices must be a non-empty subset of range({n}), got {sorted(keep)}")
    return [i for i in range(n) if i not in keep]


def prune_resnet_groups(block: nn.Module, keep_groups: Sequence[int]) -> None:
    """Shrink a ResnetBlock2D in place to the ``norm2`` groups in ``keep_groups`` (indices into its groups).

    With ``g`` channels per group, ``conv1: [C_in -> g*G] -> [C_in -> g*len(keep)]``; ``norm2`` keeps those
    channels and gets ``num_groups = len(keep)``; ``conv2`` input channels and ``time_emb_proj`` rows follow.
    """
    tp = _tp()
    groups = block.norm2.num_groups
    per_group = block.conv1.out_channels // groups
    removed_groups = _complement(groups, keep_groups)
    remove = [k * per_group + i for k in removed_groups for i in range(per_group)]
    channels = block.conv1.out_channels
    _prune_layer(tp.prune_conv_out_channels, block.conv1, remove)
    # torch-pruning's GroupNorm function slices weight/bias and num_channels but leaves num_groups alone
    _prune_layer(tp.prune_groupnorm_out_channels, block.norm2, remove)
    block.norm2.num_groups = groups - len(removed_groups)
    _prune_layer(tp.prune_conv_in_channels, block.conv2, remove)
    if block.time_emb_proj is not None:
        rows = list(remove)
        if block.time_embedding_norm == "scale_shift":  # [scale, shift] halves: same channel in both
            rows += [channels + r for r in remove]
        _prune_layer(tp.prune_linear_out_channels, block.time_emb_proj, rows)


def prune_attention_heads(attn: nn.Module, keep_heads: Sequence[int]) -> None:
    """Shrink a diffusers Attention in place to the heads in ``keep_heads``; the head dim ``d`` is unchanged.

    ``to_q/to_k/to_v: [D -> H*d] -> [D -> h*d]``, ``to_out[0]: [H*d -> D_out] -> [h*d -> D_out]``, ``heads = h``.
    """
    from ..models.pruned_unet import set_attention_heads

    tp = _tp()
    heads = attn.heads
    head_dim = attn.to_q.out_features // heads
    remove = [h * head_dim + i for h in _complement(heads, keep_heads) for i in range(head_dim)]
    for proj in (attn.to_q, attn.to_k, attn.to_v):
        _prune_layer(tp.prune_linear_out_channels, proj, remove)
    _prune_layer(tp.prune_linear_in_channels, attn.to_out[0], remove)
    set_attention_heads(attn, heads - len(set(range(heads)) - set(keep_heads)))


def prune_feedforward_units(ff: nn.Module, keep_units: Sequence[int]) -> None:
    """Shrink a diffusers FeedForward in place to the inner units in ``keep_units``.

    Gated (GEGLU/SwiGLU): ``net[0].proj: [D -> 2n]`` keeps rows ``j`` and ``n + j`` for each kept ``j``
    (hidden and gate halves), giving ``[D -> 2k]``; ``net[2]: [n -> D_out] -> [k -> D_out]``.
    """
    from ..models.pruned_unet import feedforward_layers

    tp = _tp()
    proj_in, proj_out, gated = feedforward_layers(ff)
    inner = proj_out.in_features
    remove = _complement(inner, keep_units)
    rows = remove + [inner + j for j in remove] if gated else remove
    _prune_layer(tp.prune_linear_out_channels, proj_in, rows)
    _prune_layer(tp.prune_linear_in_channels, proj_out, remove)


_APPLY = {"resnets": prune_resnet_groups, "attention": prune_attention_heads, "feedforward": prune_feedforward_units}


def _width_entry(section: str, module: nn.Module, n_keep: int) -> dict[str, int]:
    if section == "resnets":
        per_group = module.conv1.out_channels // module.norm2.num_groups
        return {"conv1_out": per_group * n_keep, "norm2_groups": n_keep}
    if section == "attention":
        return {"heads": n_keep}
    return {"inner": n_keep}


def plan_widths(
    unet: nn.Module, ratio: float, parts: Iterable[str] = PARTS, layers: list | None = None
) -> dict[str, dict]:
    """The ``pruned_widths`` entries a uniform ``ratio`` gives (sizes only; no weights are looked at)."""
    from ..models.pruned_unet import empty_widths

    widths = empty_widths()
    for section, name, module, n in layers if layers is not None else prunable_layers(unet, parts):
        n_remove = units_to_remove(n, ratio)
        if n_remove:
            widths[section][name] = _width_entry(section, module, n - n_remove)
    return widths


# --------------------------------------------------------------------------------------------- MAC budgeting
class _MacModel:
    """MACs of ``unet`` for any per-layer unit counts, from one hooked forward of ``unet``.

    Every MAC a prunable layer touches is linear in its number of units (conv1 out + conv2 in + time_emb_proj
    rows; q/k/v rows, to_out columns and the attention matmuls; both FF projections), and the rest of the UNet
    does not depend on it, so ``macs = total - sum_l M_l * removed_l / n_l`` is exact.
    """

    def __init__(self, unet: nn.Module, layers: list, sample_size) -> None:
        from ..models.pruned_unet import feedforward_layers
        from .macs import count_macs_by_module, unet_example_inputs

        per_module = count_macs_by_module(unet, **unet_example_inputs(unet, sample_size=sample_size))
        names = {id(m): n for n, m in unet.named_modules()}
        self.total = sum(per_module.values())
        self.scalable: dict[tuple[str, str], tuple[int, int]] = {}
        for section, name, module, n in layers:
            if section == "resnets":
                touched = [module.conv1, module.conv2, module.time_emb_proj]
            elif section == "attention":
                touched = [module.to_q, module.to_k, module.to_v, module.to_out[0], module]
            else:
                touched = list(feedforward_layers(module)[:2])
            macs = sum(per_module.get(names[id(m)], 0) for m in touched if m is not None)
            self.scalable[(section, name)] = (macs, n)

    def macs(self, ratio: float) -> int:
        removed = 0
        for macs, n in self.scalable.values():
            removed += macs * units_to_remove(n, ratio) // n
        return self.total - removed


def _candidate_ratios(layers: list) -> list[float]:
    """One ratio inside each interval on which the rounded per-layer unit counts are constant, ascending.

    ``units_to_remove(n, r)`` steps at ``r = (k - 0.5) / n``; midpoints between consecutive steps avoid any
    floating-point doubt about which side of a step a ratio falls on.
    """
    steps = sorted({(k - 0.5) / n for n in {layer[3] for layer in layers} for k in range(1, n)})
    bounds = [0.0] + steps + [1.0]
    return [(a + b) / 2 for a, b in zip(bounds[:-1], bounds[1:])]


def _ratio_for_target(model: _MacModel, layers: list, target: float) -> float:
    candidates = _candidate_ratios(layers)
    wanted = target * model.total
    last = len(candidates) - 1
    if model.macs(candidates[last]) > wanted:
        raise SafepruneError(
            f"target_macs={target} is below what internal-width pruning can reach: keeping one unit per layer "
            f"still costs {model.macs(candidates[last]) / model.total:.1%} of the teacher's MACs"
        )
    # MACs never grow with the ratio: bisect for the first candidate at or under the target
    lo, hi = 0, last
    while lo < hi:
        mid = (lo + hi) // 2
        if model.macs(candidates[mid]) <= wanted:
            hi = mid
        else:
            lo = mid + 1
    best = lo
    if lo > 0 and abs(model.macs(candidates[lo - 1]) - wanted) < abs(model.macs(candidates[lo]) - wanted):
        best = lo - 1  # the step just above the target lands closer
    return candidates[best]


# ------------------------------------------------------------------------------------------------------ prune
def _check_args(ratio, target_macs, importance, parts) -> None:
    if (ratio is None) == (target_macs is None):
        raise SafepruneError("pass exactly one of ratio= (fraction of units to remove) or target_macs= (fraction kept)")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
            raise SafepruneError(
                f"ratio must be a number in (0, 1) (fraction of units removed per layer), got {ratio!r}"
            )
    if target_macs is not None:
        if isinstance(target_macs, bool) or not isinstance(target_macs, (int, float)) or not 0.0 < target_macs <= 1.0:
            raise SafepruneError(f"target_macs must be a fraction of the teacher's MACs in (0, 1], got {target_macs!r}")
    if not callable(importance) and importance not in IMPORTANCES:
        raise SafepruneError(f"importance must be one of {IMPORTANCES} or a callable scoring units, got {importance!r}")
    unknown = set(parts) - set(PARTS)
    if unknown or not set(parts):
        raise SafepruneError(f"parts must be a non-empty subset of {PARTS}, got {tuple(parts)!r}")


def prune(
    unet: nn.Module,
    ratio: float | None = None,
    target_macs: float | None = None,
    importance: Union[str, UnitScores] = "l2",
    sample_size: int | None = None,
    *,
    parts: Iterable[str] = PARTS,
    method: str = "magnitude",
) -> tuple["PrunedUNet2DConditionModel", PruneReport]:
    """Prune a copy of ``unet`` (the teacher, left untouched) to a smaller student with the same interface.

    Args:
        unet: a UNet2DConditionModel (or an already pruned PrunedUNet2DConditionModel).
        ratio: fraction of units removed in every prunable layer, in (0, 1), rounded to whole units per layer
            (GroupNorm groups, heads, FF units); at least one unit per layer stays.
        target_macs: wanted student MACs as a fraction of the teacher's, in (0, 1]. The uniform ratio is found
            by bisection over the ratios where the rounded widths change, on MACs counted from one hooked teacher
            forward, and the one closest to the target is used. Exactly one of ``ratio`` / ``target_macs``.
            Raises ``SafepruneError`` when even one unit per layer costs more than the target.
        importance: "l2" or "l1" norm of the weights producing each unit (see module docstring), or a callable
            ``(section, name, module) -> scores [n_units]`` called on the teacher's (unpruned) layer.
        sample_size: latent height/width for MAC counting; default ``unet.config.sample_size``.
        parts: which unit kinds to prune, a subset of ``("resnets", "attention", "feedforward")``.
        method: the pruning method's name, recorded in the report.

    Returns:
        ``(student, report)``: a PrunedUNet2DConditionModel with the teacher's dtype, device and train/eval mode
        and every parameter trainable (``requires_grad=True``), mapping ``sample [B, C, H, W]``, ``timestep``,
        ``encoder_hidden_states [B, L, D]`` to ``.sample [B, C, H, W]`` like the teacher; and a PruneReport.
    """
    from ..models.pruned_unet import PrunedUNet2DConditionModel, empty_widths, merge_widths  # noqa: F811

    parts = tuple(parts)
    _check_args(ratio, target_macs, importance, parts)
    base_widths = merge_widths(getattr(unet.config, "pruned_widths", None), None)
    layers = prunable_layers(unet, parts)
    if not layers:
        raise SafepruneError(f"no prunable layers (parts={parts}) with at least two units in this UNet")
    mac_model = _MacModel(unet, layers, sample_size)
    if target_macs is not None:
        ratio = _ratio_for_target(mac_model, layers, float(target_macs))

    student = copy.deepcopy(unet)
    student_layers = {(section, name): module for section, name, module, _ in prunable_layers(student, parts)}
    new_widths, kept = empty_widths(), empty_widths()
    for section, name, _, n in layers:
        n_keep = n - units_to_remove(n, ratio)
        if n_keep == n:
            continue
        module = student_layers[(section, name)]
        if callable(importance):
            scores = importance(section, name, module)
        else:
            scores = unit_importance(section, module, importance)
        keep = _keep_top(scores, n_keep)
        new_widths[section][name] = _width_entry(section, module, n_keep)
        _APPLY[section](module, keep)
        kept[section][name] = keep
    widths = merge_widths(base_widths, new_widths)
    student = PrunedUNet2DConditionModel.from_unet(student, widths)
    student.requires_grad_(True)

    report = PruneReport(
        params_before=count_params(unet),
        params_after=count_params(student),
        macs_before=mac_model.total,
        macs_after=mac_model.macs(ratio),
        ratio=float(ratio),
        importance=importance if isinstance(importance, str) else getattr(importance, "name", "custom"),
        target_macs=None if target_macs is None else float(target_macs),
        sample_size=unet.config.sample_size if sample_size is None else sample_size,
        pruned_widths=widths,
        kept=kept,
        method=method,
    )
    return student, report
