"""Pruning methods behind --prune-method: magnitude, taylor, BK-SDM block removal; `safeprune prune`; training
and export with every method. Real tiny diffusers models, no mocks."""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from safeprune_engine.errors import SafepruneError
from safeprune_engine.prune.base import PRUNE_METHODS, CalibrationBatch, prune_unet
from safeprune_engine.prune.bk import bk_config
from safeprune_engine.prune.taylor import taylor_scores, unit_contributions
from safeprune_engine.prune.width import prunable_layers, prune
from safeprune_engine.testing import tiny_unet

# an SD-shaped 3-stage UNet: two cross-attention stages, then a plain innermost stage of the same width
SD_LIKE = dict(block_out_channels=(16, 32, 32), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
               "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(7)


def inputs(unet, gen, batch=2, size=8):
    return dict(sample=torch.randn(batch, 4, size, size, generator=gen),
                timestep=torch.randint(0, 1000, (batch,), generator=gen),
                encoder_hidden_states=torch.randn(batch, 5, unet.config.cross_attention_dim, generator=gen))


def calibration(unet, gen, batches=2, batch=2):
    out = []
    for _ in range(batches):
        x = inputs(unet, gen, batch)
        out.append(CalibrationBatch(latents=x["sample"], timesteps=x["timestep"], text_emb=x["encoder_hidden_states"],
                                    target=torch.randn(x["sample"].shape, generator=gen)))
    return out


def test_registry_lists_every_builtin_method():
    assert {"magnitude", "taylor", "bk-base", "bk-small", "bk-tiny"} <= set(PRUNE_METHODS.names())
    with pytest.raises(SafepruneError, match="unknown prune method"):
        PRUNE_METHODS.get("random")


def _norms(rows: torch.Tensor, importance: str) -> list[float]:
    """Per output row (filter), the L2 or L1 norm of everything that produces it, in float64."""
    flat = rows.detach().double().reshape(rows.shape[0], -1)
    return (flat.abs().sum(1) if importance == "l1" else flat.pow(2).sum(1).sqrt()).tolist()


def _expected_units(module, importance: str) -> tuple[list[float], dict[str, tuple[torch.Tensor, int, int]]]:
    """Scores per unit written out from the module's weights, and per tensor (dim, channels per unit) of what a
    unit takes with it, for resnets (conv1 groups), attention (heads) and GEGLU feed-forwards (inner units)."""
    from diffusers.models.attention import FeedForward
    from diffusers.models.resnet import ResnetBlock2D

    if isinstance(module, ResnetBlock2D):
        groups = module.norm2.num_groups
        per = module.conv1.out_channels // groups
        rows = _norms(module.conv1.weight, importance)
        scores = [sum(rows[g * per:(g + 1) * per]) for g in range(groups)]
        return scores, {"conv1.weight": (0, per), "conv1.bias": (0, per), "norm2.weight": (0, per),
                        "norm2.bias": (0, per), "time_emb_proj.weight": (0, per), "time_emb_proj.bias": (0, per),
                        "conv2.weight": (1, per)}
    if isinstance(module, FeedForward):
        proj = module.net[0].proj  # GEGLU: rows [hidden half; gate half]
        inner = proj.out_features // 2
        assert proj.out_features == 2 * module.net[2].in_features, "the tiny UNet's feed-forwards are gated"
        rows = _norms(proj.weight, importance)
        return [rows[j] + rows[inner + j] for j in range(inner)], {"net.2.weight": (1, 1)}
    heads = module.heads
    per = module.to_q.out_features // heads
    rows = [_norms(getattr(module, p).weight, importance) for p in ("to_q", "to_k", "to_v")]
    scores = [sum(sum(r[h * per:(h + 1) * per]) for r in rows) for h in range(heads)]
    return scores, {f"{p}.weight": (0, per) for p in ("to_q", "to_k", "to_v")} | {"to_out.0.weight": (1, per)}


@pytest.mark.parametrize("importance", ["l2", "l1"])
def test_magnitude_method_keeps_the_units_with_the_largest_weight_norms(importance):
    """Which units --prune-method magnitude keeps, checked against norms computed here from the teacher's weights
    (independently of prune/width.py), on a UNet with one planted ranking; and the student's weights are the
    teacher's rows and columns of exactly those units."""
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    teacher = tiny_unet(seed=1).eval()
    planted = teacher.down_blocks[0].resnets[0]
    # every conv1 filter of group g is +-scale[g] (random signs): same ranking by L1 and L2, known in advance
    scale = torch.tensor([0.3, 0.9, 0.1, 0.7, 0.5, 0.2, 0.8, 0.4])
    per = planted.conv1.out_channels // planted.norm2.num_groups
    signs = torch.randint(0, 2, planted.conv1.weight.shape, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        planted.conv1.weight.copy_(signs * 0.05 * scale.repeat_interleave(per)[:, None, None, None])
    original = copy.deepcopy(teacher.state_dict())

    student, report = prune_unet(teacher, "magnitude", ratio=0.5, importance=importance)
    assert report.method == "magnitude" and report.importance == importance
    assert report.kept["resnets"]["down_blocks.0.resnets.0"] == [1, 3, 4, 6]  # the groups scaled 0.9, 0.7, 0.5, 0.8

    kinds = {"resnets": ResnetBlock2D, "attention": Attention, "feedforward": FeedForward}
    student_state = student.state_dict()
    checked = 0
    for section, kind in kinds.items():
        names = [name for name, m in teacher.named_modules() if isinstance(m, kind)]
        assert names and sorted(report.kept[section]) == sorted(names), section
        for name in names:
            scores, tensors = _expected_units(teacher.get_submodule(name), importance)
            n_keep = len(scores) - len(scores) // 2  # ratio 0.5 of an even count
            keep = sorted(sorted(range(len(scores)), key=lambda u: -scores[u])[:n_keep])
            assert report.kept[section][name] == keep, (section, name, scores)
            for tensor, (dim, unit_size) in tensors.items():
                index = torch.tensor([u * unit_size + i for u in keep for i in range(unit_size)])
                if section == "feedforward":  # net[0].proj keeps hidden row j and gate row j
                    inner = len(scores)
                    proj = torch.cat([index, index + inner])
                    for key in ("net.0.proj.weight", "net.0.proj.bias"):
                        expected = original[f"{name}.{key}"].index_select(0, proj)
                        assert torch.equal(student_state[f"{name}.{key}"], expected), (name, key)
                expected = original[f"{name}.{tensor}"].index_select(dim, index)
                assert torch.equal(student_state[f"{name}.{tensor}"], expected), (name, tensor)
                checked += 1
    assert checked > 20
    # what no unit owns is the teacher's, and the teacher itself is untouched
    for key in ("conv_in.weight", "conv_out.weight", "time_embedding.linear_1.weight",
                "down_blocks.0.resnets.0.conv2.bias", "down_blocks.0.attentions.0.proj_in.weight"):
        assert torch.equal(student_state[key], original[key]), key
    assert all(torch.equal(v, original[k]) for k, v in teacher.state_dict().items())


# ---------------------------------------------------------------------------------------------------- taylor
def _tied_slices(section, module, unit):
    """(parameter, dim, indices) of every weight removed with `unit`, written out per section for the test."""
    from safeprune_engine.models.pruned_unet import feedforward_layers

    if section == "resnets":
        per = module.conv1.out_channels // module.norm2.num_groups
        ch = list(range(unit * per, (unit + 1) * per))
        return [(module.conv1.weight, 0, ch), (module.conv1.bias, 0, ch), (module.norm2.weight, 0, ch),
                (module.norm2.bias, 0, ch), (module.time_emb_proj.weight, 0, ch), (module.time_emb_proj.bias, 0, ch),
                (module.conv2.weight, 1, ch)]
    if section == "attention":
        d = module.to_q.out_features // module.heads
        ch = list(range(unit * d, (unit + 1) * d))
        out = [(getattr(module, p).weight, 0, ch) for p in ("to_q", "to_k", "to_v")]
        return out + [(module.to_out[0].weight, 1, ch)]
    proj_in, proj_out, _ = feedforward_layers(module)
    inner = proj_out.in_features
    return [(proj_in.weight, 0, [unit, inner + unit]), (proj_in.bias, 0, [unit, inner + unit]),
            (proj_out.weight, 1, [unit])]


@pytest.mark.parametrize("section", ["resnets", "attention", "feedforward"])
def test_taylor_contribution_is_the_directional_derivative_of_removing_the_unit(section, gen):
    model = tiny_unet(seed=2).double()
    batch = inputs(model, gen)
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    target = torch.randn(batch["sample"].shape, generator=gen, dtype=torch.float64)

    def loss():
        return torch.nn.functional.mse_loss(model(**batch).sample, target)

    _, name, module, n = next(layer for layer in prunable_layers(model) if layer[0] == section)
    model.zero_grad()
    loss().backward()
    contributions = unit_contributions(section, module)
    assert contributions.shape == (n,)
    unit, eps = n - 1, 1e-6
    values = []
    with torch.no_grad():
        for scale in (1 + eps, 1 - eps):  # scale every weight tied to the unit: d/da L(a * unit) at a = 1
            saved = [(p, p.detach().clone()) for p, _, _ in _tied_slices(section, module, unit)]
            for p, dim, idx in _tied_slices(section, module, unit):
                p.index_copy_(dim, torch.tensor(idx), p.index_select(dim, torch.tensor(idx)) * scale)
            values.append(loss().item())
            for p, original in saved:
                p.copy_(original)
    derivative = (values[0] - values[1]) / (2 * eps)
    assert contributions[unit].item() == pytest.approx(derivative, rel=1e-5, abs=1e-10)


def test_taylor_scores_average_squared_contributions_and_drive_the_choice(gen):
    teacher = tiny_unet(seed=3).eval()
    batches = calibration(teacher, gen, batches=3)
    scores = taylor_scores(teacher, batches, ("resnets", "attention", "feedforward"))
    # by hand for one head layer: mean over batches of the squared per-batch contributions
    model = copy.deepcopy(teacher)
    section, name, module, n = next(layer for layer in prunable_layers(model) if layer[0] == "attention")
    expected = torch.zeros(n)
    for b in batches:
        model.zero_grad()
        pred = model(b.latents, b.timesteps, encoder_hidden_states=b.text_emb).sample
        torch.nn.functional.mse_loss(pred, b.target).backward()
        expected += unit_contributions(section, module).pow(2) / len(batches)
    torch.testing.assert_close(scores[(section, name)], expected, rtol=1e-4, atol=1e-12)
    assert all(torch.isfinite(s).all() and s.sum() > 0 for s in scores.values())

    student, report = prune_unet(teacher, "taylor", ratio=0.5, calibration=batches)
    assert report.method == "taylor" and report.importance == "taylor"
    for (section, name), score in scores.items():
        kept = report.kept[section].get(name)
        if kept is not None:
            assert kept == sorted(torch.topk(score, len(kept)).indices.tolist()), name
    # the same widths as magnitude pruning: only the choice of units differs
    magnitude, mreport = prune_unet(teacher, "magnitude", ratio=0.5)
    assert report.pruned_widths == mreport.pruned_widths and report.macs_after == mreport.macs_after
    assert report.kept != mreport.kept
    # the student is made of the teacher's own weights: every kept row of a head equals the teacher's row
    name = next(iter(report.kept["attention"]))
    heads = report.kept["attention"][name]
    d = teacher.get_submodule(name).to_q.out_features // teacher.get_submodule(name).heads
    rows = [h * d + i for h in heads for i in range(d)]
    torch.testing.assert_close(student.get_submodule(name).to_k.weight, teacher.get_submodule(name).to_k.weight[rows])
    # the teacher keeps no gradient and is unchanged
    assert all(p.grad is None for p in teacher.parameters())


def test_taylor_needs_calibration_data():
    with pytest.raises(SafepruneError, match="--data"):
        prune_unet(tiny_unet(), "taylor", ratio=0.5)


# -------------------------------------------------------------------------------------------------------- BK
def test_bk_configs_are_standard_diffusers_configs():
    teacher = tiny_unet(**SD_LIKE)
    base, small, tiny = (bk_config(teacher.config, v) for v in ("bk-base", "bk-small", "bk-tiny"))
    assert base["layers_per_block"] == 1 and base["mid_block_type"] == "UNetMidBlock2DCrossAttn"
    assert small["layers_per_block"] == 1 and small["mid_block_type"] is None
    assert tiny["block_out_channels"] == [16, 32] and tiny["mid_block_type"] is None
    assert tiny["down_block_types"] == ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert tiny["up_block_types"] == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
    assert not any(k.startswith("_") for k in tiny)


def test_bk_students_copy_the_teachers_weights_by_name(gen):
    teacher = tiny_unet(seed=4, **SD_LIKE).eval()
    sd = teacher.state_dict()
    sizes = []
    for variant in ("bk-base", "bk-small", "bk-tiny"):
        student, report = prune_unet(teacher, variant)
        assert type(student).__name__ == "UNet2DConditionModel" and report.ratio is None
        assert report.fresh == []  # equal innermost widths, as in SD: everything is copied
        st = student.state_dict()
        up = 1 if variant == "bk-tiny" else 0
        # the kept first pair, the second student pair from the teacher's third, shifted up blocks for tiny
        assert torch.equal(st["down_blocks.0.resnets.0.conv1.weight"], sd["down_blocks.0.resnets.0.conv1.weight"])
        assert torch.equal(st["down_blocks.1.attentions.0.proj_in.weight"], sd["down_blocks.1.attentions.0.proj_in.weight"])
        assert torch.equal(st[f"up_blocks.{2 - up}.resnets.1.conv1.weight"], sd["up_blocks.2.resnets.2.conv1.weight"])
        assert torch.equal(st[f"up_blocks.{2 - up}.attentions.1.proj_out.weight"],
                           sd["up_blocks.2.attentions.2.proj_out.weight"])
        assert torch.equal(st[f"up_blocks.{1 - up}.resnets.0.conv1.weight"], sd["up_blocks.1.resnets.0.conv1.weight"])
        assert torch.equal(st["conv_out.weight"], sd["conv_out.weight"])
        if variant == "bk-base":
            assert torch.equal(st["mid_block.resnets.1.conv2.weight"], sd["mid_block.resnets.1.conv2.weight"])
            assert "up_blocks.0.resnets.2.conv1.weight" not in st and "down_blocks.0.resnets.1.conv1.weight" not in st
        else:
            assert student.mid_block is None and "mid_block" in report.removed
        if variant == "bk-tiny":
            assert len(student.up_blocks) == 2 and "down_blocks.2" in report.removed and "up_blocks.0" in report.removed
            assert "down_blocks.1.downsamplers" in report.removed and student.down_blocks[1].downsamplers is None
        sizes.append((report.params_after, report.macs_after))
        assert report.params_after < report.params_before and report.macs_after < report.macs_before
        assert student(**inputs(student, gen)).sample.shape == (2, 4, 8, 8)
    assert sizes[0] > sizes[1] > sizes[2]  # base > small > tiny, in params and in MACs


def test_bk_tiny_keeps_fresh_init_only_where_teacher_shapes_differ():
    teacher = tiny_unet(seed=5).eval()  # 2 stages of different widths: the new innermost up block's input shrinks
    student, report = prune_unet(teacher, "bk-tiny")
    sd = teacher.state_dict()

    def source(key):  # student up_blocks.0 is the teacher's up_blocks.1 without its second pair
        if not key.startswith("up_blocks.0."):
            return key
        return "up_blocks.1." + re.sub(r"^(resnets|attentions)\.1\.", r"\1.2.", key[len("up_blocks.0."):])

    for key, tensor in student.state_dict().items():
        source_key = source(key)
        if key in report.fresh:
            assert sd[source_key].shape != tensor.shape, key
        else:
            assert torch.equal(sd[source_key], tensor), key
    assert report.fresh and all(k.startswith("up_blocks.0.resnets.0.") for k in report.fresh)


@pytest.mark.parametrize("variant", ["bk-base", "bk-small", "bk-tiny"])
def test_bk_student_loads_in_plain_diffusers_with_identical_outputs(variant, tmp_path, gen):
    from diffusers import UNet2DConditionModel

    student, _ = prune_unet(tiny_unet(seed=6, **SD_LIKE).eval(), variant)
    student.eval()
    student.save_pretrained(tmp_path / "unet", safe_serialization=True)
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert config["_class_name"] == "UNet2DConditionModel" and "pruned_widths" not in config
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    x = inputs(student, gen)
    with torch.no_grad():
        assert torch.equal(loaded(**x).sample, student(**x).sample)


def test_bk_refuses_what_it_cannot_do():
    with pytest.raises(SafepruneError, match="layers_per_block"):
        prune_unet(tiny_unet(layers_per_block=1), "bk-base")
    with pytest.raises(SafepruneError, match="target-macs"):
        prune_unet(tiny_unet(), "bk-small", target_macs=0.5)
    width_pruned, _ = prune(tiny_unet(), ratio=0.5)
    with pytest.raises(SafepruneError, match="width-pruned"):
        prune_unet(width_pruned, "bk-base")


def test_feature_pairs_follow_the_kept_stages(gen):
    from safeprune_engine.distill.features import pair_feature_blocks
    from safeprune_engine.run.builder import block_shapes

    teacher = tiny_unet(seed=4, **SD_LIKE).eval()
    student, _ = prune_unet(teacher, "bk-tiny")
    pairs = pair_feature_blocks(block_shapes(student, 8, (5, 32), "cpu"), block_shapes(teacher, 8, (5, 32), "cpu"))
    # student down_blocks.1 no longer downsamples (4x4 vs the teacher's 2x2): not distilled
    assert pairs == [("down_blocks.0", "down_blocks.0"), ("up_blocks.0", "up_blocks.1"), ("up_blocks.1", "up_blocks.2")]
    width, _ = prune(teacher, ratio=0.5)
    shapes = block_shapes(width, 8, (5, 32), "cpu")
    assert [s for s, _ in pair_feature_blocks(shapes, block_shapes(teacher, 8, (5, 32), "cpu"))] == list(shapes)


# ------------------------------------------------------------------------------------------- CLI and training
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from safeprune_engine.testing import save_tiny_pipeline, write_image_folder

    root = tmp_path_factory.mktemp("prune-world")
    return {"teacher": str(save_tiny_pipeline(root / "teacher", seed=0)),
            "data": str(write_image_folder(root / "data", ["a red square", "a blue square"] * 3, size=16))}


@pytest.mark.parametrize("method,extra", [("bk-tiny", []), ("taylor", ["--prune-ratio", "0.5"])])
def test_safeprune_prune_reports_and_exports(world, tmp_path, capsys, method, extra):
    from diffusers import StableDiffusionPipeline

    from safeprune_engine.cli import main

    out = tmp_path / "pruned"
    args = ["prune", "--teacher", world["teacher"], "--prune-method", method, "--out", str(out),
            "--latency-repeats", "2", *extra]
    if method == "taylor":
        assert main(args) == 2 and "--data" in capsys.readouterr().err and not out.exists()
        args += ["--data", world["data"], "--prune-calibration-batches", "2", "--batch-size", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "prune_report.json").read_text())
    assert f"{report['params_before']:,}" in printed and f"{report['params_after']:,}" in printed
    assert f"{report['macs_after']:,}" in printed and "latency ms" in printed
    assert report["latency_s_before"] > 0 and report["latency_s_after"] > 0 and report["method"] == method
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert sum(p.numel() for p in pipe.unet.parameters()) == report["params_after"] < report["params_before"]
    assert main(args) == 2 and "not empty" in capsys.readouterr().err  # refuses to overwrite


@pytest.mark.parametrize("method", ["taylor", "bk-small", "bk-tiny"])
def test_every_prune_method_trains_and_exports(world, tmp_path, method):
    from diffusers import UNet2DConditionModel

    from safeprune_engine.api import train
    from safeprune_engine.config import RunConfig

    config = RunConfig(teacher=world["teacher"], data=world["data"], erase=["by monet"], prune_method=method,
                       method="bilevel", steps=2, bilevel_inner_steps=1, batch_size=2, resolution=16,
                       esd_pool_size=2, esd_ddim_steps=2, prune_calibration_batches=2, progress=False, lr=1e-3,
                       out=str(tmp_path / "run"))
    result = train(config)
    assert result.prune_report["method"] == method and "loss/cu" in result.history[-1]
    unet_dir = result.pipeline_dir / "unet"
    loaded = (UNet2DConditionModel if method != "taylor" else type(result.student)).from_pretrained(unet_dir).eval()
    for (name, a), (_, b) in zip(loaded.state_dict().items(), result.student.state_dict().items()):
        assert torch.equal(a, b.cpu()), name


def test_the_readme_pruning_plugin_runs(world, tmp_path, monkeypatch, request):
    import re
    import sys
    from pathlib import Path

    from safeprune_engine.cli import main

    PRUNE_METHODS.names()  # discover the built-ins first: the copy below must hold them
    monkeypatch.setattr(PRUNE_METHODS, "_entries", dict(PRUNE_METHODS._entries))  # the registration ends with the test
    request.addfinalizer(lambda: sys.modules.pop("my_methods", None))

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if b.startswith("# my_methods.py"))
    (tmp_path / "my_methods.py").write_text(example)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "pruned"
    assert main(["prune", "--teacher", world["teacher"], "--plugins", "my_methods", "--prune-method", "random",
                 "--prune-ratio", "0.5", "--latency-repeats", "1", "--out", str(out)]) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["method"] == "random" and report["params_after"] < report["params_before"]
    magnitude = prune_unet(tiny_unet(seed=0), "magnitude", ratio=0.5)[1]
    assert report["pruned_widths"] == magnitude.pruned_widths and report["kept"] != magnitude.kept
