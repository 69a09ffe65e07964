"""Lower-level (quality recovery) losses: diffusion, output distillation and feature distillation.

All losses are computed in fp32 whatever the forward dtype was, and are means over the batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, ...) x (B, ...) -> (B,) mean squared error of each sample, in fp32."""
    diff = prediction.float() - target.float()
    return diff.pow(2).flatten(1).mean(dim=1)


def min_snr_weights(
    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Min-SNR-gamma loss weights, (B,) fp32.

    SNR(t) = a_t / (1 - a_t) with a_t = alphas_cumprod[t]. For epsilon targets the weight is
    min(SNR, gamma) / SNR; for v targets it is min(SNR, gamma) / (SNR + 1) (Hang et al., 2023).
    """
    alpha = alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alpha / (1.0 - alpha)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped / snr


def diffusion_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor | None = None,
    alphas_cumprod: torch.Tensor | None = None,
    snr_gamma: float | None = None,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """L_diff: per-sample MSE(prediction, target), optionally min-SNR weighted, averaged over the batch.

    prediction, target: (B, C, H, W); target is the noise (epsilon models) or the velocity (v models).
    """
    losses = per_sample_mse(prediction, target)
    if snr_gamma is not None:
        if timesteps is None or alphas_cumprod is None:
            raise ValueError("min-SNR weighting needs timesteps and alphas_cumprod")
        losses = losses * min_snr_weights(timesteps, alphas_cumprod, snr_gamma, prediction_type)
    return losses.mean()


def output_kd_loss(student_prediction: torch.Tensor, teacher_prediction: torch.Tensor) -> torch.Tensor:
    """L_out: MSE between the student's and the (frozen) teacher's predictions, (B, C, H, W) each."""
    return F.mse_loss(student_prediction.float(), teacher_prediction.float())


class FeatureProjections(nn.Module):
    """Learned 1x1 convolutions mapping student block outputs to the teacher's width where they differ.

    Built from the channel counts of both models; maps whose widths already agree get no projection.
    """

    def __init__(self, student_channels: list[int], teacher_channels: list[int]):
        super().__init__()
        if len(student_channels) != len(teacher_channels):
            raise ValueError(
                f"student has {len(student_channels)} feature maps, teacher {len(teacher_channels)}"
            )
        self.student_channels = list(student_channels)
        self.teacher_channels = list(teacher_channels)
        self.projections = nn.ModuleDict(
            {
                str(i): nn.Conv2d(s, t, kernel_size=1, bias=False)
                for i, (s, t) in enumerate(zip(student_channels, teacher_channels))
                if s != t
            }
        )

    def forward(self, index: int, feature: torch.Tensor) -> torch.Tensor:
        projection = self.projections[str(index)] if str(index) in self.projections else None
        return feature if projection is None else projection(feature)


def feature_kd_loss(
    student_features: list[torch.Tensor],
    teacher_features: list[torch.Tensor],
    projections: FeatureProjections | None = None,
) -> torch.Tensor:
    """L_feat: mean over block outputs of MSE(project(student map), teacher map).

    student_features[i]: (B, C_s_i, H_i, W_i); teacher_features[i]: (B, C_t_i, H_i, W_i).
    """
    if len(student_features) != len(teacher_features) or not student_features:
        raise ValueError("feature KD needs the same non-zero number of student and teacher maps")
    total = student_features[0].new_zeros((), dtype=torch.float32)
    for i, (s, t) in enumerate(zip(student_features, teacher_features)):
        if projections is not None:
            s = projections(i, s)
        total = total + F.mse_loss(s.float(), t.float())
    return total / len(student_features)
