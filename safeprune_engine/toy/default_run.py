"""The built-in default job (`make run`): prune the shipped toy teacher, train three students with the same
budget (distill-only, two-stage, bilevel), evaluate all of them against the teacher, and write a report.

The fine-tuning data is the toy world without the erased style, so whatever "by Vexa" the distilled student
still draws, it learned from the teacher, which is the leak the paper is about.

``world="glyphs"`` (``safeprune run --world glyphs``) runs the same job on the validation world: its teacher,
its data split, its erased style ("by Quen"), its prompt set and its judge, with the toy world's training
settings (TOY_TRAINING), to check that they transfer to a world they were not tuned on.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import time
from pathlib import Path

import numpy as np

from ..config import RunConfig
from ..errors import SafepruneError
from .world import TOY, World, caption_for, concept_prompt, get_world

log = logging.getLogger("safeprune_engine")

METHODS = ("distill-only", "two-stage", "bilevel")
# two-stage's student is also judged after these fractions of its erase steps (snapshots; 10, 25, 50 and 100 of the
# built-in job's 200), so the report draws its trade-off frontier over several erase strengths, not one point
TWO_STAGE_SNAPSHOTS = (0.05, 0.125, 0.25, 0.5)
FINETUNE_IMAGES = 512
DATA_SEED = 1234
# The built-in job's size, used for every field the user did not set, the same on every world (toy and glyphs): a
# 50%-MACs student trained 800 steps at batch 8 and lr 1e-4 (the tiny UNets learn at a higher rate than SD's
# default 1e-5), and a trajectory pool of 32 per erase prompt (8 left 12-19% of the style: the student fits a small
# pool and the erasure does not generalise to fresh samples). Two-stage's erase phase runs at lr_upper 3e-5: at the
# default 5 x lr it destroyed content and every other style within 10 erase steps, which leaves its trade-off
# frontier no points worth comparing. How the bilevel student erases and what it keeps (solver, quality tolerance,
# anchor, objective) are RunConfig's own defaults; see docs/status.md for how they were chosen.
TOY_TRAINING = dict(steps=800, batch_size=8, lr=1e-4, lr_upper=3e-5, target_macs=0.5, esd_pool_size=32,
                    checkpoint_every=200, log_every=20)


def toy_defaults(config: RunConfig, explicit: set[str] | None = None, world: World | str | None = None
                 ) -> RunConfig:
    """The built-in job's settings for every field the user did not set (paths inside the run dir): TOY_TRAINING,
    and the teacher and erase prompts of `world` (default the toy world).

    explicit: the fields the user set (the CLI knows); None = treat fields still at RunConfig's default as unset.
    """
    from .teacher import toy_teacher_path

    base = Path(config.out) / "builtin"
    stock = RunConfig()

    def user_set(name: str) -> bool:
        return name in explicit if explicit is not None else getattr(config, name) != getattr(stock, name)

    changes = {k: v for k, v in TOY_TRAINING.items() if not user_set(k)}
    if "target_macs" in changes and user_set("prune_ratio"):
        del changes["target_macs"]  # the user asked for a ratio
    world = get_world(world)
    changes["teacher"] = str(toy_teacher_path(world))
    if config.data is None:
        changes["data"] = str(base / "data")
    if not config.erase:
        erased = world.erased_style
        changes["erase"] = [concept_prompt(erased)]
        if not config.erase_prompts:
            # full captions: the anchor (caption minus "by Vexa") keeps the object and drops only the style
            changes["erase_prompts"] = [caption_for(s, c, erased) for s in world.shapes for c in world.colours]
            changes["anchor"] = "strip"
    return config.replace(**changes)


def materialize_toy_data(config: RunConfig, images: int = FINETUNE_IMAGES, world: World | str | None = None
                         ) -> None:
    """Render the fine-tuning split of `world` (no image of its erased style) into the run dir, once."""
    world = get_world(world)
    data = Path(config.data)
    if data == Path(config.out) / "builtin" / "data" and not (data / "metadata.jsonl").is_file():
        world.write_split(data, world.sample_items(images, seed=DATA_SEED, styles=world.finetune_styles()))


def one_thread_for_tiny_models() -> None:
    """The toy UNets are a few million parameters: on a CPU, torch's thread pool costs more than it gives (the
    pruned student's forward+backward at batch 8 took 58 ms on 1 thread and 120-190 ms on 2, on 2 cores). Unless
    the user set OMP_NUM_THREADS, the built-in job runs on one thread; a GPU run is not affected."""
    import os

    import torch

    if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > 1:
        log.info("built-in job: 1 torch thread for the tiny toy models (set OMP_NUM_THREADS to choose)")
        torch.set_num_threads(1)


def _finished(run_dir: Path, steps: int) -> bool:
    summary = run_dir / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("steps") == steps and (
        run_dir / "pipeline" / "model_index.json").is_file()


def run_default(config: RunConfig, methods: tuple[str, ...] = METHODS, eval_samples: int = 2,
                eval_steps: int = 20, finetune_images: int = FINETUNE_IMAGES, explicit: set[str] | None = None,
                world: World | str | None = None, tolerances: tuple[float, ...] = ()) -> dict:
    """Train one student per method from the same pruned init, evaluate each and the teacher, write reports.

    tolerances: extra bilevel students at these --quality-tolerance values (OUT/bilevel-tolTOL), drawn with the others
    in the report's trade-off plots.
    world: "toy" (default) or "glyphs": whose teacher, data, erased style, prompt set and judge. A rerun of the
    same command continues where it stopped: finished students are reused, an interrupted one resumes from its
    last checkpoint (use another --out per world: the data split is rendered once per run dir).
    """
    from ..checkpoint import list_checkpoints
    from .prompts import toy_prompts
    from ..eval.runner import evaluate
    from ..models.teacher import load_teacher
    from ..prune.base import calibration_batches, prune_unet
    from ..run import resolve_device, train

    for tolerance in tolerances:
        if not tolerance > 0:
            raise SafepruneError(f"--sweep-tolerances: each tolerance must be positive, got {tolerance}")
    world = get_world(world)
    out = Path(config.out)
    config = toy_defaults(config, explicit, world)
    config.validate()
    one_thread_for_tiny_models()
    materialize_toy_data(config, finetune_images, world)
    teacher = load_teacher(config.teacher)
    started = time.perf_counter()
    native_resolution = teacher.unet.config.sample_size * 2 ** (len(teacher.vae.config.block_out_channels) - 1)
    # one pruned init for every student, by the user's --prune-method (data-driven ones score on the toy data)
    student, report = prune_unet(
        teacher.unet, config.prune_method, ratio=None if config.target_macs else config.prune_ratio,
        target_macs=config.target_macs, importance=config.prune_importance,
        calibration=lambda: calibration_batches(teacher, config.data, config.resolution or native_resolution,
                                                config.prune_calibration_batches, config.batch_size,
                                                seed=config.seed, device=resolve_device(config)))
    print(report.summary(), flush=True)

    # (name, method, changes): the students to train, the extra bilevel tolerances after the methods
    students = [(method, method, {}) for method in methods]
    students += [(f"bilevel-tol{t:g}", "bilevel", {"quality_tolerance": t}) for t in tolerances]
    runs: dict[str, Path] = {}
    trained: list[float] = []  # seconds per student trained in this invocation, for the overall ETA
    for index, (name, method, changes) in enumerate(students, 1):
        run_dir = out / name
        eta = ""
        if trained:
            left = sum(trained) / len(trained) * (len(students) - index + 1)
            eta = f"; {time.perf_counter() - started:.0f} s elapsed, about {left:.0f} s of training left"
        print(f"[{index}/{len(students) + 1}] training the {name} student ({config.steps} steps){eta}", flush=True)
        student_started = time.perf_counter()
        if _finished(run_dir, config.steps):
            print(f"  already trained: {run_dir}", flush=True)
        else:
            resume = "latest" if list_checkpoints(run_dir) else None
            # one cache for all students: the data and the concept trajectories are encoded once
            cache_dir = config.cache_dir or str(out / "cache")
            run_config = config.replace(method=method, out=str(run_dir), resume=resume, cache_dir=cache_dir,
                                        **changes)
            if method == "two-stage" and not config.snapshot_steps:
                run_config = run_config.replace(snapshot_steps=two_stage_snapshot_steps(run_config))
            if config.launcher:  # new processes cannot receive in-memory models: the ranks load and prune themselves
                train(run_config)
            else:  # train() works on its own copies of the teacher and the student
                train(run_config, teacher=teacher, student=student)
            trained.append(time.perf_counter() - student_started)
        runs[name] = run_dir / "pipeline"
    training_seconds = time.perf_counter() - started

    print(f"[{len(students) + 1}/{len(students) + 1}] evaluating the teacher and {len(students)} students", flush=True)
    prompts = toy_prompts(world=world)
    evaluations = {"teacher": evaluate(config.teacher, prompts, judge=world.name, samples_per_prompt=eval_samples,
                                       steps=eval_steps, seed=config.seed)}
    for method, pipeline_dir in runs.items():
        evaluations[method] = evaluate(pipeline_dir, prompts, judge=world.name, samples_per_prompt=eval_samples,
                                       steps=eval_steps, seed=config.seed)
    tradeoff = tradeoff_points(out, runs, evaluations, prompts, world, eval_samples, eval_steps, config.seed)
    constraint = constraint_state(runs)
    metrics = {
        "settings": {"world": world.name, "steps": config.steps, "batch_size": config.batch_size, "lr": config.lr,
                     "prune": report.to_dict(), "erase": config.erase, "anchor": config.anchor,
                     "methods": list(methods), "eval": evaluations["teacher"].settings,
                     "training_seconds": training_seconds,
                     "total_seconds": time.perf_counter() - started},
        "models": {name: result.model.to_dict() for name, result in evaluations.items()},
        "tradeoff": {"points": [p.to_dict() for p in tradeoff[0]], "references": [p.to_dict() for p in tradeoff[1]]},
        "constraint": constraint,
    }
    for result in metrics["models"].values():
        result.pop("judged", None)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_reports(out, evaluations, metrics, world, tradeoff)
    print(markdown_table(evaluations, world), flush=True)
    print(f"report: {out / 'report.html'} (also report.md, metrics.json)", flush=True)
    return metrics


def constraint_state(runs: dict) -> dict[str, dict[str, float]]:
    """Each constraint-form bilevel student's last logged multiplier, slack and ratio (from its summary.json)."""
    state = {}
    for name, pipeline_dir in runs.items():
        summary = pipeline_dir.parent / "summary.json"
        final = json.loads(summary.read_text()).get("final", {}) if summary.is_file() else {}
        values = {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("constraint/")}
        if values:
            state[name] = values
    return state


def constraint_lines(constraint: dict) -> list[str]:
    return [f"{name}: at the end, multiplier {v['multiplier']:.3g}, L_ft ratio to the value model {v['ratio']:.3f} "
            f"on the probe set (slack {v['slack']:+.3f} below 1 + tolerance)" for name, v in constraint.items()
            if {"multiplier", "ratio", "slack"} <= set(v)]


def two_stage_snapshot_steps(config: RunConfig) -> list[int]:
    """The steps inside two-stage's erase phase at which its student is also saved (TWO_STAGE_SNAPSHOTS of its erase
    steps in), for the trade-off frontier."""
    erase = config.effective_two_stage_erase_steps
    return sorted({config.steps - erase + round(f * erase) for f in TWO_STAGE_SNAPSHOTS if round(f * erase) >= 1})


def tradeoff_points(out: Path, runs: dict, evaluations: dict, prompts, world: World, samples: int, steps: int,
                    seed: int):
    """(points, references) of the erase/retain trade-off: every trained student that erases (and two-stage's
    snapshots inside its erase phase, evaluated here with the same prompts, judge and seeds), with the teacher and
    distill-only as references."""
    from ..eval.tradeoff import TradeoffPoint, describe_run, evaluate_sweep, sweep_models

    points, references = [], []
    for name, result in evaluations.items():
        if name in ("teacher", "distill-only"):
            references.append(TradeoffPoint(name, "reference", "", dict(result.model.metrics)))
        else:
            method, strength = describe_run(runs[name].parent)
            points.append(TradeoffPoint(name, method, strength, dict(result.model.metrics)))
    snapshots = [m for name in runs if name not in ("distill-only",)
                 for m in sweep_models([runs[name].parent]) if m.unet_dir is not None]
    if snapshots:
        print(f"  and {len(snapshots)} snapshots inside the erase phase, for the trade-off plots", flush=True)
        swept = evaluate_sweep(snapshots, prompts=prompts, judge=world.name, samples_per_prompt=samples, steps=steps,
                               seed=seed)
        for point in swept.points:
            point.label = point.label.replace(str(out) + "/", "")
        points += swept.points
    return points, references


# ---- reports -------------------------------------------------------------------------------------------------
def rows(world: World = TOY) -> tuple[tuple[str, str], ...]:
    """(metric key, description) of the report's table, naming `world`'s erased and neighbour styles."""
    return (
        ("erased_rate", f"'{world.erased_style}' style rate under erased prompts (lower = erased)"),
        ("erased_content_accuracy", "content accuracy under erased prompts (object still drawn)"),
        ("neighbour_rate", f"neighbour style '{world.neighbour_style}' rate (keep high)"),
        ("unrelated_accuracy", "accuracy on unrelated prompts"),
        ("fd_retained", "Frechet distance to real images, non-erased prompts"),
    )



def markdown_table(evaluations: dict, world: World | str | None = None) -> str:
    names = list(evaluations)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, text in rows(get_world(world)):
        cells = []
        for name in names:
            value = evaluations[name].model.metrics.get(key)
            cells.append("-" if value is None else f"{value:.3f}")
        lines.append(f"| {text} | " + " | ".join(cells) + " |")
    for key, text, fmt in (("params", "UNet params", "{:,}"), ("unet_macs", "UNet MACs / forward", "{:,}"),
                           ("latency_s_per_image", "sampling latency (s / image)", "{:.4f}")):
        cells = [fmt.format(getattr(evaluations[n].model, key)) if getattr(evaluations[n].model, key) is not None
                 else "-" for n in names]
        lines.append(f"| {text} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(evaluations: dict) -> list[str]:
    """Plain sentences read off the numbers (not asserted): leak, erasure and what was kept."""
    get = lambda name, key: evaluations[name].model.metrics.get(key) if name in evaluations else None  # noqa: E731
    lines = []
    teacher_rate = get("teacher", "erased_rate")
    for name in METHODS:
        rate = get(name, "erased_rate")
        if rate is None or teacher_rate is None:
            continue
        kept = rate / teacher_rate if teacher_rate else float("nan")
        lines.append(f"{name}: draws the erased style in {rate:.0%} of erased-prompt samples "
                     f"({kept:.0%} of the teacher's {teacher_rate:.0%}); content accuracy "
                     f"{get(name, 'erased_content_accuracy'):.0%}, neighbour style kept in "
                     f"{get(name, 'neighbour_rate'):.0%}, unrelated accuracy {get(name, 'unrelated_accuracy'):.0%}.")
    return lines


def comparison_grid(evaluations: dict, set_name: str, max_prompts: int = 8) -> np.ndarray:
    """uint8 grid: a row per prompt; column blocks teacher | students, each block the same seeds."""
    first = next(iter(evaluations.values()))
    prompts = [p.prompt for p in first.prompts if p.set == set_name][:max_prompts]
    blocks = []
    for result in evaluations.values():
        rows = [np.concatenate(list(result.model.images[p]), axis=1) for p in prompts]
        blocks.append(np.concatenate(rows, axis=0))
    gap = np.full((blocks[0].shape[0], 4, 3), 255, np.uint8)
    grid = blocks[0]
    for block in blocks[1:]:
        grid = np.concatenate([grid, gap, block], axis=1)
    return np.concatenate([_labels(list(evaluations), blocks[0].shape[1], 4), grid], axis=0)


def _labels(names: list[str], block_width: int, gap: int, height: int = 12) -> np.ndarray:
    """A white strip with each column block's name, drawn with PIL's built-in bitmap font."""
    from PIL import Image, ImageDraw

    width = len(names) * block_width + (len(names) - 1) * gap
    strip = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for i, name in enumerate(names):
        draw.text((i * (block_width + gap) + 1, 0), name, fill=(0, 0, 0))
    return np.asarray(strip)


def _png(image: np.ndarray, scale: int = 3) -> bytes:
    from PIL import Image

    picture = Image.fromarray(image)
    picture = picture.resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def write_reports(out: Path, evaluations: dict, metrics: dict, world: World | str | None = None,
                  tradeoff: tuple[list, list] | None = None) -> None:
    """report.md (table, verdict, grids) and the self-contained report.html, which also draws the erase/retain
    trade-off (tradeoff: the (points, references) of tradeoff_points)."""
    from ..eval.tradeoff import tradeoff_html

    world = get_world(world)
    first = next(iter(evaluations.values()))
    sets = list(dict.fromkeys(p.set for p in first.prompts))
    grids_dir = out / "grids"
    grids_dir.mkdir(parents=True, exist_ok=True)
    pngs = {}
    for set_name in sets:
        pngs[set_name] = _png(comparison_grid(evaluations, set_name))
        (grids_dir / f"{set_name}.png").write_bytes(pngs[set_name])
    columns = " | ".join(evaluations)
    settings = metrics["settings"]
    intro = (f"Teacher pruned to {settings['prune']['macs_after'] / settings['prune']['macs_before']:.0%} of its MACs; "
             f"each student trained {settings['steps']} steps at batch {settings['batch_size']} on a fine-tuning "
             f"split with no '{world.erased_style}' image; erased concept {settings['erase']}. Training took "
             f"{settings['training_seconds']:.0f} s, the whole run {settings['total_seconds']:.0f} s.")
    md = [f"# safeprune-engine default run: concept leakage and erasure in the {world.name} world", "", intro, "",
          markdown_table(evaluations, world), "", *[f"- {line}" for line in verdict(evaluations)],
          *[f"- {line}" for line in constraint_lines(metrics.get("constraint", {}))], ""]
    for set_name in sets:
        md += [f"## {set_name} prompts", f"Columns: {columns} (same prompts and seeds in every block).", "",
               f"![{set_name}](grids/{set_name}.png)", ""]
    (out / "report.md").write_text("\n".join(md))

    def html_table() -> str:
        names = list(evaluations)
        head = "".join(f"<th>{n}</th>" for n in names)
        body = []
        for key, text in rows(world):
            cells = "".join(
                f"<td>{'-' if evaluations[n].model.metrics.get(key) is None else f'{evaluations[n].model.metrics[key]:.3f}'}</td>"
                for n in names)
            body.append(f"<tr><td>{text}</td>{cells}</tr>")
        for key, text in (("params", "UNet params"), ("unet_macs", "UNet MACs / forward")):
            cells = "".join(f"<td>{getattr(evaluations[n].model, key):,}</td>" for n in names)
            body.append(f"<tr><td>{text}</td>{cells}</tr>")
        return f"<table><tr><th>metric</th>{head}</tr>{''.join(body)}</table>"

    tradeoff_section = ""
    if tradeoff is not None and tradeoff[0]:
        tradeoff_section = (tradeoff_html(*tradeoff) + "<p>Two-stage is also judged part-way through its erase "
                            "phase (snapshots after " + ", ".join(f"{f:.0%}" for f in TWO_STAGE_SNAPSHOTS)
                            + " of its erase steps), so its frontier spans several erase strengths.</p>")
    sections = []
    for set_name in sets:
        encoded = base64.b64encode(pngs[set_name]).decode()
        sections.append(f"<h2>{set_name} prompts</h2><p>Columns: {columns} (same prompts and seeds).</p>"
                        f"<img alt='{set_name}' src='data:image/png;base64,{encoded}'>")
    html = ("<!doctype html><html><head><meta charset='utf-8'><title>safeprune-engine default run</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
            "img{image-rendering:pixelated;max-width:100%}</style></head><body>"
            f"<h1>Concept leakage and erasure in the {world.name} world</h1>"
            f"<p>{intro}</p>{html_table()}<ul>{''.join(f'<li>{v}</li>' for v in verdict(evaluations))}"
            f"{''.join(f'<li>{v}</li>' for v in constraint_lines(metrics.get('constraint', {})))}</ul>"
            f"{tradeoff_section}{''.join(sections)}</body></html>")
    (out / "report.html").write_text(html)
