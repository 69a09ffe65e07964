"""patch_unet / unpatch_unet: patched UNets (dense tiny and pruned) agree with the unpatched ones in outputs and
gradients; unpatching restores the state dict and the outputs exactly; backends are forced by argument."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from safeprune_engine.errors import SafepruneError
from safeprune_engine.ops import dispatch
from safeprune_engine.ops.pruned_conv import PrunedConv2d
from safeprune_engine.patching import GroupNormSiLU, patch_unet, unpatch_unet
from safeprune_engine.testing import tiny_unet

OPS_VARIANTS = [("groupnorm_silu", "conv"), ("conv_prologue",), ("groupnorm_silu",), ("conv",)]
REL_TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def skip_unless(backend: str, *ops_names: str):
    for op in ops_names:
        reasons = dispatch.available_backends(op).get(backend, [f"no {backend} backend"])
        if reasons:
            pytest.skip(f"{backend} backend of {op} unavailable here: {'; '.join(reasons)}")


def unet_inputs(unet, batch: int = 2, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    sample = torch.randn(batch, unet.config.in_channels, size, size, generator=g).to(dtype)
    timestep = torch.randint(0, 1000, (batch,), generator=g)
    text = torch.randn(batch, 7, unet.config.cross_attention_dim, generator=g).to(dtype)
    return sample, timestep, text


def output_and_grads(unet, inputs):
    sample = inputs[0].clone().requires_grad_()
    out = unet(sample, *inputs[1:]).sample
    g = torch.Generator().manual_seed(9)
    upstream = torch.randn(out.shape, generator=g).to(out.dtype)
    params = [p for p in unet.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [sample] + params, upstream)
    return out.detach(), grads


def assert_rel(actual, expected, dtype, what):
    scale = expected.abs().max().item()
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= REL_TOL[dtype] * max(scale, 1e-12), f"{what}: max error {err:.3g} (max |ref| {scale:.3g})"


@pytest.fixture(scope="module")
def dense_unet():
    return tiny_unet(seed=0)


@pytest.fixture(scope="module")
def pruned_unet(dense_unet):
    from safeprune_engine.prune.width import prune

    student, _ = prune(dense_unet, ratio=0.5)
    # shrunk norm2 groups can leave 1-2 channels per group: different widths than the dense model (the point)
    assert any(w for w in student.pruned_widths["resnets"].values())
    return student


@pytest.mark.parametrize("which", ["dense", "pruned"])
@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("ops", OPS_VARIANTS, ids=lambda o: "+".join(o))
def test_patched_unet_matches_outputs_and_gradients(which, backend, ops, dense_unet, pruned_unet):
    if backend != "reference":
        skip_unless(backend, "pruned_conv", "groupnorm_silu")
    unet = dense_unet if which == "dense" else pruned_unet
    inputs = unet_inputs(unet)
    state_before = {k: v for k, v in unet.state_dict().items()}
    expected, expected_grads = output_and_grads(unet, inputs)

    record = patch_unet(unet, backend=backend, ops=ops)
    try:
        assert record.forwards and not record.skipped
        out, grads = output_and_grads(unet, inputs)
        assert_rel(out, expected, torch.float32, "output")
        assert len(grads) == len(expected_grads)
        for i, (grad, ref) in enumerate(zip(grads, expected_grads)):
            assert_rel(grad, ref, torch.float32, "grad sample" if i == 0 else f"grad parameter {i}")
    finally:
        unpatch_unet(unet, record)

    # exactly the original model again: same tensors under the same keys, bit-identical outputs
    state_after = unet.state_dict()
    assert list(state_after) == list(state_before)
    assert all(state_after[k].data_ptr() == v.data_ptr() and torch.equal(state_after[k], v)
               for k, v in state_before.items())
    again, _ = output_and_grads(unet, inputs)
    assert torch.equal(again, expected)


def test_record_lists_what_was_replaced_and_state_dict_keys_do_not_change(dense_unet):
    from diffusers.models.resnet import ResnetBlock2D

    keys = list(dense_unet.state_dict())
    convs = [name for name, m in dense_unet.named_modules() if isinstance(m, nn.Conv2d)]
    resnets = [name for name, m in dense_unet.named_modules() if isinstance(m, ResnetBlock2D)]
    record = patch_unet(dense_unet, backend="reference")
    try:
        assert [name for _, name in record.forwards] == resnets
        swapped_convs = [name for _, _, original, name in record.swapped if isinstance(original, nn.Conv2d)]
        assert sorted(swapped_convs) == sorted(convs)
        assert isinstance(dense_unet.down_blocks[0].resnets[0].conv1, PrunedConv2d)
        original_conv1 = next(orig for _, _, orig, name in record.swapped if name == "down_blocks.0.resnets.0.conv1")
        assert dense_unet.down_blocks[0].resnets[0].conv1.weight is original_conv1.weight
        assert isinstance(dense_unet.conv_norm_out, GroupNormSiLU) and isinstance(dense_unet.conv_act, nn.Identity)
        assert list(dense_unet.state_dict()) == keys  # shared parameters, same names
        assert "resnet forwards" in record.summary()
    finally:
        unpatch_unet(dense_unet, record)
    assert isinstance(dense_unet.down_blocks[0].resnets[0].conv1, nn.Conv2d)
    assert "forward" not in vars(dense_unet.down_blocks[0].resnets[0])


def test_parameters_are_shared_not_copied(dense_unet):
    conv = dense_unet.conv_in
    record = patch_unet(dense_unet, backend="reference", ops=("conv",))
    try:
        assert dense_unet.conv_in.weight is conv.weight and dense_unet.conv_in.bias is conv.bias
        with torch.no_grad():
            dense_unet.conv_in.weight.add_(0.0)  # an optimizer step on the patched model updates the original
        assert dense_unet.conv_in.weight.data_ptr() == conv.weight.data_ptr()
    finally:
        unpatch_unet(dense_unet, record)
    assert dense_unet.conv_in is conv


def test_bf16_patched_unet_within_bf16_tolerance():
    skip_unless("cpp", "pruned_conv", "groupnorm_silu")
    unet = tiny_unet(seed=3)
    inputs = unet_inputs(unet, seed=4)
    expected = unet(*inputs).sample.double()  # fp32 truth
    unet.to(torch.bfloat16)
    inputs_bf16 = unet_inputs(unet, seed=4, dtype=torch.bfloat16)
    torch_bf16 = unet(*inputs_bf16).sample.double()
    record = patch_unet(unet, backend="cpp")
    try:
        out = unet(*inputs_bf16).sample
    finally:
        unpatch_unet(unet, record)
    assert out.dtype == torch.bfloat16
    # the 2x-torch rule: the fused bf16 model is at most twice as far from fp32 as torch's own bf16 run
    torch_err = (torch_bf16 - expected).abs().max().item()
    err = (out.double() - expected).abs().max().item()
    assert err <= 2 * torch_err + 1e-3, (err, torch_err)


def test_triton_patched_forward_matches():
    unet = tiny_unet(seed=5)
    inputs = unet_inputs(unet, batch=1, seed=6)
    if dispatch.available_backends("pruned_conv", inputs[0], unet.conv_in.weight)["triton"]:
        pytest.skip("triton backend unavailable here: "
                    + "; ".join(dispatch.available_backends("pruned_conv", inputs[0], unet.conv_in.weight)["triton"]))
    with torch.no_grad():
        expected = unet(*inputs).sample
        record = patch_unet(unet, backend="triton", ops=("conv_prologue",))
        try:
            out = unet(*inputs).sample
        finally:
            unpatch_unet(unet, record)
    assert_rel(out, expected, torch.float32, "output")


def test_blocks_the_fused_forward_does_not_cover_are_left_alone():
    unet = tiny_unet(seed=0, resnet_time_scale_shift="scale_shift")
    inputs = unet_inputs(unet)
    with torch.no_grad():
        expected = unet(*inputs).sample
        record = patch_unet(unet, backend="reference")
        try:
            assert not record.forwards
            assert record.skipped and all("scale_shift" in why for _, why in record.skipped)
            out = unet(*inputs).sample  # convs still swapped (drop-in), resnet forwards original
        finally:
            unpatch_unet(unet, record)
    assert_rel(out, expected, torch.float32, "output")


def test_patch_errors(dense_unet, monkeypatch):
    with pytest.raises(SafepruneError, match="choose from"):
        patch_unet(dense_unet, ops=("attention",))
    with pytest.raises(SafepruneError, match="backend argument is 'fast'"):
        patch_unet(dense_unet, backend="fast")
    with pytest.raises(SafepruneError, match="UNet2DConditionModel"):
        patch_unet(nn.Linear(2, 2))
    if dispatch.available_backends("pruned_conv")["cuda"]:  # not built / CPU torch here
        with pytest.raises(SafepruneError, match="backend 'cuda' cannot run 'pruned_conv'"):
            patch_unet(dense_unet, backend="cuda")
    record = patch_unet(dense_unet, backend="reference")
    try:
        with pytest.raises(SafepruneError, match="already patched"):
            patch_unet(dense_unet)
        with pytest.raises(SafepruneError, match="another UNet"):
            unpatch_unet(tiny_unet(seed=1), record)
    finally:
        unpatch_unet(dense_unet, record)
    with pytest.raises(SafepruneError, match="already undone"):
        unpatch_unet(dense_unet, record)


# ----------------------------------------------------------------------------------------------- the engine
def test_training_run_with_cpp_kernels_matches_kernels_off(tmp_path):
    """Two steps of a full bilevel run (CLI) with --kernels cpp: the losses of --kernels off, within fp32 noise."""
    skip_unless("cpp", "pruned_conv", "groupnorm_silu")
    import json

    from safeprune_engine.cli import main
    from safeprune_engine.testing import save_tiny_pipeline, write_image_folder

    teacher = save_tiny_pipeline(tmp_path / "teacher", seed=0)
    data = write_image_folder(tmp_path / "data", ["a red square", "a blue square", "a green square"] * 2, size=16)
    histories = {}
    for kernels in ("off", "cpp"):
        out = tmp_path / f"run-{kernels}"
        assert main(["run", "--teacher", str(teacher), "--data", str(data), "--erase", "by monet", "--steps", "2",
                     "--prune-ratio", "0.5", "--resolution", "16", "--batch-size", "2", "--esd-pool-size", "2",
                     "--esd-ddim-steps", "2", "--bilevel-inner-steps", "1", "--log-every", "1", "--no-progress",
                     "--lr", "1e-3", "--out", str(out), "--kernels", kernels]) == 0
        histories[kernels] = json.loads((out / "summary.json").read_text())["history"]
    off, fused = histories["off"], histories["cpp"]
    assert len(off) == len(fused) == 2
    for row_off, row_fused in zip(off, fused):
        losses = [k for k in row_off if k.startswith("loss/")]
        assert losses
        for key in losses:
            assert row_fused[key] == pytest.approx(row_off[key], rel=1e-3, abs=1e-6), (row_off["step"], key)


def test_train_hands_back_unpatched_models(tmp_path):
    """--kernels patches the UNets for training only: train() returns plain diffusers modules."""
    skip_unless("cpp", "pruned_conv", "groupnorm_silu")
    from safeprune_engine.config import RunConfig
    from safeprune_engine.patching import _MARK
    from safeprune_engine.testing import save_tiny_pipeline, write_image_folder
    from safeprune_engine.run import train

    teacher = save_tiny_pipeline(tmp_path / "teacher", seed=0)
    data = write_image_folder(tmp_path / "data", ["a red square", "a blue square"] * 2, size=16)
    result = train(RunConfig(teacher=str(teacher), data=str(data), out=str(tmp_path / "run"), method="distill-only",
                             steps=1, batch_size=2, resolution=16, progress=False, kernels="cpp"))
    for unet in (result.student, result.teacher.unet):
        assert not hasattr(unet, _MARK)
        assert not any(type(m).__name__ == "PrunedConv2d" for m in unet.modules())


def test_kernels_setting_is_validated_and_not_an_identity_field():
    from safeprune_engine.config import IDENTITY_FIELDS, RunConfig

    assert "kernels" not in IDENTITY_FIELDS
    assert RunConfig().kernels == "auto"
    with pytest.raises(SafepruneError, match="unknown --kernels 'fast'"):
        RunConfig(method="distill-only", kernels="fast").validate()
    if dispatch.available_backends("pruned_conv")["cuda"]:
        with pytest.raises(SafepruneError, match="backend 'cuda' cannot run"):
            RunConfig(method="distill-only", kernels="cuda").validate()


def test_forced_kernels_are_refused_with_zero3_sharding_and_auto_does_not_patch():
    from safeprune_engine.config import RunConfig
    from safeprune_engine.patching import _MARK
    from safeprune_engine.run.builder import patch_kernels

    for zero in (dict(zero_stage=3), dict(teacher_zero3=True)):
        for forced in ("cpp", "triton", "cuda"):
            with pytest.raises(SafepruneError, match="ZeRO-3|cannot run"):
                RunConfig(method="distill-only", kernels=forced, **zero).validate()
        config = RunConfig(method="distill-only", **zero).validate()  # the default, auto, is not refused
        assert config.kernels == "auto" and not config.patches_kernels
        unet = tiny_unet(seed=0)
        assert patch_kernels(config, unet, unet) == [] and not hasattr(unet, _MARK)
    assert RunConfig(method="distill-only").patches_kernels
    assert not RunConfig(method="distill-only", kernels="off").patches_kernels


@pytest.mark.parametrize("backward", [True, False])
def test_patch_if_faster_keeps_the_patch_only_when_the_whole_unet_wins(backward):
    """The model-level check of --kernels auto: the decision follows the timing against the margin (a margin no
    timing can meet leaves the UNet exactly as it was; one every timing meets keeps the patch), outputs stay the
    same either way and the timing leaves no gradients behind."""
    from safeprune_engine.patching import patch_unet_if_faster

    unet = tiny_unet(seed=3).train(backward)
    latents, timesteps, text = unet_inputs(unet)
    with torch.no_grad():
        before = unet(latents, timesteps, encoder_hidden_states=text).sample
    kwargs = {"encoder_hidden_states": text}

    record, timing = patch_unet_if_faster(unet, (latents, timesteps), kwargs, backward=backward, margin=0.999)
    assert record is None and not timing.pays_off(0.999) and timing.plain_s > 0 and timing.patched_s > 0
    assert getattr(unet, "_safeprune_patch_record", None) is None
    assert not any(isinstance(m, (PrunedConv2d, GroupNormSiLU)) for m in unet.modules())
    assert all(p.grad is None for p in unet.parameters())

    record, timing = patch_unet_if_faster(unet, (latents, timesteps), kwargs, backward=backward, margin=-1e9)
    assert record is not None and timing.pays_off(-1e9) and "fused ops kept" in timing.summary(True)
    assert any(isinstance(m, PrunedConv2d) for m in unet.modules())
    assert all(p.grad is None for p in unet.parameters())
    with torch.no_grad():
        after = unet(latents, timesteps, encoder_hidden_states=text).sample
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    unpatch_unet(unet, record)


def test_whole_unet_decision_is_timed_once_then_cached(monkeypatch):
    """--kernels auto's per-UNet decision: timed on the first run, stored with the ops' decisions per device and
    taken from there afterwards (so a rerun patches the same way), never timed with SAFEPRUNE_AUTOTUNE=0."""
    import safeprune_engine.patching as patching
    from safeprune_engine.config import RunConfig
    from safeprune_engine.ops import autotune
    from safeprune_engine.run.builder import fused_ops_pay_off

    unet = tiny_unet(seed=4).train()
    sample = unet_inputs(unet)
    config = RunConfig()
    keep, why = fused_ops_pay_off(config, unet, sample, backward=True)
    assert "timed now" in why and ("not kept" in why) != keep
    assert all(p.grad is None for p in unet.parameters())
    assert getattr(unet, "_safeprune_patch_record", None) is None  # deciding leaves the UNet as it was

    def no_timing(*args, **kwargs):
        raise AssertionError("timed again although the decision was cached")

    monkeypatch.setattr(patching, "time_patched_unet", no_timing)
    autotune.cache().clear_memory()  # from disk this time
    again, why_again = fused_ops_pay_off(config, unet, sample, backward=True)
    assert again == keep and "cached" in why_again
    # a different input shape is another decision
    with pytest.raises(AssertionError, match="timed again"):
        fused_ops_pay_off(config, unet, unet_inputs(unet, batch=3), backward=True)
    monkeypatch.setenv("SAFEPRUNE_AUTOTUNE", "0")
    assert fused_ops_pay_off(config, unet, unet_inputs(unet, batch=3), backward=True)[0] is True
