"""`safeprune toy ...`: build the toy world's judge (and teacher).

    safeprune toy build-judge [--world toy|glyphs] [--out DIR] [--seed S] [--steps N]
    safeprune toy build-teacher [--world toy|glyphs] --out DIR [--seed S] [--vae-steps N] [--unet-steps N]

Every `toy` subcommand hangs off one `toy` parser; ``toy_subparsers(subparsers)`` creates it on first use and
returns the same sub-subparsers object on every later call, so each builder adds its own subcommand with
``add_...(toy_subparsers(subparsers))``. Nothing heavy is imported here: handlers import torch when they run.
"""
from __future__ import annotations

import sys

TOY_HELP = "the built-in toy worlds: build their teachers and judges"
WORLD_NAMES = ("toy", "glyphs")  # safeprune_engine.toy.world.WORLDS, without importing numpy at parse time


def add_world_option(parser) -> None:
    parser.add_argument("--world", choices=WORLD_NAMES, default="toy",
                        help="which world: toy (the tuned-on one, default) or glyphs (the validation world)")


def toy_subparsers(subparsers):
    """The `toy` group's sub-subparsers (an argparse ``_SubParsersAction``), created on first call."""
    toy = subparsers.choices.get("toy")
    if toy is None:
        toy = subparsers.add_parser("toy", help=TOY_HELP, description=TOY_HELP)

        def missing_subcommand(args) -> int:
            toy.print_help(sys.stderr)
            return 2

        toy.set_defaults(handler=missing_subcommand)
        toy._toy_subparsers = toy.add_subparsers(dest="toy_command")
    return toy._toy_subparsers


def add_build_judge(toy_sub) -> None:
    parser = toy_sub.add_parser(
        "build-judge", help="train the toy judge (shape, colour, style classifier) and print held-out accuracy",
        description="Train the toy world's judge on freshly rendered images and save it as safetensors + JSON.")
    add_world_option(parser)
    parser.add_argument("--out", default=None,
                        help="output directory (default: the world's shipped judge, safeprune_engine/toy/assets/judge "
                             "or assets/glyphs/judge)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (held-out items use another seed)")
    parser.add_argument("--steps", type=int, default=None, help="training steps of 128 images (default 800)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while training (default 1)")
    parser.set_defaults(handler=command_build_judge)


def command_build_judge(args) -> int:
    from .judge import ACCURACY_BAR, build_judge, format_report

    kwargs = {"num_threads": args.threads}
    if args.steps is not None:
        kwargs["steps"] = args.steps
    print(f"training the {args.world} judge on freshly rendered images ...", flush=True)
    out, report = build_judge(args.out, seed=args.seed, world=args.world, **kwargs)
    print(format_report(report))
    print(f"wrote {out}")
    if not report.passed(ACCURACY_BAR):
        print(f"safeprune: warning: held-out accuracy is below the {100 * ACCURACY_BAR:.0f}% bar; train longer "
              "(--steps) or with another --seed", file=sys.stderr)
        return 1
    return 0


def add_build_teacher(toy_sub) -> None:
    parser = toy_sub.add_parser(
        "build-teacher", help="train the toy teacher (a small latent-diffusion pipeline of the toy world)",
        description="Train the toy world's teacher (VAE, then UNet + text encoder on all styles, the erased one "
                    "included) and save it as a StableDiffusionPipeline folder. An interrupted build resumes from "
                    "OUT/.partial when the same command is run again.")
    add_world_option(parser)
    parser.add_argument("--out", required=True,
                        help="output pipeline directory (the shipped ones are safeprune_engine/toy/assets/teacher and "
                             "assets/glyphs/teacher)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the initialisation and every step")
    parser.add_argument("--vae-steps", type=int, default=None, help="VAE training steps (default 1200)")
    parser.add_argument("--unet-steps", type=int, default=None, help="UNet training steps (default 4000)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own setting)")
    parser.add_argument("--no-eval", action="store_true", help="skip the judge's quality check at the end")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(handler=command_build_teacher)


def command_build_teacher(args) -> int:
    import json

    from .teacher import CARD_NAME, build_teacher

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = build_teacher(args.out, seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                        progress=not args.no_progress, evaluate=not args.no_eval, world=args.world)
    card = json.loads((out / CARD_NAME).read_text())
    quality = card.get("quality")
    if quality:
        accs = "  ".join(f"{attr} {100 * quality[attr]:.1f}%" for attr in ("shape", "colour", "style"))
        print(f"judge on {quality['n']} samples (DDIM {quality['ddim_steps']}, guidance {quality['guidance']}): {accs}")
    print(f"trained in {card['seconds']['total']:.0f} s; wrote {out}")
    return 0


def register(subparsers) -> None:
    toy_sub = toy_subparsers(subparsers)
    add_build_judge(toy_sub)
    add_build_teacher(toy_sub)
