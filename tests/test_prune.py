"""Width pruning (safeprune_engine.prune.width) and MAC counting (safeprune_engine.prune.macs) on the tiny UNet."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from safeprune_engine.errors import SafepruneError
from safeprune_engine.prune.macs import count_macs, count_module_macs, count_params
from safeprune_engine.prune.width import (
    PruneReport,
    prunable_layers,
    prune,
    prune_attention_heads,
    prune_resnet_groups,
)
from safeprune_engine.testing import TOLERANCES, tiny_unet

ATOL, RTOL = TOLERANCES[torch.float32]
FF = "down_blocks.0.attentions.0.transformer_blocks.0.ff"


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def teacher():
    return tiny_unet(seed=3).eval()


def unet_inputs(unet, gen, batch=2, text_len=7):
    cfg = unet.config
    return dict(
        sample=torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen),
        timestep=torch.randint(0, 1000, (batch,), generator=gen),
        encoder_hidden_states=torch.randn(batch, text_len, cfg.cross_attention_dim, generator=gen),
    )


def capture_output(model, name):
    """Run-time hook that stores the output of model.<name> in the returned dict under 'out'."""
    store = {}
    handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: store.__setitem__("out", o))
    return store, handle


# ------------------------------------------------------------------------------------------------ whole model
def test_pruned_model_trains_and_shrinks(teacher, gen):
    from safeprune_engine.models.pruned_unet import PrunedUNet2DConditionModel

    student, report = prune(teacher, ratio=0.5)
    assert isinstance(student, PrunedUNet2DConditionModel) and isinstance(report, PruneReport)
    student.train()
    inputs = unet_inputs(teacher, gen)
    out = student(**inputs).sample
    assert out.shape == inputs["sample"].shape
    out.square().mean().backward()
    for name, p in student.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in student.parameters())

    assert report.params_before == count_params(teacher)
    assert report.params_after == count_params(student) < report.params_before
    assert report.macs_before == count_macs(teacher)  # the meta-device skeleton counts what the real model does
    assert report.macs_after == count_macs(student) < report.macs_before
    assert report.ratio == 0.5
    for section in ("resnets", "attention", "feedforward"):
        assert report.pruned_widths[section], section
    text = report.summary()
    assert "params" in text and "MACs" in text and f"{report.macs_after:,}" in text
    d = json.loads(json.dumps(report.to_dict()))
    assert d["macs_after"] == report.macs_after and d["pruned_widths"] == report.pruned_widths
    assert d["macs_fraction"] == pytest.approx(report.macs_after / report.macs_before)


def test_teacher_is_not_modified(teacher, gen):
    teacher.requires_grad_(False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    inputs = unet_inputs(teacher, gen)
    with torch.no_grad():
        out_before = teacher(**inputs).sample
    student, _ = prune(teacher, ratio=0.5)
    after = teacher.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].shape == after[k].shape and torch.equal(before[k], after[k]), k
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(a.heads == 4 for a in teacher.modules() if type(a).__name__ == "Attention")
    with torch.no_grad():
        assert torch.equal(teacher(**inputs).sample, out_before)
    # the student owns its storage and is trainable even though the teacher is frozen
    teacher_ptrs = {p.data_ptr() for p in teacher.parameters()}
    assert not any(p.data_ptr() in teacher_ptrs for p in student.parameters())
    assert all(p.requires_grad for p in student.parameters())


def test_ratio_rounds_to_whole_units_per_layer(teacher):
    student, report = prune(teacher, ratio=0.3)
    w = report.pruned_widths
    # 8 groups: remove round(2.4) = 2; 4 heads: remove round(1.2) = 1; 128 FF units: remove round(38.4) = 38
    assert w["resnets"]["down_blocks.0.resnets.0"] == {"conv1_out": 24, "norm2_groups": 6}
    assert w["resnets"]["up_blocks.0.resnets.0"] == {"conv1_out": 48, "norm2_groups": 6}
    assert w["attention"][FF.replace("ff", "attn2")] == {"heads": 3}
    assert w["feedforward"][FF] == {"inner": 90}
    assert w["feedforward"]["mid_block.attentions.0.transformer_blocks.0.ff"] == {"inner": 256 - 77}
    n_layers = len(prunable_layers(teacher))
    assert sum(len(v) for v in w.values()) == n_layers == 30


def test_extreme_ratio_keeps_one_unit_per_layer(teacher, gen):
    student, report = prune(teacher, ratio=0.999)
    for name, spec in report.pruned_widths["resnets"].items():
        assert spec["norm2_groups"] == 1
        assert student.get_submodule(name).norm2.num_groups == 1
    assert all(spec == {"heads": 1} for spec in report.pruned_widths["attention"].values())
    assert all(spec == {"inner": 1} for spec in report.pruned_widths["feedforward"].values())
    out = student(**unet_inputs(teacher, gen)).sample
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------- resnet groups
def test_resnet_pruning_removes_whole_groups_and_is_exact(teacher, gen):
    student, report = prune(teacher, ratio=0.5, parts=("resnets",))
    assert not report.pruned_widths["attention"] and not report.pruned_widths["feedforward"]
    for name, keep in report.kept["resnets"].items():
        t, s = teacher.get_submodule(name), student.get_submodule(name)
        per_group = t.norm2.num_channels // t.norm2.num_groups
        assert s.norm2.num_channels // s.norm2.num_groups == per_group  # channels per group unchanged
        assert s.norm2.num_groups == len(keep) == 4
        assert s.conv1.out_channels == s.norm2.num_channels == s.conv2.in_channels == 4 * per_group
        assert s.time_emb_proj.out_features == s.conv1.out_channels
        assert s.conv2.out_channels == t.conv2.out_channels  # block output width kept
        assert report.pruned_widths["resnets"][name] == {"conv1_out": 4 * per_group, "norm2_groups": 4}

    # only resnets changed, so the first resnet sees the teacher's input: its kept norm2 channels must match
    name = "down_blocks.0.resnets.0"
    keep = report.kept["resnets"][name]
    per_group = teacher.get_submodule(name).norm2.num_channels // 8
    channels = [k * per_group + i for k in keep for i in range(per_group)]
    inputs = unet_inputs(teacher, gen)
    t_store, h1 = capture_output(teacher, f"{name}.norm2")
    s_store, h2 = capture_output(student, f"{name}.norm2")
    with torch.no_grad():
        teacher(**inputs)
        student(**inputs)
    h1.remove(), h2.remove()
    torch.testing.assert_close(s_store["out"], t_store["out"][:, channels], atol=ATOL, rtol=RTOL)


def test_group_pruning_is_exact_for_any_kept_groups(teacher, gen):
    # block level, every resnet of the UNet, a random (non-contiguous) set of kept groups
    for name, block, n_groups in [(n, m, k) for s, n, m, k in prunable_layers(teacher, ("resnets",))]:
        pruned = copy.deepcopy(block)
        keep = sorted(torch.randperm(n_groups, generator=gen)[: n_groups // 2 + 1].tolist())
        prune_resnet_groups(pruned, keep)
        x = torch.randn(2, block.conv1.in_channels, 6, 6, generator=gen)
        temb = torch.randn(2, block.time_emb_proj.in_features, generator=gen)
        outs = {}
        for key, mod in (("t", block), ("s", pruned)):
            h = mod.norm2.register_forward_hook(lambda m, i, o, key=key: outs.__setitem__(key, o))
            with torch.no_grad():
                y = mod(x, temb)
            h.remove()
            assert y.shape == x.shape[:1] + (block.conv2.out_channels,) + x.shape[2:]
        per_group = block.norm2.num_channels // n_groups
        channels = [k * per_group + i for k in keep for i in range(per_group)]
        torch.testing.assert_close(outs["s"], outs["t"][:, channels], atol=ATOL, rtol=RTOL, msg=name)


# ---------------------------------------------------------------------------------------------- attention heads
def attention_by_hand(attn, x, context, heads_kept):
    """Teacher attention restricted to heads_kept, written out from its weights: [B, Lq, D_out]."""
    d = attn.to_q.out_features // attn.heads
    rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads_kept])
    q = F.linear(x, attn.to_q.weight[rows], None if attn.to_q.bias is None else attn.to_q.bias[rows])
    k = F.linear(context, attn.to_k.weight[rows], None if attn.to_k.bias is None else attn.to_k.bias[rows])
    v = F.linear(context, attn.to_v.weight[rows], None if attn.to_v.bias is None else attn.to_v.bias[rows])
    b, lq, lk = x.shape[0], x.shape[1], context.shape[1]
    q = q.view(b, lq, -1, d).transpose(1, 2)
    k = k.view(b, lk, -1, d).transpose(1, 2)
    v = v.view(b, lk, -1, d).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    mixed = (probs @ v).transpose(1, 2).reshape(b, lq, -1)
    return F.linear(mixed, attn.to_out[0].weight[:, rows], attn.to_out[0].bias)


@pytest.mark.parametrize("which", ["attn1", "attn2"])
def test_attention_head_pruning(teacher, gen, which):
    attn = teacher.get_submodule(FF.replace("ff", which))
    x = torch.randn(2, 9, attn.to_q.in_features, generator=gen)
    context = x if which == "attn1" else torch.randn(2, 5, attn.to_k.in_features, generator=gen)
    kwargs = {} if which == "attn1" else {"encoder_hidden_states": context}
    with torch.no_grad():
        reference = attn(x, **kwargs)

        # keeping every head is the identity on the layer
        same = copy.deepcopy(attn)
        prune_attention_heads(same, range(attn.heads))
        assert same.heads == attn.heads
        torch.testing.assert_close(same(x, **kwargs), reference, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(attention_by_hand(attn, x, context, range(4)), reference, atol=ATOL, rtol=RTOL)

        # dropping heads 1 and 3 equals the teacher computed with heads 0 and 2 only
        pruned = copy.deepcopy(attn)
        prune_attention_heads(pruned, [0, 2])
        d = attn.to_q.out_features // attn.heads
        assert pruned.heads == 2 and pruned.inner_dim == pruned.inner_kv_dim == 2 * d
        assert pruned.to_q.out_features == pruned.to_k.out_features == pruned.to_v.out_features == 2 * d
        assert pruned.to_out[0].in_features == 2 * d and pruned.to_out[0].out_features == attn.to_out[0].out_features
        got = pruned(x, **kwargs)
        torch.testing.assert_close(got, attention_by_hand(attn, x, context, [0, 2]), atol=ATOL, rtol=RTOL)
        assert not torch.allclose(got, reference, atol=1e-3)


def test_model_attention_heads_reduced(teacher):
    student, report = prune(teacher, ratio=0.5, parts=("attention",))
    assert len(report.pruned_widths["attention"]) == 12
    for name in report.pruned_widths["attention"]:
        t, s = teacher.get_submodule(name), student.get_submodule(name)
        assert (t.heads, s.heads) == (4, 2)
        assert s.to_q.out_features == t.to_q.out_features // 2 == s.inner_dim
        assert s.to_out[0].out_features == t.to_out[0].out_features
    # diffusers' attention slicing reads the updated head bookkeeping
    inputs = unet_inputs(teacher, torch.Generator().manual_seed(7))
    student.eval()
    with torch.no_grad():
        plain = student(**inputs).sample
        student.set_attention_slice("auto")
        torch.testing.assert_close(student(**inputs).sample, plain, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------------------------------------- GEGLU
@pytest.mark.parametrize("importance", ["l2", "l1"])
def test_geglu_pairs_hidden_and_gate_halves(teacher, gen, importance):
    student, report = prune(teacher, ratio=0.5, importance=importance, parts=("feedforward",))
    t_ff, s_ff = teacher.get_submodule(FF), student.get_submodule(FF)
    n = t_ff.net[2].in_features
    kept = torch.tensor(report.kept["feedforward"][FF])
    # exactly the asked fraction (torch-pruning's dependency graph leaves ~11% of rows at ratio 0.5)
    assert len(kept) == n // 2 == s_ff.net[2].in_features
    assert s_ff.net[0].proj.out_features == 2 * (n // 2)
    assert report.pruned_widths["feedforward"][FF] == {"inner": n // 2}

    # the kept units are the top half by the summed norm of BOTH rows j (hidden) and n + j (gate)
    W, b = t_ff.net[0].proj.weight.detach(), t_ff.net[0].proj.bias.detach()
    row = W.abs().sum(1) if importance == "l1" else W.norm(dim=1)
    score = row[:n] + row[n:]
    assert kept.tolist() == sorted(torch.topk(score, n // 2).indices.tolist())

    x = torch.randn(3, 6, W.shape[1], generator=gen)
    hidden = F.linear(x, W[kept], b[kept])
    gate = F.linear(x, W[n + kept], b[n + kept])
    expected = F.linear(hidden * F.gelu(gate), t_ff.net[2].weight[:, kept], t_ff.net[2].bias)
    with torch.no_grad():
        got = s_ff(x)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
        assert not torch.allclose(got, t_ff(x), atol=1e-3)


def test_resnet_importance_uses_conv1_filters(teacher):
    name = "down_blocks.1.resnets.0"
    for importance in ("l1", "l2"):
        _, report = prune(teacher, ratio=0.5, importance=importance, parts=("resnets",))
        w = teacher.get_submodule(name).conv1.weight.detach().flatten(1)
        per_channel = w.abs().sum(1) if importance == "l1" else w.norm(dim=1)
        score = per_channel.view(8, -1).sum(1)
        assert report.kept["resnets"][name] == sorted(torch.topk(score, 4).indices.tolist()), importance


# ------------------------------------------------------------------------------------------------ MAC budgets
@pytest.mark.parametrize("target", [0.8, 0.6])
def test_target_macs_lands_near_target(teacher, target):
    student, report = prune(teacher, target_macs=target)
    fraction = count_macs(student) / count_macs(teacher)
    assert fraction == pytest.approx(report.macs_fraction)
    # the tiny UNet has 8 groups / 4 heads per layer, so one step moves MACs by up to ~7%; closest step wins
    assert abs(fraction - target) < 0.05, (fraction, report.ratio)
    assert report.target_macs == target and 0 < report.ratio < 1


def test_target_macs_is_monotone_and_checked(teacher):
    _, hi = prune(teacher, target_macs=0.9)
    _, lo = prune(teacher, target_macs=0.5)
    assert lo.macs_after < hi.macs_after < hi.macs_before
    with pytest.raises(SafepruneError, match="below what internal-width pruning can reach"):
        prune(teacher, target_macs=0.05)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ratio=0.0), "ratio must be"),
        (dict(ratio=1.0), "ratio must be"),
        (dict(ratio=1.5), "ratio must be"),
        (dict(ratio=-0.2), "ratio must be"),
        (dict(ratio=float("nan")), "ratio must be"),
        (dict(ratio=True), "ratio must be"),
        (dict(), "exactly one"),
        (dict(ratio=0.5, target_macs=0.5), "exactly one"),
        (dict(target_macs=0.0), "target_macs must be"),
        (dict(target_macs=1.2), "target_macs must be"),
        (dict(ratio=0.5, importance="l3"), "importance"),
        (dict(ratio=0.5, parts=("heads",)), "parts"),
    ],
)
def test_bad_arguments_raise(teacher, kwargs, match):
    with pytest.raises(SafepruneError, match=match):
        prune(teacher, **kwargs)


# ------------------------------------------------------------------------------------------------------ MACs
def test_linear_and_conv_macs_by_hand(gen):
    lin = nn.Linear(8, 16)
    assert count_module_macs(lin, torch.randn(2, 5, 8, generator=gen)) == 2 * 5 * 16 * 8

    conv = nn.Conv2d(3, 6, kernel_size=3, stride=2, padding=1)  # 9x9 -> 5x5
    assert count_module_macs(conv, torch.randn(2, 3, 9, 9, generator=gen)) == (2 * 6 * 5 * 5) * (3 * 3 * 3)

    grouped = nn.Conv2d(6, 9, kernel_size=3, groups=3)  # each output sees 6/3 input channels; 7x7 -> 5x5
    assert count_module_macs(grouped, torch.randn(1, 6, 7, 7, generator=gen)) == (9 * 5 * 5) * (2 * 3 * 3)

    assert count_params(lin) == 8 * 16 + 16
    shared = nn.Sequential(lin, nn.ReLU(), lin)
    assert count_params(shared) == 8 * 16 + 16  # a shared layer counts once


def test_attention_macs_by_hand(gen):
    from diffusers.models.attention_processor import Attention

    B, Lq, Lk, D, C, heads, d = 2, 10, 7, 16, 12, 2, 8
    attn = Attention(query_dim=D, cross_attention_dim=C, heads=heads, dim_head=d)
    x, ctx = torch.randn(B, Lq, D, generator=gen), torch.randn(B, Lk, C, generator=gen)
    inner = heads * d
    projections = B * Lq * D * inner + 2 * B * Lk * C * inner + B * Lq * inner * D
    matmuls = 2 * B * heads * Lq * Lk * d  # Q K^T and attention @ V
    assert count_module_macs(attn, x, encoder_hidden_states=ctx) == projections + matmuls

    self_attn = Attention(query_dim=D, heads=heads, dim_head=d)
    assert count_module_macs(self_attn, x) == 4 * B * Lq * D * inner + 2 * B * heads * Lq * Lq * d


def test_unet_macs_scale_and_shrink(teacher):
    base = count_macs(teacher)
    assert count_macs(teacher, batch_size=2) == 2 * base
    assert count_macs(teacher, sample_size=16) > 3 * base  # 4x the pixels; text attention grows less
    student, _ = prune(teacher, ratio=0.25)
    assert count_macs(student) < base
