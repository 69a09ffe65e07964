"""Do the shipped bilevel defaults transfer? Train and judge every method on every world, prune ratio and seed.

For each cell (world x prune ratio x seed) this prunes the world's teacher by width at that ratio and trains,
with the built-in job's settings (TOY_TRAINING) and nothing tuned per world:
- distill-only (the leak, and the retention every target is relative to),
- two-stage with snapshots inside its erase phase, so its trade-off frontier has several erase strengths,
- bilevel with the shipped defaults (plus KEY=VALUE overrides, for trials),
then evaluates them and the teacher with the world's prompt set and judge, and checks the issue-12 targets:

    erased-style rate <= 0.10, and no two-stage point retains as much (neighbour and unrelated) with less erasure;
    content under erased prompts, neighbour-style rate, unrelated accuracy >= 0.95 x distill-only's;
    Frechet distance (non-erased prompts) <= 1.5 x distill-only's;
    distill-only still leaks: erased-style rate >= 0.5 x the teacher's.

    python benchmarks/validate_defaults.py                       # toy and glyphs, ratios 0.3 / 0.6, seeds 0 / 1
    python benchmarks/validate_defaults.py --worlds glyphs --jobs 2 quality_tolerance=0.1
    python benchmarks/validate_defaults.py --worlds toy:Kiru/Pell glyphs:Rhun/Lisk --name held-out

A world may name another erase task as WORLD:ERASED/NEIGHBOUR: the same teacher and judge (trained on every
style), but another style is erased (and left out of the fine-tuning split) and another one is its neighbour. That
gives held-out tasks without training a teacher: settings chosen on one task are checked on styles of other image
statistics (checkerboard, concentric rings) that no default was chosen on.

Cells run as subprocesses (--jobs at a time, one torch thread each) and are kept under --work: a rerun reuses
finished cells with the same settings and the same world teacher (a cell trained against an older teacher is
started afresh). Results: benchmarks/results/validation/<name>.json and .md, and an HTML
page with every cell's trade-off panels.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "validation"
METHODS = ("distill-only", "two-stage", "bilevel")
RETAINED = ("erased_content_accuracy", "neighbour_rate", "unrelated_accuracy")


def cell_name(world: str, ratio: float, seed: int) -> str:
    return f"{world.replace(':', '-').replace('/', '-')}-r{ratio:g}-s{seed}"


def task_world(spec: str):
    """The World of a --worlds entry: WORLD, or WORLD:ERASED/NEIGHBOUR (that world with another erase task)."""
    import dataclasses

    from safeprune_engine.errors import SafepruneError
    from safeprune_engine.toy.world import get_world

    name, _, task = spec.partition(":")
    try:
        world = get_world(name)
    except SafepruneError as error:
        raise SystemExit(f"--worlds {spec!r}: {error}") from None
    if not task:
        return world
    erased, _, neighbour = task.partition("/")
    if not neighbour:
        raise SystemExit(f"--worlds {spec!r}: write WORLD:ERASED/NEIGHBOUR, e.g. toy:Kiru/Pell")
    try:  # World checks that both are artist styles of that world
        return dataclasses.replace(world, erased_style=erased, neighbour_style=neighbour)
    except ValueError as error:
        raise SystemExit(f"--worlds {spec!r}: {error}") from None


def settings_key(overrides: dict, steps: int | None) -> str:
    """The cells' folder under --work: the trial's overrides and the shipped defaults they apply to (RunConfig's
    and the built-in job's), so a rerun after a change of defaults trains afresh instead of reusing old cells."""
    from safeprune_engine.config import RunConfig
    from safeprune_engine.toy.default_run import TOY_TRAINING

    defaults = {**RunConfig().identity(), **TOY_TRAINING}
    return hashlib.sha256(json.dumps([overrides, steps, defaults], sort_keys=True, default=str).encode()
                          ).hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def teacher_digest(world_name: str) -> str:
    """The world's shipped teacher UNet weights, hashed: a cell trained against another teacher (a rebuilt world) is
    not reused."""
    from safeprune_engine.toy.teacher import toy_teacher_path

    weights = toy_teacher_path(task_world(world_name)) / "unet" / "diffusion_pytorch_model.safetensors"
    return hashlib.sha256(weights.read_bytes()).hexdigest()[:16]


def reusable(path: Path, world_name: str) -> bool:
    """A finished cell of the same settings, trained against the world's current teacher."""
    return path.is_file() and json.loads(path.read_text()).get("teacher_digest") == teacher_digest(world_name)


def run_cell(world_name: str, ratio: float, seed: int, overrides: dict, steps: int | None, work: Path,
             samples: int) -> dict:
    """Train the three students of one cell and evaluate them (and the teacher); returns the cell's record."""
    import torch

    from safeprune_engine.config import RunConfig
    from safeprune_engine.eval.tradeoff import describe_run, evaluate_sweep, sweep_models
    from safeprune_engine.models.teacher import load_teacher
    from safeprune_engine.prune.base import prune_unet
    from safeprune_engine.run import train
    from safeprune_engine.toy.default_run import materialize_toy_data, toy_defaults, two_stage_snapshot_steps
    from safeprune_engine.toy.prompts import toy_prompts

    torch.set_num_threads(1)
    world = task_world(world_name)
    root = work / cell_name(world_name, ratio, seed)
    marker, digest = root / "teacher_digest", teacher_digest(world_name)
    if root.is_dir() and (not marker.is_file() or marker.read_text() != digest):
        print(f"{root}: trained against another {world_name} teacher; starting the cell afresh", flush=True)
        shutil.rmtree(root)  # its students, data cache and trajectories belong to the old teacher
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text(digest)
    explicit = {"prune_ratio", "seed", *overrides} | ({"steps"} if steps else set())
    fields = dict(prune_ratio=ratio, seed=seed, progress=False, **overrides, **({"steps": steps} if steps else {}))
    shared = toy_defaults(RunConfig(out=str(root), **fields), explicit=set(explicit), world=world)
    materialize_toy_data(shared, world=world)
    teacher = load_teacher(shared.teacher)
    base = shared.replace(target_macs=None, cache_dir=str(root / "cache"), checkpoint_every=0)
    student, report = prune_unet(teacher.unet, base.prune_method, ratio=ratio, target_macs=None,
                                 importance=base.prune_importance)
    seconds = {}
    for method in METHODS:
        config = base.replace(method=method, out=str(root / method))
        if method != "bilevel":  # the overrides are trials of the bilevel defaults; the baselines keep theirs
            config = config.replace(**{k: getattr(RunConfig(), k) for k in overrides
                                       if k not in ("prune_ratio", "seed", "steps")})
            config = toy_defaults(config, explicit=set(explicit) - set(overrides), world=world)
            config = config.replace(target_macs=None, cache_dir=str(root / "cache"), checkpoint_every=0,
                                    out=str(root / method), method=method)
        if method == "two-stage":  # the same snapshots inside the erase phase as the built-in job
            config = config.replace(snapshot_steps=two_stage_snapshot_steps(config))
        config.validate()
        if not (root / method / "pipeline" / "model_index.json").is_file():
            started = time.perf_counter()
            train(config, teacher=teacher, student=student)
            seconds[method] = time.perf_counter() - started
    models = sweep_models([root / "two-stage", root / "bilevel"])
    references = sweep_models([Path(shared.teacher), root / "distill-only" / "pipeline"], flag="--reference")
    references[0].method, references[0].label = "reference", "teacher"
    references[1].method, references[1].label = "reference", "distill-only"
    result = evaluate_sweep(models, prompts=toy_prompts(world=world), judge=world.name, references=references,
                            samples_per_prompt=samples, steps=20, seed=seed)
    points = [p.to_dict() for p in result.points]
    for point in points:
        point["label"] = point["label"].replace(str(root) + "/", "")
    return {"world": world_name, "erased_style": world.erased_style, "neighbour_style": world.neighbour_style,
            "teacher_digest": digest, "prune_ratio": ratio, "seed": seed, "overrides": overrides,
            "bilevel_strength": describe_run(root / "bilevel")[1], "train_seconds": seconds,
            "params": {"before": report.params_before, "after": report.params_after},
            "teacher": result.references[0].metrics, "distill-only": result.references[1].metrics,
            "points": points, "targets": check_targets(result)}


def check_targets(result) -> dict:
    """The issue-12 targets for this cell's bilevel student, each as {value, bound, met}."""
    teacher, distill = result.references[0].metrics, result.references[1].metrics
    bilevel = next(p for p in result.points if p.method == "bilevel").metrics
    two_stage = [p.metrics for p in result.points if p.method == "two-stage"]
    checks = {"erased_rate": (bilevel["erased_rate"], 0.10, bilevel["erased_rate"] <= 0.10)}
    for key in RETAINED:
        bound = 0.95 * distill[key]
        checks[key] = (bilevel[key], bound, bilevel[key] >= bound - 1e-9)
    checks["fd_retained"] = (bilevel["fd_retained"], 1.5 * distill["fd_retained"],
                             bilevel["fd_retained"] <= 1.5 * distill["fd_retained"])
    checks["distill_leaks"] = (distill["erased_rate"], 0.5 * teacher["erased_rate"],
                               distill["erased_rate"] >= 0.5 * teacher["erased_rate"])
    # two-stage points that keep at least the bilevel student's neighbour and unrelated scores: their best erasure
    equal = [m["erased_rate"] for m in two_stage if m["neighbour_rate"] >= bilevel["neighbour_rate"]
             and m["unrelated_accuracy"] >= bilevel["unrelated_accuracy"]]
    best = min(equal) if equal else None
    checks["vs_two_stage"] = (bilevel["erased_rate"], best, best is None or bilevel["erased_rate"] <= best + 1e-9)
    return {k: {"value": v, "bound": b, "met": bool(m)} for k, (v, b, m) in checks.items()}


def summary_markdown(cells: list[dict], title: str) -> str:
    """One table per world: a row per cell and method (mean over nothing: every seed is its own row)."""
    keys = ("erased_rate", "erased_content_accuracy", "neighbour_rate", "unrelated_accuracy", "fd_retained")
    heads = ("erased rate", "content", "neighbour", "unrelated", "FD")
    lines = [f"# {title}", ""]
    for world in dict.fromkeys(c["world"] for c in cells):
        first = next(c for c in cells if c["world"] == world)
        task = f" (erased {first['erased_style']}, neighbour {first['neighbour_style']})" if "erased_style" in first \
            else ""
        lines += [f"## world: {world}{task}", "", "| ratio | seed | model | " + " | ".join(heads) + " | targets met |",
                  "|---|---|---|" + "---|" * (len(heads) + 1)]
        for cell in (c for c in cells if c["world"] == world):
            rows = [("teacher", cell["teacher"], ""), ("distill-only", cell["distill-only"], "")]
            rows += [(f"{p['method']} ({p['strength']})", p["metrics"], "") for p in cell["points"]
                     if p["method"] == "two-stage"]
            met = [k for k, v in cell["targets"].items() if v["met"]]
            missed = [k for k, v in cell["targets"].items() if not v["met"]]
            bilevel = next(p for p in cell["points"] if p["method"] == "bilevel")
            note = f"{len(met)}/{len(met) + len(missed)}" + (f" (missed: {', '.join(missed)})" if missed else "")
            rows.append((f"**bilevel** ({bilevel['strength']})", bilevel["metrics"], note))
            for name, metrics, note in rows:
                cells_text = " | ".join("-" if metrics.get(k) is None else f"{metrics[k]:.3f}" for k in keys)
                lines.append(f"| {cell['prune_ratio']:g} | {cell['seed']} | {name} | {cells_text} | {note} |")
        lines.append("")
    total = [v["met"] for c in cells for v in c["targets"].values()]
    lines.append(f"Targets met: {sum(total)} of {len(total)} checks over {len(cells)} cells.")
    return "\n".join(lines) + "\n"


def parse_overrides(pairs: list[str]) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from toy_sweep import parse_overrides as parse

    return parse(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="RunConfig FIELD=VALUE for the bilevel student (trials)")
    parser.add_argument("--worlds", nargs="+", default=["toy", "glyphs"],
                        help="WORLD, or WORLD:ERASED/NEIGHBOUR for another erase task of that world")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.6])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the built-in job's)")
    parser.add_argument("--samples", type=int, default=2, help="seeds per evaluation prompt")
    parser.add_argument("--jobs", type=int, default=2, help="cells trained at once (one torch thread each)")
    parser.add_argument("--work", default="runs/validate", help="cell folders (reused by a rerun)")
    parser.add_argument("--name", default="defaults", help="result file name under benchmarks/results/validation")
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # world,ratio,seed: run one cell here
    args = parser.parse_args()
    overrides = parse_overrides(args.overrides)
    key = settings_key(overrides, args.steps)
    work = Path(args.work) / key

    if args.cell:
        world, ratio, seed = args.cell.split(",")
        record = run_cell(world, float(ratio), int(seed), overrides, args.steps, work, args.samples)
        out = work / f"{cell_name(world, float(ratio), int(seed))}.json"
        out.write_text(json.dumps(record, indent=2) + "\n")
        return

    for spec in args.worlds:
        task_world(spec)  # a misspelt world or style fails here, not in every cell's subprocess
    cells = [(w, r, s) for w in args.worlds for r in args.ratios for s in args.seeds]
    pending = [c for c in cells if not reusable(work / f"{cell_name(*c)}.json", c[0])]
    work.mkdir(parents=True, exist_ok=True)
    running: list[tuple[subprocess.Popen, tuple]] = []
    started = time.perf_counter()
    while pending or running:
        while pending and len(running) < args.jobs:
            cell = pending.pop(0)
            log = open(work / f"{cell_name(*cell)}.log", "w")
            command = [sys.executable, __file__, *args.overrides, "--work", args.work, "--samples", str(args.samples),
                       "--cell", ",".join(map(str, cell))] + (["--steps", str(args.steps)] if args.steps else [])
            running.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), cell))
            print(f"started {cell_name(*cell)}", flush=True)
        time.sleep(5)
        for process, cell in list(running):
            if process.poll() is not None:
                running.remove((process, cell))
                state = "done" if process.returncode == 0 else f"FAILED ({work / cell_name(*cell)}.log)"
                print(f"{cell_name(*cell)}: {state} after {time.perf_counter() - started:.0f} s", flush=True)
    records = [json.loads((work / f"{cell_name(*c)}.json").read_text()) for c in cells
               if (work / f"{cell_name(*c)}.json").is_file()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"overrides": overrides, "cells": records}, indent=2) + "\n")
    text = summary_markdown(records, f"Validation of the bilevel defaults ({args.name})")
    (RESULTS / f"{args.name}.md").write_text(text)
    write_html(records, RESULTS / f"{args.name}.html")
    print(text)
    print(f"wrote {RESULTS / args.name}.json, .md and .html")


def write_html(cells: list[dict], path: Path) -> None:
    from safeprune_engine.eval.tradeoff import TradeoffPoint, report_page, tradeoff_html

    parts = []
    for cell in cells:
        points = [TradeoffPoint(p["label"], p["method"], p["strength"], p["metrics"]) for p in cell["points"]]
        references = [TradeoffPoint("teacher", "reference", "", cell["teacher"]),
                      TradeoffPoint("distill-only", "reference", "", cell["distill-only"])]
        parts.append(f"<h2>{cell['world']}, prune ratio {cell['prune_ratio']:g}, seed {cell['seed']}</h2>"
                     + tradeoff_html(points, references))
    path.write_text(report_page("".join(parts), "safeprune: validation of the bilevel defaults"), encoding="utf-8")


if __name__ == "__main__":
    main()
