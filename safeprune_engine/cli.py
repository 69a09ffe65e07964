"""`safeprune` command line: a thin shell over the Python API.

    safeprune run --teacher DIR --data DIR --erase TEXT --prune-ratio 0.5 --method bilevel --steps N --out DIR
    safeprune sample --model DIR --prompt TEXT --out FILE.png
    safeprune prune --teacher DIR --prune-method bk-small --out DIR
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from .errors import SafepruneError

# flag name -> (type, help); every RunConfig field used here is also a YAML key of the same name
RUN_FLAGS = {
    "teacher": (str, "StableDiffusionPipeline directory (or hub id when online); omit for the built-in default"),
    "data": (str, "image folder with metadata.jsonl lines {\"file_name\", \"text\"}"),
    "erase": (str, "concept prompt to suppress; repeat for several"),
    "erase_data": (str, "image folder of concept images (default: the teacher's own sampling trajectories)"),
    "erase_prompts": (str, "a prompt whose teacher trajectories feed the upper level (repeatable; default: --erase)"),
    "anchor": (str, "anchor for the concept: empty | strip | any text; repeat to give each --erase its own"),
    "preserve": (str, "a prompt whose outputs are held to the teacher's (repeatable)"),
    "preserve_weight": (float, "weight of holding the --preserve prompts"),
    "prune_ratio": (float, "fraction of internal width units removed, in (0, 1)"),
    "target_macs": (float, "prune to this fraction of the teacher's MACs instead of a fixed ratio"),
    "prune_importance": (str, "magnitude pruning: l2 | l1"),
    "prune_method": (str, "magnitude | taylor | bk-base | bk-small | bk-tiny (or a plug-in's name)"),
    "prune_calibration_batches": (int, "taylor: batches of --data that score the units"),
    "method": (str, "bilevel | alternating | two-stage | distill-only"),
    "steps": (int, "training steps"),
    "batch_size": (int, "data batch size per step"),
    "concept_batch_size": (int, "concept batch size of upper steps (default: batch size)"),
    "resolution": (int, "image resolution in pixels (default: the teacher's)"),
    "lr": (float, "learning rate of the lower level"),
    "lr_upper": (float, "learning rate of the upper level (default 5 x lr)"),
    "seed": (int, "random seed"),
    "mixed_precision": (str, "no | bf16 | fp16"),
    "device": (str, "cpu | cuda | cuda:N (default: cuda when available)"),
    "kernels": (str, "fused ops in the UNets: auto | off | triton | cuda | cpp (default off)"),
    "w_diff": (float, "weight of the diffusion loss"),
    "w_out": (float, "weight of output distillation"),
    "w_feat": (float, "weight of feature distillation"),
    "snr_gamma": (float, "min-SNR gamma for the diffusion loss (default: off)"),
    "erase_method": (str, "esd-u | esd-x | concept-ablation-model | concept-ablation-noise | uce | salun"),
    "eta": (float, "ESD negative-guidance strength"),
    "bilevel_lambda": (float, "bilevel penalty lambda"),
    "bilevel_inner_steps": (int, "bilevel: inner (lower) steps per outer step"),
    "upper_every": (int, "alternating: one upper step every N iterations"),
    "two_stage_erase_steps": (int, "two-stage: erase steps at the end (default steps // 4)"),
    "esd_pool_size": (int, "trajectory latents per concept when no --erase-data"),
    "esd_ddim_steps": (int, "DDIM steps of the trajectory sampler"),
    "esd_guidance": (float, "guidance scale of the trajectory sampler"),
    "uce_when": (str, "uce: closed-form edit before | after | every:N steps"),
    "uce_lambda": (float, "uce: weight of keeping the edited matrices close to their old values"),
    "salun_base": (str, "salun: the gradient objective whose updates the saliency mask restricts"),
    "salun_topk": (float, "salun: fraction of the base objective's weights the mask keeps"),
    "salun_batches": (int, "salun: concept batches the saliency is measured on"),
    "plugins": (str, "a module to import first, whose decorators register plug-ins (repeatable)"),
    "cache_dir": (str, "where encoded latents, captions and trajectories are cached (default OUT/cache)"),
    "checkpoint_every": (int, "save a checkpoint every N steps (0: only at the end)"),
    "keep_checkpoints": (int, "checkpoints to keep"),
    "resume": (str, "latest | CHECKPOINT_DIR"),
    "log_every": (int, "log scalars every N steps"),
    "launcher": (str, "deepspeed | torchrun: start --nproc processes on this machine"),
    "nproc": (int, "processes (ranks) to start with --launcher"),
    "zero_stage": (int, "0 (plain data parallel) | 1 | 2 | 3: DeepSpeed ZeRO stage of the student"),
    "teacher_zero3": (bool, "shard the frozen teacher across ranks (optimizer-less ZeRO-3 engine)"),
    "zero3_persistence_threshold": (int, "ZeRO-3 keeps tensors with fewer elements whole (default 100000)"),
    "gradient_checkpointing": (bool, "recompute student activations in backward (less memory, more time)"),
    "channels_last": (bool, "NHWC memory format for the UNets' convolutions"),
    "use_8bit_adam": (bool, "bitsandbytes AdamW8bit states for every solver optimizer"),
    "teacher_int8": (bool, "bitsandbytes int8 Linear layers in the teacher (the output error is reported)"),
    "teacher_dtype": (str, "fp32 | bf16 | fp16 (default: the --mixed-precision dtype)"),
    "export_dtype": (str, "fp32 | bf16 | fp16: weights of the exported pipeline (default fp32)"),
}


COMMAND_MODULES = ("safeprune_engine.toy.commands", "safeprune_engine.eval.commands", "safeprune_engine.prune.commands")
REPEATABLE = ("erase", "erase_prompts", "anchor", "preserve", "plugins")  # flags given once per value


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safeprune", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="prune a teacher, then fine-tune and erase concepts in one phase")
    run.add_argument("--config", help="YAML (or JSON) file whose keys are these flags' names")
    run.add_argument("--out", help="run directory (default runs/default)")
    for name, (kind, text) in RUN_FLAGS.items():
        if name in REPEATABLE:
            run.add_argument(flag(name), action="append", default=None, help=text)
        elif kind is bool:  # a switch: given = True, absent = the config file's (or default) value
            run.add_argument(flag(name), action="store_true", default=None, help=text)
        else:
            run.add_argument(flag(name), type=kind, default=None, help=text)
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    run.set_defaults(handler=command_run)

    sample = sub.add_parser("sample", help="generate an image with an exported pipeline")
    sample.add_argument("--model", required=True,
                        help="a run directory (the --out of `safeprune run`) or a pipeline directory")
    sample.add_argument("--prompt", required=True)
    sample.add_argument("--out", required=True, help="output PNG file")
    sample.add_argument("--steps", type=int, default=25, help="denoising steps")
    sample.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--size", type=int, default=None, help="image size in pixels (default: the model's)")
    sample.add_argument("--device", default=None)
    sample.set_defaults(handler=command_sample)

    # other rooms add their own subcommands: each module has register(subparsers), setting `handler`
    from importlib import import_module

    for module in COMMAND_MODULES:
        import_module(module).register(sub)
    return parser


def run_config_from_args(args) -> "RunConfig":
    from .config import RunConfig

    config = RunConfig.from_file(args.config) if args.config else RunConfig()
    overrides = {name: getattr(args, name) for name in RUN_FLAGS if getattr(args, name) is not None}
    if isinstance(overrides.get("anchor"), list) and len(overrides["anchor"]) == 1:
        overrides["anchor"] = overrides["anchor"][0]  # one anchor for every concept: the plain form
    if args.out is not None:
        overrides["out"] = args.out
    if args.no_progress:
        overrides["progress"] = False
    return dataclasses.replace(config, **overrides)  # validated by train(), after built-in defaults


def explicit_fields(args) -> set[str]:
    """RunConfig fields the user set (flags or config-file keys), whatever their value: the built-in default
    fills in only the others, so an explicit value equal to RunConfig's default is still honoured."""
    names = {name for name in RUN_FLAGS if getattr(args, name) is not None}
    if args.config:
        from .config import read_config_file

        names |= set(read_config_file(args.config))
    return names


def command_run(args) -> int:
    from .api import train

    config = run_config_from_args(args)
    if config.teacher is None:
        # the built-in default: the toy world, one student per method, evaluated and reported
        from .toy.default_run import METHODS, run_default

        run_default(config, methods=(args.method,) if args.method else METHODS, explicit=explicit_fields(args))
        return 0
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


def pipeline_dir(model: str) -> "Path":
    """The pipeline directory --model names: a pipeline directory itself, or a run directory (the --out of
    `safeprune run`, whose student is exported to RUN/pipeline)."""
    from pathlib import Path

    path = Path(model)
    if not path.exists():
        raise SafepruneError(f"--model {model} does not exist")
    if (path / "model_index.json").is_file():
        return path
    if (path / "pipeline" / "model_index.json").is_file():
        return path / "pipeline"
    if (path / "run_config.json").is_file():
        raise SafepruneError(f"--model {model} is a run directory without an exported pipeline yet (its run has "
                             "not finished; continue it with `safeprune run ... --resume latest`)")
    # the built-in default's --out holds one run directory per method
    runs = sorted(str(index.parent.parent) for index in path.glob("*/pipeline/model_index.json"))
    if runs:
        raise SafepruneError(f"--model {model} holds run directories, one per method; choose one: {', '.join(runs)}")
    raise SafepruneError(f"--model {model} is neither a pipeline directory (no model_index.json) nor a run "
                         "directory (no pipeline/model_index.json)")


def command_sample(args) -> int:
    from pathlib import Path

    import torch

    from .models.export import load_pipeline

    model = pipeline_dir(args.model)
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


def quiet_third_party_noise() -> None:
    """Libraries that diffusers imports when present print start-up warnings that are not about the user's run."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not os.environ.get("DS_ACCELERATOR"):
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"  # deepspeed otherwise warns that it fell back to CPU
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


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
