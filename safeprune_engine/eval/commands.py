"""`safeprune eval`: sample a model (and a reference) on a prompt set with fixed seeds and measure it.

    safeprune eval --model DIR [--reference DIR] [--prompts FILE|NAME] [--judge toy|PATH|clip:PATH|csd:PATH|nudenet:PATH]
                   [--samples-per-prompt N] [--steps N] [--guidance G] [--seed S] [--out FILE.json] [--grids DIR]
                   [--size N] [--batch-size N] [--device DEV] [--threads N]
    safeprune eval --sweep DIR [DIR ...] [--reference DIR ...] [--report FILE.html] [the same sampling options]

--sweep evaluates many models the same way (runs with their snapshots, pipelines) and reports the erase/retain
trade-off (safeprune_engine/eval/tradeoff.py): a table row per model, JSON of every point, an HTML report with
the Pareto plots.

Nothing heavy is imported here (the parser is built on every `safeprune` call): the handler imports torch.
"""
from __future__ import annotations

EVAL_HELP = "measure erased-concept rate, content, neighbour and unrelated accuracy, FD, size and speed"


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help=EVAL_HELP, description=EVAL_HELP + " of a pipeline.")
    models = parser.add_mutually_exclusive_group(required=True)
    models.add_argument("--model", metavar="DIR",
                        help="pipeline directory, or the run directory `safeprune run` wrote (its RUN/pipeline)")
    models.add_argument("--sweep", nargs="+", metavar="DIR",
                        help="evaluate many models for the erase/retain trade-off: run directories (their pipeline "
                             "and each OUT/snapshots/step-N), pipeline directories, or folders of run directories")
    parser.add_argument("--reference", action="append", default=None, metavar="DIR",
                        help="pipeline (or run) directory to report side by side (e.g. the teacher); with --sweep, "
                             "repeat it for several reference models (e.g. the teacher and a distill-only run)")
    parser.add_argument("--prompts", default="toy", metavar="FILE|NAME",
                        help="prompt file (JSON list or JSONL of {\"prompt\", \"set\", labels...}) or the name of "
                             "a registered prompt set (default: toy, the built-in toy prompt set)")
    parser.add_argument("--judge", default="toy", metavar="SPEC",
                        help="toy (default) | DIR of a torch classifier | clip:DIR | csd:DIR | nudenet:PATH")
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="images per prompt (seeds S..S+N-1)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="first seed; the same seeds for every model")
    parser.add_argument("--size", type=int, default=None, help="image size in pixels (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per pipeline call")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own setting)")
    parser.add_argument("--out", default=None, metavar="FILE.json", help="write the metrics as JSON here")
    parser.add_argument("--grids", default=None, metavar="DIR",
                        help="write one image grid per model and prompt set here (--model)")
    parser.add_argument("--report", default=None, metavar="FILE.html",
                        help="--sweep: write an HTML report with the trade-off plots and a table here")
    parser.set_defaults(handler=command_eval)


def command_eval(args) -> int:
    import logging

    from ..errors import SafepruneError
    from .judges import resolve_judge
    from .prompts import resolve_prompts
    from .runner import DEFAULT_GUIDANCE, evaluate

    from ..models.export import resolve_pipeline_dir

    if args.sweep is not None:
        return command_sweep(args)
    # every input is checked before anything is loaded or sampled
    if args.report is not None:
        raise SafepruneError("--report draws the trade-off of a --sweep; with --model use --out")
    if args.reference is not None and len(args.reference) > 1:
        raise SafepruneError("--model takes one --reference; several references go with --sweep")
    model_dir = resolve_pipeline_dir(args.model, "--model")
    reference_dir = resolve_pipeline_dir(args.reference[0], "--reference") if args.reference else None
    check_numbers(args)
    prompts = resolve_prompts(args.prompts)
    judge = resolve_judge(args.judge)

    import torch

    from ..models.export import load_pipeline

    if args.threads:
        torch.set_num_threads(args.threads)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_pipeline(model_dir, device=device)
    reference = load_pipeline(reference_dir, device=device) if reference_dir is not None else None
    logging.getLogger(__name__).info("evaluating %d prompts x %d samples with the %s judge", len(prompts),
                                     args.samples_per_prompt, judge.name)
    result = evaluate(model, prompts, judge=judge, samples_per_prompt=args.samples_per_prompt, steps=args.steps,
                      guidance=DEFAULT_GUIDANCE if args.guidance is None else args.guidance, seed=args.seed,
                      reference=reference, size=args.size, batch_size=args.batch_size)
    result.model.name = args.model
    if result.reference is not None:
        result.reference.name = args.reference[0]
    print(result.table())
    if args.out:
        print(f"wrote {result.save_json(args.out)}")
    if args.grids:
        files = result.save_grids(args.grids)
        print(f"wrote {len(files)} grids to {args.grids}")
    return 0


def check_numbers(args) -> None:
    from ..errors import SafepruneError

    for name in ("samples_per_prompt", "steps", "batch_size", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SafepruneError(f"--{name.replace('_', '-')} must be >= 1")


def command_sweep(args) -> int:
    from ..errors import SafepruneError
    from .judges import resolve_judge
    from .prompts import resolve_prompts
    from .runner import DEFAULT_GUIDANCE
    from .tradeoff import evaluate_sweep, reference_models, sweep_models

    # every input is checked before anything is loaded or sampled
    if args.grids is not None:
        raise SafepruneError("--grids goes with --model; a --sweep writes --out and --report")
    models = sweep_models(args.sweep)
    references = reference_models(args.reference or [])
    check_numbers(args)
    prompts = resolve_prompts(args.prompts)
    judge = resolve_judge(args.judge)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    result = evaluate_sweep(models, prompts, judge=judge, references=references, device=args.device,
                            samples_per_prompt=args.samples_per_prompt, steps=args.steps,
                            guidance=DEFAULT_GUIDANCE if args.guidance is None else args.guidance, seed=args.seed,
                            size=args.size, batch_size=args.batch_size)
    print(result.table())
    if args.out:
        print(f"wrote {result.save_json(args.out)}")
    if args.report:
        print(f"wrote {result.save_report(args.report)}")
    return 0
