"""The toy teacher: the shipped pipeline loads and samples with plain diffusers, stays small, draws the erased
style when prompted, and `build_teacher` reproduces a pipeline folder (and resumes an interrupted build)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from safeprune_engine.errors import SafepruneError
from safeprune_engine.toy import teacher as toy_teacher
from safeprune_engine.toy.world import ERASED_STYLE, SHAPES, COLOURS, caption_for

MAX_BYTES = 25 * 1024 * 1024


def _judge_or_skip():
    from safeprune_engine.toy.judge import ASSETS_DIR, load_judge

    if not (ASSETS_DIR / "model.safetensors").is_file():
        pytest.skip("the toy judge is not shipped")
    return load_judge()


@pytest.fixture(scope="module")
def shipped_pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(toy_teacher.toy_teacher_path(), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_teacher_samples_32px_with_plain_diffusers(shipped_pipe):
    assert shipped_pipe.unet.config.sample_size * shipped_pipe.vae_scale_factor == 32
    assert shipped_pipe.scheduler.config.prediction_type == "epsilon"
    assert shipped_pipe.scheduler.config.steps_offset == 1
    assert shipped_pipe.tokenizer.model_max_length == shipped_pipe.text_encoder.config.max_position_embeddings
    image = shipped_pipe("a red circle by Vexa", num_inference_steps=4, guidance_scale=4.0,
                         generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (32, 32, 3)
    assert np.isfinite(image).all() and image.std() > 0.01


def test_shipped_teacher_is_small_and_documented():
    root = toy_teacher.toy_teacher_path()
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total < MAX_BYTES, f"{total / 2**20:.1f} MiB"
    assert not (root / toy_teacher.PARTIAL_DIR).exists()
    card = toy_teacher.teacher_card()
    assert card["recipe"]["seed"] == 0 and card["unet"]["mse"] > 0
    unet_cfg = json.loads((root / "unet" / "config.json").read_text())
    # room for pruning: >= 2 channels per GroupNorm group, several heads per attention
    assert min(unet_cfg["block_out_channels"]) // unet_cfg["norm_num_groups"] >= 2
    assert unet_cfg["attention_head_dim"] >= 2


def test_load_toy_teacher_is_a_frozen_bundle():
    bundle = toy_teacher.load_toy_teacher()
    assert bundle.prediction_type == "epsilon"
    assert not any(p.requires_grad for p in bundle.unet.parameters())
    assert bundle.vae.config.scaling_factor != pytest.approx(0.18215)  # measured, not SD's
    ids = bundle.tokenizer(caption_for("triangle", "yellow", "Orrin"), padding="max_length",
                           max_length=bundle.tokenizer.model_max_length, return_tensors="pt").input_ids
    text = bundle.text_encoder(ids)[0]
    assert text.shape == (1, 32, bundle.unet.config.cross_attention_dim)


def test_shipped_tokenizer_matches_the_byte_level_builder():
    """The shipped tokenizer folder and the shipped builder (models.tokenizers, used to build teachers) give the
    same ids, fixed here for two prompts, so moving or changing the builder cannot silently retokenize."""
    from transformers import AutoTokenizer, CLIPTokenizer

    from safeprune_engine.models.tokenizers import byte_clip_tokenizer

    folder = toy_teacher.toy_teacher_path() / "tokenizer"
    loaded = [AutoTokenizer.from_pretrained(folder, local_files_only=True),
              CLIPTokenizer.from_pretrained(folder, local_files_only=True)]
    built = [byte_clip_tokenizer(toy_teacher.TEXT_MAX_LENGTH), toy_teacher.teacher_tokenizer()]
    prompts = ["a red circle by Vexa", "by Orrin", "", "a yellow diamond", "Ünïcode & PUNCT!? 42"]
    for prompt in prompts:
        ids = [tok(prompt, padding="max_length", max_length=toy_teacher.TEXT_MAX_LENGTH, truncation=True).input_ids
               for tok in loaded + built]
        assert all(i == ids[0] for i in ids), (prompt, ids)
    # CLIP lowercases; byte b -> id b + 256 for the last byte of a word (</w>), else b; 512 start, 513 end and pad
    assert built[0]("by Orrin").input_ids == [512, 98, 121 + 256, 111, 114, 114, 105, 110 + 256, 513]
    assert loaded[0]("a red circle by Vexa").input_ids[:6] == [512, 97 + 256, 114, 101, 100 + 256, 99]
    assert len(built[0]) == len(loaded[0]) == 514


def test_shipped_teacher_draws_the_erased_style(shipped_pipe):
    judge = _judge_or_skip()
    prompts = [caption_for(SHAPES[i % 4], list(COLOURS)[(i // 4) % 4], ERASED_STYLE) for i in range(8)]
    images = toy_teacher.sample_images(shipped_pipe, prompts, steps=10, guidance=4.0, seed=0)
    styles = judge.predict(images).labels["style"]
    assert sum(s == ERASED_STYLE for s in styles) > len(styles) // 2, styles


TINY = dict(n_images=24, vae_batch_size=4, unet_batch_size=4, warmup_steps=1, checkpoint_every=2)


def test_build_teacher_short_run_gives_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    out = toy_teacher.build_teacher(tmp_path / "t", seed=3, vae_steps=2, unet_steps=3, progress=False,
                                    evaluate=False, **TINY)
    assert not (out / toy_teacher.PARTIAL_DIR).exists()
    card = toy_teacher.teacher_card(out)
    assert card["recipe"]["unet_steps"] == 3 and card["recipe"]["seed"] == 3
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a blue square by Pell", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3)
    with pytest.raises(SafepruneError, match="already holds a pipeline"):
        toy_teacher.build_teacher(out, seed=3, vae_steps=2, unet_steps=3, progress=False, evaluate=False, **TINY)


def test_build_teacher_resumes_an_interrupted_run(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    kwargs = dict(seed=1, vae_steps=2, unet_steps=4, progress=False, evaluate=False, **TINY)
    straight = toy_teacher.build_teacher(tmp_path / "straight", **kwargs)

    real = toy_teacher._step_generator

    def interrupt_at_step_3(seed, stage, step):
        if stage == 2 and step == 3:
            raise KeyboardInterrupt
        return real(seed, stage, step)

    monkeypatch.setattr(toy_teacher, "_step_generator", interrupt_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        toy_teacher.build_teacher(tmp_path / "resumed", **kwargs)
    partial = tmp_path / "resumed" / toy_teacher.PARTIAL_DIR
    assert (partial / "unet_state.pt").is_file() and (partial / "vae.safetensors").is_file()
    with pytest.raises(SafepruneError, match="other settings"):
        toy_teacher.build_teacher(tmp_path / "resumed", **{**kwargs, "unet_steps": 5})
    monkeypatch.setattr(toy_teacher, "_step_generator", real)
    resumed = toy_teacher.build_teacher(tmp_path / "resumed", **kwargs)

    for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors"):
        a, b = load_file(straight / name), load_file(resumed / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=f"{name}:{key}")


def test_cli_build_teacher(tmp_path, monkeypatch):
    from safeprune_engine import cli

    calls = {}

    def fake_build(out_dir, **kwargs):
        calls.update(kwargs, out_dir=out_dir)
        out = tmp_path / "t"
        out.mkdir()
        (out / toy_teacher.CARD_NAME).write_text(json.dumps({"seconds": {"total": 1.0}, "quality": None}))
        return out

    monkeypatch.setattr(toy_teacher, "build_teacher", fake_build)
    rc = cli.main(["toy", "build-teacher", "--out", str(tmp_path / "t"), "--seed", "5", "--vae-steps", "7",
                   "--unet-steps", "9", "--no-progress", "--no-eval"])
    assert rc == 0
    assert calls == {"out_dir": str(tmp_path / "t"), "seed": 5, "vae_steps": 7, "unet_steps": 9,
                     "progress": False, "evaluate": False, "world": "toy"}
