"""ImageFolder validation and loading; the latent/text cache: correctness, reuse, invalidation, crash safety."""
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from safeprune_engine.data.cache import MANIFEST, LatentCache, build_latent_cache, encode_prompts
from safeprune_engine.data.imagefolder import ImageFolder
from safeprune_engine.errors import SafepruneError
from safeprune_engine.models.teacher import bundle_from_pipeline, load_teacher
from safeprune_engine.testing import TOLERANCES, save_tiny_pipeline, tiny_pipeline, write_image_folder

ATOL, RTOL = TOLERANCES[torch.float32]
CAPTIONS = ["a red square", "a green square", "a blue square", "", "a yellow square by Monet", "a red circle",
            "a blue circle"]
CACHE_LOGGER = "safeprune_engine.data.cache"


@pytest.fixture
def bundle():
    return bundle_from_pipeline(tiny_pipeline(seed=0))


@pytest.fixture
def folder(tmp_path):
    return ImageFolder(write_image_folder(tmp_path / "data", CAPTIONS))


def count_encodes(monkeypatch, bundle, fail_on_call=None):
    """Wraps vae.encode to count calls (and optionally raise on call number `fail_on_call`)."""
    calls = []
    original = bundle.vae.encode

    def encode(x, *args, **kwargs):
        calls.append(x.shape[0])
        if fail_on_call is not None and len(calls) == fail_on_call:
            raise RuntimeError("simulated crash mid-pass")
        return original(x, *args, **kwargs)

    monkeypatch.setattr(bundle.vae, "encode", encode)
    return calls


def direct_latents(bundle, folder, i, resolution):
    with torch.no_grad():
        return bundle.vae.encode(folder.load_image(i, resolution)[None]).latent_dist


def direct_text(bundle, caption):
    tok = bundle.tokenizer
    ids = tok([caption], padding="max_length", truncation=True, max_length=tok.model_max_length,
              return_tensors="pt").input_ids
    with torch.no_grad():
        return bundle.text_encoder(ids)[0][0]


# --- ImageFolder ----------------------------------------------------------------------------------------------


def test_image_folder_basics(folder):
    assert len(folder) == 7 and folder.captions == CAPTIONS
    img = folder.load_image(0, 16)
    assert img.shape == (3, 16, 16) and img.dtype == torch.float32
    assert img.min() >= -1 and img.max() <= 1
    # the centre of image 0 is the red square (220, 40, 40)
    torch.testing.assert_close(img[:, 8, 8], torch.tensor([220, 40, 40]) / 127.5 - 1)


def test_load_image_resizes_shorter_side_and_center_crops(tmp_path):
    # 40x20: blue | red (middle 20 columns) | green; resized to 20x10 and cropped to the middle 10x10 = red
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :10] = (0, 0, 255)
    pixels[:, 10:30] = (255, 0, 0)
    pixels[:, 30:] = (0, 255, 0)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    Image.fromarray(pixels.transpose(1, 0, 2).copy()).save(tmp_path / "tall.png")
    Image.fromarray(np.full((4, 6), 128, dtype=np.uint8), mode="L").save(tmp_path / "grey.png")
    lines = [{"file_name": n, "text": ""} for n in ("wide.png", "tall.png", "grey.png")]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    ds = ImageFolder(tmp_path)
    red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1)
    wide = ds.load_image(0, 10)
    assert wide.shape == (3, 10, 10)
    torch.testing.assert_close(wide[:, :, 2:8], red.expand(3, 10, 6), atol=0.02, rtol=0)
    tall = ds.load_image(1, 10)
    torch.testing.assert_close(tall[:, 2:8, :], red.expand(3, 6, 10), atol=0.02, rtol=0)
    grey = ds.load_image(2, 8)  # upscaled, grey -> RGB
    assert grey.shape == (3, 8, 8)
    torch.testing.assert_close(grey, torch.full((3, 8, 8), 128 / 127.5 - 1))


def _write_metadata(path, lines):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metadata.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_folder", "does not exist"),
        ("no_metadata", "has no metadata.jsonl"),
        ("bad_json", r"line 3 is not valid JSON"),
        ("not_an_object", r"line 1 is a JSON list"),
        ("no_text_key", r"line 2 has no 'text' key \(use \"text\": \"\" for an image without caption\)"),
        ("no_file_name", r"line 1 has no 'file_name' key"),
        ("null_text", r"line 1: text must be a string"),
        ("empty", "is empty: the dataset has no images"),
    ],
)
def test_bad_image_folders(tmp_path, case, expected):
    root = tmp_path / "data"
    if case != "missing_folder":
        write_image_folder(root, ["a red square", "a blue square", "a green square"])
    ok = json.dumps({"file_name": "00000.png", "text": "x"})
    if case == "no_metadata":
        (root / "metadata.jsonl").unlink()
    elif case == "bad_json":
        _write_metadata(root, [ok, ok, '{"file_name": "00001.png", "text": "unterminated}'])
    elif case == "not_an_object":
        _write_metadata(root, ['["00000.png", "x"]'])
    elif case == "no_text_key":
        _write_metadata(root, [ok, json.dumps({"file_name": "00001.png"})])
    elif case == "no_file_name":
        _write_metadata(root, [json.dumps({"text": "x"})])
    elif case == "null_text":
        _write_metadata(root, [json.dumps({"file_name": "00000.png", "text": None})])
    elif case == "empty":
        _write_metadata(root, ["", "  "])
    with pytest.raises(SafepruneError, match=expected):
        ImageFolder(root)


def test_missing_images_listed(tmp_path):
    root = write_image_folder(tmp_path / "data", [f"a red square {i}" for i in range(9)])
    for i in range(1, 8):
        (root / f"{i:05d}.png").unlink()
    with pytest.raises(SafepruneError) as err:
        ImageFolder(root)
    msg = str(err.value)
    assert "7 image(s) listed" in msg and "are missing" in msg
    assert all(f"{i:05d}.png" in msg for i in range(1, 6))
    assert "00006.png" not in msg and "00000.png" not in msg and msg.count(".png") == 5


def test_empty_captions_allowed(tmp_path):
    ds = ImageFolder(write_image_folder(tmp_path / "data", ["", "", "a red square"]))
    assert ds.captions == ["", "", "a red square"]


def test_folder_fingerprint(tmp_path):
    root = write_image_folder(tmp_path / "data", CAPTIONS)
    fp = ImageFolder(root).fingerprint()
    assert ImageFolder(root).fingerprint() == fp and len(fp) == 16
    _touch_new_image(root / "00002.png")
    fp2 = ImageFolder(root).fingerprint()
    assert fp2 != fp
    lines = (root / "metadata.jsonl").read_text().replace("a red circle", "a red disc")
    (root / "metadata.jsonl").write_text(lines)
    assert ImageFolder(root).fingerprint() not in (fp, fp2)


def _touch_new_image(path):
    """Rewrites an image with other pixels; bumps mtime too, since file timestamps tick in coarse (ms) steps."""
    old = path.stat().st_mtime_ns
    Image.fromarray(np.full((16, 16, 3), 255, dtype=np.uint8)).save(path)
    os.utime(path, ns=(old + 10**9, old + 10**9))


# --- encode_prompts -------------------------------------------------------------------------------------------


def test_encode_prompts(bundle):
    prompts = ["a red square", "", "a blue circle by Monet", "x" * 100]  # the last one needs truncation
    emb = encode_prompts(bundle, prompts, batch_size=3)
    assert emb.shape == (4, 32, 32) and emb.dtype == torch.float32
    for i, p in enumerate(prompts):
        torch.testing.assert_close(emb[i], direct_text(bundle, p), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(encode_prompts(bundle, prompts, batch_size=1), emb, atol=ATOL, rtol=RTOL)
    # an ordinary tensor: usable as input to a layer being trained
    assert not emb.is_inference()
    layer = torch.nn.Linear(32, 8)
    layer(emb).sum().backward()
    assert layer.weight.grad is not None
    assert encode_prompts(bundle, []).shape == (0, 32, 32)
    with pytest.raises(SafepruneError, match="list of strings"):
        encode_prompts(bundle, "a red square")


# --- latent cache ---------------------------------------------------------------------------------------------


def test_cache_matches_direct_encoding(bundle, folder, tmp_path):
    cache_dir = tmp_path / "cache"
    cache = build_latent_cache(bundle, folder, 16, cache_dir, batch_size=3, shard_size=4, progress=False)
    assert sorted(p.name for p in cache_dir.iterdir()) == [MANIFEST, "shard-00000.safetensors",
                                                           "shard-00001.safetensors"]
    manifest = json.loads((cache_dir / MANIFEST).read_text())
    assert manifest["num_items"] == 7 and [s["count"] for s in manifest["shards"]] == [4, 3]
    assert manifest["scaling_factor"] == bundle.vae.config.scaling_factor == cache.scaling_factor
    assert manifest["latent_shape"] == [4, 8, 8] and manifest["text_emb_shape"] == [32, 32]
    assert len(cache) == 7 and cache.captions == CAPTIONS
    assert cache.latent_mean.shape == cache.latent_std.shape == (7, 4, 8, 8)
    assert cache.text_emb.shape == (7, 32, 32) and cache.latent_mean.dtype == torch.float32
    for i in range(7):
        dist = direct_latents(bundle, folder, i, 16)
        torch.testing.assert_close(cache.latent_mean[i], dist.mean[0], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(cache.latent_std[i], dist.std[0], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(cache.text_emb[i], direct_text(bundle, CAPTIONS[i]), atol=ATOL, rtol=RTOL)
    # a plain path works as well, and so does LatentCache.load
    again = build_latent_cache(bundle, folder.root, 16, cache_dir, progress=False)
    assert torch.equal(again.latent_mean, cache.latent_mean)
    assert torch.equal(LatentCache.load(cache_dir).text_emb, cache.text_emb)


def test_second_call_loads_without_encoders(bundle, folder, tmp_path, monkeypatch, caplog):
    first = build_latent_cache(bundle, folder, 16, tmp_path / "cache", shard_size=3, progress=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("encoder ran although the cache is valid")

    monkeypatch.setattr(bundle.vae, "encode", forbidden)
    monkeypatch.setattr(bundle.text_encoder, "forward", forbidden)
    caplog.set_level(logging.INFO, logger=CACHE_LOGGER)
    second = build_latent_cache(bundle, ImageFolder(folder.root), 16, tmp_path / "cache", progress=False)
    assert "loaded latent cache" in caplog.text
    for name in ("latent_mean", "latent_std", "text_emb"):
        assert torch.equal(getattr(second, name), getattr(first, name))
    assert second.captions == first.captions and second.fingerprint == first.fingerprint


@pytest.mark.parametrize("change", ["image", "caption", "resolution", "vae_weights", "text_encoder_weights",
                                    "loaded_vae_weights"])
def test_changes_rebuild(tmp_path, monkeypatch, caplog, change):
    if change == "loaded_vae_weights":  # a teacher loaded from disk fingerprints its files; edits must still show
        bundle = load_teacher(save_tiny_pipeline(tmp_path / "sd"))
    else:
        bundle = bundle_from_pipeline(tiny_pipeline(seed=0))
    root = write_image_folder(tmp_path / "data", CAPTIONS)
    cache_dir = tmp_path / "cache"
    calls = count_encodes(monkeypatch, bundle)
    before = build_latent_cache(bundle, ImageFolder(root), 16, cache_dir, batch_size=4, progress=False)
    assert sum(calls) == 7
    calls.clear()
    assert build_latent_cache(bundle, ImageFolder(root), 16, cache_dir, progress=False) is not None
    assert sum(calls) == 0  # unchanged inputs: loaded

    resolution = 16
    if change == "image":
        _touch_new_image(root / "00002.png")
    elif change == "caption":
        (root / "metadata.jsonl").write_text((root / "metadata.jsonl").read_text().replace("by Monet", "by Manet"))
    elif change == "resolution":
        resolution = 32
    elif change in ("vae_weights", "loaded_vae_weights"):
        with torch.no_grad():
            bundle.vae.encoder.conv_in.weight.mul_(1.5)
    elif change == "text_encoder_weights":
        with torch.no_grad():
            # by name: the module path differs between transformers 4 (text_model.) and 5
            bias = next(p for n, p in bundle.text_encoder.named_parameters() if n.endswith("final_layer_norm.bias"))
            bias.add_(0.5)
    caplog.set_level(logging.INFO, logger=CACHE_LOGGER)
    folder = ImageFolder(root)
    after = build_latent_cache(bundle, folder, resolution, cache_dir, batch_size=4, progress=False)
    assert sum(calls) == 7, "the cache was not rebuilt"
    assert "stale" in caplog.text and after.fingerprint != before.fingerprint
    # the rebuilt cache holds the new data
    for i in (2, 4):
        torch.testing.assert_close(after.latent_mean[i], direct_latents(bundle, folder, i, resolution).mean[0],
                                   atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(after.text_emb[i], direct_text(bundle, folder.captions[i]), atol=ATOL, rtol=RTOL)
    if change == "resolution":
        assert after.latent_mean.shape == (7, 4, 16, 16)
    if change in ("image", "vae_weights", "loaded_vae_weights", "resolution"):
        assert not torch.equal(after.latent_mean[2:3].flatten()[:16], before.latent_mean[2:3].flatten()[:16])


def test_interrupted_build_leaves_no_valid_cache(bundle, folder, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    # a complete cache at 16 px, then a rebuild at 32 px that dies after its first shard was written
    build_latent_cache(bundle, folder, 16, cache_dir, batch_size=2, shard_size=2, progress=False)
    count_encodes(monkeypatch, bundle, fail_on_call=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_latent_cache(bundle, folder, 32, cache_dir, batch_size=2, shard_size=2, progress=False)
    assert (cache_dir / "shard-00000.safetensors").exists()  # the first shard landed...
    assert not (cache_dir / MANIFEST).exists()  # ...but nothing claims the cache is complete
    assert not list(cache_dir.glob("*.tmp"))
    with pytest.raises(SafepruneError, match="no complete latent cache"):
        LatentCache.load(cache_dir)
    monkeypatch.undo()
    calls = count_encodes(monkeypatch, bundle)
    # the old 16 px cache must not come back either: its manifest went away when the rebuild started
    cache = build_latent_cache(bundle, folder, 16, cache_dir, batch_size=2, shard_size=2, progress=False)
    assert sum(calls) == 7
    torch.testing.assert_close(cache.latent_mean[6], direct_latents(bundle, folder, 6, 16).mean[0],
                               atol=ATOL, rtol=RTOL)


def test_crash_while_writing_a_shard_leaves_no_partial_file(bundle, folder, tmp_path, monkeypatch):
    import safeprune_engine.data.cache as cache_module

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(cache_module.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        build_latent_cache(bundle, folder, 16, tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_damaged_shard_rebuilds(bundle, folder, tmp_path, monkeypatch, caplog, damage):
    cache_dir = tmp_path / "cache"
    good = build_latent_cache(bundle, folder, 16, cache_dir, shard_size=4, progress=False)
    shard = cache_dir / "shard-00001.safetensors"
    if damage == "delete":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:100])
    calls = count_encodes(monkeypatch, bundle)
    caplog.set_level(logging.INFO, logger=CACHE_LOGGER)
    rebuilt = build_latent_cache(bundle, folder, 16, cache_dir, shard_size=4, progress=False)
    assert sum(calls) == 7 and "damaged" in caplog.text
    torch.testing.assert_close(rebuilt.latent_mean, good.latent_mean)


def test_sample_latents(bundle, folder, tmp_path):
    cache = build_latent_cache(bundle, folder, 16, tmp_path / "cache", progress=False)
    sf = bundle.vae.config.scaling_factor
    a = cache.sample_latents([1, 3, 3], torch.Generator().manual_seed(0))
    b = cache.sample_latents(torch.tensor([1, 3, 3]), torch.Generator().manual_seed(0))
    c = cache.sample_latents([1, 3, 3], torch.Generator().manual_seed(1))
    assert a.shape == (3, 4, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[1], a[2])  # the same image gets fresh noise per draw
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([1, 3, 3])
    torch.testing.assert_close(a, (cache.latent_mean[idx] + cache.latent_std[idx] * noise) * sf)
    # scaling alone: mean 0 / std 1 posteriors give samples with std == scaling_factor
    unit = LatentCache(torch.zeros(2, 4, 64, 64), torch.ones(2, 4, 64, 64), torch.zeros(2, 3, 5), ["", ""],
                       scaling_factor=sf)
    z = unit.sample_latents([0, 1], torch.Generator().manual_seed(0))
    assert abs(z.std().item() - sf) < 0.01 * sf and abs(z.mean().item()) < 0.01
    shifted = LatentCache(torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.zeros(1, 3, 5), [""],
                          scaling_factor=0.5, shift_factor=0.25)
    torch.testing.assert_close(shifted.sample_latents([0]), torch.full((1, 4, 2, 2), 0.375))
    assert cache.to("cpu") is cache and cache.device.type == "cpu"


def test_erase_data_uses_its_own_cache(bundle, folder, tmp_path):
    concept = ImageFolder(write_image_folder(tmp_path / "concept", ["a red square by Monet", "a blue circle by Monet"],
                                             seed=3))
    data_cache = build_latent_cache(bundle, folder, 16, tmp_path / "cache-data", progress=False)
    concept_cache = build_latent_cache(bundle, concept, 16, tmp_path / "cache-erase", progress=False)
    assert len(data_cache) == 7 and len(concept_cache) == 2 and data_cache.fingerprint != concept_cache.fingerprint
    assert concept_cache.captions == concept.captions
    assert LatentCache.load(tmp_path / "cache-data").fingerprint == data_cache.fingerprint


def test_cache_argument_errors(bundle, folder, tmp_path):
    with pytest.raises(SafepruneError, match="not a multiple of the VAE's downsampling factor 2"):
        build_latent_cache(bundle, folder, 15, tmp_path / "cache", progress=False)
    with pytest.raises(SafepruneError, match="positive int"):
        build_latent_cache(bundle, folder, 0, tmp_path / "cache", progress=False)
    with pytest.raises(SafepruneError, match="batch_size and shard_size must be positive"):
        build_latent_cache(bundle, folder, 16, tmp_path / "cache", shard_size=0, progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SafepruneError, match="is a file"):
        build_latent_cache(bundle, folder, 16, tmp_path / "file", progress=False)
    with pytest.raises(SafepruneError, match="does not exist"):
        build_latent_cache(bundle, tmp_path / "nope", 16, tmp_path / "cache", progress=False)
