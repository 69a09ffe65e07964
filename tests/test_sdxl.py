"""SDXL as a teacher, end to end, with real tiny diffusers components: two text encoders, the pooled embedding and
size/crop time ids packed with the text (models.conditioning), the cache, the one teacher pass, every erase method,
export to a StableDiffusionXLPipeline and sampling from it, and a 2-rank ZeRO run."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from safeprune_engine.config import RunConfig
from safeprune_engine.errors import SafepruneError
from safeprune_engine.models.conditioning import TIME_IDS, ConditionLayout, time_ids

CAPTIONS = ["a red square by monet", "a blue square", "a green square", "a yellow square"] * 2


# ---- the packed condition ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("width,pooled,rows", [(64, 32, 1), (16, 32, 3), (2048, 1280, 1)])
def test_pack_and_split_round_trip(width, pooled, rows):
    layout = ConditionLayout(width, pooled)
    assert layout.added and layout.extra_rows == rows
    hidden, emb = torch.randn(3, 5, width), torch.randn(3, pooled)
    ids = torch.tensor([[1024.0, 768, 8, 16, 512, 512]] * 3) + 8 * torch.arange(3.0)[:, None]
    packed = layout.pack(hidden, emb, ids)
    assert packed.shape == (3, 5 + rows, width)
    kwargs = layout.kwargs(packed)
    torch.testing.assert_close(kwargs["encoder_hidden_states"], hidden, rtol=0, atol=0)
    torch.testing.assert_close(kwargs["added_cond_kwargs"]["text_embeds"], emb, rtol=0, atol=0)
    torch.testing.assert_close(kwargs["added_cond_kwargs"]["time_ids"], ids, rtol=0, atol=0)
    torch.testing.assert_close(layout.hidden(packed), hidden, rtol=0, atol=0)
    # rows and dtypes travel like any tensor: a slice of rows, a concatenation, a bf16 cast keep pixel sizes exact
    half = layout.kwargs(torch.cat([packed[2:], packed[:1]]).to(torch.bfloat16))["added_cond_kwargs"]["time_ids"]
    assert torch.equal(half.float(), torch.stack([ids[2], ids[0]]))


def test_sd_layout_passes_hidden_states_through():
    layout = ConditionLayout(32)
    hidden = torch.randn(2, 7, 32)
    assert layout.extra_rows == 0 and layout.kwargs(hidden) == {"encoder_hidden_states": hidden}
    with pytest.raises(SafepruneError, match="takes no added conditioning"):
        layout.pack(hidden, torch.randn(2, 4), torch.zeros(2, 6))


def test_drop_text_keeps_each_rows_time_ids():
    layout = ConditionLayout(16, 20)
    ids = torch.tensor([[64.0, 96, 0, 16, 64, 64], [80.0, 64, 8, 0, 64, 64]])
    condition = layout.pack(torch.randn(2, 4, 16), torch.randn(2, 20), ids)
    empty = layout.pack(torch.zeros(1, 4, 16), torch.zeros(1, 20), time_ids(64, 1))
    dropped = layout.drop_text(condition, empty, torch.tensor([True, False]))
    kwargs = layout.kwargs(dropped)
    assert torch.equal(kwargs["added_cond_kwargs"]["time_ids"], ids)  # both rows keep their own size and crop
    assert not kwargs["encoder_hidden_states"][0].any() and not kwargs["added_cond_kwargs"]["text_embeds"][0].any()
    assert torch.equal(dropped[1], condition[1])


def test_layout_refusals():
    with pytest.raises(SafepruneError, match="addition_embed_type 'image'"):
        ConditionLayout.from_config({"cross_attention_dim": 8, "addition_embed_type": "image"})
    layout = ConditionLayout(8, 4)
    with pytest.raises(SafepruneError, match="not a packed SDXL condition"):
        layout.split(torch.randn(2, 1, 8))
    with pytest.raises(SafepruneError, match="pooled text embedding and the time ids"):
        layout.pack(torch.randn(2, 3, 8))


# ---- a saved tiny SDXL pipeline ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from PIL import Image

    from safeprune_engine.testing import save_tiny_sdxl_pipeline, write_image_folder

    root = tmp_path_factory.mktemp("sdxl")
    teacher = save_tiny_sdxl_pipeline(root / "teacher", seed=0)
    data = write_image_folder(root / "data", CAPTIONS, size=16)
    # one landscape image: its time ids must carry its own original size and crop corner
    pixels = np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(data / "00001.png")
    return {"root": root, "teacher": str(teacher), "data": str(data)}


def test_load_and_encode_like_the_sdxl_pipeline(sdxl):
    """load_teacher takes a StableDiffusionXLPipeline folder, and the packed condition is exactly what the SDXL
    pipeline feeds its UNet: encode_prompt's states and pooled embedding, _get_add_time_ids' time ids."""
    from diffusers import StableDiffusionXLPipeline

    from safeprune_engine.data.cache import encode_prompts
    from safeprune_engine.models.teacher import load_teacher

    teacher = load_teacher(sdxl["teacher"])
    assert teacher.is_sdxl and teacher.force_zeros_for_empty_prompt
    assert {teacher.fingerprint(n) for n in ("text_encoder", "text_encoder_2", "tokenizer_2")}.__len__() == 3
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl["teacher"], local_files_only=True)
    prompts = ["a red square by monet", "a cat"]
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    condition = encode_prompts(teacher, prompts, resolution=16)
    layout = ConditionLayout.of(teacher.unet)
    kwargs = layout.kwargs(condition)
    torch.testing.assert_close(kwargs["encoder_hidden_states"], embeds)
    torch.testing.assert_close(kwargs["added_cond_kwargs"]["text_embeds"], pooled)
    pipeline_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), torch.float32,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(kwargs["added_cond_kwargs"]["time_ids"], pipeline_ids.expand(2, -1))
    # the UNet's prediction from the packed condition is the pipeline's
    latents, t = torch.randn(2, 4, 2, 2), torch.tensor([10, 500])
    ours = teacher.unet(latents, t, **kwargs).sample
    theirs = pipe.unet(latents, t, encoder_hidden_states=embeds,
                       added_cond_kwargs={"text_embeds": pooled, "time_ids": pipeline_ids.expand(2, -1)}).sample
    torch.testing.assert_close(ours, theirs)
    # the empty prompt is all zeros (force_zeros_for_empty_prompt: what the pipeline's guidance reads)
    empty = layout.kwargs(encode_prompts(teacher, [""], resolution=16))
    assert not empty["encoder_hidden_states"].any() and not empty["added_cond_kwargs"]["text_embeds"].any()
    assert empty["added_cond_kwargs"]["time_ids"].tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]


def test_cache_rows_carry_their_size_and_crop_and_rebuild_on_either_encoder(sdxl, tmp_path, caplog):
    from safeprune_engine.data.cache import build_latent_cache
    from safeprune_engine.models.teacher import load_teacher

    teacher = load_teacher(sdxl["teacher"])
    cache = build_latent_cache(teacher, sdxl["data"], resolution=16, cache_dir=tmp_path / "c", progress=False)
    ids = ConditionLayout.of(teacher.unet).kwargs(cache.text_emb)["added_cond_kwargs"]["time_ids"]
    # 40x24 landscape: shorter side to 16 -> 27x16 (rounded), centre crop starts at column (27-16)//2 = 5
    assert ids[1].tolist() == [24.0, 40.0, 0.0, 5.0, 16.0, 16.0]
    assert ids[0].tolist() == [16.0, 16.0, 0.0, 0.0, 16.0, 16.0]
    assert cache.text_emb.shape[1:] == (32 + 1, 64)

    copy = tmp_path / "teacher2"
    shutil.copytree(sdxl["teacher"], copy)
    again = load_teacher(copy)
    build_latent_cache(again, sdxl["data"], resolution=16, cache_dir=tmp_path / "c", progress=False)
    fingerprint = json.loads((tmp_path / "c" / "manifest.json").read_text())["fingerprint"]
    assert fingerprint == cache.fingerprint  # same weights in another folder: reused
    with torch.no_grad():
        again.text_encoder_2.text_projection.weight.mul_(1.5)  # only the second encoder changes
    caplog.set_level("INFO")
    rebuilt = build_latent_cache(again, sdxl["data"], resolution=16, cache_dir=tmp_path / "c", progress=False)
    assert rebuilt.fingerprint != cache.fingerprint and "text_encoder_2" in caplog.text
    assert not torch.allclose(rebuilt.text_emb, cache.text_emb)


def test_width_pruning_shrinks_every_transformer_layer_and_keeps_the_added_embedding():
    from safeprune_engine.prune.width import prune
    from safeprune_engine.testing import tiny_sdxl_pipeline

    teacher = tiny_sdxl_pipeline(seed=0).unet
    student, _ = prune(teacher, ratio=0.5)
    before, after = dict(teacher.named_parameters()), dict(student.named_parameters())
    for name in before:
        if name.startswith(("add_embedding.", "time_embedding.")):  # SDXL's added conditioning stays whole
            assert torch.equal(before[name], after[name]), name
    for layer in (0, 1):  # both layers of the 2-layer transformer lose half their feed-forward units
        key = f"down_blocks.1.attentions.0.transformer_blocks.{layer}.ff.net.0.proj.weight"
        assert after[key].shape[0] == before[key].shape[0] // 2
    latents, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    added = {"text_embeds": torch.randn(2, 32), "time_ids": time_ids(64, 2)}
    text = torch.randn(2, 5, 64)
    assert student(latents, t, encoder_hidden_states=text, added_cond_kwargs=added).sample.shape == latents.shape


def make_engine(sdxl, tmp_path, **overrides):
    from safeprune_engine.bilevel.solvers import build_solver
    from safeprune_engine.data.imagefolder import ImageFolder
    from safeprune_engine.memory import optimizer_factory
    from safeprune_engine.models.teacher import load_teacher
    from safeprune_engine.prune.width import prune
    from safeprune_engine.run.builder import build_engine

    teacher = load_teacher(sdxl["teacher"])
    student, _ = prune(teacher.unet, ratio=0.5)
    settings = dict(out=str(tmp_path / "run"), erase=["by monet"], batch_size=2, concept_batch_size=2,
                    resolution=16, steps=4, bilevel_inner_steps=1, esd_pool_size=4, esd_ddim_steps=3, progress=False,
                    lr=1e-3, device="cpu", kernels="off")
    settings.update(overrides)
    config = RunConfig(**settings).validate()
    engine = build_engine(config, teacher, student, ImageFolder(sdxl["data"]), tmp_path / "cache", latent_size=2,
                          progress=False)
    return engine, build_solver(engine, config, optimizer_factory(config)), teacher


def test_one_teacher_pass_per_step_with_added_conditioning_and_no_encoders(sdxl, tmp_path):
    """The shipped defaults (bilevel, constraint form, caption dropout, cached concept targets): one teacher forward
    per step (plus the probe set at the constraint's checks), each row with its pooled embedding and time ids; no
    VAE or text encoder runs in a step."""
    from safeprune_engine.bilevel.solvers import CHECK_EVERY

    engine, solver, teacher = make_engine(sdxl, tmp_path, caption_dropout=0.5)
    calls, seen = {}, []

    def count(key):
        return lambda *_: calls.__setitem__(key, calls.get(key, 0) + 1)

    def look(_, args, kwargs):
        seen.append(kwargs["added_cond_kwargs"]["time_ids"].detach().clone())

    hooks = [engine.teacher.register_forward_pre_hook(count("teacher")),
             engine.teacher.register_forward_pre_hook(look, with_kwargs=True),
             teacher.vae.encoder.register_forward_pre_hook(count("vae")),
             teacher.text_encoder.register_forward_pre_hook(count("text")),
             teacher.text_encoder_2.register_forward_pre_hook(count("text_2"))]
    per_step = []
    for step in range(4):
        calls.clear()
        solver.step(step)
        per_step.append(dict(calls))
    for hook in hooks:
        hook.remove()
    assert [c.get("teacher", 0) for c in per_step] == [1 + len(solver.probe) if step % CHECK_EVERY == 0 else 1
                                                         for step in range(4)]
    assert not any(c.get(k) for c in per_step for k in ("vae", "text", "text_2")), per_step
    rows = torch.cat(seen)
    assert rows.shape[1] == TIME_IDS and rows.shape[0] >= 2 * 4
    assert {tuple(r) for r in rows.tolist()} <= {(16.0, 16.0, 0.0, 0.0, 16.0, 16.0), (24.0, 40.0, 0.0, 5.0, 16.0, 16.0)}


@pytest.mark.parametrize("erase_method", ["esd", "esd-u", "esd-x", "concept-ablation-model",
                                          "concept-ablation-noise", "uce", "salun"])
def test_every_erase_method_trains_with_an_sdxl_teacher(sdxl, tmp_path, erase_method):
    engine, solver, _ = make_engine(sdxl, tmp_path, erase_method=erase_method, quality_tolerance=None,
                                    bilevel_lambda=1.0, uce_when="every:1")
    before = {n: p.detach().clone() for n, p in engine.student.named_parameters()}
    engine.objective.on_train_start(engine, 0)
    losses = []
    for step in range(3):
        losses.append(solver.step(step))
        engine.objective.on_step_end(engine, step + 1)  # uce every:1 edits here
    assert all(np.isfinite(v) for s in losses for v in s.values() if isinstance(v, float))
    changed = [n for n, p in engine.student.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "no student parameter moved"
    if erase_method == "uce":
        # the closed form reads cross-attention's context only: both encoders' token states (64 wide), never the
        # packed pooled/time-id row
        objective = engine.objective
        to_k = next(m for n, m in engine.student.named_modules() if n.endswith("attn2.to_k"))
        assert objective.erase.shape == (32, to_k.in_features) == (32, 64)
        assert any(n.endswith("attn2.to_k.weight") for n in changed)


def run_cli(args, timeout=600, env=None):
    done = subprocess.run([sys.executable, "-m", "safeprune_engine.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


FAST = ["--erase", "by monet", "--resolution", "16", "--esd-pool-size", "4", "--esd-ddim-steps", "3",
        "--bilevel-inner-steps", "1", "--no-progress", "--lr", "1e-3"]


def test_prune_train_export_and_sample_through_the_cli(sdxl, tmp_path):
    """safeprune prune, then safeprune run (shipped defaults) -> a StableDiffusionXLPipeline directory that
    diffusers loads and samples from, and safeprune sample uses."""
    from diffusers import StableDiffusionXLPipeline

    pruned = tmp_path / "pruned"
    done = run_cli(["prune", "--teacher", sdxl["teacher"], "--prune-ratio", "0.5", "--out", str(pruned),
                    "--resolution", "16"])
    assert "MACs" in done.stdout
    assert json.loads((pruned / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"

    out = tmp_path / "run"
    run_cli(["run", "--teacher", sdxl["teacher"], "--data", sdxl["data"], "--prune-ratio", "0.5", "--steps", "3",
             "--out", str(out), "--batch-size", "2", *FAST])
    import safeprune_engine  # noqa: F401  (diffusers finds the pruned UNet class among loaded modules)

    pipe = StableDiffusionXLPipeline.from_pretrained(out / "pipeline", local_files_only=True)
    assert type(pipe.unet).__name__ == "PrunedUNet2DConditionModel" and pipe.text_encoder_2 is not None
    image = pipe("a red square", num_inference_steps=2, height=16, width=16, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()
    png = tmp_path / "sample.png"
    run_cli(["sample", "--model", str(out), "--prompt", "a red square", "--out", str(png), "--steps", "2",
             "--device", "cpu"])
    assert png.stat().st_size > 0
    report = tmp_path / "eval.json"  # the toy prompt set and judge, at the judge's 32 px
    run_cli(["eval", "--model", str(out), "--size", "32", "--steps", "2", "--samples-per-prompt", "1", "--device",
             "cpu", "--out", str(report)])
    model = json.loads(report.read_text())["model"]
    assert model["name"] == str(out) and 0.0 <= model["metrics"]["erased_rate"] <= 1.0
    assert np.isfinite(model["metrics"]["fd"])


def test_scale_options_with_an_sdxl_teacher(sdxl, tmp_path):
    """8-bit Adam states, gradient checkpointing and a bf16 teacher, as with SD-1.5."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    run_cli(["run", "--teacher", sdxl["teacher"], "--data", sdxl["data"], "--prune-ratio", "0.5", "--steps", "2",
             "--out", str(out), "--use-8bit-adam", "--gradient-checkpointing", "--teacher-dtype", "bf16",
             "--batch-size", "2", *FAST])
    summary = json.loads((out / "summary.json").read_text())
    assert all(np.isfinite(h["loss/ft"]) for h in summary["history"] if "loss/ft" in h)
    state = torch.load(out / "checkpoints" / "step-00000002" / "state.pt", weights_only=True)
    assert any(t.dtype == torch.uint8 for t in _tensors(state["solver"]))


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_two_rank_zero_run_with_an_sdxl_teacher(sdxl, tmp_path):
    """2 ranks over gloo: a ZeRO-2 student and a ZeRO-3 teacher sharding the SDXL UNet, identical ranks."""
    pytest.importorskip("deepspeed")
    import os
    from pathlib import Path

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                  str(Path(__file__).resolve().parent.parent / ".torch_extensions"))}
    out = tmp_path / "zero"
    run_cli(["run", "--teacher", sdxl["teacher"], "--data", sdxl["data"], "--prune-ratio", "0.5", "--steps", "2",
             "--out", str(out), "--launcher", "torchrun", "--nproc", "2", "--zero-stage", "2", "--teacher-zero3", "--outer-optimizer", "adamw",
             "--batch-size", "4", *FAST], env=env)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["zero_stage"] == 2 and summary["teacher_zero3"] is True
    assert summary["rank_weight_checksums"][0] == summary["rank_weight_checksums"][1]
    assert json.loads((out / "pipeline" / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"


def test_depth_pruned_sdxl_student_trains_and_exports_a_plain_pipeline(sdxl, tmp_path):
    """--prune-method sdxl-depth-1b on the SDXL teacher through safeprune run: the student is a plain
    UNet2DConditionModel with fewer layers, and diffusers loads the exported StableDiffusionXLPipeline with no
    safeprune code (a fresh interpreter that never imports the package)."""
    out = tmp_path / "run"
    run_cli(["run", "--teacher", sdxl["teacher"], "--data", sdxl["data"], "--prune-method", "sdxl-depth-1b",
             "--steps", "2", "--out", str(out), "--batch-size", "2", *FAST])
    config = json.loads((out / "pipeline" / "unet" / "config.json").read_text())
    assert config["_class_name"] == "UNet2DConditionModel" and config["layers_per_block"] == 1
    probe = ("import sys, torch; from diffusers import StableDiffusionXLPipeline; "
             f"p = StableDiffusionXLPipeline.from_pretrained({str(out / 'pipeline')!r}, local_files_only=True); "
             "assert 'safeprune_engine' not in sys.modules; "
             "print(p('a cat', num_inference_steps=2, height=16, width=16, output_type='np').images.shape)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(1, 16, 16, 3)" in done.stdout
