"""Loss values against hand computation on fixed tensors, and their gradients against autograd of the formula."""
import math

import pytest
import torch

from safeprune_engine.distill.losses import (FeatureProjections, diffusion_loss, feature_kd_loss, min_snr_weights,
                                             output_kd_loss)
from safeprune_engine.unlearn.esd import ESDCrossAttention, ESDUnconditional, esd_target


def test_diffusion_loss_matches_hand_computation():
    prediction = torch.tensor([[[[1.0, 2.0]]], [[[0.0, -1.0]]]])  # (2, 1, 1, 2)
    target = torch.tensor([[[[0.0, 0.0]]], [[[2.0, -3.0]]]])
    # sample 0: (1^2 + 2^2) / 2 = 2.5; sample 1: (2^2 + 2^2) / 2 = 4.0; batch mean 3.25
    assert diffusion_loss(prediction, target).item() == pytest.approx(3.25)


def test_min_snr_weights_epsilon_and_v():
    alphas = torch.tensor([0.8, 0.5, 0.1])  # SNR = 4, 1, 1/9
    t = torch.tensor([0, 1, 2])
    eps = min_snr_weights(t, alphas, gamma=2.0, prediction_type="epsilon")
    v = min_snr_weights(t, alphas, gamma=2.0, prediction_type="v_prediction")
    snr = [4.0, 1.0, 1.0 / 9.0]
    assert eps.tolist() == pytest.approx([min(s, 2.0) / s for s in snr])
    assert v.tolist() == pytest.approx([min(s, 2.0) / (s + 1.0) for s in snr])


def test_weighted_diffusion_loss_uses_per_sample_weights():
    torch.manual_seed(0)
    prediction, target = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    alphas = torch.tensor([0.9, 0.3, 0.05])
    t = torch.tensor([2, 0, 1])
    per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    snr = alphas[t] / (1 - alphas[t])
    expected = (per_sample * torch.clamp(snr, max=5.0) / snr).mean()
    got = diffusion_loss(prediction, target, t, alphas, snr_gamma=5.0, prediction_type="epsilon")
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_output_kd_accepts_lower_precision_teacher():
    torch.manual_seed(1)
    student = torch.randn(2, 4, 3, 3, requires_grad=True)
    teacher = torch.randn(2, 4, 3, 3).to(torch.bfloat16)
    loss = output_kd_loss(student, teacher)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(((student - teacher.float()) ** 2).mean().item(), rel=1e-6)
    loss.backward()
    assert torch.allclose(student.grad, 2 * (student - teacher.float()).detach() / student.numel())


def test_feature_kd_is_mean_over_maps_and_projects_mismatched_widths():
    torch.manual_seed(2)
    teacher = [torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2)]
    student = [torch.randn(2, 8, 4, 4), torch.randn(2, 12, 2, 2)]
    projections = FeatureProjections([8, 12], [8, 16])
    assert list(projections.projections.keys()) == ["1"]  # only the mismatched map gets a projection
    projected = projections.projections["1"](student[1])
    expected = (((student[0] - teacher[0]) ** 2).mean() + ((projected - teacher[1]) ** 2).mean()) / 2
    assert feature_kd_loss(student, teacher, projections).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError):
        feature_kd_loss(student[:1], teacher)


def test_esd_target_and_parameter_sets():
    concept, anchor = torch.tensor([3.0, 1.0]), torch.tensor([1.0, 1.0])
    # anchor - eta (concept - anchor) = [1 - 2*2, 1 - 0] = [-3, 1]
    assert esd_target(concept, anchor, eta=2.0).tolist() == [-3.0, 1.0]
    names = ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight", "conv_in.weight"]

    class Cfg:
        eta = 1.0

    assert [ESDCrossAttention(Cfg).trainable(n) for n in names] == [True, False, False]
    assert [ESDUnconditional(Cfg).trainable(n) for n in names] == [False, True, True]
    student = torch.tensor([[0.0, 0.0]])
    loss = ESDUnconditional(Cfg).loss(student, {"concept": concept[None], "anchor": anchor[None]})
    # target with eta=1: [1 - 2, 1] = [-1, 1] -> mse = 1
    assert loss.item() == pytest.approx(1.0)
    assert not math.isnan(loss.item())
