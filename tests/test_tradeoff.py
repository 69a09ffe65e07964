"""The erase/retain trade-off: Pareto frontiers on fixed points, the hand-written SVG, run snapshots
(--snapshot-steps, kept by a resumed run and loadable as a pipeline's UNet), and `safeprune eval --sweep`."""
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from safeprune_engine.cli import main
from safeprune_engine.eval.tradeoff import (PANELS, TradeoffPoint, describe_run, pareto_front, tradeoff_html,
                                            tradeoff_svg)

SVG = "{http://www.w3.org/2000/svg}"


def point(label, erased, y, method="bilevel", key="neighbour_rate"):
    return TradeoffPoint(label, method, f"lambda {label}", {"erased_rate": erased, key: y})


# ------------------------------------------------------------------------------------------------ Pareto frontier


def test_pareto_front_drops_dominated_points_and_keeps_ties():
    points = [point("a", 0.1, 0.5), point("b", 0.3, 0.8), point("c", 0.4, 0.7),  # c: b erases more and keeps more
              point("d", 0.3, 0.6),  # same erased rate as b, worse neighbour rate
              point("e", 0.5, 0.8),  # same neighbour rate as b, erases less
              point("f", 0.1, 0.5),  # equal to a: neither dominates the other
              point("g", 0.05, None)]  # not measured: left out
    assert [p.label for p in pareto_front(points, "neighbour_rate")] == ["a", "f", "b"]
    # reading the same numbers as lower-better turns the frontier around
    assert [p.label for p in pareto_front(points, "neighbour_rate", y_higher_better=False)] == ["a", "f"]


def test_pareto_front_takes_frechet_distance_as_lower_better():
    points = [point("a", 0.1, 30.0, key="fd_retained"), point("b", 0.3, 12.0, key="fd_retained"),
              point("c", 0.4, 10.0, key="fd_retained"), point("d", 0.2, 31.0, key="fd_retained"),
              point("e", 0.4, 11.0, key="fd_retained")]
    assert [p.label for p in pareto_front(points, "fd_retained", y_higher_better=False)] == ["a", "b", "c"]
    assert [p.label for p in pareto_front(points, "fd_retained", y_higher_better=True)] == ["a", "d"]


def metrics(erased, neighbour, unrelated, fd):
    return {"erased_rate": erased, "erased_content_accuracy": 0.5, "neighbour_rate": neighbour,
            "unrelated_accuracy": unrelated, "fd_retained": fd}


POINTS = [TradeoffPoint("b10", "bilevel", "lambda 10", metrics(0.1, 0.5, 0.9, 30.0)),
          TradeoffPoint("b100", "bilevel", "lambda 100", metrics(0.3, 0.8, 0.95, 12.0)),
          TradeoffPoint("b1k", "bilevel", "lambda 1000", metrics(0.4, 0.7, 0.97, 10.0)),
          TradeoffPoint("t4", "two-stage", "4 erase steps, lr_upper 5e-05", metrics(0.2, 0.6, 0.9, 20.0)),
          TradeoffPoint("t8", "two-stage", "8 erase steps, lr_upper 5e-05 at step 2", metrics(0.05, 0.3, 0.8, 45.)),
          TradeoffPoint("x", "two-stage", "no FD", {**metrics(0.5, 0.9, 0.9, None)})]
REFERENCES = [TradeoffPoint("teacher", "reference", "", metrics(0.95, 0.95, 1.0, 5.0)),
              TradeoffPoint("distill-only", "distill-only", "no erasing", metrics(0.9, 0.9, 0.98, 8.0))]


@pytest.mark.parametrize("key,label,higher", PANELS)
def test_tradeoff_svg_is_xml_with_a_marker_per_point_and_a_frontier_per_method(key, label, higher):
    root = ET.fromstring(tradeoff_svg(POINTS, key, label, higher, REFERENCES))
    assert root.tag == SVG + "svg"
    drawn = [p for p in POINTS if p.metrics[key] is not None]
    markers = root.findall(f".//{SVG}circle[@class='point']")
    assert len(markers) == len(drawn)
    assert sorted(m.get("data-method") for m in markers) == sorted(p.method for p in drawn)
    lines = root.findall(f".//{SVG}polyline[@class='frontier']")
    assert sorted(line.get("data-method") for line in lines) == ["bilevel", "two-stage"]
    for line in lines:  # each polyline joins exactly its method's frontier, left to right
        front = pareto_front([p for p in POINTS if p.method == line.get("data-method")], key, higher)
        xs = [float(pair.split(",")[0]) for pair in line.get("points").split()]
        assert len(xs) == len(front) and xs == sorted(xs)
    references = root.findall(f".//*[@class='reference']")
    assert len(references) == 2 and {r.tag for r in references} == {SVG + "rect", SVG + "path"}  # distinct shapes
    texts = [t.text for t in root.iter(SVG + "text")]
    assert "teacher" in texts and "distill-only" in texts and "λ 100" in texts
    assert "0.5" in texts and any(label in (t or "") for t in texts)  # x ticks, the y axis label


def test_tradeoff_html_has_three_panels_and_a_row_per_model():
    fragment = tradeoff_html(POINTS, REFERENCES)
    panels = re.findall(r"<svg.*?</svg>", fragment, flags=re.S)
    assert [ET.fromstring(svg).get("data-metric") for svg in panels] == [key for key, _, _ in PANELS]
    assert fragment.count("<tr>") == 1 + len(POINTS) + len(REFERENCES)
    assert "reference (distill-only)" in fragment


# ------------------------------------------------------------------------------------------------ runs


def write_run(path: Path, **settings) -> Path:
    path.mkdir(parents=True)
    (path / "run_config.json").write_text(json.dumps({"erase": ["by monet"], "steps": 8, **settings}))
    return path


@pytest.mark.parametrize("settings,expected", [
    ({}, ("bilevel", "tol 0.1")),  # the default tolerance
    ({"quality_tolerance": None}, ("bilevel", "lambda 1")),
    ({"quality_tolerance": 0.05, "bilevel_lambda": 3.0}, ("bilevel", "tol 0.05")),
    ({"method": "two-stage", "lr": 1e-4}, ("two-stage", "2 erase steps, lr_upper 0.0005")),
    ({"method": "two-stage", "two_stage_erase_steps": 3, "lr_upper": 0.01, "eta": 2.0},
     ("two-stage", "3 erase steps, lr_upper 0.01, eta 2")),
    ({"eta": 0.5}, ("bilevel", "tol 0.1")),  # bilevel's own default eta, given explicitly: no change
    ({"eta": 1.0}, ("bilevel", "tol 0.1, eta 1")),
    ({"method": "two-stage", "lr": 1e-4, "eta": 1.0}, ("two-stage", "2 erase steps, lr_upper 0.0005")),
    ({"method": "two-stage", "lr": 1e-4, "eta": 0.5}, ("two-stage", "2 erase steps, lr_upper 0.0005, eta 0.5")),
    ({"method": "distill-only", "erase": []}, ("distill-only", "no erasing")),
    ({"erase_method": "esd-x", "bilevel_lambda": 10.0, "quality_tolerance": None}, ("bilevel", "lambda 10, esd-x")),
])
def test_describe_run_names_the_erase_strength(tmp_path, settings, expected):
    run = write_run(tmp_path / "run", **settings)
    assert describe_run(run) == expected
    assert describe_run(run, step=4) == (expected[0], expected[1] + " at step 4")


# ------------------------------------------------------------------------------------------------ snapshots

CAPTIONS = ["a red square", "a blue square", "a green square", "a yellow square"] * 2
FAST = ["--resolution", "16", "--batch-size", "2", "--esd-pool-size", "4", "--esd-ddim-steps", "3", "--no-progress",
        "--lr", "1e-3", "--kernels", "off", "--prune-ratio", "0.5", "--erase", "by monet"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from safeprune_engine.testing import save_tiny_pipeline, write_image_folder

    root = tmp_path_factory.mktemp("tradeoff")
    return {"root": root, "teacher": str(save_tiny_pipeline(root / "teacher", seed=0)),
            "data": str(write_image_folder(root / "data", CAPTIONS, size=16))}


def run_args(world, out, *extra, method="bilevel"):
    return ["run", "--teacher", world["teacher"], "--data", world["data"], "--method", method, "--steps", "4",
            "--out", str(out), *FAST, *extra]


SNAPSHOTS = ["--snapshot-steps", "2", "--snapshot-steps", "4", "--checkpoint-every", "3", "--keep-checkpoints", "1"]


@pytest.fixture(scope="module")
def runs(world):
    """A bilevel run with snapshots at steps 2 and 4 (of 4), and a two-stage run without any."""
    bilevel, two_stage = world["root"] / "bilevel", world["root"] / "two-stage"
    assert main(run_args(world, bilevel, *SNAPSHOTS)) == 0
    assert main(run_args(world, two_stage, "--two-stage-erase-steps", "1", method="two-stage")) == 0
    return {"bilevel": bilevel, "two-stage": two_stage}


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "diffusion_pytorch_model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_snapshot_steps_write_those_steps_and_outlive_checkpoint_pruning(runs):
    from safeprune_engine.checkpoint import list_checkpoints, list_snapshots

    out = runs["bilevel"]
    assert [step for step, _ in list_snapshots(out)] == [2, 4]
    assert [p.name for p in list_checkpoints(out)] == ["step-00000004"]  # step 3's was pruned, snapshot 2 stays
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step-00000002", "step-00000004"]
    final = weights(out / "checkpoints" / "step-00000004" / "student")
    assert_same_weights(weights(out / "snapshots" / "step-00000004"), final)
    early = weights(out / "snapshots" / "step-00000002")
    assert any(not torch.equal(early[k], final[k]) for k in final)  # two more steps changed the student
    assert json.loads((out / "run_config.json").read_text())["snapshot_steps"] == [2, 4]
    assert not list_snapshots(runs["two-stage"])


def test_a_resumed_run_keeps_its_snapshots_and_writes_the_rest(world, runs, monkeypatch):
    from safeprune_engine.bilevel import solvers

    out = world["root"] / "interrupted"
    original = solvers.SOLVERS.get("bilevel").step

    def crash_at_4(self, iteration):
        if iteration == 3:  # step 4: snapshot 2 and checkpoint 3 are written
            raise KeyboardInterrupt("simulated interruption")
        return original(self, iteration)

    monkeypatch.setattr(solvers.SOLVERS.get("bilevel"), "step", crash_at_4)
    with pytest.raises(KeyboardInterrupt):
        main(run_args(world, out, *SNAPSHOTS))
    monkeypatch.undo()
    kept = out / "snapshots" / "step-00000002" / "diffusion_pytorch_model.safetensors"
    written = kept.stat().st_mtime_ns
    assert not (out / "snapshots" / "step-00000004").exists()
    assert main(run_args(world, out, *SNAPSHOTS, "--resume", "latest")) == 0
    assert kept.stat().st_mtime_ns == written  # resumed at step 3: snapshot 2 is left as it was
    for step in (2, 4):  # and both are the uninterrupted run's, bit for bit
        name = f"step-{step:08d}"
        assert_same_weights(weights(out / "snapshots" / name), weights(runs["bilevel"] / "snapshots" / name))


def test_bad_snapshot_steps_are_refused_before_anything_is_written(world, tmp_path, capsys):
    from safeprune_engine.config import RunConfig
    from safeprune_engine.errors import SafepruneError

    out = tmp_path / "out"
    assert main(run_args(world, out, "--snapshot-steps", "5")) == 2
    assert "--snapshot-steps 5 is not a step of this run (1..4)" in capsys.readouterr().err
    assert not out.exists()
    config_file = tmp_path / "run.yaml"
    config_file.write_text("snapshot_steps: 3\n")
    assert RunConfig.from_file(config_file).snapshot_steps == [3]  # one value is a list of one
    config_file.write_text("snapshot-steps: [1, yes]\n")
    with pytest.raises(SafepruneError, match="run.yaml:1:17: snapshot_steps must be an integer or a list of "):
        RunConfig.from_file(config_file)


def test_load_pipeline_with_a_snapshot_as_its_unet(runs):
    from safeprune_engine.models.export import load_pipeline

    out = runs["bilevel"]
    snapshot = out / "snapshots" / "step-00000002"
    pipe = load_pipeline(out / "pipeline", unet_dir=snapshot)
    assert type(pipe.unet).__name__ == "PrunedUNet2DConditionModel"
    assert_same_weights({k: v for k, v in pipe.unet.state_dict().items()}, weights(snapshot))
    plain = load_pipeline(out / "pipeline")
    assert any(not torch.equal(a, b) for a, b in zip(plain.unet.state_dict().values(),
                                                     pipe.unet.state_dict().values()))
    for name in ("vae", "text_encoder"):  # the rest is the pipeline's
        for a, b in zip(getattr(plain, name).state_dict().values(), getattr(pipe, name).state_dict().values()):
            assert torch.equal(a, b)
    from safeprune_engine.errors import SafepruneError

    with pytest.raises(SafepruneError, match="not a saved UNet folder"):
        load_pipeline(out / "pipeline", unet_dir=out / "snapshots")


# ------------------------------------------------------------------------------------------------ eval --sweep


def test_eval_sweep_writes_every_point_to_json_and_html(world, runs, tmp_path, capsys):
    from safeprune_engine.eval.prompts import save_prompts
    from safeprune_engine.toy.prompts import toy_prompts

    specs = toy_prompts(unrelated_per_style=1)
    prompts = save_prompts([next(p for p in specs if p.set == name) for name in ("erased", "neighbour", "unrelated")],
                           tmp_path / "p.jsonl")
    out, report = tmp_path / "sweep.json", tmp_path / "sweep.html"
    bilevel, two_stage = str(runs["bilevel"]), str(runs["two-stage"])
    code = main(["eval", "--sweep", bilevel, two_stage, "--reference", world["teacher"], "--prompts", str(prompts),
                 "--samples-per-prompt", "1", "--steps", "1", "--device", "cpu", "--out", str(out),
                 "--report", str(report)])
    assert code == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    # the bilevel run's pipeline and its step-2 snapshot (step 4 is the pipeline), the two-stage run's pipeline
    assert [(p["label"], p["method"], p["strength"]) for p in data["points"]] == [
        (bilevel, "bilevel", "tol 0.1"), (bilevel + "@2", "bilevel", "tol 0.1 at step 2"),
        (two_stage, "two-stage", "1 erase steps, lr_upper 0.005")]
    assert data["points"][1]["unet"].endswith("step-00000002") and data["points"][0]["unet"] is None
    assert [(r["label"], r["method"]) for r in data["references"]] == [("teacher", "reference")]
    for entry in data["points"] + data["references"]:
        assert 0 <= entry["metrics"]["erased_rate"] <= 1 and entry["metrics"]["fd_retained"] >= 0
        assert entry["label"] in printed
    assert data["settings"]["seeds"] == [0] and data["settings"]["prompts"] == 3
    page = report.read_text()
    panels = re.findall(r"<svg.*?</svg>", page, flags=re.S)
    assert len(panels) == 3
    for svg in panels:
        root = ET.fromstring(svg)
        assert len(root.findall(f".//{SVG}circle[@class='point']")) == 3
        assert len(root.findall(f".//{SVG}polyline[@class='frontier']")) == 2
        assert len(root.findall(f".//*[@class='reference']")) == 1


def test_eval_sweep_bad_inputs_give_one_clear_error(world, runs, tmp_path, capsys):
    unfinished = write_run(tmp_path / "unfinished")
    empty = tmp_path / "empty"
    empty.mkdir()
    bilevel = str(runs["bilevel"])
    cases = [
        (["--sweep", str(tmp_path / "nope")], "--sweep .*nope does not exist"),
        (["--sweep", str(unfinished)], "run directory without an exported pipeline"),
        (["--sweep", str(empty)], "is neither a pipeline directory"),
        (["--sweep", bilevel, str(runs["bilevel"] / "pipeline")], "are the same model"),
        (["--sweep", bilevel, "--reference", str(tmp_path / "nope")], "--reference .*nope does not exist"),
        (["--sweep", bilevel, "--grids", str(tmp_path / "g")], "--grids goes with --model"),
        (["--sweep", bilevel, "--steps", "0"], "--steps must be >= 1"),
        (["--model", bilevel, "--report", str(tmp_path / "r.html")], "--report draws the trade-off of a --sweep"),
        (["--model", bilevel, "--reference", world["teacher"], "--reference", world["teacher"]],
         "--model takes one --reference"),
    ]
    for args, pattern in cases:
        assert main(["eval", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("safeprune: error: ") and re.search(pattern, err), (pattern, err)
    with pytest.raises(SystemExit):  # argparse: --model and --sweep exclude each other
        main(["eval", "--model", bilevel, "--sweep", bilevel])
    assert "not allowed with argument" in capsys.readouterr().err
