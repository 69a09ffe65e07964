"""One toy-world student per call, for calibrating the built-in default (`TOY_TRAINING`).

Prunes the shipped toy teacher, trains one student with the toy defaults plus KEY=VALUE overrides of RunConfig
fields, judges it on the default toy prompt set and prints/writes the metrics as one JSON line. The rendered
fine-tuning data and the latent/trajectory cache live under --work and are shared by every call, so a sweep
pays for them once.

    python benchmarks/toy_sweep.py --name k2 method=bilevel bilevel_inner_steps=2 lr_upper=3e-4
    python benchmarks/toy_sweep.py --name esdx method=bilevel erase_method=esd-x "preserve=a red circle by Orrin|a blue square"

List fields take "|"-separated values. Results: benchmarks/results/toy-sweep/<name>.json.
``--world glyphs`` runs the trial on the validation world (its teacher, data, erased style, prompts and judge)
with the same settings; give it its own --work (the data folder there is rendered once, for one world).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from safeprune_engine.config import RunConfig
from safeprune_engine.errors import SafepruneError


def parse_overrides(pairs: list[str]) -> dict:
    """KEY=VALUE strings -> RunConfig field values, typed by the field's declared type."""
    types = {f.name: f.type for f in dataclasses.fields(RunConfig)}
    values = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.replace("-", "_")
        if not sep or key not in types:
            raise SafepruneError(f"override {pair!r}: expected FIELD=VALUE with a RunConfig field")
        kind = str(types[key])
        if raw.lower() in ("none", "off") and "None" in kind:
            values[key] = None
        elif "list" in kind:
            values[key] = [v for v in raw.split("|") if v]
        elif "bool" in kind:
            values[key] = raw.lower() in ("1", "true", "yes")
        elif "int" in kind and "." not in raw and "e" not in raw.lower():
            values[key] = int(raw)
        elif "float" in kind or "int" in kind:
            values[key] = float(raw)
        else:
            values[key] = raw
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="RunConfig FIELD=VALUE (e.g. method=bilevel lr_upper=3e-4)")
    parser.add_argument("--name", required=True, help="result name (JSON file and run folder)")
    parser.add_argument("--work", default="runs/toy-sweep", help="shared data/cache and per-name run folders")
    parser.add_argument("--samples", type=int, default=2, help="seeds per evaluation prompt")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this tiny model)")
    parser.add_argument("--world", choices=("toy", "glyphs"), default="toy",
                        help="toy (tuned on) or glyphs (validation world; use its own --work)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from safeprune_engine.toy.prompts import toy_prompts
    from safeprune_engine.eval.runner import evaluate
    from safeprune_engine.models.teacher import load_teacher
    from safeprune_engine.prune.base import prune_unet
    from safeprune_engine.toy.default_run import materialize_toy_data, toy_defaults
    from safeprune_engine.run import train

    overrides = parse_overrides(args.overrides)
    work = Path(args.work)
    run_dir = work / args.name
    # the shared data folder sits where the default run renders it (OUT/builtin/data), with OUT = the work dir
    shared = toy_defaults(RunConfig(out=str(work), progress=False), explicit=set(), world=args.world)
    materialize_toy_data(shared, world=args.world)
    config = toy_defaults(RunConfig(out=str(run_dir), progress=False, **overrides), explicit=set(overrides),
                          world=args.world)
    config = config.replace(data=shared.data, cache_dir=str(work / "cache"), checkpoint_every=0).validate()

    teacher = load_teacher(config.teacher)
    student, report = prune_unet(teacher.unet, config.prune_method, target_macs=config.target_macs,
                                 ratio=None if config.target_macs else config.prune_ratio,
                                 importance=config.prune_importance)
    started = time.perf_counter()
    train(config, teacher=teacher, student=student)
    train_seconds = time.perf_counter() - started
    result = evaluate(run_dir / "pipeline", toy_prompts(world=args.world), judge=args.world,
                      samples_per_prompt=args.samples, steps=20, seed=config.seed)
    record = {"name": args.name, "world": args.world, "overrides": overrides, "steps": config.steps,
              "train_seconds": train_seconds,
              "metrics": result.model.metrics,
              "sets": {name: {"head_accuracy": s.get("head_accuracy"), "concept_distribution":
                              s.get("concept_distribution")} for name, s in result.model.sets.items()}}
    out = Path(__file__).resolve().parent / "results" / "toy-sweep" / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("name", "world", "overrides", "steps", "train_seconds", "metrics")}))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
