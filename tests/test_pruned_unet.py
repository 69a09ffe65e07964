"""PrunedUNet2DConditionModel: widths in the config, rebuild from config, safetensors and pipeline round trips."""
from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safeprune_engine.errors import SafepruneError
from safeprune_engine.models.pruned_unet import PrunedUNet2DConditionModel
from safeprune_engine.prune.width import prune
from safeprune_engine.testing import tiny_pipeline, tiny_unet, tiny_unet_config

ROUNDTRIP_ATOL = 5e-5
REPO = Path(__file__).resolve().parents[1]

EXAMPLE_WIDTHS = {
    "resnets": {"down_blocks.0.resnets.0": {"conv1_out": 24, "norm2_groups": 6}},
    "attention": {"down_blocks.0.attentions.0.transformer_blocks.0.attn1": {"heads": 3}},
    "feedforward": {"mid_block.attentions.0.transformer_blocks.0.ff": {"inner": 96}},
}


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(99)


def unet_inputs(gen, batch=2, text_len=6):
    return dict(
        sample=torch.randn(batch, 4, 8, 8, generator=gen),
        timestep=torch.randint(0, 1000, (batch,), generator=gen),
        encoder_hidden_states=torch.randn(batch, text_len, 32, generator=gen),
    )


@pytest.fixture
def student():
    model, _ = prune(tiny_unet(seed=5), ratio=0.5)
    return model.eval()


def test_config_records_every_unet_argument_and_the_widths():
    from diffusers import UNet2DConditionModel

    model = PrunedUNet2DConditionModel(**tiny_unet_config(), pruned_widths=EXAMPLE_WIDTHS)
    unet_args = set(inspect.signature(UNet2DConditionModel.__init__).parameters) - {"self"}
    assert unet_args <= set(model.config)
    assert model.config.block_out_channels == (32, 64) and model.config.attention_head_dim == 4
    assert model.config.pruned_widths == EXAMPLE_WIDTHS == model.pruned_widths

    # the property hands out a copy: editing it does not touch the record
    widths = model.pruned_widths
    widths["attention"].clear()
    assert model.pruned_widths == EXAMPLE_WIDTHS

    # shapes follow the record; unlisted layers keep their dense size
    r = model.get_submodule("down_blocks.0.resnets.0")
    assert (r.conv1.out_channels, r.norm2.num_channels, r.norm2.num_groups, r.conv2.in_channels) == (24, 24, 6, 24)
    assert r.time_emb_proj.out_features == 24 and r.conv2.out_channels == 32
    a = model.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1")
    assert a.heads == 3 and a.to_q.out_features == a.to_k.out_features == a.to_out[0].in_features == 24
    ff = model.get_submodule("mid_block.attentions.0.transformer_blocks.0.ff")
    assert ff.net[0].proj.out_features == 192 and ff.net[2].in_features == 96
    dense = model.get_submodule("down_blocks.0.resnets.1")
    assert dense.conv1.out_channels == 32 and dense.norm2.num_groups == 8

    # from_config rebuilds the same structure
    again = PrunedUNet2DConditionModel.from_config(model.config)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "widths, match",
    [
        ({"blocks": {}}, "unknown sections"),
        ({"resnets": {"down_blocks.9.resnets.0": {"conv1_out": 8, "norm2_groups": 2}}}, "not a module"),
        ({"attention": {"down_blocks.0.resnets.0": {"heads": 2}}}, "not Attention"),
        ({"attention": {"down_blocks.0.attentions.0.transformer_blocks.0.attn1": {"head": 2}}}, "exactly the keys"),
        ({"feedforward": {"mid_block.attentions.0.transformer_blocks.0.ff": {"inner": 0}}}, "int >= 1"),
        ({"resnets": {"down_blocks.0.resnets.0": {"conv1_out": 25, "norm2_groups": 6}}}, "whole number"),
    ],
)
def test_bad_widths_raise(widths, match):
    with pytest.raises(SafepruneError, match=match):
        PrunedUNet2DConditionModel(**tiny_unet_config(), pruned_widths=widths)


@pytest.mark.parametrize("low_cpu_mem_usage", [True, False])
def test_safetensors_roundtrip(student, gen, tmp_path, low_cpu_mem_usage):
    student.save_pretrained(tmp_path, safe_serialization=True)
    files = {p.name for p in tmp_path.iterdir()}
    assert "diffusion_pytorch_model.safetensors" in files and not any(f.endswith((".bin", ".pt")) for f in files)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "PrunedUNet2DConditionModel"
    assert config["pruned_widths"] == student.pruned_widths

    loaded = PrunedUNet2DConditionModel.from_pretrained(tmp_path, low_cpu_mem_usage=low_cpu_mem_usage).eval()
    assert type(loaded) is PrunedUNet2DConditionModel
    assert loaded.pruned_widths == student.pruned_widths
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in student.state_dict().items()}
    inputs = unet_inputs(gen)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).sample, student(**inputs).sample, atol=ROUNDTRIP_ATOL, rtol=0)


def test_from_unet_wraps_without_copying(gen):
    from safeprune_engine.prune.width import prune_attention_heads

    dense = tiny_unet(seed=2).eval()
    name = "up_blocks.1.attentions.2.transformer_blocks.0.attn2"
    prune_attention_heads(dense.get_submodule(name), [1, 3])
    widths = {"attention": {name: {"heads": 2}}}
    wrapped = PrunedUNet2DConditionModel.from_unet(dense, widths)
    assert isinstance(wrapped, PrunedUNet2DConditionModel) and not wrapped.training
    assert wrapped.pruned_widths["attention"] == widths["attention"]
    assert wrapped.get_submodule(name).to_q.weight.data_ptr() == dense.get_submodule(name).to_q.weight.data_ptr()
    inputs = unet_inputs(gen)
    with torch.no_grad():
        assert torch.equal(wrapped(**inputs).sample, dense(**inputs).sample)
    # defaults to the source's own record when it is already a PrunedUNet2DConditionModel
    assert PrunedUNet2DConditionModel.from_unet(wrapped).pruned_widths == wrapped.pruned_widths

    with pytest.raises(SafepruneError, match="do not describe"):
        PrunedUNet2DConditionModel.from_unet(dense, {"attention": {name: {"heads": 3}}})


def test_pruning_a_pruned_model_merges_widths(student):
    again, report = prune(student, ratio=0.5, parts=("feedforward",))
    assert type(again) is PrunedUNet2DConditionModel
    first, second = student.pruned_widths, again.pruned_widths
    assert second["resnets"] == first["resnets"] and second["attention"] == first["attention"]
    for name, spec in first["feedforward"].items():
        assert second["feedforward"][name] == {"inner": spec["inner"] // 2}
    assert report.macs_before > report.macs_after


def pipeline_with(student):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**{**tiny_pipeline(seed=1).components, "unet": student})


@pytest.mark.parametrize("library", ["as saved", "safeprune_engine.models.pruned_unet"])
def test_pipeline_roundtrip(student, gen, tmp_path, library):
    from diffusers import StableDiffusionPipeline

    pipeline_with(student).save_pretrained(tmp_path, safe_serialization=True)
    index_path = tmp_path / "model_index.json"
    index = json.loads(index_path.read_text())
    assert index["unet"] == ["safeprune_engine", "PrunedUNet2DConditionModel"]
    if library != "as saved":  # the submodule path is also a valid record
        index["unet"] = [library, "PrunedUNet2DConditionModel"]
        index_path.write_text(json.dumps(index))
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").exists()

    loaded = StableDiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    assert isinstance(loaded.unet, PrunedUNet2DConditionModel)
    assert loaded.unet.pruned_widths == student.pruned_widths
    inputs = unet_inputs(gen)
    with torch.no_grad():
        torch.testing.assert_close(loaded.unet(**inputs).sample, student(**inputs).sample, atol=ROUNDTRIP_ATOL, rtol=0)


def test_pipeline_loads_in_a_fresh_process(student, gen, tmp_path):
    # diffusers only resolves non-diffusers libraries already in sys.modules; `import safeprune_engine` must do
    pipeline_with(student).save_pretrained(tmp_path, safe_serialization=True)
    inputs = unet_inputs(gen, batch=1)
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = student(**inputs).sample
    script = (
        "import sys, torch, safeprune_engine\n"
        "from diffusers import StableDiffusionPipeline\n"
        "p = StableDiffusionPipeline.from_pretrained(sys.argv[1], local_files_only=True)\n"
        "assert type(p.unet).__name__ == 'PrunedUNet2DConditionModel', type(p.unet)\n"
        "with torch.no_grad():\n"
        "    out = p.unet(**torch.load(sys.argv[1] + '/inputs.pt', weights_only=True)).sample\n"
        "torch.save(out, sys.argv[1] + '/out.pt')\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "out.pt", weights_only=True), expected, atol=ROUNDTRIP_ATOL, rtol=0)
