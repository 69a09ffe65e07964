"""The built-in default job on the shipped toy teacher: a short run writes every report section; the slow
variant (full default budget) checks the effect the paper claims, measured by the judge."""
import json

import pytest

from safeprune_engine.config import RunConfig
from safeprune_engine.toy.default_run import METHODS, TOY_TRAINING, run_default, toy_defaults


def test_short_default_run_writes_every_report_section(tmp_path):
    out = tmp_path / "default"
    # taylor pruning: the default run honours --prune-method, scoring units on the toy data
    config = RunConfig(out=str(out), steps=8, progress=False, esd_pool_size=2, esd_ddim_steps=3,
                       checkpoint_every=4, prune_method="taylor", prune_calibration_batches=1)
    metrics = run_default(config, eval_samples=1, eval_steps=2, finetune_images=24, tolerances=(0.2,))
    assert set(metrics["models"]) == {"teacher", *METHODS, "bilevel-tol0.2"}
    for name, model in metrics["models"].items():
        for key in ("erased_rate", "erased_content_accuracy", "neighbour_rate", "unrelated_accuracy", "fd"):
            assert model["metrics"][key] is not None, (name, key)
    students = [metrics["models"][m] for m in METHODS]
    assert all(s["params"] < metrics["models"]["teacher"]["params"] for s in students)
    settings = json.loads((out / "metrics.json").read_text())["settings"]
    assert settings["steps"] == 8 and settings["prune"]["method"] == "taylor"
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3  # erased, neighbour and unrelated grids inline
    for method in METHODS:
        assert method in html
        assert (out / method / "pipeline" / "model_index.json").is_file()
    markdown = (out / "report.md").read_text()
    assert "| metric | teacher | distill-only | two-stage | bilevel |" in markdown
    assert all((out / "grids" / f"{s}.png").is_file() for s in ("erased", "neighbour", "unrelated"))
    # the fine-tuning split really has no image of the erased style
    captions = [json.loads(line)["text"] for line in (out / "builtin" / "data" / "metadata.jsonl").open()]
    assert captions and not any("Vexa" in c for c in captions)
    # a rerun of the command reuses finished students (and only those) instead of training them again
    from safeprune_engine.toy.default_run import _finished

    assert all(_finished(out / m, 8) for m in METHODS) and not _finished(out / "bilevel", 9)
    # the trade-off: the erasing students and two-stage's snapshot inside its 2 erase steps, against the references
    tradeoff = json.loads((out / "metrics.json").read_text())["tradeoff"]
    # (and the extra bilevel student at another tolerance, for bilevel's frontier)
    assert [p["method"] for p in tradeoff["points"]] == ["two-stage", "bilevel", "bilevel", "two-stage"]
    assert [p["strength"] for p in tradeoff["points"][1:3]] == ["tol 0.1", "tol 0.2"]
    assert "at step 7" in tradeoff["points"][3]["strength"]
    assert [r["label"] for r in tradeoff["references"]] == ["teacher", "distill-only"]
    assert html.count("<svg") == 3 and "tradeoff" in html
    # the constraint form's multiplier and slack reach the report
    constraint = json.loads((out / "metrics.json").read_text())["constraint"]
    assert set(constraint) == {"bilevel", "bilevel-tol0.2"} and constraint["bilevel"]["multiplier"] > 0
    assert "multiplier" in html and "slack" in html


def test_toy_defaults_fill_only_what_the_user_did_not_set(tmp_path):
    stock = RunConfig(out=str(tmp_path))
    assert toy_defaults(stock).steps == TOY_TRAINING["steps"] != stock.steps
    # an explicit value equal to RunConfig's own default is still the user's choice
    assert toy_defaults(stock.replace(steps=stock.steps), explicit={"steps"}).steps == stock.steps
    ratio = toy_defaults(stock.replace(prune_ratio=0.3), explicit={"prune_ratio"})
    assert ratio.prune_ratio == 0.3 and ratio.target_macs is None  # a ratio replaces the toy's MACs target


def test_cli_passes_explicit_flags_and_config_keys(tmp_path):
    from safeprune_engine.cli import build_parser, explicit_fields

    config_file = tmp_path / "run.yaml"
    config_file.write_text("batch-size: 4\nlr: 0.0001\n")
    args = build_parser().parse_args(["run", "--steps", "1000", "--config", str(config_file)])
    assert explicit_fields(args) == {"steps", "batch_size", "lr"}


@pytest.mark.slow
def test_default_run_shows_leak_and_erasure(tmp_path):
    metrics = run_default(RunConfig(out=str(tmp_path / "default"), progress=False), eval_samples=2)
    rate = {name: m["metrics"]["erased_rate"] for name, m in metrics["models"].items()}
    content = {name: m["metrics"]["erased_content_accuracy"] for name, m in metrics["models"].items()}
    assert rate["teacher"] > 0.8
    assert rate["distill-only"] > 0.5 * rate["teacher"]  # distillation leaks the concept
    assert rate["bilevel"] < 0.5 * rate["distill-only"]  # the bilevel student erases it
    assert content["bilevel"] > content["distill-only"] - 0.2  # ... and still draws the object
    neighbour = {name: m["metrics"]["neighbour_rate"] for name, m in metrics["models"].items()}
    assert neighbour["bilevel"] > neighbour["distill-only"] - 0.2  # ... and keeps the look-alike style
