"""Loss values against hand computation on fixed tensors, and their gradients against autograd of the formula."""
import math

import pytest
import torch

from safeprune_engine.distill.losses import (FeatureProjections, diffusion_loss, distillation_losses,
                                             feature_kd_loss, min_snr_weights, output_kd_loss)
from safeprune_engine.ops import dispatch
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


# (student channels, teacher channels, H=W) per map: equal widths, pruned widths (projected), several resolutions
MAP_SETS = [
    [(8, 8, 6), (12, 16, 3)],
    [(20, 20, 8), (40, 40, 4), (80, 80, 2), (80, 80, 2), (60, 80, 4), (30, 40, 8)],
    [(5, 7, 5)],
]


def _distill_inputs(maps, teacher_dtype, projected, seed):
    g = torch.Generator().manual_seed(seed)
    teacher_prediction = torch.randn(2, 4, 6, 6, generator=g).to(teacher_dtype)
    student_prediction = (teacher_prediction.float() + 0.5 * torch.randn(2, 4, 6, 6, generator=g)).requires_grad_()
    if not projected:
        maps = [(t, t, hw) for _, t, hw in maps]
    teacher_maps = [torch.randn(2, t, hw, hw, generator=g).to(teacher_dtype) for _, t, hw in maps]
    student_maps = [torch.randn(2, s, hw, hw, generator=g).requires_grad_() for s, _, hw in maps]
    torch.manual_seed(seed)
    projections = FeatureProjections([s for s, _, _ in maps], [t for _, t, _ in maps])
    return student_prediction, teacher_prediction, student_maps, teacher_maps, projections


def _backends():
    # every backend that can run these CPU tensors (reference always; cpp when the extension is built)
    x = [torch.zeros(2)]
    return ["off", "auto"] + [b for b in ("cpp", "triton") if not dispatch.available_backends("distill_loss", x, x,
                                                                                             [1.0]).get(b, ["-"])]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("projected", [False, True])
@pytest.mark.parametrize("maps_index", range(len(MAP_SETS)))
def test_distillation_losses_match_the_mse_loss_path(backend, teacher_dtype, projected, maps_index):
    """One fused call gives the value and every gradient (student prediction, maps, projection weights) of
    w_out * output_kd_loss + w_feat * feature_kd_loss."""
    maps = MAP_SETS[maps_index]
    w_out, w_feat = 2.0, 0.3
    sp, tp, s_maps, t_maps, proj = _distill_inputs(maps, teacher_dtype, projected, seed=10 + maps_index)
    total, parts = distillation_losses(sp, tp, s_maps, t_maps, proj, w_out, w_feat, backend=backend)
    inputs = [sp, *s_maps, *proj.parameters()]
    got = torch.autograd.grad(total * 1.3, inputs)
    out, feat = output_kd_loss(sp, tp), feature_kd_loss(s_maps, t_maps, proj)
    expected = w_out * out + w_feat * feat
    want = torch.autograd.grad(expected * 1.3, inputs)
    assert total.dtype == torch.float32 and total.dim() == 0
    assert total.item() == pytest.approx(expected.item(), rel=2e-6)
    assert parts["out"].item() == pytest.approx(out.item(), rel=1e-6)
    # "feat" is derived from the total: fp32 rounding of the total, scaled by 1 / w_feat
    assert parts["feat"].item() == pytest.approx(feat.item(), rel=1e-6, abs=4e-7 * expected.item() / w_feat)
    assert bool(list(proj.parameters())) == projected  # the projected cases check projection weight gradients
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("w_feat, with_maps", [(0.0, True), (0.5, False)])
def test_distillation_losses_without_feature_term(w_feat, with_maps):
    """No "feat" part (and no map in the loss) when w_feat == 0 or there are no maps; maps get no gradient."""
    sp, tp, s_maps, t_maps, proj = _distill_inputs(MAP_SETS[0], torch.bfloat16, True, seed=3)
    total, parts = distillation_losses(sp, tp, s_maps if with_maps else [], t_maps if with_maps else [], proj,
                                       1.5, w_feat)
    assert set(parts) == {"out"}
    assert total.item() == pytest.approx(1.5 * output_kd_loss(sp, tp).item(), rel=1e-6)
    total.backward()
    assert torch.allclose(sp.grad, 1.5 * 2 * (sp - tp.float()).detach() / sp.numel())
    assert all(m.grad is None for m in s_maps)
    with pytest.raises(ValueError):
        distillation_losses(sp, tp, s_maps, t_maps[:1], proj, 1.0, 1.0)


def test_esd_target_and_parameter_sets():
    concept, anchor = torch.tensor([3.0, 1.0]), torch.tensor([1.0, 1.0])
    # anchor - eta (concept - anchor) = [1 - 2*2, 1 - 0] = [-3, 1]
    assert esd_target(concept, anchor, eta=2.0).tolist() == [-3.0, 1.0]
    names = ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight", "conv_in.weight"]

    class Cfg:
        effective_eta = 1.0

    assert [ESDCrossAttention(Cfg).trainable(n) for n in names] == [True, False, False]
    assert [ESDUnconditional(Cfg).trainable(n) for n in names] == [False, True, True]
    student = torch.tensor([[0.0, 0.0]])
    loss = ESDUnconditional(Cfg).loss(student, {"concept": concept[None], "anchor": anchor[None]})
    # target with eta=1: [1 - 2, 1] = [-1, 1] -> mse = 1
    assert loss.item() == pytest.approx(1.0)
    assert not math.isnan(loss.item())


@pytest.mark.parametrize("settings,eta", [
    ({}, 0.5),  # bilevel erases alongside distillation in every step: half ESD's strength (docs/status.md)
    ({"method": "two-stage"}, 1.0),  # erasing after distillation, as ESD does: ESD's own strength
    ({"method": "interleaved"}, 1.0),
    ({"eta": 2.0}, 2.0),
    ({"method": "two-stage", "eta": 0.25}, 0.25),
])
def test_esd_objective_uses_the_method_default_eta_unless_given(settings, eta):
    from safeprune_engine.config import RunConfig
    from safeprune_engine.unlearn.base import build_objective

    objective = build_objective(RunConfig(erase_method="esd", **settings))
    concept, anchor = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    student = torch.randn(2, 4, 8, 8)
    expected = torch.nn.functional.mse_loss(student, anchor - eta * (concept - anchor))
    loss = objective.loss(student, {"concept": concept, "anchor": anchor})
    torch.testing.assert_close(loss, expected)
