"""load_teacher / TeacherBundle: round trip, prediction types, fingerprints, and every refused input."""
import json
import shutil
import types

import pytest
import torch

from safeprune_engine.errors import SafepruneError
from safeprune_engine.models.teacher import TeacherBundle, bundle_from_pipeline, load_teacher
from safeprune_engine.testing import TOLERANCES, save_tiny_pipeline, tiny_pipeline

ATOL, RTOL = TOLERANCES[torch.float32]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An in-memory tiny pipeline and the folder it was saved to."""
    pipe = tiny_pipeline(seed=0)
    path = tmp_path_factory.mktemp("teacher") / "sd"
    pipe.save_pretrained(path, safe_serialization=True)
    return pipe, path


@pytest.fixture
def copy_of(saved, tmp_path):
    """A private copy of the saved pipeline folder, for tests that break it."""
    dst = tmp_path / "sd"
    shutil.copytree(saved[1], dst)
    return dst


@pytest.fixture
def no_weight_loading(monkeypatch):
    """Makes any weight load fail loudly: bad inputs must be refused before weights are read."""
    import diffusers
    import transformers

    def boom(*args, **kwargs):
        raise AssertionError("weights were loaded before the input was validated")

    for cls in (diffusers.UNet2DConditionModel, diffusers.AutoencoderKL, transformers.CLIPTextModel):
        monkeypatch.setattr(cls, "from_pretrained", boom)


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_round_trip_matches_in_memory_pipeline(saved):
    pipe, path = saved
    bundle = load_teacher(path)
    assert isinstance(bundle, TeacherBundle)
    assert bundle.source == str(path) and bundle.prediction_type == "epsilon"
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    ids = pipe.tokenizer(["a red square", ""], padding="max_length", max_length=32, return_tensors="pt").input_ids
    images = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        emb = pipe.text_encoder(ids)[0]
        torch.testing.assert_close(bundle.text_encoder(ids)[0], emb, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(
            bundle.unet(latents, t, emb).sample, pipe.unet(latents, t, emb).sample, atol=ATOL, rtol=RTOL
        )
        torch.testing.assert_close(
            bundle.vae.encode(images).latent_dist.mean, pipe.vae.encode(images).latent_dist.mean, atol=ATOL, rtol=RTOL
        )
    assert bundle.tokenizer("a red square").input_ids == pipe.tokenizer("a red square").input_ids
    assert bundle.tokenizer.model_max_length == 32
    assert type(bundle.scheduler).__name__ == "DDIMScheduler"
    for module in (bundle.unet, bundle.vae, bundle.text_encoder):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())


def test_dtype_argument(saved):
    bundle = load_teacher(saved[1], dtype=torch.float64)
    for module in (bundle.unet, bundle.vae, bundle.text_encoder):
        assert {p.dtype for p in module.parameters()} == {torch.float64}
    assert bundle.dtype == torch.float64 and bundle.device.type == "cpu"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_prediction_type_and_noise_scheduler(tmp_path, prediction_type):
    bundle = load_teacher(save_tiny_pipeline(tmp_path / "sd", prediction_type=prediction_type))
    assert bundle.prediction_type == prediction_type
    ns = bundle.noise_scheduler()
    assert type(ns).__name__ == "DDPMScheduler"
    assert ns.config.prediction_type == prediction_type
    torch.testing.assert_close(ns.alphas_cumprod, bundle.scheduler.alphas_cumprod)
    # the scaled_linear schedule the teacher was trained with, not DDPM's default linear one
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    acp = torch.cumprod(1 - betas, 0).float()
    torch.testing.assert_close(ns.alphas_cumprod, acp)
    x, n, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([0, 999])
    a = acp[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - acp[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(ns.add_noise(x, n, t), a * x + s * n)
    torch.testing.assert_close(ns.get_velocity(x, n, t), a * n - s * x)


def test_bundle_from_pipeline():
    pipe = tiny_pipeline(prediction_type="v_prediction")
    pipe.unet.train()
    bundle = bundle_from_pipeline(pipe)
    assert bundle.unet is pipe.unet and bundle.prediction_type == "v_prediction"
    assert not pipe.unet.training and not any(p.requires_grad for p in pipe.unet.parameters())
    assert bundle.source == "<in-memory pipeline>"


def test_bundle_from_pipeline_refusals():
    with pytest.raises(SafepruneError, match="'sample' is not supported"):
        bundle_from_pipeline(tiny_pipeline(prediction_type="sample"))
    pipe = tiny_pipeline()
    fake_xl = types.SimpleNamespace(
        unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
        scheduler=pipe.scheduler, text_encoder_2=pipe.text_encoder,
    )
    with pytest.raises(SafepruneError, match="missing required components: tokenizer_2"):
        bundle_from_pipeline(fake_xl)
    fake_missing = types.SimpleNamespace(unet=pipe.unet, vae=None, text_encoder=pipe.text_encoder,
                                         tokenizer=None, scheduler=pipe.scheduler)
    with pytest.raises(SafepruneError, match="missing required components: vae, tokenizer"):
        bundle_from_pipeline(fake_missing)


def test_fingerprints(saved, tmp_path):
    pipe, path = saved
    a, b = load_teacher(path), load_teacher(path)
    names = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    fa = {n: a.fingerprint(n) for n in names}
    assert fa == {n: b.fingerprint(n) for n in names}
    assert len(set(fa.values())) == 5 and all(len(v) == 16 for v in fa.values())
    # moving to another device keeps weights; here .to("cpu") is the portable stand-in
    a.vae.to("cpu")
    assert a.fingerprint("vae") == fa["vae"]
    # in-place edit of a loaded (disk-hashed) module is seen
    with torch.no_grad():
        a.vae.encoder.conv_in.weight.mul_(1.5)
    assert a.fingerprint("vae") != fa["vae"]
    # a cast changes the fingerprint
    b.text_encoder.to(torch.float64)
    assert b.fingerprint("text_encoder") != fa["text_encoder"]
    # other weights, other fingerprint; same tokenizer, same fingerprint
    other = load_teacher(save_tiny_pipeline(tmp_path / "other", seed=1))
    assert other.fingerprint("vae") != fa["vae"]
    assert other.fingerprint("tokenizer") == fa["tokenizer"]
    # in-memory bundles hash tensor bytes: deterministic and edit-sensitive
    m1, m2 = bundle_from_pipeline(tiny_pipeline(seed=0)), bundle_from_pipeline(tiny_pipeline(seed=0))
    assert m1.fingerprint("vae") == m2.fingerprint("vae")
    with torch.no_grad():
        m1.vae.decoder.conv_out.bias.add_(0.1)
    assert m1.fingerprint("vae") != m2.fingerprint("vae")
    with pytest.raises(SafepruneError, match="unknown teacher component 'safety_checker'"):
        a.fingerprint("safety_checker")


# --- bad inputs -----------------------------------------------------------------------------------------------


def test_missing_path(tmp_path, no_weight_loading):
    with pytest.raises(SafepruneError, match="does not exist"):
        load_teacher(tmp_path / "nope")


def test_path_is_a_file(tmp_path, no_weight_loading):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(SafepruneError, match="is a file"):
        load_teacher(f)


def test_missing_model_index(copy_of, no_weight_loading):
    (copy_of / "model_index.json").unlink()
    with pytest.raises(SafepruneError, match="no model_index.json"):
        load_teacher(copy_of)


def test_bad_model_index_json(copy_of, no_weight_loading):
    (copy_of / "model_index.json").write_text("{not json")
    with pytest.raises(SafepruneError, match="not valid JSON"):
        load_teacher(copy_of)


def test_missing_components_all_named(copy_of, no_weight_loading):
    shutil.rmtree(copy_of / "vae")
    shutil.rmtree(copy_of / "tokenizer")
    with pytest.raises(SafepruneError) as err:
        load_teacher(copy_of)
    msg = str(err.value)
    assert "missing required components" in msg
    assert "vae (no vae/ folder)" in msg and "tokenizer (no tokenizer/ folder)" in msg
    assert "unet (" not in msg and "text_encoder (" not in msg


def test_missing_weights_and_unlisted_component(copy_of, no_weight_loading):
    (copy_of / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    _edit_json(copy_of / "model_index.json", scheduler=[None, None])
    with pytest.raises(SafepruneError) as err:
        load_teacher(copy_of)
    assert "unet (no weight file in unet/)" in str(err.value)
    assert "scheduler (not listed in model_index.json)" in str(err.value)


@pytest.mark.parametrize("variant", ["pipeline_class", "text_encoder_2", "addition_embed_type"])
def test_sdxl_folder_without_its_second_encoder_is_named(copy_of, no_weight_loading, variant):
    """A folder that looks like SDXL (by its class, its index or its UNet) must have SDXL's second encoder."""
    if variant == "pipeline_class":
        _edit_json(copy_of / "model_index.json", _class_name="StableDiffusionXLPipeline")
    elif variant == "text_encoder_2":
        _edit_json(copy_of / "model_index.json", text_encoder_2=["transformers", "CLIPTextModelWithProjection"])
    else:
        _edit_json(copy_of / "unet" / "config.json", addition_embed_type="text_time")
    with pytest.raises(SafepruneError, match="missing required components: text_encoder_2 .*tokenizer_2 .*A Stable "
                                             "Diffusion XL pipeline folder needs"):
        load_teacher(copy_of)


def test_sdxl_refiner_and_other_xl_pipelines_refused(copy_of, no_weight_loading):
    _edit_json(copy_of / "model_index.json", _class_name="StableDiffusionXLImg2ImgPipeline", text_encoder=[None, None],
               tokenizer=[None, None], requires_aesthetics_score=True)
    with pytest.raises(SafepruneError, match="the SDXL refiner \\(it has no text_encoder and no tokenizer\\) is not "
                                             "supported: among SDXL pipelines only the base model"):
        load_teacher(copy_of)
    _edit_json(copy_of / "model_index.json", _class_name="StableDiffusionXLPipeline")
    with pytest.raises(SafepruneError, match="SDXL refiner UNet"):
        load_teacher(copy_of)
    _edit_json(copy_of / "model_index.json", requires_aesthetics_score=False)
    _edit_json(copy_of / "unet" / "config.json", addition_embed_type="image")
    with pytest.raises(SafepruneError, match="addition_embed_type 'image' is not supported"):
        load_teacher(copy_of)


def test_non_conditional_unet_refused(copy_of, no_weight_loading):
    _edit_json(copy_of / "model_index.json", unet=["diffusers", "UNet2DModel"])
    with pytest.raises(SafepruneError, match="unet class is UNet2DModel, but only UNet2DConditionModel"):
        load_teacher(copy_of)


def test_transformer_pipeline_refused(copy_of, no_weight_loading):
    index = json.loads((copy_of / "model_index.json").read_text())
    index.pop("unet")
    index.update(_class_name="PixArtAlphaPipeline", transformer=["diffusers", "PixArtTransformer2DModel"])
    (copy_of / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(SafepruneError, match="transformer denoiser, not a UNet"):
        load_teacher(copy_of)


def test_other_vae_refused(copy_of, no_weight_loading):
    _edit_json(copy_of / "vae" / "config.json", _class_name="AutoencoderTiny")
    with pytest.raises(SafepruneError, match="vae class is AutoencoderTiny, but only AutoencoderKL"):
        load_teacher(copy_of)


@pytest.mark.parametrize("prediction_type", ["sample", "flow_prediction"])
def test_unsupported_prediction_type(copy_of, no_weight_loading, prediction_type):
    _edit_json(copy_of / "scheduler" / "scheduler_config.json", prediction_type=prediction_type)
    with pytest.raises(SafepruneError, match=f"prediction_type '{prediction_type}' is not supported"):
        load_teacher(copy_of)


def test_missing_prediction_type_defaults_to_epsilon(copy_of):
    config = json.loads((copy_of / "scheduler" / "scheduler_config.json").read_text())
    config.pop("prediction_type")
    (copy_of / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    assert load_teacher(copy_of).prediction_type == "epsilon"


def test_uncached_hub_id_offline(monkeypatch, tmp_path, no_weight_loading):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # so the id cannot resolve to a local folder
    with pytest.raises(SafepruneError, match="not in the hub cache, and HF_HUB_OFFLINE=1"):
        load_teacher("safeprune-tests/no-such-model")


def test_weight_loading_guard_is_effective(copy_of, no_weight_loading):
    # keeps the "refused before loading weights" tests honest: a valid folder does reach the (patched) loaders
    with pytest.raises(AssertionError, match="weights were loaded"):
        load_teacher(copy_of)
