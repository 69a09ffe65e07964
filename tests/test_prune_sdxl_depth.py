"""SDXL depth pruning (--prune-method sdxl-depth-1.3b | sdxl-depth-1b | sdxl-depth-700m): real tiny diffusers UNets
with SDXL's structure and added conditioning, no mocks; the real-size SDXL UNet's variant sizes (slow, meta)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from safeprune_engine.errors import SafepruneError
from safeprune_engine.prune.base import PRUNE_METHODS, prune_unet
from safeprune_engine.prune.macs import count_macs
from safeprune_engine.prune.sdxl_depth import kept_layers, sdxl_depth_config, transformer_depths
from safeprune_engine.testing import tiny_unet

VARIANTS = ("sdxl-depth-1.3b", "sdxl-depth-1b", "sdxl-depth-700m")
POOLED, TIME_DIM = 16, 8
# SDXL's structure at tiny width: no attention in the outer stage, then 2 and 10 transformer layers, text_time
# added conditioning (pooled text embeds + 6 time ids, each embedded to addition_time_embed_dim)
SDXL_LIKE = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 4, 4),
    cross_attention_dim=32, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM,
)
# what each variant keeps of SDXL's (1, 2, 10): layers per block, deepest depth, mid block kept
EXPECTED = {"sdxl-depth-1.3b": (2, 4, True), "sdxl-depth-1b": (1, 6, True), "sdxl-depth-700m": (1, 5, False)}


def sdxl_like(seed: int = 0, **overrides):
    return tiny_unet(seed=seed, **{**SDXL_LIKE, **overrides}).eval()


def inputs(gen, batch=2, size=8):
    return dict(sample=torch.randn(batch, 4, size, size, generator=gen),
                timestep=torch.randint(0, 1000, (batch,), generator=gen),
                encoder_hidden_states=torch.randn(batch, 5, 32, generator=gen),
                added_cond_kwargs={"text_embeds": torch.randn(batch, POOLED, generator=gen),
                                   "time_ids": torch.randn(batch, 6, generator=gen) * 100})


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(11)


@pytest.fixture(scope="module")
def teacher():
    return sdxl_like(seed=3)


@pytest.fixture(scope="module")
def pruned(teacher):
    """{variant: (student, report)} of the module's teacher, pruned once per variant."""
    return {v: prune_unet(teacher, v) for v in VARIANTS}


def test_registry_lists_the_depth_methods_and_the_evenly_spaced_choice():
    assert set(VARIANTS) <= set(PRUNE_METHODS.names())
    assert kept_layers(10, 4) == [0, 3, 6, 9]
    assert kept_layers(10, 6) == [0, 2, 4, 5, 7, 9]
    assert kept_layers(10, 5) == [0, 2, 5, 7, 9]
    assert kept_layers(4, 2) == [0, 3] and kept_layers(7, 1) == [0] and kept_layers(3, 3) == [0, 1, 2]


@pytest.mark.parametrize("variant", VARIANTS)
def test_students_have_the_expected_plain_diffusers_configs(variant, pruned):
    student, report = pruned[variant]
    layers, deep, mid = EXPECTED[variant]
    assert type(student).__name__ == "UNet2DConditionModel" and report.ratio is None and report.method == variant
    assert student.config.layers_per_block == layers
    assert list(student.config.transformer_layers_per_block) == [1, 2, deep]
    assert (student.mid_block is not None) == mid
    depths = transformer_depths(student)
    assert depths["down_blocks.2.attentions.0"] == deep and depths["up_blocks.0.attentions.0"] == deep
    assert depths["down_blocks.1.attentions.0"] == 2 and depths["up_blocks.1.attentions.0"] == 2
    assert len(student.down_blocks[2].attentions) == layers and len(student.up_blocks[0].attentions) == layers + 1
    if mid:
        assert depths["mid_block.attentions.0"] == deep
    # SDXL's added conditioning and the time embedding are kept whole
    assert student.config.addition_embed_type == "text_time" and student.add_embedding is not None
    assert report.fresh == []


def test_kept_layers_and_conditioning_are_the_teachers_mapped_weights(teacher, pruned):
    sd = teacher.state_dict()
    tb = "transformer_blocks"
    down2, up0, up1, mid = "down_blocks.2.attentions", "up_blocks.0.attentions", "up_blocks.1.attentions", \
        "mid_block.attentions"
    expected = {  # student key -> teacher key, written out by hand
        "sdxl-depth-1.3b": {
            f"{down2}.0.{tb}.1.attn1.to_q.weight": f"{down2}.0.{tb}.3.attn1.to_q.weight",
            f"{down2}.1.{tb}.3.ff.net.2.weight": f"{down2}.1.{tb}.9.ff.net.2.weight",
            f"{up0}.2.{tb}.2.attn2.to_k.weight": f"{up0}.2.{tb}.6.attn2.to_k.weight",
            f"{mid}.0.{tb}.2.norm1.weight": f"{mid}.0.{tb}.6.norm1.weight",
            "down_blocks.2.resnets.1.conv1.weight": "down_blocks.2.resnets.1.conv1.weight",
            f"{up0}.1.proj_out.weight": f"{up0}.1.proj_out.weight",
        },
        "sdxl-depth-1b": {  # second pairs gone: student pair 1 of an up stage is the teacher's pair 2
            f"{down2}.0.{tb}.3.attn1.to_v.weight": f"{down2}.0.{tb}.5.attn1.to_v.weight",
            f"{up0}.1.{tb}.1.ff.net.0.proj.weight": f"{up0}.2.{tb}.2.ff.net.0.proj.weight",
            f"{mid}.0.{tb}.4.attn2.to_out.0.bias": f"{mid}.0.{tb}.7.attn2.to_out.0.bias",
            f"{up1}.1.{tb}.1.attn1.to_q.weight": f"{up1}.2.{tb}.1.attn1.to_q.weight",
            "up_blocks.2.resnets.1.conv2.weight": "up_blocks.2.resnets.2.conv2.weight",
        },
        "sdxl-depth-700m": {
            f"{down2}.0.{tb}.2.attn1.to_k.weight": f"{down2}.0.{tb}.5.attn1.to_k.weight",
            f"{up0}.1.{tb}.4.norm3.bias": f"{up0}.2.{tb}.9.norm3.bias",
            "up_blocks.0.resnets.1.conv_shortcut.weight": "up_blocks.0.resnets.2.conv_shortcut.weight",
        },
    }
    common = ["conv_in.weight", "conv_out.weight", "time_embedding.linear_1.weight", "time_embedding.linear_2.bias",
              "add_embedding.linear_1.weight", "add_embedding.linear_2.weight", f"{down2}.0.proj_in.weight",
              f"down_blocks.1.attentions.0.{tb}.1.attn2.to_v.weight", "down_blocks.0.downsamplers.0.conv.weight"]
    for variant, pairs in expected.items():
        st = pruned[variant][0].state_dict()
        for key, source in {**pairs, **{k: k for k in common}}.items():
            assert torch.equal(st[key], sd[source]), (variant, key, source)
    # what the variants remove, named in the report
    removed = {v: pruned[v][1].removed for v in VARIANTS}
    assert f"{down2}.0.{tb}.1" in removed["sdxl-depth-1.3b"] and f"{mid}.0.{tb}.8" in removed["sdxl-depth-1.3b"]
    assert f"{mid}.0.{tb}.9" not in removed["sdxl-depth-1.3b"]
    assert len(removed["sdxl-depth-1.3b"]) == 6 * 6  # 6 transformers of 10 layers keep 4
    assert {f"{down2}.1", "up_blocks.0.resnets.1", "down_blocks.0.resnets.1"} <= set(removed["sdxl-depth-1b"])
    assert "mid_block" in removed["sdxl-depth-700m"] and "mid_block" not in removed["sdxl-depth-1b"]
    assert not any(r.startswith("mid_block.") for r in removed["sdxl-depth-700m"])  # listed whole, not per layer


def test_the_1_3b_student_is_the_teacher_with_its_removed_layers_made_identities(teacher, gen):
    """A BasicTransformerBlock whose three residual branches end in zero (attn1/attn2 to_out, ff.net.2) is the
    identity; with every removed layer made so, the teacher computes exactly what the pruned student computes,
    which checks the kept layers, their order and the mapping of every tensor at once."""
    zeroed = copy.deepcopy(teacher)
    for name, n in transformer_depths(zeroed).items():
        if n != 10:
            continue
        for j, block in enumerate(zeroed.get_submodule(name).transformer_blocks):
            if j not in (0, 3, 6, 9):
                for layer in (block.attn1.to_out[0], block.attn2.to_out[0], block.ff.net[2]):
                    torch.nn.init.zeros_(layer.weight)
                    torch.nn.init.zeros_(layer.bias)
    student, _ = prune_unet(zeroed, "sdxl-depth-1.3b")
    x = inputs(gen)
    with torch.no_grad():
        expected, got = zeroed(**x).sample, student.eval()(**x).sample
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(teacher(**x).sample, expected, atol=1e-3)  # the removed layers did matter


@pytest.mark.parametrize("variant", VARIANTS)
def test_students_run_with_added_conditioning_and_reload_in_plain_diffusers(variant, teacher, pruned, tmp_path, gen):
    from diffusers import UNet2DConditionModel

    student, report = pruned[variant]
    student.eval()
    x = inputs(gen)
    with torch.no_grad():
        out = student(**x).sample
        assert out.shape == teacher(**x).sample.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    student.save_pretrained(tmp_path / "unet", safe_serialization=True)
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert config["_class_name"] == "UNet2DConditionModel" and "pruned_widths" not in config
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    with torch.no_grad():
        assert torch.equal(loaded(**x).sample, out)
    # smaller in params and MACs; MACs counted on meta copies equal a real hooked forward's
    assert report.params_after < report.params_before and report.macs_after < report.macs_before
    assert report.params_after == sum(p.numel() for p in student.parameters())
    assert report.macs_before == count_macs(teacher) and report.macs_after == count_macs(student)
    assert report.sample_size == 8 and "sdxl-depth" in report.summary()


def test_sizes_shrink_in_variant_order_and_mac_counts_follow_the_sample_size(teacher, pruned):
    sizes = [(pruned[v][1].params_after, pruned[v][1].macs_after) for v in VARIANTS]
    assert sizes[0][0] > sizes[1][0] > sizes[2][0] and sizes[0][1] > sizes[1][1] > sizes[2][1]
    before = copy.deepcopy(teacher.state_dict())
    _, report = prune_unet(teacher, "sdxl-depth-700m", sample_size=16)  # 128 px images
    assert report.sample_size == 16 and report.macs_after == count_macs(pruned["sdxl-depth-700m"][0], 16)
    assert report.macs_before > pruned["sdxl-depth-700m"][1].macs_before
    assert all(torch.equal(t, before[k]) for k, t in teacher.state_dict().items())  # the teacher is untouched


def test_a_half_precision_teacher_gives_a_student_in_its_dtype(teacher):
    half = copy.deepcopy(teacher).to(torch.bfloat16)
    student, report = prune_unet(half, "sdxl-depth-1b")
    assert all(p.dtype == torch.bfloat16 for p in student.parameters()) and report.fresh == []
    assert torch.get_default_dtype() == torch.float32  # built in bf16 directly, the default restored
    key = "mid_block.attentions.0.transformer_blocks.5.attn1.to_q.weight"
    assert torch.equal(student.state_dict()[key], half.state_dict()[key.replace(".5.", ".9.")])


def test_the_rule_scales_with_the_teachers_own_depth():
    """(1, 2, 4): the deepest transformers keep round(4 * k / 10) layers, k = 4, 6, 5 -> 2, 2, 2; per-layer
    config lists (an asymmetric teacher) keep their shape, minus the dropped pair's entries."""
    shallow = sdxl_like(transformer_layers_per_block=(1, 2, 4))
    for variant in VARIANTS:
        assert list(sdxl_depth_config(shallow, variant)["transformer_layers_per_block"]) == [1, 2, 2]
    asym = sdxl_like(seed=5, transformer_layers_per_block=[1, [2, 2], [10, 3]],
                     reverse_transformer_layers_per_block=[[10, 3, 10], [2, 2, 2], 1])
    config = sdxl_depth_config(asym, "sdxl-depth-1.3b")
    assert config["transformer_layers_per_block"] == [1, [2, 2], [4, 3]]
    assert config["reverse_transformer_layers_per_block"] == [[4, 3, 4], [2, 2, 2], 1]
    config = sdxl_depth_config(asym, "sdxl-depth-700m")
    assert config["transformer_layers_per_block"] == [1, [2], [5]]
    assert config["reverse_transformer_layers_per_block"] == [[5, 5], [2, 2], 1]
    student, report = prune_unet(asym, "sdxl-depth-1.3b")
    depths = transformer_depths(student)
    assert depths["down_blocks.2.attentions.1"] == 3 and depths["up_blocks.0.attentions.1"] == 3
    assert depths["mid_block.attentions.0"] == 4 and report.fresh == []
    assert torch.equal(student.state_dict()["up_blocks.0.attentions.1.transformer_blocks.2.attn1.to_q.weight"],
                       asym.state_dict()["up_blocks.0.attentions.1.transformer_blocks.2.attn1.to_q.weight"])


def test_depth_pruning_refuses_what_it_cannot_do():
    for variant in VARIANTS:  # SD-like: one layer per transformer, nothing to shorten
        with pytest.raises(SafepruneError, match=r"no Transformer2DModel with more than one layer.*"
                                                 r"transformer_layers_per_block > 1"):
            prune_unet(tiny_unet(), variant)
    with pytest.raises(SafepruneError, match="sdxl-depth-700m removes pairs like bk-small: .*layers_per_block=1"):
        prune_unet(sdxl_like(layers_per_block=1), "sdxl-depth-700m")
    with pytest.raises(SafepruneError, match="target-macs"):
        prune_unet(sdxl_like(), "sdxl-depth-1b", target_macs=0.5)


# the published UNet sizes the variants follow (model cards / papers), and how close the measured sizes must be
PUBLISHED = {"sdxl-depth-1.3b": (1.3e9, 0.05), "sdxl-depth-1b": (1.161e9, 0.02), "sdxl-depth-700m": (782e6, 0.02)}


@pytest.mark.slow
def test_real_size_sdxl_variants_match_the_published_sizes(record_property):
    """The real SDXL-base UNet config (2.57B) on the meta device (shapes only: exact params and MACs, no memory),
    each variant pruned through prune_unet with MACs at 1024x1024 px (128x128 latents) with added conditioning."""
    from diffusers import UNet2DConditionModel

    from safeprune_engine.models.sd_configs import unet_config

    with torch.device("meta"):
        sdxl = UNet2DConditionModel(**unet_config("sdxl"))
    for variant, (published, band) in PUBLISHED.items():
        _, report = prune_unet(sdxl, variant, sample_size=128)
        assert 2.55e9 < report.params_before < 2.58e9 and report.fresh == []
        assert abs(report.params_after / published - 1) < band, (variant, report.params_after)
        assert report.macs_after < report.macs_before
        print(f"{variant}: {report.params_after:,} params (published {published:,.0f}), "
              f"{report.macs_after:,} MACs at 1024 px ({report.macs_fraction:.1%} of SDXL's {report.macs_before:,})")
        record_property(f"{variant}_params", report.params_after)
        record_property(f"{variant}_macs", report.macs_after)


@pytest.mark.slow
def test_real_size_sdxl_students_copy_real_weights_and_run(record_property):
    """The real SDXL-base UNet with random bf16 weights (5.1 GB; built in bf16, never in fp32): each variant's
    student holds the teacher's tensors at the mapped names, stays in bf16 and runs one forward with added
    conditioning at 16x16 latents. Measured on a 2-core CPU: 43 s in all (15 s to build, 10-20 s per variant),
    7.9 GiB peak RSS."""
    import time

    from diffusers import UNet2DConditionModel

    from safeprune_engine.models.sd_configs import unet_config

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        torch.manual_seed(0)
        sdxl = UNet2DConditionModel(**unet_config("sdxl")).eval()
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator().manual_seed(0)
    x = dict(sample=torch.randn(1, 4, 16, 16, generator=gen), timestep=torch.tensor([500]),
             encoder_hidden_states=torch.randn(1, 8, 2048, generator=gen),
             added_cond_kwargs={"text_embeds": torch.randn(1, 1280, generator=gen),
                                "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]])})
    x = {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in x.items()}
    x["added_cond_kwargs"] = {k: v.bfloat16() for k, v in x["added_cond_kwargs"].items()}
    teacher_state = sdxl.state_dict()
    pairs = {  # student key -> teacher key at real size
        "sdxl-depth-1.3b": ("mid_block.attentions.0.transformer_blocks.3.ff.net.2.weight",
                            "mid_block.attentions.0.transformer_blocks.9.ff.net.2.weight"),
        "sdxl-depth-1b": ("up_blocks.0.attentions.1.transformer_blocks.5.attn2.to_k.weight",
                          "up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_k.weight"),
        "sdxl-depth-700m": ("down_blocks.2.attentions.0.transformer_blocks.2.attn1.to_out.0.weight",
                            "down_blocks.2.attentions.0.transformer_blocks.5.attn1.to_out.0.weight"),
    }
    for variant, (key, source) in pairs.items():
        started = time.perf_counter()
        student, report = prune_unet(sdxl, variant, sample_size=128)
        record_property(f"{variant}_prune_s", time.perf_counter() - started)
        state = student.state_dict()
        assert report.fresh == [] and all(p.dtype == torch.bfloat16 for p in student.parameters())
        assert torch.equal(state[key], teacher_state[source])
        assert torch.equal(state["add_embedding.linear_1.weight"], teacher_state["add_embedding.linear_1.weight"])
        with torch.no_grad():
            out = student.eval()(**x).sample
        assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()
        del student, state
