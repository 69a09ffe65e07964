"""Lower-level (quality recovery) losses: diffusion, output distillation and feature distillation.

All losses are computed in fp32 whatever the forward dtype was, and are means over the batch.
:func:`distillation_losses` is what training calls: w_out L_out + w_feat L_feat through one fused
``distill_loss`` launch. :func:`output_kd_loss` and :func:`feature_kd_loss` are the plain definitions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.distill_loss import distill_loss


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


def distillation_losses(
    student_prediction: torch.Tensor,
    teacher_prediction: torch.Tensor,
    student_maps: list[torch.Tensor],
    teacher_maps: list[torch.Tensor],
    projections: FeatureProjections | None,
    w_out: float,
    w_feat: float,
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """w_out L_out + w_feat L_feat as one fp32 scalar, and the unweighted parts {"out", "feat"} for logging.

    Same values and gradients as ``w_out * output_kd_loss(...) + w_feat * feature_kd_loss(...)``, but the output
    pair and every (projected) map pair go through ONE fused ``distill_loss`` call with weights
    [w_out] + [w_feat / n] * n. Maps are used only when w_feat != 0 and there are maps; "feat" is then in the parts.
    backend: as for ``distill_loss`` (None reads $SAFEPRUNE_KERNELS; "off" runs the torch reference).

    The parts are detached. "out" is recomputed under no_grad (the prediction is small: 4 channels); "feat" is
    (total - w_out L_out) / w_feat, so it costs no second pass over the maps. Its absolute error is about
    fp32 eps * |total| / w_feat, far below what logging shows unless L_feat is < 1e-5 of w_out L_out / w_feat.
    """
    students, teachers, weights = [student_prediction], [teacher_prediction], [float(w_out)]
    use_maps = w_feat != 0 and bool(student_maps)
    if use_maps:
        if len(student_maps) != len(teacher_maps):
            raise ValueError("feature KD needs the same non-zero number of student and teacher maps")
        n = len(student_maps)
        for i, s in enumerate(student_maps):
            students.append(s if projections is None else projections(i, s))
        teachers += list(teacher_maps)
        weights += [float(w_feat) / n] * n
    total = distill_loss(students, teachers, weights, backend=backend).float()
    with torch.no_grad():
        out = F.mse_loss(student_prediction.detach().float(), teacher_prediction.float())
        parts = {"out": out}
        if use_maps:
            # clamp: rounding may push a tiny L_feat below zero, which a mean of squares never is
            parts["feat"] = ((total.detach() - float(w_out) * out) / float(w_feat)).clamp_min(0.0)
    return total, parts
