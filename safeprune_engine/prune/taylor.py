"""``--prune-method taylor``: width pruning by first-order Taylor importance (Molchanov et al., 2019).

Removing a unit zeroes every weight tied to it: the rows that produce its channels and the columns that read
them. To first order that changes the loss by ``-sum_{w in unit} g * w``; the score of a unit is that sum
squared, averaged over the calibration batches (a few batches of the fine-tuning data, diffusion loss of the
teacher itself). Units are whole GroupNorm groups of a resnet's conv1 output, attention heads and GEGLU units
(both halves), exactly as in magnitude pruning, so the student has the same shapes; only the choice differs.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..models.conditioning import unet_kwargs
from .base import PRUNE_METHODS, CalibrationBatch, PruneMethod, PruneRequest
from .width import prunable_layers, prune


def _channel_sums(param: torch.Tensor, dim: int) -> torch.Tensor:
    """sum of g * w over every axis but ``dim``: [param.shape[dim]] in fp32 (no gradient: zeros)."""
    if param.grad is None:
        return torch.zeros(param.shape[dim], device=param.device)
    product = (param.detach().float() * param.grad.float()).movedim(dim, 0)
    return product.reshape(product.shape[0], -1).sum(1)


def unit_contributions(section: str, module: nn.Module) -> torch.Tensor:
    """``sum g*w`` over all weights tied to each unit of one prunable layer, [n_units], from current ``.grad``."""
    from ..models.pruned_unet import feedforward_layers

    def rows(layer):  # output rows (+ bias) of a conv / linear / norm
        out = _channel_sums(layer.weight, 0)
        return out + _channel_sums(layer.bias, 0) if layer.bias is not None else out

    if section == "resnets":
        groups = module.norm2.num_groups
        channels = rows(module.conv1) + rows(module.norm2) + _channel_sums(module.conv2.weight, 1)
        if module.time_emb_proj is not None:
            emb = rows(module.time_emb_proj)
            channels = channels + (emb.view(2, -1).sum(0) if module.time_embedding_norm == "scale_shift" else emb)
        return channels.view(groups, -1).sum(1)
    if section == "attention":
        channels = rows(module.to_q) + rows(module.to_k) + rows(module.to_v) + _channel_sums(module.to_out[0].weight, 1)
        return channels.view(module.heads, -1).sum(1)
    proj_in, proj_out, gated = feedforward_layers(module)
    inner = proj_out.in_features
    produced = rows(proj_in)
    produced = produced[:inner] + produced[inner:] if gated else produced
    return produced + _channel_sums(proj_out.weight, 1)


def taylor_scores(unet: nn.Module, batches: list[CalibrationBatch], parts) -> dict[tuple[str, str], torch.Tensor]:
    """(section, layer name) -> [n_units] mean over batches of (sum_{w in unit} g*w)^2, g = d L_diff / d w.

    Runs on a copy of ``unet`` (the teacher keeps no gradients); batches: CalibrationBatch list.
    """
    model = copy.deepcopy(unet).float().requires_grad_(True)
    layers = prunable_layers(model, parts)
    scores = {(section, name): torch.zeros(n) for section, name, _, n in layers}
    for batch in batches:
        model.zero_grad(set_to_none=False)
        device = next(model.parameters()).device
        prediction = model(batch.latents.to(device), batch.timesteps.to(device),
                           **unet_kwargs(model, batch.text_emb.to(device, torch.float32))).sample
        F.mse_loss(prediction.float(), batch.target.to(device).float()).backward()
        for section, name, module, _ in layers:
            scores[(section, name)] += unit_contributions(section, module).cpu().pow(2) / len(batches)
    return scores


class _TaylorImportance:
    name = "taylor"

    def __init__(self, scores):
        self.scores = scores

    def __call__(self, section: str, name: str, module) -> torch.Tensor:
        return self.scores[(section, name)]


@PRUNE_METHODS.register("taylor")
class TaylorPruning(PruneMethod):
    needs_calibration = True

    def prune(self, unet, request: PruneRequest):
        scores = taylor_scores(unet, list(request.calibration()), request.parts)
        return prune(unet, ratio=request.ratio, target_macs=request.target_macs, importance=_TaylorImportance(scores),
                     sample_size=request.sample_size, parts=request.parts, method="taylor")
