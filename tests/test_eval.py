"""Evaluation: metrics on hand-built cases, prompt files, evaluate() on a tiny pipeline, `safeprune eval`,
pluggable judges (user torch classifier, CLIP, CSD, NudeNet) and every bad input's message."""
import json
import sys

import numpy as np
import pytest
import torch

from safeprune_engine.cli import main
from safeprune_engine.errors import SafepruneError
from safeprune_engine.eval import metrics as M
from safeprune_engine.eval.prompts import PromptSpec, load_prompts
from safeprune_engine.toy.prompts import toy_labels, toy_prompt_file, toy_prompts
from safeprune_engine.toy.world import ERASED_STYLE, NEIGHBOUR_STYLE, Item, render_batch



# ------------------------------------------------------------------------------------------------ hand-built models


def drawing(style_of):
    """A 'model' that renders the prompted object in style_of(prompted style); seeds shift so it never copies
    the real images the Frechet distance compares against."""

    def model(prompts, seeds):
        items = []
        for prompt, seed in zip(prompts, seeds):
            labels = toy_labels(prompt)
            items.append(Item(labels["shape"], labels["colour"], style_of(labels["style"]), seed + 10_000))
        return render_batch(items)

    return model


always_styled = drawing(lambda style: ERASED_STYLE)
faithful = drawing(lambda style: style)
erasing = drawing(lambda style: "plain" if style == ERASED_STYLE else style)


def shifted(prompts, seeds):
    """Faithful drawings with a colour cast: same labels, different image statistics."""
    images = faithful(prompts, seeds).astype(np.int16)
    images[..., 2] = 255 - images[..., 2]
    return images.clip(0, 255).astype(np.uint8)


SMALL = toy_prompts(unrelated_per_style=2)


def test_metric_functions_on_hand_built_labels():
    expected = [{"shape": "circle", "colour": "red", "style": "Vexa"}] * 4
    judged = [
        {"shape": "circle", "colour": "red", "style": "Vexa"},
        {"shape": "circle", "colour": "red", "style": "plain"},
        {"shape": "square", "colour": "red", "style": "Vexa"},
        {"shape": "circle", "colour": "blue", "style": "Orrin"},
    ]
    assert M.concept_rate(judged, expected) == 0.5
    assert M.content_accuracy(judged, expected) == 0.5
    assert M.accuracy(judged, expected) == 0.25
    assert M.head_accuracy(judged, expected) == {"shape": 0.75, "colour": 0.75, "style": 0.5}
    assert M.label_distribution(judged) == {"Orrin": 0.25, "Vexa": 0.5, "plain": 0.25}
    assert M.concept_rate(judged, [{"shape": "circle"}] * 4) is None  # prompts without a style label
    with pytest.raises(ValueError):
        M.accuracy(judged, expected[:2])


def test_frechet_distance_is_zero_on_itself_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 6))
    assert M.frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    distances = [M.frechet_distance(a, a + shift) for shift in (0.5, 1.0, 2.0)]
    assert distances == sorted(distances) and distances[0] > 0
    assert distances[1] == pytest.approx(6 * 1.0**2, rel=1e-6)  # a pure mean shift adds |d|^2
    b = rng.normal(size=(150, 6)) * 1.5 + 0.3
    sqrtm = pytest.importorskip("scipy.linalg").sqrtm
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * sqrtm(cov_a @ cov_b).real)
    assert M.frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    assert M.frechet_distance(a[:5], b[:7]) >= 0  # fewer samples than dimensions: still finite, >= 0


def test_a_model_that_always_draws_the_style_scores_rate_one():
    from safeprune_engine.eval import evaluate

    result = evaluate(always_styled, SMALL, samples_per_prompt=2)
    m = result.metrics
    assert m["erased_rate"] == 1.0 and m["erased_content_accuracy"] == 1.0
    assert m["neighbour_rate"] == 0.0 and m["unrelated_accuracy"] == 0.0
    assert result.model.sets["neighbour"]["concept_distribution"] == {ERASED_STYLE: 1.0}


def test_a_model_that_erases_the_style_keeps_the_object_and_the_neighbour():
    from safeprune_engine.eval import evaluate

    result = evaluate(erasing, SMALL, samples_per_prompt=2, reference=faithful)
    m, ref = result.metrics, result.reference.metrics
    assert m["erased_rate"] == 0.0 and m["erased_content_accuracy"] == 1.0
    assert m["neighbour_rate"] == 1.0 and m["unrelated_accuracy"] == 1.0
    assert result.model.sets["erased"]["concept_distribution"] == {"plain": 1.0}
    assert ref["erased_rate"] == 1.0 and ref["neighbour_rate"] == 1.0
    # the faithful reference matches the real renderings everywhere; the eraser only differs on the erased set
    assert ref["fd"] < m["fd"] and m["fd_retained"] < 0.5 * result.model.sets["erased"]["fd"]
    table = result.table()
    assert "erased-concept rate" in table and "reference" in table


def test_frechet_distance_in_evaluate_grows_for_a_shifted_model():
    from safeprune_engine.eval import evaluate

    result = evaluate(shifted, SMALL, samples_per_prompt=2, reference=faithful)
    assert result.reference.metrics["fd"] < 0.2 * result.metrics["fd"]
    assert result.metrics["unrelated_accuracy"] is not None


def test_prompt_files_round_trip_as_json_and_jsonl(tmp_path):
    specs = toy_prompts()
    sets = [s.set for s in specs]
    assert sets.count("erased") == 16 and sets.count("neighbour") == 16 and sets.count("unrelated") == 12
    assert {s.labels["style"] for s in specs if s.set == "erased"} == {ERASED_STYLE}
    assert {s.labels["style"] for s in specs if s.set == "neighbour"} == {NEIGHBOUR_STYLE}
    unrelated = [s for s in specs if s.set == "unrelated"]
    assert {s.labels["style"] for s in unrelated} == {"plain", "Pell", "Kiru"}
    assert {s.labels["shape"] for s in unrelated} == {"circle", "square", "triangle", "diamond"}
    assert all(toy_labels(s.prompt) == s.labels for s in specs)
    for name in ("prompts.json", "prompts.jsonl"):
        path = toy_prompt_file(tmp_path / name)
        assert load_prompts(path) == specs
    assert json.loads((tmp_path / "prompts.json").read_text())[0] == specs[0].to_dict()
    nested = tmp_path / "nested.jsonl"
    nested.write_text('{"prompt": "a cat", "set": "pets", "labels": {"animal": "cat"}}\n\n')
    assert load_prompts(nested) == [PromptSpec("a cat", "pets", {"animal": "cat"})]


@pytest.mark.parametrize("text, message", [
    ("", "no prompts"),
    ("[{\"prompt\": \"x\"}]", "'set' is missing"),
    ("[{\"set\": \"erased\"}]", "'prompt' is missing"),
    ("{\"prompt\": \"x\", \"set\": \"a\"}\nnot json\n", "line 2 is not JSON"),
    ("[{\"prompt\": \"x\", \"set\": \"a\"}, {\"prompt\": \"x\", \"set\": \"b\"}]", "appears twice"),
    ("[{\"prompt\": \"x\", \"set\": \"a\", \"style\": 3}]", "labels must be strings"),
])
def test_bad_prompt_files_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(SafepruneError, match=message):
        load_prompts(path)


def test_labels_the_judge_cannot_read_are_refused():
    from safeprune_engine.eval import evaluate

    with pytest.raises(SafepruneError, match="not one the toy judge reads"):
        evaluate(faithful, [PromptSpec("a red circle by Monet", "erased", {"style": "Monet"})])


# ------------------------------------------------------------------------------------------------ tiny pipeline


@pytest.fixture(scope="module")
def pipelines():
    from safeprune_engine.testing import tiny_pipeline

    return tiny_pipeline(seed=0), tiny_pipeline(seed=1)


def pick(specs, per_set=2):
    return [s for name in ("erased", "neighbour", "unrelated") for s in [p for p in specs if p.set == name][:per_set]]


PIPE_PROMPTS = pick(toy_prompts(unrelated_per_style=1))


def test_evaluate_on_a_tiny_pipeline_reports_every_metric(pipelines, tmp_path):
    from safeprune_engine.eval import evaluate

    student, teacher = pipelines
    result = evaluate(student, PIPE_PROMPTS, samples_per_prompt=2, steps=2, reference=teacher, seed=5)
    for model in (result.model, result.reference):
        for key in ("erased_rate", "erased_content_accuracy", "neighbour_rate", "unrelated_accuracy"):
            assert 0.0 <= model.metrics[key] <= 1.0, key
        assert model.metrics["fd"] >= 0 and model.metrics["fd_retained"] >= 0
        assert model.params == sum(p.numel() for p in student.unet.parameters())
        assert model.unet_macs > 0 and model.sampling_macs_per_image == model.unet_macs * 2 * 2
        assert model.latency_s_per_image > 0
        assert set(model.images) == {p.prompt for p in PIPE_PROMPTS}
        assert all(im.shape == (2, 16, 16, 3) and im.dtype == np.uint8 for im in model.images.values())
    assert result.settings["seeds"] == [5, 6] and result.settings["image_size"] == 16
    # fixed seeds: the same model sampled again gives the same pictures
    again = evaluate(student, PIPE_PROMPTS[:2], samples_per_prompt=2, steps=2, seed=5)
    for prompt, images in again.images.items():
        np.testing.assert_array_equal(images, result.images[prompt])
    data = json.loads(json.dumps(result.to_dict()))
    assert data["reference"]["metrics"].keys() == data["model"]["metrics"].keys()
    assert len(data["model"]["judged"][PIPE_PROMPTS[0].prompt]["style"]) == 2
    grids = result.save_grids(tmp_path / "grids")
    assert {p.name for p in grids} >= {"model_erased.png", "reference_erased.png", "real_erased.png"}


@pytest.mark.parametrize("given", ["pipeline dir", "run dir"])
def test_cli_eval_on_a_tiny_pipeline_writes_json(tiny_pipeline_dir, tmp_path, capsys, given):
    """--model takes a pipeline directory or the run directory `safeprune run` printed (its RUN/pipeline)."""
    import shutil

    from safeprune_engine.eval.prompts import save_prompts

    model = tiny_pipeline_dir
    if given == "run dir":
        model = tmp_path / "run"
        shutil.copytree(tiny_pipeline_dir, model / "pipeline")
        (model / "run_config.json").write_text("{}")
    prompts = save_prompts(PIPE_PROMPTS[:3], tmp_path / "p.jsonl")
    out = tmp_path / "eval.json"
    code = main(["eval", "--model", str(model), "--prompts", str(prompts), "--judge", "toy",
                 "--samples-per-prompt", "2", "--steps", "2", "--seed", "3", "--out", str(out), "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "erased-concept rate" in printed and "UNet MACs" in printed
    data = json.loads(out.read_text())
    assert data["settings"]["seeds"] == [3, 4] and data["settings"]["judge"] == "toy"
    assert data["model"]["name"] == str(model) and data["reference"] is None
    assert 0 <= data["model"]["metrics"]["erased_rate"] <= 1


# ------------------------------------------------------------------------------------------------ toy plug-ins

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def _python(code: str, *pythonpath, timeout=300):
    import os
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, (*pythonpath, REPO))))
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_pyproject_entry_points_find_the_toy_plugins_in_a_fresh_process(tmp_path):
    """Evaluation never imports the toy world: a process that imports only eval finds the toy judge and prompt set
    through the entry points pyproject.toml declares (installed here as a throwaway dist-info, as `pip install`
    would write them), and loading them is what imports the toy world."""
    tomllib = pytest.importorskip("tomllib")
    groups = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    assert set(groups) >= {"safeprune_engine.judges", "safeprune_engine.prompt_sets"}
    dist = tmp_path / "site" / "safeprune_probe-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: safeprune-probe\nVersion: 0\n")
    (dist / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in points.items()) + "\n"
        for group, points in groups.items()))
    code = """
import sys
from safeprune_engine.eval.judges import resolve_judge
from safeprune_engine.eval.prompts import resolve_prompts
from safeprune_engine.eval.runner import evaluate
assert "safeprune_engine.toy" not in sys.modules, "importing eval imported the toy world"
judge = resolve_judge("toy")
prompts = resolve_prompts(None)
print(type(judge).__name__, len(prompts), sorted({p.set for p in prompts}), "safeprune_engine.toy" in sys.modules)
"""
    result = _python(code, dist.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "ToyJudge 44 ['erased', 'neighbour', 'unrelated'] True"


def test_cli_eval_finds_the_toy_judge_and_prompts_without_entry_points(tiny_pipeline_dir, tmp_path):
    """Before a reinstall the dist metadata has no entry points: `safeprune eval` still finds the toy judge and the
    toy prompt set, because the CLI imports the toy world (which registers them), in a fresh process."""
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(tiny_pipeline_dir), "--samples-per-prompt", "1", "--steps", "1", "--batch-size",
            "64", "--device", "cpu", "--threads", "1", "--out", str(out)]
    code = f"""
import sys
import importlib.metadata as metadata
found = metadata.entry_points
metadata.entry_points = lambda **kw: (metadata.EntryPoints(()) if kw.get("group", "").startswith("safeprune_engine")
                                      else found(**kw))
from safeprune_engine.cli import main
sys.exit(main({args!r}))
"""
    result = _python(code)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["settings"]["judge"] == "toy" and data["settings"]["prompts"] == 44
    assert data["settings"]["real_per_prompt"] == 8  # the toy set rendered real images for the Frechet distance
    assert data["model"]["metrics"]["fd"] is not None


# ------------------------------------------------------------------------------------------------ bad inputs


@pytest.fixture
def fake_model(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")  # inputs are checked before any model is loaded
    return model


def run_eval(capsys, *args):
    code = main(["eval", *map(str, args)])
    return code, capsys.readouterr().err


def test_cli_eval_bad_inputs_give_one_clear_error(tmp_path, fake_model, capsys):
    prompts = toy_prompt_file(tmp_path / "p.json")
    cases = [
        (["--model", tmp_path / "nope", "--prompts", prompts], "--model .*nope does not exist"),
        (["--model", tmp_path, "--prompts", prompts], "is neither a pipeline directory .* nor a run directory"),
        (["--model", fake_model, "--reference", tmp_path / "nope"], "--reference .*does not exist"),
        (["--model", fake_model, "--prompts", tmp_path / "missing.json"], "prompts file .*missing.json does not exist"),
        (["--model", fake_model, "--prompts", "bogus"], "prompts file bogus does not exist .*prompt set: .*toy"),
        (["--model", fake_model, "--judge", "bogus"], "unknown judge 'bogus'"),
        (["--model", fake_model, "--judge", "clip:" + str(tmp_path / "no-clip")], "clip weights are not present"),
        (["--model", fake_model, "--judge", "csd:" + str(tmp_path)], "csd weights are not present"),
        (["--model", fake_model, "--judge", "nudenet:" + str(tmp_path / "x.onnx")], "nudenet weights are not"),
        (["--model", fake_model, "--samples-per-prompt", "0"], "--samples-per-prompt must be >= 1"),
    ]
    for args, pattern in cases:
        code, err = run_eval(capsys, *args)
        assert code == 2, (args, err)
        assert err.startswith("safeprune: error: ") and len(err.strip().splitlines()) >= 1
        assert __import__("re").search(pattern, err), (pattern, err)


def test_missing_judge_weights_say_how_to_supply_them(tmp_path):
    from safeprune_engine.eval.judges import resolve_judge

    with pytest.raises(SafepruneError, match="needs a local path: clip:PATH"):
        resolve_judge("clip")
    with pytest.raises(SafepruneError, match="save_pretrained"):
        resolve_judge(f"clip:{tmp_path}")
    with pytest.raises(SafepruneError, match="style_projection.safetensors"):
        resolve_judge(f"csd:{tmp_path}")
    with pytest.raises(SafepruneError, match="no .onnx file"):
        resolve_judge(f"nudenet:{tmp_path}")
    (tmp_path / "320n.onnx").write_bytes(b"not really")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        with pytest.raises(SafepruneError, match="needs onnxruntime"):
            resolve_judge(f"nudenet:{tmp_path}")
    user = tmp_path / "user"
    user.mkdir()
    (user / "judge.json").write_text(json.dumps({"module": "m:C", "labels": {"a": ["x", "y"]}, "image_size": 8}))
    with pytest.raises(SafepruneError, match="judge weights not present.*model.safetensors"):
        resolve_judge(str(user))
    with pytest.raises(SafepruneError, match="unknown judge"):
        resolve_judge(str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------------------------ pluggable judges

USER_MODULE = '''
import torch
from torch import nn


class ColourNet(nn.Module):
    """Mean colour -> colour and brightness heads."""

    def __init__(self, hidden=8):
        super().__init__()
        self.body = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, hidden), nn.Tanh())
        self.colour = nn.Linear(hidden, 4)
        self.brightness = nn.Linear(hidden, 2)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        h = self.body(x)
        return {"colour": self.colour(h), "brightness": self.brightness(h)}
'''


def test_user_supplied_torch_judge_round_trips(tmp_path, monkeypatch):
    from safeprune_engine.eval import evaluate
    from safeprune_engine.eval.judges import resolve_judge, save_torch_judge

    (tmp_path / "user_colour_judge.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_colour_judge", raising=False)
    import user_colour_judge

    torch.manual_seed(0)
    model = user_colour_judge.ColourNet(hidden=6).eval()
    labels = {"colour": ["red", "green", "blue", "yellow"], "brightness": ["dark", "light"]}
    out = save_torch_judge(model, tmp_path / "judge", "user_colour_judge:ColourNet", labels, image_size=16,
                           kwargs={"hidden": 6})
    assert not list(out.glob("*.pt")) and (out / "model.safetensors").is_file()
    judge = resolve_judge(str(out))
    images = render_batch([Item("circle", c, "plain", i) for i, c in enumerate(labels["colour"])])
    pred = judge.predict(images)
    with torch.no_grad():
        x = torch.nn.functional.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1,
                                            size=16, mode="bilinear", antialias=True)
        direct = model(x)
    for head in labels:
        np.testing.assert_allclose(pred.probs[head], direct[head].softmax(1).numpy(), atol=1e-5)
    assert judge.features(images).shape == (4, 6)
    # and it plugs into evaluate: prompts label the heads it has; the rest are ignored
    specs = [PromptSpec(f"a {c} circle", "unrelated", {"colour": c, "shape": "circle"}) for c in labels["colour"]]
    result = evaluate(faithful, specs, judge=str(out), samples_per_prompt=2)
    assert 0 <= result.metrics["unrelated_accuracy"] <= 1
    assert result.settings["judge_heads"] == labels


def test_clip_judge_from_a_local_directory(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from safeprune_engine.eval.judges import resolve_judge
    from safeprune_engine.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=tok.model_max_length, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(tmp_path)
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    CLIPProcessor(image_processor=processor, tokenizer=tok).save_pretrained(tmp_path)

    judge = resolve_judge(f"clip:{tmp_path}")
    judge.prepare(SMALL)
    assert judge.heads["style"][:2] == (ERASED_STYLE, NEIGHBOUR_STYLE) and len(judge.heads["shape"]) == 4
    images = render_batch([Item("circle", "red", "Vexa", i) for i in range(3)])
    pred = judge.predict(images)
    assert pred.probs["style"].shape == (3, 5) and len(pred.labels["colour"]) == 3
    scores = judge.scores(images, ["a red circle by Vexa"] * 3)
    assert scores.shape == (3,) and ((0 <= scores) & (scores <= 100)).all()
    assert judge.features(images).shape == (3, 8)


def test_csd_judge_from_a_local_directory(tmp_path):
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from safeprune_engine.eval.judges import resolve_judge

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=16, patch_size=8)).save_pretrained(tmp_path)
    save_file({"weight": torch.randn(8, 16)}, str(tmp_path / "style_projection.safetensors"))
    for style in (ERASED_STYLE, NEIGHBOUR_STYLE):
        folder = tmp_path / "references" / style
        folder.mkdir(parents=True)
        for i, image in enumerate(render_batch([Item("square", "red", style, i) for i in range(2)])):
            Image.fromarray(image).save(folder / f"{i}.png")
    judge = resolve_judge(f"csd:{tmp_path}")
    assert judge.heads == {"style": (NEIGHBOUR_STYLE, ERASED_STYLE)}
    pred = judge.predict(render_batch([Item("circle", "blue", ERASED_STYLE, 9)]))
    assert pred.probs["style"].shape == (1, 2) and pred.labels["style"][0] in judge.heads["style"]
    feats = judge.features(render_batch([Item("circle", "blue", ERASED_STYLE, 9)]))
    assert feats.shape == (1, 8) and np.linalg.norm(feats) == pytest.approx(1, rel=1e-5)
