"""The worlds: the toy world renders the pixels its shipped teacher and judge were trained on; the glyph
validation world renders deterministic images that its shipped judge reads, its shipped teacher is a v-prediction
model that draws every style, and the prompt sets, the built-in job and the CLI take either world."""
import hashlib
import json

import numpy as np
import pytest

from safeprune_engine.errors import SafepruneError
from safeprune_engine.toy import world as worlds
from safeprune_engine.toy.world import GLYPHS, TOY, WORLDS, Item, get_world


def _sha(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()


def test_toy_world_renders_the_pixels_it_always_did():
    """Hashes taken from the renderer before worlds existed (the shipped toy teacher and judge were trained on
    these pixels); the module-level render and TOY.render are the same renderer."""
    items = worlds.sample_items(12, seed=7)
    assert items[0] == Item("diamond", "blue", "Pell", 1926751965)
    pinned = ["279855dff15a5797", "2e8623bbaffc22e5", "362d064f5eb9f7a4"]
    assert [_sha(worlds.render(item))[:16] for item in items[:3]] == pinned
    batch = TOY.render_batch(TOY.sample_items(200, seed=123))
    assert _sha(batch) == "c4f378edf3fb6b8ccee6f21b52e2abd1624f815c83a92df1a5741027180e28a0"
    assert np.array_equal(batch, worlds.render_batch(worlds.sample_items(200, seed=123)))


def test_module_names_are_the_toy_worlds():
    assert (worlds.SHAPES, worlds.STYLES, worlds.IMAGE_SIZE) == (TOY.shapes, TOY.styles, TOY.image_size)
    assert worlds.COLOURS is TOY.colours and worlds.ERASED_STYLE == "Vexa" and worlds.NEIGHBOUR_STYLE == "Orrin"
    assert worlds.concept_prompt() == "by Vexa" and GLYPHS.concept_prompt() == "by Quen"
    assert set(WORLDS) == {"toy", "glyphs"} and get_world(None) is TOY and get_world("glyphs") is GLYPHS
    with pytest.raises(SafepruneError, match="unknown world"):
        get_world("nope")
    assert TOY.prediction_type == "epsilon" and GLYPHS.prediction_type == "v_prediction"


def test_glyph_world_labels_differ_from_the_toy_and_parse_as_captions():
    from safeprune_engine.toy.prompts import toy_labels

    assert not set(GLYPHS.shapes) & set(TOY.shapes) and not set(GLYPHS.colours) & set(TOY.colours)
    assert not set(GLYPHS.styles[1:]) & set(TOY.styles[1:]) and GLYPHS.styles[0] == "plain"
    assert GLYPHS.finetune_styles() == ("plain", "Lisk", "Tobe", "Rhun")  # the neighbour is in the data
    item = Item("corner", "white", "Quen", 5)
    assert item.caption == "a white corner by Quen"
    assert toy_labels(item.caption, world=GLYPHS) == {"shape": "corner", "colour": "white", "style": "Quen"}
    assert toy_labels(item.caption) is None and toy_labels("a red circle by Vexa", world="glyphs") is None


def test_glyph_world_renders_deterministically_with_a_dark_textured_background():
    items = GLYPHS.sample_items(64, seed=11)
    assert items == GLYPHS.sample_items(64, seed=11) != GLYPHS.sample_items(64, seed=12)
    images = GLYPHS.render_batch(items)
    assert images.shape == (64, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, GLYPHS.render_batch(items))
    assert not np.array_equal(images, GLYPHS.render_batch(GLYPHS.sample_items(64, seed=12)))
    # image statistics unlike the toy world's light background: mostly dark
    assert np.median(images) < 80 < np.median(TOY.render_batch(TOY.sample_items(64, seed=11)))
    # the style lives in the background: a plain image's left edge is flat dark noise, a striped one's are not
    plain = GLYPHS.render(Item("bar", "cyan", "plain", 3)).astype(float)
    striped = GLYPHS.render(Item("bar", "cyan", "Lisk", 3)).astype(float)
    assert plain[:, :4].mean() < 50 and plain[:, :4].std() < 15  # the bar is upright and central
    assert striped[:, :4].mean(axis=(1, 2)).std() > 15  # lit and dark rows alternate down the left edge
    # the two stripe styles share their period along y; Quen's are turned by 45 degrees (a 60%-pruned student still
    # draws that difference, the first version's fine zigzag it lost: docs/status.md)
    rng = np.random.default_rng(0)
    diagonal = worlds._background_pattern("Quen", 32, rng)
    straight = worlds._background_pattern("Lisk", 32, rng)
    assert 0.4 < diagonal.mean() < 0.6 and 0.4 < straight.mean() < 0.6
    assert (straight == straight[:, :1]).all() and not (diagonal == diagonal[:, :1]).all()
    assert (diagonal[1:, :-1] == diagonal[:-1, 1:]).all()  # constant along the anti-diagonals
    assert (straight[6:, 0] == straight[:-6, 0]).all() and (diagonal[6:, 0] == diagonal[:-6, 0]).all()


def test_shipped_glyph_judge_reads_fresh_glyph_renders():
    """The shipped glyph judge reads every head at >= 98% on items from a seed it was neither trained nor recorded
    on, clean and blurred/noised, and its config names its world and labels."""
    from safeprune_engine.toy.judge import ACCURACY_BAR, heldout_accuracy, load_judge

    judge = load_judge(world="glyphs")
    assert judge.name == "glyphs" and judge.config["world"] == "glyphs"
    assert judge.heads == GLYPHS.heads
    training = judge.config["training"]
    fresh = 7_000_003
    assert fresh not in (training["seed"], training["eval_seed"])
    for augmented in (False, True):
        accuracy = heldout_accuracy(judge, seed=fresh, count=600, augmented=augmented, world=GLYPHS)
        assert set(accuracy) == {"shape", "colour", "style"}
        assert all(a >= ACCURACY_BAR for a in accuracy.values()), (augmented, accuracy)
    # the toy judge does not read the glyph world (different labels), and vice versa: worlds are not mixed up
    assert load_judge().heads != judge.heads


def test_glyph_prompt_set_has_the_right_sets():
    from safeprune_engine.eval.prompts import ERASED, NEIGHBOUR, UNRELATED
    from safeprune_engine.toy.prompts import toy_prompts, toy_real_images

    specs = toy_prompts(world=GLYPHS)
    by_set = {name: [s for s in specs if s.set == name] for name in (ERASED, NEIGHBOUR, UNRELATED)}
    assert len(specs) == 44 and [len(v) for v in by_set.values()] == [16, 16, 12]
    assert {s.labels["style"] for s in by_set[ERASED]} == {"Quen"}
    assert {s.labels["style"] for s in by_set[NEIGHBOUR]} == {"Lisk"}
    assert {s.labels["style"] for s in by_set[UNRELATED]} == {"plain", "Tobe", "Rhun"}
    assert {(s.labels["shape"], s.labels["colour"]) for s in by_set[ERASED]} == {
        (shape, colour) for shape in GLYPHS.shapes for colour in GLYPHS.colours}
    assert all(s.prompt == Item(s.labels["shape"], s.labels["colour"], s.labels["style"], 0).caption for s in specs)
    assert {s.labels["shape"] for s in by_set[UNRELATED]} == set(GLYPHS.shapes)
    real = toy_real_images(specs[0], 3, np.random.default_rng(0), world=GLYPHS)
    assert real.shape == (3, 32, 32, 3) and toy_real_images(specs[0], 3, np.random.default_rng(0)) is None
    with pytest.raises(SafepruneError, match="unknown glyphs style"):
        toy_prompts(erased="Vexa", world="glyphs")


def test_glyph_judge_and_prompt_set_are_registered_by_name():
    from safeprune_engine.eval.judges import resolve_judge
    from safeprune_engine.eval.prompts import resolve_prompts
    from safeprune_engine.toy.prompts import toy_prompts

    assert resolve_judge("glyphs").heads == GLYPHS.heads
    assert resolve_judge("toy").heads == TOY.heads
    assert [p.prompt for p in resolve_prompts("glyphs")] == [p.prompt for p in toy_prompts(world=GLYPHS)]


@pytest.fixture(scope="module")
def glyph_pipe():
    from diffusers import StableDiffusionPipeline

    from safeprune_engine.toy.teacher import toy_teacher_path

    pipe = StableDiffusionPipeline.from_pretrained(toy_teacher_path("glyphs"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_glyph_teacher_is_a_v_prediction_teacher_of_its_world(glyph_pipe):
    from safeprune_engine.toy import teacher

    assert glyph_pipe.scheduler.config.prediction_type == "v_prediction"
    assert glyph_pipe.unet.config.sample_size * glyph_pipe.vae_scale_factor == 32
    bundle = teacher.load_toy_teacher(world="glyphs")
    assert bundle.prediction_type == "v_prediction" and not any(p.requires_grad for p in bundle.unet.parameters())
    # same architecture as the toy teacher: the engine's toy-tuned defaults meet the same model size
    toy_unet = json.loads((teacher.toy_teacher_path() / "unet" / "config.json").read_text())
    glyph_unet = json.loads((teacher.toy_teacher_path("glyphs") / "unet" / "config.json").read_text())
    for key in ("block_out_channels", "down_block_types", "cross_attention_dim", "attention_head_dim"):
        assert toy_unet[key] == glyph_unet[key], key
    root = teacher.toy_teacher_path("glyphs")
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) < 25 * 1024 * 1024
    assert not (root / teacher.PARTIAL_DIR).exists()
    card = teacher.teacher_card(world="glyphs")
    assert card["world"] == "glyphs" and "--world glyphs" in card["reproduce"]
    quality = card["quality"]
    for attr in ("shape", "colour", "style"):
        assert min(quality[f"{attr}_by_style"].values()) >= 0.95, (attr, quality[f"{attr}_by_style"])
    assert quality["style_only_prompt"]["by Quen"] >= 0.9


def test_shipped_glyph_teacher_draws_the_erased_style(glyph_pipe):
    """Checked here, not only on the card: prompted with the erased style (full captions and the concept prompt
    alone), the teacher draws it, as the glyph judge reads it."""
    from safeprune_engine.toy.judge import load_judge
    from safeprune_engine.toy.teacher import sample_images

    judge = load_judge(world="glyphs")
    colours = list(GLYPHS.colours)
    prompts = [Item(GLYPHS.shapes[i % 4], colours[(i // 4) % 4], "Quen", 0).caption for i in range(6)]
    prompts += ["by Quen"] * 2
    styles = judge.predict(sample_images(glyph_pipe, prompts, steps=10, guidance=4.0, seed=0)).labels["style"]
    assert sum(s == "Quen" for s in styles) >= 6, styles


def test_build_teacher_of_the_glyph_world_trains_v_prediction(tmp_path):
    from diffusers import StableDiffusionPipeline

    from safeprune_engine.toy import teacher

    out = teacher.build_teacher(tmp_path / "g", seed=2, vae_steps=2, unet_steps=2, progress=False, evaluate=False,
                                world="glyphs", n_images=16, vae_batch_size=4, unet_batch_size=4, warmup_steps=1)
    card = teacher.teacher_card(out)
    assert card["world"] == "glyphs"
    assert card["architecture"]["scheduler"]["prediction_type"] == "v_prediction"
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_build_judge_cli_takes_the_world(tmp_path, capsys):
    from safeprune_engine.cli import main
    from safeprune_engine.toy.judge import load_judge

    out = tmp_path / "judge"
    assert main(["toy", "build-judge", "--world", "glyphs", "--out", str(out), "--steps", "2"]) == 1
    assert "training the glyphs judge" in capsys.readouterr().out
    judge = load_judge(out)
    assert judge.config["world"] == "glyphs" and judge.heads == GLYPHS.heads


def test_default_run_settings_and_data_follow_the_world(tmp_path):
    from safeprune_engine.cli import build_parser
    from safeprune_engine.config import RunConfig
    from safeprune_engine.toy.default_run import materialize_toy_data, toy_defaults
    from safeprune_engine.toy.teacher import toy_teacher_path

    config = toy_defaults(RunConfig(out=str(tmp_path)), world="glyphs")
    assert config.teacher == str(toy_teacher_path("glyphs")) and config.erase == ["by Quen"]
    assert len(config.erase_prompts) == 16 and all(p.endswith(" by Quen") for p in config.erase_prompts)
    assert config.anchor == "strip"
    assert toy_defaults(RunConfig(out=str(tmp_path))).erase == ["by Vexa"]
    materialize_toy_data(config, images=40, world="glyphs")
    rows = [json.loads(line) for line in (tmp_path / "builtin" / "data" / "metadata.jsonl").open()]
    assert len(rows) == 40 and {r["style"] for r in rows} <= set(GLYPHS.finetune_styles())
    assert "Lisk" in {r["style"] for r in rows} and {r["shape"] for r in rows} <= set(GLYPHS.shapes)
    assert build_parser().parse_args(["run", "--world", "glyphs"]).world == "glyphs"
    assert build_parser().parse_args(["run"]).world is None


def test_run_world_with_a_teacher_is_refused(tmp_path, capsys):
    from safeprune_engine.cli import main

    code = main(["run", "--world", "glyphs", "--teacher", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code != 0 and "--world" in capsys.readouterr().err
