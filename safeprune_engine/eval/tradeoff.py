"""The erase/retain trade-off: many models on one prompt set, their Pareto frontiers, and a report to look at.

Each model is a point: how often the erased style still shows (``erased_rate``, lower = erased) against one
retained-quality metric (``neighbour_rate`` and ``unrelated_accuracy``, higher better; ``fd_retained``, lower
better). A method's points come from runs at several erase strengths and from their snapshots (``safeprune run
--snapshot-steps``); reference models (the teacher, a distill-only student) are drawn as named markers.

    from safeprune_engine.eval.tradeoff import sweep_models, evaluate_sweep
    result = evaluate_sweep(sweep_models(["runs/bilevel-l10", "runs/two-stage-e100"]), "toy", judge="toy",
                            references=reference_models(["safeprune_engine/toy/assets/teacher"]))
    print(result.table()); result.save_json("sweep.json"); result.save_report("sweep.html")

``pareto_front``, ``tradeoff_svg`` and ``tradeoff_html`` need only the points (plain dicts of metrics): the SVG is
written by hand (no plotting library) and is self-contained. Nothing heavy is imported here at import time:
sampling (``evaluate_sweep``) imports torch and diffusers when it runs.
"""
from __future__ import annotations

import html
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import SafepruneError

log = logging.getLogger(__name__)

X_KEY = "erased_rate"
X_LABEL = "erased-style rate (lower = erased)"
# (metric, axis label, higher is better): the report's three panels
PANELS = (
    ("neighbour_rate", "neighbour-style rate", True),
    ("unrelated_accuracy", "unrelated accuracy", True),
    ("fd_retained", "Frechet distance, retained sets", False),
)
TABLE_COLUMNS = (
    ("erased_rate", "erased rate"),
    ("erased_content_accuracy", "content (erased)"),
    ("neighbour_rate", "neighbour rate"),
    ("unrelated_accuracy", "unrelated acc."),
    ("fd_retained", "FD retained"),
)
METHOD_COLOURS = {"bilevel": "#1f77b4", "two-stage": "#d62728", "interleaved": "#2ca02c", "alternating": "#9467bd",
                  "distill-only": "#7f7f7f"}
OTHER_COLOURS = ("#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#bcbd22")
REFERENCE_SHAPES = ("square", "diamond", "triangle")


@dataclass
class TradeoffPoint:
    """One evaluated model. method: what trained it (``bilevel``, ``two-stage``, ... or ``reference``); strength:
    its erase strength as text (``lambda 100``, ``4 erase steps, lr_upper 5e-05 at step 200``); metrics: the
    headline metrics of ``evaluate`` (``erased_rate``, ``neighbour_rate``, ...; None where not measured)."""

    label: str
    method: str
    strength: str
    metrics: dict[str, float | None]
    source: dict[str, Any] = field(default_factory=dict)  # where the model came from (pipeline, unet folder)

    def value(self, key: str) -> float | None:
        value = self.metrics.get(key)
        return float(value) if value is not None and math.isfinite(value) else None

    def to_dict(self) -> dict:
        return {"label": self.label, "method": self.method, "strength": self.strength, "metrics": self.metrics,
                **self.source}


# ------------------------------------------------------------------------------------------------ Pareto frontier


def _dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """a is at least as good as b on both (x lower, y higher after sign) and better on one."""
    return a[0] <= b[0] and a[1] >= b[1] and a != b


def pareto_front(points: Iterable[TradeoffPoint], y_key: str, y_higher_better: bool = True
                 ) -> list[TradeoffPoint]:
    """The points no other point dominates on (erased_rate, lower better) x (``y_key``), by erased rate.

    Pass one method's points. Points missing either metric are left out; equal points are all kept (neither
    dominates the other); at equal erased rate the better y comes first.
    """
    sign = 1.0 if y_higher_better else -1.0
    scored = [(p, (p.value(X_KEY), p.value(y_key))) for p in points]
    scored = [(p, (x, sign * y)) for p, (x, y) in scored if x is not None and y is not None]
    front = [(p, s) for p, s in scored if not any(_dominates(o, s) for _, o in scored)]
    return [p for p, _ in sorted(front, key=lambda item: (item[1][0], -item[1][1]))]


# ------------------------------------------------------------------------------------------------ SVG


def _nice_step(span: float) -> float:
    exponent = math.floor(math.log10(span))
    fraction = span / 10 ** exponent
    return next(n for n in (1, 2, 2.5, 5, 10) if fraction <= n) * 10 ** exponent


def _y_axis(values: Sequence[float]) -> tuple[float, float, list[float]]:
    """(low, high, ticks): 0..1 for rates and accuracies, else from 0 (or below) to a round number above."""
    if not values or (min(values) >= 0 and max(values) <= 1):
        return 0.0, 1.0, [0.0, 0.25, 0.5, 0.75, 1.0]
    low, high = min(0.0, min(values)), max(values)
    step = _nice_step(max(high - low, 1e-9) / 4)
    low, high = math.floor(low / step) * step, math.ceil(high / step) * step
    if high <= max(values):  # room above the highest marker
        high += step
    count = round((high - low) / step)
    return low, high, [low + i * step for i in range(count + 1)]


def short_strength(text: str, limit: int = 18) -> str:
    """A marker's label: the strength text with its long words shortened (the full text is the tooltip)."""
    for long, short in ((" erase steps", "E"), ("lambda ", "λ "), ("lr_upper ", "lr↑ "), (" at step ", " @")):
        text = text.replace(long, short)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _tip(point: TradeoffPoint) -> str:
    shown = ", ".join(f"{key} {point.metrics[key]:.4g}" for key, _ in TABLE_COLUMNS
                      if point.metrics.get(key) is not None)
    return f"{point.label} ({point.method}{', ' + point.strength if point.strength else ''}): {shown}"


def method_colours(points: Iterable[TradeoffPoint]) -> dict[str, str]:
    """One colour per method, in order of first appearance (the usual methods keep theirs in every plot)."""
    colours: dict[str, str] = {}
    others = iter(OTHER_COLOURS * 10)
    for point in points:
        if point.method not in colours:
            colours[point.method] = METHOD_COLOURS.get(point.method) or next(others)
    return colours


def _reference_marker(shape: str, x: float, y: float, r: float = 5.5) -> str:
    if shape == "square":
        return f'<rect x="{x - r:.1f}" y="{y - r:.1f}" width="{2 * r:.1f}" height="{2 * r:.1f}"'
    if shape == "diamond":
        d = f"M{x:.1f} {y - r - 1:.1f}L{x + r + 1:.1f} {y:.1f}L{x:.1f} {y + r + 1:.1f}L{x - r - 1:.1f} {y:.1f}Z"
        return f'<path d="{d}"'
    return f'<path d="M{x:.1f} {y - r - 1:.1f}L{x + r + 1:.1f} {y + r:.1f}L{x - r - 1:.1f} {y + r:.1f}Z"'


def tradeoff_svg(points: Sequence[TradeoffPoint], y_key: str, y_label: str, y_higher_better: bool = True,
                 references: Sequence[TradeoffPoint] = (), *, width: int = 460, height: int = 320) -> str:
    """A standalone ``<svg>`` of erased-style rate (x, 0..1) against ``y_key``: every point as a marker of its
    method's colour with a short strength label, each method's Pareto frontier as a polyline
    (``class="frontier"``), reference models as grey named markers (``class="reference"``), axis ticks and a
    legend. Points without both metrics are not drawn."""
    left, right, top, bottom = 58, width - 150, 30, height - 46
    drawn = [p for p in points if p.value(X_KEY) is not None and p.value(y_key) is not None]
    refs = [p for p in references if p.value(X_KEY) is not None and p.value(y_key) is not None]
    low, high, ticks = _y_axis([p.value(y_key) for p in drawn + refs])

    def sx(x: float) -> float:
        return left + min(max(x, 0.0), 1.0) * (right - left)

    def sy(y: float) -> float:
        return bottom - (y - low) / (high - low) * (bottom - top)

    def beside(x: float, y: float) -> str:
        """An open <text> tag for a marker's label: to its right, or to its left near the right edge."""
        if x > left + 0.75 * (right - left):
            return f'<text x="{x - 7:.1f}" y="{y:.1f}" text-anchor="end"'
        return f'<text x="{x + 7:.1f}" y="{y:.1f}"'

    esc = html.escape
    better = "higher" if y_higher_better else "lower"
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11" role="img" '
           f'data-metric="{esc(y_key)}">',
           f'<title>{esc(y_label)} against {esc(X_LABEL)}</title>',
           f'<text x="{left}" y="16" font-size="12" font-weight="bold">{esc(y_label)} ({better} better)</text>',
           f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" stroke="#999"/>']
    for x in (0.0, 0.25, 0.5, 0.75, 1.0):  # x axis: ticks, grid, labels
        out.append(f'<line x1="{sx(x):.1f}" y1="{top}" x2="{sx(x):.1f}" y2="{bottom}" stroke="#eee"/>'
                   f'<line x1="{sx(x):.1f}" y1="{bottom}" x2="{sx(x):.1f}" y2="{bottom + 4}" stroke="#333"/>'
                   f'<text x="{sx(x):.1f}" y="{bottom + 16}" text-anchor="middle">{x:g}</text>')
    for y in ticks:
        out.append(f'<line x1="{left}" y1="{sy(y):.1f}" x2="{right}" y2="{sy(y):.1f}" stroke="#eee"/>'
                   f'<line x1="{left - 4}" y1="{sy(y):.1f}" x2="{left}" y2="{sy(y):.1f}" stroke="#333"/>'
                   f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.4g}</text>')
    out.append(f'<text x="{(left + right) / 2:.1f}" y="{height - 8}" text-anchor="middle">{esc(X_LABEL)}</text>')
    out.append(f'<text transform="translate(14 {(top + bottom) / 2:.1f}) rotate(-90)" text-anchor="middle">'
               f'{esc(y_label)}</text>')

    colours = method_colours(points)
    legend_y = top + 6
    for method, colour in colours.items():
        mine = [p for p in drawn if p.method == method]
        front = pareto_front(mine, y_key, y_higher_better)
        if front:
            coords = " ".join(f"{sx(p.value(X_KEY)):.1f},{sy(p.value(y_key)):.1f}" for p in front)
            out.append(f'<polyline class="frontier" data-method="{esc(method)}" points="{coords}" fill="none" '
                       f'stroke="{colour}" stroke-width="1.5"/>')
        for p in mine:
            x, y = sx(p.value(X_KEY)), sy(p.value(y_key))
            on_front = any(p is q for q in front)
            out.append(f'<circle class="point" data-method="{esc(method)}" cx="{x:.1f}" cy="{y:.1f}" r="4" '
                       f'fill="{colour if on_front else "white"}" stroke="{colour}" stroke-width="1.5">'
                       f'<title>{esc(_tip(p))}</title></circle>')
            if p.strength:
                out.append(f'{beside(x, y - 5)} font-size="9" fill="{colour}">{esc(short_strength(p.strength))}'
                           '</text>')
        out.append(f'<circle cx="{right + 26}" cy="{legend_y}" r="4" fill="{colour}"/>'
                   f'<text x="{right + 34}" y="{legend_y + 4}">{esc(method)}</text>')
        legend_y += 16
    for index, p in enumerate(refs):
        x, y = sx(p.value(X_KEY)), sy(p.value(y_key))
        shape = REFERENCE_SHAPES[index % len(REFERENCE_SHAPES)]
        out.append(f'{_reference_marker(shape, x, y)} class="reference" fill="#333" stroke="white">'
                   f'<title>{esc(_tip(p))}</title></{"rect" if shape == "square" else "path"}>')
        out.append(f'{beside(x, y + 14)} font-size="9" fill="#333">{esc(p.label)}</text>')
        out.append(f'{_reference_marker(shape, right + 26, legend_y, 4)} fill="#333"/>'
                   f'<text x="{right + 34}" y="{legend_y + 4}">{esc(p.label)}</text>')
        legend_y += 16
    if colours:
        out.append(f'<text x="{right + 20}" y="{legend_y + 8}" font-size="9" fill="#666">filled: on the '
                   f'frontier</text>')
    out.append("</svg>")
    return "\n".join(out)


def tradeoff_html(points: Sequence[TradeoffPoint], references: Sequence[TradeoffPoint] = ()) -> str:
    """An HTML fragment (``<section class="tradeoff">``): one SVG panel per retained metric (PANELS) against
    the erased-style rate, and a table of every model's metrics, with the panels whose frontier it is on."""
    esc = html.escape
    panels = [tradeoff_svg(points, key, label, higher, references) for key, label, higher in PANELS]
    methods = list(method_colours(points))
    fronts = {(key, method): pareto_front([p for p in points if p.method == method], key, higher)
              for key, _, higher in PANELS for method in methods}
    head = "".join(f"<th>{esc(text)}</th>" for _, text in TABLE_COLUMNS)
    rows = []
    for p in list(points) + list(references):
        cells = "".join(f"<td>{'-' if p.value(key) is None else f'{p.value(key):.4g}'}</td>"
                        for key, _ in TABLE_COLUMNS)
        on = [label for key, label, _ in PANELS if any(p is q for q in fronts.get((key, p.method), ()))]
        kind = reference_kind(p) if any(p is r for r in references) else p.method
        rows.append(f"<tr><td>{esc(p.label)}</td><td>{esc(kind)}</td><td>{esc(p.strength)}</td>{cells}"
                    f"<td>{esc(', '.join(on))}</td></tr>")
    return "\n".join([
        '<section class="tradeoff">',
        "<style>.tradeoff .panels{display:flex;flex-wrap:wrap;gap:8px}.tradeoff table{border-collapse:collapse;"
        "font-size:12px}.tradeoff td,.tradeoff th{border:1px solid #ccc;padding:2px 6px;text-align:left}</style>",
        "<h2>Erasing against retained quality</h2>",
        "<p>Each marker is one model: x is how often the erased style still shows under its prompts (lower = "
        "erased); y is a retained-quality metric. Lines join each method's Pareto frontier (filled markers: no "
        "other point of the method is at least as good on both axes and better on one). Grey shapes are reference "
        "models.</p>",
        '<div class="panels">', *panels, "</div>",
        f"<table><tr><th>model</th><th>method</th><th>strength</th>{head}<th>on the frontier of</th></tr>",
        *rows, "</table>", "</section>"])


def reference_kind(point: TradeoffPoint) -> str:
    """How a reference's method reads in tables: ``reference``, or ``reference (distill-only)`` for a run."""
    return "reference" if point.method == "reference" else f"reference ({point.method})"


def report_page(fragment: str, title: str = "safeprune trade-off") -> str:
    """A whole HTML document around a fragment of tradeoff_html."""
    return (f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>\n'
            f'<body style="font-family:sans-serif">\n{fragment}\n</body></html>\n')


# ------------------------------------------------------------------------------------------------ runs as points

# settings that change how strongly a run erases, shown in a point's strength when they differ from the default
STRENGTH_FIELDS = ("erase_method", "eta", "lr_upper", "bilevel_inner_steps", "upper_every", "preserve_weight",
                   "uce_lambda", "salun_topk", "esd_guidance")


def read_run_config(run_dir: str | os.PathLike):
    """The RunConfig a run directory was started with (its run_config.json)."""
    from ..config import RunConfig

    path = Path(run_dir) / "run_config.json"
    try:
        return RunConfig.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError) as error:
        raise SafepruneError(f"{path} cannot be read: {error}") from None
    except SafepruneError as error:
        raise SafepruneError(f"{path}: {error}") from None


def describe_run(run_dir: str | os.PathLike, step: int | None = None) -> tuple[str, str]:
    """(method, erase strength as text) of a run directory, from its run_config.json.

    bilevel: ``tol 0.05`` (constraint form) or ``lambda 100``; interleaved: ``lambda 100``; two-stage:
    ``E erase steps, lr_upper X``; alternating: ``upper every N, lr_upper X``; distill-only: ``no erasing``.
    Then every STRENGTH_FIELDS setting that differs from its default (``eta 2``), and with `step` (a snapshot)
    `` at step N``.
    """
    from ..config import RunConfig

    config = read_run_config(run_dir)
    default = RunConfig(method=config.method)  # e.g. eta's default depends on the method
    shown = set()
    if config.method == "bilevel":
        shown.add("lr_upper")  # bilevel steps the student at lr only
        parts = [f"tol {config.quality_tolerance:g}" if config.quality_tolerance is not None
                 else f"lambda {config.bilevel_lambda:g}"]
    elif config.method == "interleaved":
        parts = [f"lambda {config.bilevel_lambda:g}"]
    elif config.method == "two-stage":
        parts = [f"{config.effective_two_stage_erase_steps} erase steps, lr_upper {config.effective_lr_upper:g}"]
        shown.add("lr_upper")
    elif config.method == "alternating":
        parts = [f"upper every {config.upper_every}, lr_upper {config.effective_lr_upper:g}"]
        shown.update(("lr_upper", "upper_every"))
    elif config.method == "distill-only":
        return config.method, "no erasing" + (f" at step {step}" if step is not None else "")
    else:
        parts = []

    def effective(settings, name):  # a setting given as what its default resolves to is no change of strength
        return getattr(settings, f"effective_{name}", getattr(settings, name))

    for name in STRENGTH_FIELDS:
        value, stock = effective(config, name), effective(default, name)
        if name not in shown and value != stock:
            parts.append(str(value) if name == "erase_method" else f"{name} {value:g}" if isinstance(
                value, float) else f"{name} {value}")
    text = ", ".join(parts)
    if step is not None:
        text += f" at step {step}"
    return config.method, text


@dataclass
class SweepModel:
    """A model to evaluate: a pipeline directory, and optionally a UNet folder (a snapshot) replacing its UNet."""

    label: str
    method: str
    strength: str
    pipeline_dir: Path
    unet_dir: Path | None = None


def _run_of(pipeline_dir: Path) -> Path | None:
    """The run directory whose export `pipeline_dir` is (RUN/pipeline), or None."""
    return pipeline_dir.parent if (pipeline_dir.parent / "run_config.json").is_file() else None


def _run_models(run_dir: Path, label: str, flag: str) -> list[SweepModel]:
    from ..checkpoint import list_snapshots
    from ..models.export import resolve_pipeline_dir

    pipeline = resolve_pipeline_dir(run_dir, flag)
    method, strength = describe_run(run_dir)
    steps = read_run_config(run_dir).steps
    models = [SweepModel(label, method, strength, pipeline)]
    for step, folder in list_snapshots(run_dir):
        if step != steps:  # the last step's snapshot is the exported pipeline's UNet
            models.append(SweepModel(f"{label}@{step}", *describe_run(run_dir, step), pipeline, folder))
    return models


def sweep_models(dirs: Sequence[str | os.PathLike], flag: str = "--sweep") -> list[SweepModel]:
    """The models of `dirs`, checked before anything loads. Each entry: a run directory (its exported pipeline,
    and each OUT/snapshots/step-N before its last step, with the pipeline's other components), a pipeline
    directory (of a run when it is RUN/pipeline), or a folder of run directories (the built-in default's --out)."""
    from ..models.export import resolve_pipeline_dir

    if not dirs:
        raise SafepruneError(f"{flag}: give at least one run or pipeline directory")
    models: list[SweepModel] = []
    for entry in dirs:
        given = Path(entry)
        if not given.exists():
            raise SafepruneError(f"{flag} {entry} does not exist")
        if (given / "model_index.json").is_file():
            run = _run_of(given)
            method, strength = describe_run(run) if run is not None else ("pipeline", "")
            models.append(SweepModel(str(entry), method, strength, given))
        elif (given / "run_config.json").is_file():
            models += _run_models(given, str(entry), flag)
        else:
            runs = sorted(p.parent for p in given.glob("*/run_config.json"))
            if not runs:
                resolve_pipeline_dir(given, flag)  # raises: neither a pipeline nor a run directory
            for run in runs:
                models += _run_models(run, str(run), flag)
    seen: dict[tuple, str] = {}
    for model in models:
        key = (model.pipeline_dir.resolve(), model.unet_dir.resolve() if model.unet_dir else None)
        if key in seen:
            raise SafepruneError(f"{flag}: {model.label} and {seen[key]} are the same model")
        seen[key] = model.label
    return models


def reference_models(dirs: Sequence[str | os.PathLike], flag: str = "--reference") -> list[SweepModel]:
    """Reference models (e.g. the teacher, a distill-only run), labelled by their folder's name (a run's name for
    RUN/pipeline); each is a pipeline or run directory."""
    from ..models.export import resolve_pipeline_dir

    models = []
    for entry in dirs:
        pipeline = resolve_pipeline_dir(entry, flag)
        run = _run_of(pipeline)
        name = (run or pipeline).name
        method, strength = describe_run(run) if run is not None else ("reference", "")
        models.append(SweepModel(name, method, strength, pipeline))
    names = [m.label for m in models]
    for model in models:  # two references of one name: tell them apart by their path
        if names.count(model.label) > 1:
            model.label = str(model.pipeline_dir)
    return models


# ------------------------------------------------------------------------------------------------ the sweep


@dataclass
class SweepResult:
    """Every model's point and the references', with the shared settings (judge, seeds, steps, ...)."""

    points: list[TradeoffPoint]
    references: list[TradeoffPoint]
    settings: dict
    prompts: list = field(default_factory=list)  # PromptSpec

    def to_dict(self) -> dict:
        return {"settings": self.settings, "prompts": [p.to_dict() for p in self.prompts],
                "points": [p.to_dict() for p in self.points],
                "references": [p.to_dict() for p in self.references]}

    def save_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def save_report(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report_page(tradeoff_html(self.points, self.references)), encoding="utf-8")
        return path

    def table(self) -> str:
        """One row per model (references last): method, strength and the headline metrics."""
        header = ["model", "method", "strength"] + [text for _, text in TABLE_COLUMNS]
        rows = [[p.label, p.method, p.strength] + ["-" if p.value(k) is None else f"{p.value(k):.4f}"
                                                   for k, _ in TABLE_COLUMNS] for p in self.points]
        rows += [[p.label, reference_kind(p), p.strength]
                 + ["-" if p.value(k) is None else f"{p.value(k):.4f}" for k, _ in TABLE_COLUMNS]
                 for p in self.references]
        widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
        lines = ["  ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in [header] + rows]
        s = self.settings
        lines.append(f"({s['judge']} judge; {s['samples_per_prompt']} samples x {s['prompts']} prompts, "
                     f"{s['steps']} steps, guidance {s['guidance']}, seeds {s['seeds'][0]}..{s['seeds'][-1]})")
        return "\n".join(lines)


def evaluate_sweep(models: Sequence[SweepModel], prompts=None, judge="toy", references: Sequence[SweepModel] = (),
                   device: str | None = None, **settings) -> SweepResult:
    """Evaluate every model and reference with the same prompts, judge, seeds and sampler settings (``settings``:
    evaluate's samples_per_prompt, steps, guidance, seed, size, batch_size), one pipeline loaded at a time."""
    import torch

    from ..models.export import load_pipeline
    from .judges import resolve_judge
    from .runner import _resolve_prompts, evaluate

    specs = _resolve_prompts(prompts)
    judge = resolve_judge(judge)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    everything = [(m, False) for m in models] + [(m, True) for m in references]
    points, refs, shared = [], [], None
    for index, (model, is_reference) in enumerate(everything):
        log.info("sweep: model %d/%d: %s", index + 1, len(everything), model.label)
        pipe = load_pipeline(model.pipeline_dir, device=device, unet_dir=model.unet_dir)
        result = evaluate(pipe, specs, judge=judge, **settings)
        del pipe
        shared = shared or result.settings
        ev = result.model
        source = {"pipeline": str(model.pipeline_dir), "unet": str(model.unet_dir) if model.unet_dir else None,
                  "params": ev.params, "unet_macs": ev.unet_macs, "latency_s_per_image": ev.latency_s_per_image}
        point = TradeoffPoint(model.label, model.method, model.strength, dict(ev.metrics), source)
        (refs if is_reference else points).append(point)
    return SweepResult(points=points, references=refs, settings=shared or {}, prompts=specs)


__all__ = ["TradeoffPoint", "pareto_front", "tradeoff_svg", "tradeoff_html", "report_page", "describe_run",
           "sweep_models",
           "reference_models", "evaluate_sweep", "SweepResult", "SweepModel", "PANELS"]
