"""`safeprune` command line: a thin shell over the Python API.

    safeprune run --teacher DIR --data DIR --erase TEXT --prune-ratio 0.5 --method bilevel --steps N --out DIR
    safeprune sample --model DIR --prompt TEXT --out FILE.png
    safeprune prune --teacher DIR --prune-method bk-small --out DIR
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.abc
import logging
import sys

from .errors import SafepruneError

COMMAND_MODULES = ("safeprune_engine.toy.commands", "safeprune_engine.eval.commands", "safeprune_engine.prune.commands")
# the options of `safeprune run` that are no RunConfig field (besides --help)
RUN_OPTIONS = ("--config", "--world", "--sweep-tolerances")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# what an optional setting's flag gives for "none" / "off": an explicit None, told apart from a flag not given
EXPLICIT_NONE = "<none>"


def optional(kind):
    """argparse type of an optional setting: "none" or "off" unsets it (e.g. --quality-tolerance none)."""
    def parse(text: str):
        return EXPLICIT_NONE if text.strip().lower() in ("none", "off") else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field, from its declaration: type, help, choices and default shown in --help.

    Flags default to None so that the CLI knows which settings the user gave (they override the --config file,
    and the built-in default run fills in only the others); the real default is written into the help.
    """
    from .config import default_text, flag_fields, setting_type
    from .toy.default_run import TOY_TRAINING

    for f in flag_fields():
        kind, repeatable, can_be_none = setting_type(f.name)
        text = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            text += ": " + " | ".join(map(str, f.metadata["choices"]))
        shown = f"default: {default_text(f)}"
        if f.name in TOY_TRAINING:
            shown += f"; the built-in default run uses {TOY_TRAINING[f.name]}"
        text = f"{text} ({shown})".strip().replace("%", "%%")  # argparse %-formats help
        if kind is bool:  # --x / --no-x: either overrides the config file
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=text)
        elif repeatable:  # given once per value
            parser.add_argument(flag(f.name), action="append", type=kind, default=None, help=text)
        else:
            parser.add_argument(flag(f.name), type=optional(kind) if can_be_none else kind, default=None, help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safeprune", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="prune a teacher, then fine-tune and erase concepts in one phase")
    run.add_argument("--config", help="YAML (or JSON) file whose keys are these flags' names; flags override it")
    from .toy.commands import WORLD_NAMES

    run.add_argument("--sweep-tolerances", type=float, nargs="+", default=None, metavar="TOL",
                     help="the built-in job only: also train a bilevel student at each of these --quality-tolerance "
                          "values (OUT/bilevel-tolTOL), so the report draws bilevel's trade-off frontier too "
                          "(about 4 minutes each on 2 CPU cores)")
    run.add_argument("--world", choices=WORLD_NAMES, default=None,
                     help="the built-in job only (no --teacher): run it on the toy world (default) or on the glyphs "
                          "validation world (its teacher, data, erased style, prompts and judge)")
    add_setting_flags(run)
    run.set_defaults(handler=command_run)

    sample = sub.add_parser("sample", help="generate an image with an exported pipeline")
    sample.add_argument("--model", required=True,
                        help="a run directory (the --out of `safeprune run`) or a pipeline directory")
    sample.add_argument("--prompt", required=True, help="text prompt")
    sample.add_argument("--out", required=True, help="output PNG file")
    sample.add_argument("--steps", type=int, default=25, help="denoising steps (default: 25)")
    sample.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    sample.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    sample.add_argument("--size", type=int, default=None, help="image size in pixels (default: the model's)")
    sample.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    sample.set_defaults(handler=command_sample)

    # other rooms add their own subcommands: each module has register(subparsers), setting `handler`
    from importlib import import_module

    for module in COMMAND_MODULES:
        import_module(module).register(sub)
    return parser


def settings_from_args(args) -> tuple["RunConfig", set[str]]:
    """The run's RunConfig (the --config file, then the flags over it) and the fields the user set there, whatever
    their value: the built-in default fills in only the others, so an explicit value equal to RunConfig's default
    is still honoured. The file is read once."""
    from .config import RunConfig, checked_settings, read_config_file

    file_values = read_config_file(args.config) if args.config else {}
    # the same normalisation as a file's values (e.g. one --anchor is the plain form for every concept)
    given = {name: getattr(args, name) for name in given_flags(args)}
    overrides = checked_settings({k: None if v == EXPLICIT_NONE else v for k, v in given.items()},
                                 lambda name, part: f"{flag(name)}: ")
    config = dataclasses.replace(RunConfig(**file_values), **overrides)  # validated by train(), after defaults
    return config, set(file_values) | set(overrides)


def run_config_from_args(args) -> "RunConfig":
    return settings_from_args(args)[0]


def given_flags(args) -> list[str]:
    """RunConfig fields given as flags on this command line."""
    from .config import flag_fields

    return [f.name for f in flag_fields() if getattr(args, f.name) is not None]


def explicit_fields(args) -> set[str]:
    """RunConfig fields the user set (flags or config-file keys); see settings_from_args."""
    return settings_from_args(args)[1]


def command_run(args) -> int:
    from .api import train

    config, explicit = settings_from_args(args)
    if config.teacher is None:
        # the built-in default: the toy world, one student per method, evaluated and reported
        from .toy.default_run import METHODS, run_default

        run_default(config, methods=(args.method,) if args.method else METHODS, explicit=explicit,
                    world=args.world, tolerances=tuple(args.sweep_tolerances or ()))
        return 0
    if args.world or args.sweep_tolerances:
        option = "--world" if args.world else "--sweep-tolerances"
        raise SafepruneError(f"{option} is an option of the built-in job; it has no effect with --teacher")
    result = train(config)
    import os

    if os.environ.get("SAFEPRUNE_LAUNCHED") or os.environ.get("RANK", "0") != "0":
        return 0  # ranks started by --launcher: the parent process reports
    print(f"done: {result.steps_run} steps; student pipeline at {result.pipeline_dir}")
    report = result.prune_report
    if report:
        print(f"params {report.get('params_before', 0):,} -> {report.get('params_after', 0):,}; "
              f"MACs {report.get('macs_before', 0):,} -> {report.get('macs_after', 0):,}")
    return 0


def command_sample(args) -> int:
    from pathlib import Path

    import torch

    from .models.export import load_pipeline, resolve_pipeline_dir

    model = resolve_pipeline_dir(args.model)
    if not args.prompt.strip():
        raise SafepruneError("--prompt is empty")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(model, device=device)
    size = args.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    generator = torch.Generator(device=device).manual_seed(args.seed)
    image = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance, height=size,
                 width=size, generator=generator).images[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    print(f"wrote {args.out}")
    return 0


class HiddenFromProbe(importlib.abc.MetaPathFinder):
    """While module `prober` runs its import-time checks for optional packages, the `hidden` ones look absent to
    it (None in sys.modules); afterwards they import as usual for whoever imports them.

    diffusers probes for bitsandbytes in diffusers.utils.import_utils and, when it is installed, imports it with
    its quantizers in every process; importing bitsandbytes on a CPU with AVX512-BF16 asks the hub's
    kernels-community for a 4-bit CPU kernel and, offline or without the `kernels` package, logs a warning. So
    bitsandbytes runs (and may warn) only where it is used: --use-8bit-adam, --teacher-int8, a plug-in.
    """

    def __init__(self, prober: str, hidden: tuple[str, ...]):
        self.prober, self.hidden = prober, hidden

    def find_spec(self, name, path=None, target=None):
        if name != self.prober:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self or not hasattr(finder, "find_spec") else finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = ProbeWindow(spec.loader, self.hidden)
                return spec
        return None


class ProbeWindow(importlib.abc.Loader):
    """A module's own loader, with the `hidden` packages absent while the module runs."""

    def __init__(self, loader, hidden: tuple[str, ...]):
        self.loader, self.hidden = loader, hidden

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        absent = [name for name in self.hidden if name not in sys.modules]
        sys.modules.update(dict.fromkeys(absent))  # find_spec(name) is None for these now
        try:
            self.loader.exec_module(module)
        finally:
            for name in absent:
                if name in sys.modules and sys.modules[name] is None:
                    del sys.modules[name]

    def __getattr__(self, attribute):  # get_source, get_resource_reader, ...: the module's own loader answers
        return getattr(self.loader, attribute)


def hide_optional_packages_from_probes() -> None:
    if not any(isinstance(finder, HiddenFromProbe) for finder in sys.meta_path):
        sys.meta_path.insert(0, HiddenFromProbe("diffusers.utils.import_utils", ("bitsandbytes",)))


def quiet_third_party_noise() -> None:
    """Libraries that diffusers imports when present print start-up warnings that are not about the user's run."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not os.environ.get("DS_ACCELERATOR"):
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"  # deepspeed otherwise warns that it fell back to CPU
    hide_optional_packages_from_probes()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    quiet_third_party_noise()
    try:
        return args.handler(args)
    except SafepruneError as error:
        import os

        if os.environ.get("RANK", "0") == "0":  # launched ranks fail together; one message is enough
            print(f"safeprune: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
