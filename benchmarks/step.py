"""Training-step benchmark: our engine against a reference-style iteration, same models and data.

Variants (same batch size, seed, teacher, pruned student and images for all; ours with the shipped defaults):
  (a) ours, solver "distill-only": one teacher forward over the data rows + student forward/backward + AdamW;
  (b) ours, solver "interleaved" (the schedule `bilevel` had before issue 12, comparable with (c)): the lower-only
      step and the outer step (lower + upper; the upper level's teacher
      targets come from the concept pool cached before training, so the teacher runs the data rows only) timed
      separately and amortised over a period of P steps (P-1 lower + 1 outer), with --kernels (default auto);
  (k) (b) with --kernels off: what the fused ops buy;
  (d) ours, solver "bilevel" with every shipped default (the constraint form: each step is a student step on
      L_cu + lambda L_ft plus a value-model step on L_ft, and every 10th step first checks the multiplier on a
      probe set; esd on every weight): a plain step and a checking step, amortised, what a default run pays per
      step against (a);
  (c) benchmarks/reference_step.py: VAE and text encoder every step, a separate fp32 teacher forward per loss,
      hooks that keep whole block-output tuples, AdamW, and every P-th iteration an upper step with a second AdamW.

Every variant runs in subprocesses of its own. On CPU one process measures peak memory (RSS growth above the
post-setup level over the first steps, with glibc made to return freed blocks at once) and counts FLOPs, and
--repeats further processes, run interleaved, measure step times with the default allocator; each step time is the
median over those processes of their median. A timing process during which other processes kept CPUs busy is
rerun (--retries) and flagged: with more runnable threads than cores, CPU step times grow 2-100x. On CUDA one
process per variant does both (allocator peak from torch.cuda.max_memory_allocated).
Reports median step times, peak memory and the memory held between steps (steady), FLOPs per step
(torch.utils.flop_counter) and the ratios below, and writes benchmarks/results/step-<cpu|cuda>.json. Targets:
(c)/(b) time >= 1.5 and peak memory >= 1.5; (k)/(b) time >= 1.15; (b)/(a) time <= 1.1. (d)/(a) and (c)/(d) are
reported without a target.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/step.py                       # CPU: mini-SD, batch 2, 128 px
    HF_HUB_OFFLINE=1 python benchmarks/step.py --preset sd15 --batch-size 16  # GPU: SD-1.5 shapes at 512 px
    python benchmarks/step.py --device cuda --quick                           # GPU check: one process each
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
try:
    import safeprune_engine  # noqa: F401  (installed, or found next to benchmarks/)
except ImportError:  # a plain checkout (e.g. copied onto a GPU box) without `pip install -e .`
    sys.path.insert(1, str(ROOT))

CONCEPT = "by monet"
COLOURS = ("red", "green", "blue", "yellow")
DATA_CAPTIONS = [f"a {c} square" for c in COLOURS] + [f"a {c} square on a dark background" for c in COLOURS]
CONCEPT_CAPTIONS = [f"a {c} square {CONCEPT}" for c in COLOURS]
VARIANTS = ("a", "b", "k", "c", "e", "j", "d")
LABELS = {"a": "(a) ours distill-only", "b": "(b) ours interleaved", "k": "(k) ours interleaved, --kernels off",
          "c": "(c) reference-style", "e": "(e) ours bilevel, esd (whole student)",
          "j": "(j) (e) with --bilevel-joint-forward", "d": "(d) ours bilevel, shipped defaults"}
BILEVEL_VARIANTS = ("b", "k", "e", "j")
PAPER_INNER_STEPS = 20  # K in the paper: 20 lower steps per outer step, a period of 21
MEMORY_STEPS = 2  # steps of each kind in the memory pass that precedes timing
CONTENDED_CPUS = 0.15  # other processes' CPU use beyond the cores we leave free that flags CPU timings

# SD-1.5's block structure. "mini" scales every width by 1/4 and the images 512 -> 128 px, which keeps the VAE
# encoder's FLOPs per image at ~1.3x one UNet forward, as in SD-1.5 at 512 px (1.39x): the share of the encoders in
# the reference step is the one that matters for (c)/(b). Its text encoder is CLIP-shaped but 2 layers of 128.
PRESETS = {
    "mini": dict(unet_channels=(80, 160, 320, 320), unet_groups=8, attention_heads=8,
                 vae_channels=(32, 64, 128, 128), vae_groups=8,
                 text_hidden=128, text_layers=2, text_heads=4, text_intermediate=512, vocab_size=None,
                 resolution=128),
    "sd15": dict(unet_channels=(320, 640, 1280, 1280), unet_groups=32, attention_heads=8,
                 vae_channels=(128, 256, 512, 512), vae_groups=32,
                 text_hidden=768, text_layers=12, text_heads=12, text_intermediate=3072, vocab_size=49408,
                 resolution=512),
}


# ---- arguments -------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time and size one training step of our engine (distill-only, bilevel) against a "
                    "reference-style iteration; write benchmarks/results/step-<cpu|cuda>.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", default=None, help="cpu or cuda[:i]; default cuda when available")
    p.add_argument("--preset", choices=sorted(PRESETS), default="mini",
                   help="model shapes: mini (SD-1.5 blocks at 1/4 width) or sd15 (full SD-1.5 shapes, GPU)")
    p.add_argument("--batch-size", type=int, default=None, help="default 2 on CPU, 16 on CUDA")
    p.add_argument("--resolution", type=int, default=None, help="image pixels (latents are 1/8); default by preset")
    p.add_argument("--steps", type=int, default=5, help="timed steps per step kind")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per step kind before timing")
    p.add_argument("--period", type=int, default=10,
                   help="P: one outer/upper step every P steps, for (b) and (c) alike")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default=None,
                   help="our engine's setting, (a) and (b); default no on CPU, bf16 on CUDA. (c) is always fp32")
    p.add_argument("--prune-ratio", type=float, default=0.5)
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="v_prediction",
                   help="v_prediction as SD 2.1 in the paper's setup")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--variants", default="a,b,k,c,d",
                   help="comma list of a, b, k, c, d, e, j (d: the shipped bilevel defaults; e, j: the upper level on "
                        "every weight, two student passes vs one joint forward on outer steps)")
    p.add_argument("--kernels", default="auto", choices=("auto", "off", "cpp", "triton", "cuda"),
                   help="our engine's --kernels for (a) and (b); (k) is (b) with --kernels off")
    p.add_argument("--quick", action="store_true",
                   help="a short run for a device check: 3 timed steps after 1 warmup, one process per variant, "
                        "no FLOP counting")
    p.add_argument("--repeats", type=int, default=None,
                   help="processes per variant, run interleaved (a b c a b c ...); times are the median over them "
                        "of each process's median, which evens out process-to-process variation; default 3 on CPU, "
                        "1 on CUDA")
    p.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    p.add_argument("--quiet-wait", type=float, default=30.0,
                   help="CPU: before each variant process wait up to this many seconds for other processes to go "
                        "idle (CPU timings with other busy processes are worthless)")
    p.add_argument("--retries", type=int, default=1,
                   help="CPU: rerun a variant process this many times when other processes were busy during it")
    p.add_argument("--out", default=None, help="JSON path; default benchmarks/results/step-<cpu|cuda>.json")
    # internal: one variant per process
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--phase", choices=("memory", "time", "both"), default="both", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    if args.quick:
        args.steps, args.warmup, args.repeats, args.no_flops = 3, 1, args.repeats or 1, True
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    if args.batch_size is None:
        args.batch_size = 16 if cuda else 2
    if args.repeats is None:
        args.repeats = 1 if cuda else 3
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if cuda else "no"
    if args.resolution is None:
        args.resolution = PRESETS[args.preset]["resolution"]
    if args.resolution % 8:
        p.error("--resolution must be a multiple of 8")
    if args.period < 2:
        p.error("--period must be at least 2")
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.repeats < 1 or args.retries < 0:
        p.error("--steps >= 1, --warmup >= 0, --batch-size >= 1, --repeats >= 1, --retries >= 0")
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not args.variant_list or any(v not in VARIANTS for v in args.variant_list):
        p.error(f"--variants takes a comma list of {', '.join(VARIANTS)}")
    return args


# ---- the models ------------------------------------------------------------------------------------------
def build_pipeline(preset: dict, resolution: int, prediction_type: str, seed: int):
    """A random-weight StableDiffusionPipeline with the preset's shapes, identical in every process for a seed."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from safeprune_engine.testing import tiny_tokenizer

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=preset["vocab_size"] or len(tokenizer), hidden_size=preset["text_hidden"],
        intermediate_size=preset["text_intermediate"], num_hidden_layers=preset["text_layers"],
        num_attention_heads=preset["text_heads"], max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=preset["vae_channels"], norm_num_groups=preset["vae_groups"], sample_size=resolution,
    )
    unet = UNet2DConditionModel(
        sample_size=resolution // 8, in_channels=4, out_channels=4, layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=preset["unet_channels"], norm_num_groups=preset["unet_groups"],
        attention_head_dim=preset["attention_heads"], cross_attention_dim=preset["text_hidden"],
    )
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=prediction_type)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def write_folders(workdir: Path, resolution: int, seed: int) -> tuple[Path, Path]:
    from safeprune_engine.testing import write_image_folder

    data = write_image_folder(workdir / "data", DATA_CAPTIONS * 2, size=resolution, seed=seed)
    concepts = write_image_folder(workdir / "concepts", CONCEPT_CAPTIONS * 2, size=resolution, seed=seed + 1)
    return data, concepts


# ---- one variant (runs in its own process) ---------------------------------------------------------------
def build_ours(args, bundle, student, device, workdir: Path, method: str, kernels: str, **extra):
    """Our engine as a run builds it: latent cache (the encoders' one use, on the device), cached concept targets,
    engine, solver; shipped defaults except the schedule, the batch and --kernels."""
    from safeprune_engine.bilevel.solvers import build_solver
    from safeprune_engine.config import RunConfig
    from safeprune_engine.data.imagefolder import ImageFolder
    from safeprune_engine.memory import optimizer_factory
    from safeprune_engine.run.builder import build_engine

    settings = dict(out=str(workdir / "run"), method=method, batch_size=args.batch_size, resolution=args.resolution,
                    seed=args.seed, mixed_precision=args.mixed_precision, lr=1e-6, progress=False,
                    bilevel_inner_steps=args.period - 1, upper_every=args.period, erase_method="esd-u",
                    device=str(device), kernels=kernels)
    settings.update(extra)
    if method != "distill-only":
        settings.update(erase=[CONCEPT], erase_data=str(workdir / "concepts"))
    config = RunConfig(**settings).validate()
    engine = build_engine(config, bundle, student, ImageFolder(workdir / "data"), workdir / "cache",
                          latent_size=args.resolution // 8, progress=False)
    return engine, build_solver(engine, config, optimizer_factory(config))


def build_reference(args, bundle, student, device, workdir: Path):
    import torch

    from reference_step import ReferenceTrainer
    from safeprune_engine.data.imagefolder import ImageFolder

    def load(folder):
        folder = ImageFolder(folder)
        images = torch.stack([folder.load_image(i, args.resolution) for i in range(len(folder))])
        ids = bundle.tokenizer(folder.captions, padding="max_length", truncation=True, return_tensors="pt",
                               max_length=bundle.tokenizer.model_max_length).input_ids
        return images, ids

    images, ids = load(workdir / "data")
    concept_images, concept_ids = load(workdir / "concepts")
    anchor_ids = bundle.tokenizer([""], padding="max_length", truncation=True, return_tensors="pt",
                                  max_length=bundle.tokenizer.model_max_length).input_ids
    return ReferenceTrainer(bundle.unet, student, bundle.vae, bundle.text_encoder, bundle.noise_scheduler(),
                            bundle.prediction_type, images, ids, concept_images, concept_ids, anchor_ids,
                            batch_size=args.batch_size, device=device, lr=1e-6, lr_upper=5e-6,
                            upper_every=args.period, seed=args.seed)


def reference_parts(runner, b: int, device) -> dict:
    """Pieces of the reference step, each a callable over one batch (run under no_grad by the caller, except the
    student's forward + backward): the encoders, the teacher over B rows and over 3B rows (our outer step's
    batched forward), the student's forward + backward."""
    import torch

    pixels = runner.images[:1].repeat(b, 1, 1, 1)
    ids = runner.caption_ids[:1].repeat(b, 1)
    z = runner.encode_images(pixels)
    text = runner.encode_text(ids)
    t = torch.full((b,), 500, device=device, dtype=torch.long)
    z3, text3, t3 = z.repeat(3, 1, 1, 1), text.repeat(3, 1, 1), t.repeat(3)

    def student_fwd_bwd():
        with torch.enable_grad():
            runner.student(z, t, encoder_hidden_states=text).sample.float().pow(2).mean().backward()
        runner.student.zero_grad(set_to_none=True)

    return {
        "vae_encode": lambda: runner.encode_images(pixels),
        "text_encode": lambda: runner.encode_text(ids),
        "teacher_forward": lambda: runner.teacher(z, t, encoder_hidden_states=text),
        "teacher_forward_3x_rows": lambda: runner.teacher(z3, t3, encoder_hidden_states=text3),
        "student_forward_backward": student_fwd_bwd,
    }


def checked(step_fn):
    """Run a step and fail loudly on a non-finite loss (a benchmark of a broken step is worthless)."""
    import math

    def run():
        scalars = step_fn()
        bad = {k: v for k, v in scalars.items() if not math.isfinite(v)}
        if bad:
            raise FloatingPointError(f"non-finite losses: {bad}")
        return scalars

    return run


def run_worker(args) -> None:
    import torch

    import harness
    from safeprune_engine.models.teacher import bundle_from_pipeline
    from safeprune_engine.prune.width import prune

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    workdir = Path(args.workdir)
    baseline_rss = harness.rss_bytes()
    t0 = time.perf_counter()
    preset = PRESETS[args.preset]
    bundle = bundle_from_pipeline(build_pipeline(preset, args.resolution, args.prediction_type, args.seed))
    student, report = prune(bundle.unet, ratio=args.prune_ratio, sample_size=args.resolution // 8)
    info = {"teacher_params": count_params(bundle.unet), "student_params": count_params(student),
            "vae_encoder_params": count_params(bundle.vae.encoder), "text_encoder_params": count_params(
                bundle.text_encoder), "student_macs_fraction": report.macs_fraction}

    if args.worker == "c":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        runner = build_reference(args, bundle, student, device, workdir)
        kinds = {"lower": checked(lambda: runner.step(0)), "outer": checked(lambda: runner.step(args.period - 1))}
    elif args.worker == "a":
        engine, solver = build_ours(args, bundle, student, device, workdir, "distill-only", args.kernels)
        kinds = {"step": checked(lambda: solver.step(0))}
    elif args.worker == "d":  # a student step (L_cu + lambda L_ft) and a value-model step, and every CHECK_EVERY
        # steps the multiplier's check first (student and value model on the probe set)
        from safeprune_engine.config import RunConfig

        shipped = RunConfig()
        engine, solver = build_ours(args, bundle, student, device, workdir, "bilevel", args.kernels,
                                    erase_method=shipped.erase_method, bilevel_inner_steps=shipped.bilevel_inner_steps)
        # the check first: the multiplier's scalars are defined from the first check on
        kinds = {"check_step": checked(lambda: solver.step(0)), "step": checked(lambda: solver.step(1))}
    else:
        kernels = "off" if args.worker == "k" else args.kernels
        # e / j: the joint forward is a bilevel (penalty form) option, whose every step is a full outer step
        extra = {"e": dict(erase_method="esd", quality_tolerance=None),
                 "j": dict(erase_method="esd", bilevel_joint_forward=True, quality_tolerance=None)}
        method = "bilevel" if args.worker in extra else "interleaved"
        engine, solver = build_ours(args, bundle, student, device, workdir, method, kernels,
                                    **extra.get(args.worker, {}))
        kinds = {"lower": checked(lambda: solver.step(0)), "outer": checked(lambda: solver.step(args.period - 1))}
    info["setup_s"] = time.perf_counter() - t0

    cpu = device.type == "cpu"
    result = {"variant": args.worker, "phase": args.phase, "device": harness.device_description(device),
              "info": info, "times": {}, "memory": None, "flops": {}, "parts_s": {}}
    if args.phase in ("memory", "both"):
        # the first steps of every kind, where optimizer states appear and the peak is reached; on CPU with glibc
        # returning freed blocks at once, so that the RSS peak is the peak of live memory
        probe = harness.MemoryProbe(device, baseline_bytes=baseline_rss)
        with harness.exact_heap(enabled=cpu) as exact:
            probe.start()
            steady = []
            for fn in kinds.values():
                for _ in range(MEMORY_STEPS):
                    fn()
                    steady.append(probe.level_above_setup())
            result["memory"] = {**probe.read(), "exact_heap": exact,
                                "steady_above_setup_bytes": None if None in steady else max(steady)}
        if args.worker != "c":  # what each of our optimizers holds (bytes of state tensors)
            optimizers = dict(solver.optimizers)
            if getattr(solver, "value_model", None) is not None:  # the constraint form's, kept outside .optimizers
                optimizers["value"] = solver.value_optimizer
            result["memory"]["optimizer_state_bytes"] = {
                name: sum(t.numel() * t.element_size() for state in optimizer.state.values()
                          for t in state.values() if isinstance(t, torch.Tensor))
                for name, optimizer in optimizers.items()}
    if args.phase in ("time", "both"):
        # glibc's default allocator behaviour here: the pinned thresholds `exact_heap` leaves behind change CPU
        # step times by +-10%, which is why CPU runs measure memory and time in separate processes
        result["times"] = {kind: harness.time_calls(fn, device, args.warmup, args.steps) for kind, fn in kinds.items()}
    if args.worker == "c":  # where the reference's time goes, one batch at a time
        with torch.no_grad():
            parts = reference_parts(runner, args.batch_size, device)
            if args.phase in ("time", "both"):
                result["parts_s"] = {name: harness.time_calls(fn, device, warmup=1, steps=3)["median_s"]
                                     for name, fn in parts.items()}
            if args.phase in ("memory", "both") and not args.no_flops:
                result["flops"]["parts"] = {name: harness.count_flops(fn) for name, fn in parts.items()}
    if args.phase in ("memory", "both") and not args.no_flops:
        result["flops"].update({kind: harness.count_flops(fn) for kind, fn in kinds.items()})
    harness.write_json(args.result, result)


# ---- the parent: run the workers, compare, report --------------------------------------------------------
def merge_runs(time_runs: list[dict], memory_run: dict, contention_limit: float) -> dict:
    """One variant's processes -> one result: per step kind the median over the timing processes of their medians
    (wall and CPU); memory and FLOPs from the memory process.

    Timing processes during which other processes kept more than `contention_limit` CPUs busy are left out when
    at least one ran undisturbed.
    """
    import statistics

    clean = [r for r in time_runs if r.get("other_processes_cpus") is not None
             and r["other_processes_cpus"] <= contention_limit]
    timed = clean or time_runs
    first = time_runs[0]
    merged = {"variant": first["variant"], "device": first["device"], "info": dict(memory_run["info"]),
              "memory": memory_run["memory"], "flops": memory_run["flops"],
              "timing_processes": len(time_runs), "timing_processes_used": len(timed)}
    merged["times"] = {}
    for kind in first["times"]:
        per_run = [r["times"][kind] for r in timed]
        merged["times"][kind] = {
            "median_s": statistics.median(x["median_s"] for x in per_run),
            "median_cpu_s": statistics.median(x["median_cpu_s"] for x in per_run),
            "per_process_median_s": [x["median_s"] for x in per_run],
            "per_process_median_cpu_s": [x["median_cpu_s"] for x in per_run],
            "all_s": [t for x in per_run for t in x["all_s"]],
        }
    contention = [r.get("other_processes_cpus") for r in timed]
    merged["other_processes_cpus"] = None if None in contention else max(contention)
    merged["info"]["setup_s"] = [r["info"]["setup_s"] for r in time_runs]
    if first.get("parts_s"):
        merged["parts_s"] = {name: statistics.median(r["parts_s"][name] for r in timed) for name in first["parts_s"]}
    return merged


def worker_argv(args, variant: str, phase: str, workdir: Path, result: Path) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--phase", phase,
            "--workdir", str(workdir),
            "--result", str(result), "--device", args.device, "--preset", args.preset,
            "--batch-size", str(args.batch_size), "--resolution", str(args.resolution), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--period", str(args.period), "--mixed-precision", args.mixed_precision,
            "--prune-ratio", str(args.prune_ratio), "--prediction-type", args.prediction_type,
            "--seed", str(args.seed), "--kernels", args.kernels]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.no_flops:
        argv.append("--no-flops")
    return argv


def engine_fingerprint() -> dict:
    """sha256 (16 hex) of the engine sources these numbers depend on: the engine changes, the results file stays."""
    import hashlib

    files = sorted((ROOT / "safeprune_engine").glob("bilevel/*.py")) + sorted(
        (ROOT / "safeprune_engine").glob("distill/*.py")) + sorted((ROOT / "safeprune_engine").glob("unlearn/*.py")) + [
        ROOT / "safeprune_engine" / "data" / "cache.py", ROOT / "safeprune_engine" / "memory.py"] + sorted(
        (ROOT / "safeprune_engine").glob("run/*.py")) + sorted((ROOT / "safeprune_engine").glob("ops/*.py"))
    digest = hashlib.sha256()
    for path in files:
        if path.is_file():
            digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return {"sha256_16": digest.hexdigest()[:16], "files": [p.relative_to(ROOT).as_posix() for p in files]}


def check_every() -> int:
    """The constraint form's check period (steps between the multiplier's probe-set checks)."""
    from safeprune_engine.bilevel.solvers import CHECK_EVERY

    return CHECK_EVERY


def amortised(lower: float, outer: float, period: int) -> float:
    """Mean cost per step over one period: P-1 lower-only steps and one outer step."""
    return ((period - 1) * lower + outer) / period


def summarise(args, results: dict) -> dict:
    """Per-variant numbers, amortisations and the ratios against their targets."""
    import harness

    P, K20 = args.period, PAPER_INNER_STEPS + 1
    summary = {"variants": {}, "ratios": {}, "targets": {}}
    for v, r in results.items():
        t = {k: x["median_s"] for k, x in r["times"].items()}
        c = {k: x["median_cpu_s"] for k, x in r["times"].items()}
        entry = {"times_s": t, "cpu_times_s": c, "timing_detail": r["times"], "memory": r["memory"],
                 "memory_primary_bytes": harness.primary_memory(r["memory"]), "flops": r["flops"], "info": r["info"],
                 "other_processes_cpus": r.get("other_processes_cpus"), "parts_s": r.get("parts_s", {})}
        if v == "a":
            entry["step_s"], entry["step_cpu_s"] = t["step"], c["step"]
            if r["flops"]:
                entry["step_flops"] = r["flops"]["step"]
        elif v == "d":  # amortised over the multiplier's check period
            entry["step_s"] = amortised(t["step"], t["check_step"], check_every())
            entry["step_cpu_s"] = amortised(c["step"], c["check_step"], check_every())
            if r["flops"]:
                entry["step_flops"] = amortised(r["flops"]["step"], r["flops"]["check_step"], check_every())
        else:
            entry["amortised_s"] = {f"P={P}": amortised(t["lower"], t["outer"], P),
                                    f"P={K20} (K=20)": amortised(t["lower"], t["outer"], K20)}
            entry["amortised_cpu_s"] = {f"P={P}": amortised(c["lower"], c["outer"], P),
                                        f"P={K20} (K=20)": amortised(c["lower"], c["outer"], K20)}
            if r["flops"]:
                entry["period_flops"] = {f"P={P}": (P - 1) * r["flops"]["lower"] + r["flops"]["outer"],
                                         f"P={K20} (K=20)": (K20 - 1) * r["flops"]["lower"] + r["flops"]["outer"]}
                entry["amortised_flops"] = {f"P={P}": amortised(r["flops"]["lower"], r["flops"]["outer"], P),
                                            f"P={K20} (K=20)": amortised(r["flops"]["lower"], r["flops"]["outer"], K20)}
        summary["variants"][v] = entry
    V, ratios, targets = summary["variants"], summary["ratios"], summary["targets"]
    key = f"P={P}"
    if "b" in V and "c" in V:
        ratios["c_over_b_time"] = V["c"]["amortised_s"][key] / V["b"]["amortised_s"][key]
        ratios["c_over_b_time_K20"] = (V["c"]["amortised_s"][f"P={K20} (K=20)"]
                                       / V["b"]["amortised_s"][f"P={K20} (K=20)"])
        ratios["c_over_b_time_each_own_schedule"] = V["c"]["amortised_s"][key] / V["b"]["amortised_s"][f"P={K20} (K=20)"]
        ratios["c_over_b_cpu_time"] = V["c"]["amortised_cpu_s"][key] / V["b"]["amortised_cpu_s"][key]
        ratios["c_over_b_memory"] = V["c"]["memory_primary_bytes"] / V["b"]["memory_primary_bytes"]
        cs, bs = V["c"]["memory"].get("steady_above_setup_bytes"), V["b"]["memory"].get("steady_above_setup_bytes")
        if cs and bs:
            ratios["c_over_b_memory_steady"] = cs / bs
        for name in ("peak_bytes", "peak_above_setup_bytes", "peak_above_baseline_bytes"):
            cb, bb = V["c"]["memory"].get(name), V["b"]["memory"].get(name)
            if cb and bb:
                ratios[f"c_over_b_memory_{name.replace('_bytes', '')}"] = cb / bb
        if "amortised_flops" in V["b"] and "amortised_flops" in V["c"]:
            ratios["c_over_b_flops"] = V["c"]["amortised_flops"][key] / V["b"]["amortised_flops"][key]
        targets["c_over_b_time"] = {"target": ">= 1.5", "value": ratios["c_over_b_time"],
                                    "met": ratios["c_over_b_time"] >= 1.5}
        targets["c_over_b_memory"] = {"target": ">= 1.5", "value": ratios["c_over_b_memory"],
                                      "met": ratios["c_over_b_memory"] >= 1.5,
                                      "measure": V["b"]["memory"]["kind"] + (
                                          " peak" if V["b"]["memory"]["kind"] == "cuda_allocated"
                                          else " peak above the post-setup RSS")}
    if "e" in V and "j" in V:
        ratios["e_over_j_time"] = V["e"]["amortised_s"][key] / V["j"]["amortised_s"][key]
        ratios["e_over_j_time_outer"] = V["e"]["times_s"]["outer"] / V["j"]["times_s"]["outer"]
        ratios["e_over_j_memory"] = V["e"]["memory_primary_bytes"] / V["j"]["memory_primary_bytes"]
    if "k" in V and "b" in V:
        ratios["k_over_b_time"] = V["k"]["amortised_s"][key] / V["b"]["amortised_s"][key]
        ratios["k_over_b_time_lower"] = V["k"]["times_s"]["lower"] / V["b"]["times_s"]["lower"]
        ratios["k_over_b_time_outer"] = V["k"]["times_s"]["outer"] / V["b"]["times_s"]["outer"]
        targets["kernels_speedup"] = {"target": ">= 1.15", "value": ratios["k_over_b_time"],
                                      "met": ratios["k_over_b_time"] >= 1.15,
                                      "measure": f"bilevel step, --kernels off / --kernels {args.kernels}"}
    if "a" in V and "b" in V:
        ratios["b_over_a_time"] = V["b"]["amortised_s"][key] / V["a"]["step_s"]
        targets["bilevel_over_distill"] = {"target": "<= 1.1", "value": ratios["b_over_a_time"],
                                           "met": ratios["b_over_a_time"] <= 1.1}
        ratios["b_over_a_time_K20"] = V["b"]["amortised_s"][f"P={K20} (K=20)"] / V["a"]["step_s"]
        ratios["b_over_a_cpu_time"] = V["b"]["amortised_cpu_s"][key] / V["a"]["step_cpu_s"]
        if "step_flops" in V["a"] and "amortised_flops" in V["b"]:
            ratios["b_over_a_flops"] = V["b"]["amortised_flops"][key] / V["a"]["step_flops"]
            ratios["b_over_a_flops_K20"] = V["b"]["amortised_flops"][f"P={K20} (K=20)"] / V["a"]["step_flops"]
            deviation = ratios["b_over_a_time"] / ratios["b_over_a_flops"] - 1.0
            ratios["b_over_a_deviation_from_flops"] = deviation
            targets["b_over_a_vs_flops"] = {"target": "within 10% of the FLOP prediction", "value": deviation,
                                            "met": abs(deviation) <= 0.10}
    if "d" in V and "a" in V:
        ratios["d_over_a_time"] = V["d"]["step_s"] / V["a"]["step_s"]
        ratios["d_over_a_memory"] = V["d"]["memory_primary_bytes"] / V["a"]["memory_primary_bytes"]
        if "step_flops" in V["a"] and "step_flops" in V["d"]:
            ratios["d_over_a_flops"] = V["d"]["step_flops"] / V["a"]["step_flops"]
    if "d" in V and "c" in V:
        ratios["c_over_d_time"] = V["c"]["amortised_s"][key] / V["d"]["step_s"]
        ratios["c_over_d_memory"] = V["c"]["memory_primary_bytes"] / V["d"]["memory_primary_bytes"]
    return summary


def fmt_s(x: float) -> str:
    return f"{x * 1000:9.1f} ms" if x < 1 else f"{x:9.3f} s "


def print_report(args, meta: dict, summary: dict) -> None:
    import harness

    P, K20 = args.period, PAPER_INNER_STEPS + 1
    V, R, T = summary["variants"], summary["ratios"], summary["targets"]
    cuda = args.device.startswith("cuda")
    mem_name = "peak alloc" if cuda else "RSS growth"
    print()
    print(f"device: {meta['device']}   torch {meta['environment']['torch']}")
    print(f"models: {args.preset} (UNet {PRESETS[args.preset]['unet_channels']}, VAE "
          f"{PRESETS[args.preset]['vae_channels']}), student prune ratio {args.prune_ratio}; batch {args.batch_size}, "
          f"{args.resolution} px -> {args.resolution // 8}x{args.resolution // 8} latents; ours mixed precision "
          f"{args.mixed_precision}, reference fp32{' (TF32 off)' if cuda else ''}; median of {args.steps} after "
          f"{args.warmup} warmup; period P={P}")
    any_info = next(iter(V.values()))["info"]
    print(f"params: teacher {any_info['teacher_params'] / 1e6:.1f}M, student {any_info['student_params'] / 1e6:.1f}M "
          f"({any_info['student_macs_fraction']:.0%} of teacher MACs), VAE encoder "
          f"{any_info['vae_encoder_params'] / 1e6:.1f}M, text encoder {any_info['text_encoder_params'] / 1e6:.1f}M")
    print()
    header = f"{'variant / step':44s} {'median':>12s} {'GFLOP':>9s}   {mem_name:>12s} {'peak abs':>12s}"
    print(header)
    print("-" * len(header))

    def row(label, seconds, flops=None, memory=None):
        mem_primary = mem_abs = ""
        if memory is not None:
            mem_primary = harness.mib(harness.primary_memory(memory))
            mem_abs = harness.mib(memory["peak_bytes"])
        gf = f"{flops / 1e9:9.2f}" if flops is not None else " " * 9
        print(f"{label:44s} {fmt_s(seconds):>12s} {gf}   {mem_primary:>12s} {mem_abs:>12s}")

    if "a" in V:
        row(LABELS["a"] + " step", V["a"]["step_s"], V["a"].get("step_flops"), V["a"]["memory"])
    if "d" in V:
        f = V["d"]["flops"] or {}
        row(LABELS["d"] + " step", V["d"]["times_s"]["step"], f.get("step"))
        row("(d) step + the multiplier's probe check", V["d"]["times_s"]["check_step"], f.get("check_step"))
        row(f"(d) amortised, a check every {check_every()} steps", V["d"]["step_s"], V["d"].get("step_flops"),
            V["d"]["memory"])
    for v in ("b", "k", "e", "j", "c"):
        if v not in V:
            continue
        e = V[v]
        f = e["flops"] or {}
        outer_name = "outer (lower + upper)" if v in BILEVEL_VARIANTS else "lower + upper iteration"
        row(f"{LABELS[v]} lower-only step", e["times_s"]["lower"], f.get("lower"))
        row(f"{LABELS[v]} {outer_name}", e["times_s"]["outer"], f.get("outer"))
        af = e.get("amortised_flops", {})
        row(f"{LABELS[v]} amortised, P={P}", e["amortised_s"][f"P={P}"], af.get(f"P={P}"), e["memory"])
        row(f"{LABELS[v]} amortised, K=20 (P={K20})", e["amortised_s"][f"P={K20} (K=20)"], af.get(f"P={K20} (K=20)"))
    if "c" in V and V["c"]["flops"].get("parts"):
        parts, seconds = V["c"]["flops"]["parts"], V["c"].get("parts_s", {})
        print(f"pieces, one batch of {args.batch_size} (VAE encode / teacher forward FLOPs "
              f"{parts['vae_encode'] / parts['teacher_forward']:.2f}x here, 1.39x for SD-1.5 at 512 px):")
        for name, flops in parts.items():
            t = seconds.get(name)
            speed = f"{flops / t / 1e9:8.1f} GFLOP/s" if t else ""
            print(f"  {name:28s} {fmt_s(t) if t else '':>12s} {flops / 1e9:9.2f}   {speed}")
    print()
    print(f"{'ratio':44s} {'measured':>10s} {'FLOP-pred.':>11s} {'target':>10s} {'met':>5s}")
    print("-" * 84)

    def ratio_row(label, value, predicted=None, target=None, met=None):
        pred = f"{predicted:11.3f}" if predicted is not None else " " * 11
        print(f"{label:44s} {value:10.3f} {pred} {target or '':>10s} {'' if met is None else ('yes' if met else 'NO'):>5s}")

    if "c_over_b_time" in R:
        ratio_row(f"(c)/(b) time, both P={P}", R["c_over_b_time"], R.get("c_over_b_flops"), ">= 1.5",
                  T["c_over_b_time"]["met"])
        ratio_row(f"(c)/(b) time, both K=20 (P={K20})", R["c_over_b_time_K20"])
        ratio_row(f"(c)/(b) time, (c) P={P} vs (b) K=20", R["c_over_b_time_each_own_schedule"])
        ratio_row(f"(c)/(b) peak memory ({mem_name})", R["c_over_b_memory"], None, ">= 1.5",
                  T["c_over_b_memory"]["met"])
        if "c_over_b_memory_steady" in R:
            ratio_row("(c)/(b) steady memory (held between steps)", R["c_over_b_memory_steady"])
        if not cuda and "c_over_b_memory_peak_above_baseline" in R:
            ratio_row("(c)/(b) peak memory (models + training)", R["c_over_b_memory_peak_above_baseline"])
            ratio_row("(c)/(b) peak memory (absolute RSS)", R["c_over_b_memory_peak"])
    if "d_over_a_time" in R:
        ratio_row("(d)/(a) time: a default bilevel step", R["d_over_a_time"], R.get("d_over_a_flops"))
        ratio_row("(d)/(a) peak memory", R["d_over_a_memory"])
    if "c_over_d_time" in R:
        ratio_row(f"(c)/(d) time, (c) amortised P={P}", R["c_over_d_time"])
        ratio_row("(c)/(d) peak memory", R["c_over_d_memory"])
    if "e_over_j_time" in R:
        ratio_row("(e)/(j) outer step time: joint forward speed-up", R["e_over_j_time_outer"])
        ratio_row(f"(e)/(j) time, P={P}", R["e_over_j_time"])
        ratio_row("(e)/(j) peak memory", R["e_over_j_memory"])
    if "k_over_b_time" in R:
        ratio_row(f"(k)/(b) time: --kernels off / {args.kernels}, P={P}", R["k_over_b_time"], None, ">= 1.15",
                  T["kernels_speedup"]["met"])
        ratio_row("(k)/(b) time, lower-only step", R["k_over_b_time_lower"])
        ratio_row("(k)/(b) time, outer step", R["k_over_b_time_outer"])
    if "b_over_a_time" in R:
        dev = T.get("b_over_a_vs_flops")
        ratio_row(f"(b)/(a) time, P={P}", R["b_over_a_time"], R.get("b_over_a_flops"), "<= 1.1",
                  T["bilevel_over_distill"]["met"])
        if dev:
            ratio_row("(b)/(a) measured / FLOP-predicted - 1", dev["value"], None, "+-10%", dev["met"])
        ratio_row(f"(b)/(a) time, K=20 (P={K20})", R["b_over_a_time_K20"], R.get("b_over_a_flops_K20"))
    if not cuda and "c_over_b_cpu_time" in R and "b_over_a_cpu_time" in R:
        print(f"same ratios in process CPU time (robust to other processes when --threads 1): (c)/(b) "
              f"{R['c_over_b_cpu_time']:.3f}, (b)/(a) {R['b_over_a_cpu_time']:.3f}")
    print()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    import torch

    import harness

    started = time.perf_counter()
    cpu = not args.device.startswith("cuda")
    # other processes may use the cores our threads leave free (--threads below the core count) without harm
    threads = args.threads or torch.get_num_threads()
    limit = max(0, (os.cpu_count() or threads) - threads) + CONTENDED_CPUS
    memory_runs, time_runs = {}, {v: [] for v in args.variant_list}

    def run(variant: str, phase: str, result: Path, label: str):
        """One worker process; on CPU waits for a quiet machine first and reruns a disturbed timing process."""
        argv = worker_argv(args, variant, phase, workdir, result)
        print(f"{label} ...", flush=True)
        retries = args.retries if cpu and phase == "time" else 0
        for attempt in range(1 + retries):
            if cpu and phase == "time" and args.quiet_wait > 0:
                harness.wait_for_quiet(args.quiet_wait, limit)
            with harness.ContentionMeter() as meter:
                proc = subprocess.run(argv, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
                raise SystemExit(f"variant {variant} ({phase}) failed with exit code {proc.returncode}")
            if meter.other_cpus is None or meter.other_cpus <= limit:
                break
            if attempt < retries:
                print(f"  other processes used {meter.other_cpus:.2f} CPUs meanwhile: running it again", flush=True)
        r = json.loads(result.read_text())
        r["other_processes_cpus"] = meter.other_cpus
        busy = "" if meter.other_cpus is None else f", other processes used {meter.other_cpus:.2f} CPUs"
        what = [f"{k} {x['median_s'] * 1000:.0f} ms" for k, x in r["times"].items()]
        if r["memory"]:
            what.append(f"peak memory {harness.mib(harness.primary_memory(r['memory']))}")
        print(f"  done: setup {r['info']['setup_s']:.1f} s, " + ", ".join(what) + busy, flush=True)
        return r

    with tempfile.TemporaryDirectory(prefix="safeprune-bench-") as tmp:
        workdir = Path(tmp)
        # --kernels auto's decisions: timed afresh by this run's first process (on the machine as it is now, not
        # taken from an earlier run's cache) and shared by every later process, so all variants patch alike
        os.environ.setdefault("SAFEPRUNE_CACHE_DIR", str(workdir / "cache-dir"))
        write_folders(workdir, args.resolution, args.seed)
        for variant in args.variant_list:
            if cpu:  # own process: the memory pass pins glibc's thresholds, which would skew the timing
                memory_runs[variant] = run(variant, "memory", workdir / f"{variant}-memory.json",
                                           f"{LABELS[variant]}: memory and FLOPs")
        for repeat in range(args.repeats):
            for variant in args.variant_list:
                phase = "time" if cpu else "both"
                r = run(variant, phase, workdir / f"{variant}-{repeat}.json",
                        f"{LABELS[variant]}: timing [{repeat + 1}/{args.repeats}]")
                time_runs[variant].append(r)
                if not cpu and repeat == 0:
                    memory_runs[variant] = r
    results = {v: merge_runs(time_runs[v], memory_runs[v], limit) for v in args.variant_list}
    device = torch.device(args.device)
    meta = {"device": next(iter(results.values()))["device"], "device_type": device.type,
            "environment": harness.environment()}
    summary = summarise(args, results)
    contention = {v: r.get("other_processes_cpus") for v, r in results.items()}
    contended = device.type == "cpu" and any(c is not None and c > limit for c in contention.values())
    summary["cpu_contention"] = {"other_processes_cpus": contention, "threshold_cpus": limit,
                                 "contended": contended}
    print_report(args, meta, summary)
    if contended:
        print(f"WARNING: other processes kept {max(c for c in contention.values() if c is not None):.2f} CPUs busy "
              f"during a variant (threshold {limit:.2f}): CPU timings are unreliable (with more runnable threads "
              "than cores, every OpenMP barrier waits for a descheduled thread); rerun on a quiet machine.")
    config = {k: v for k, v in vars(args).items() if k not in ("worker", "workdir", "result", "variant_list", "out")}
    config.update(preset_shapes=PRESETS[args.preset], latent_size=args.resolution // 8,
                  paper_period=PAPER_INNER_STEPS + 1, reference="fp32" + (", TF32 off" if device.type == "cuda" else ""),
                  erase_method="esd-u", concept_batch_size=args.batch_size, engine_sources=engine_fingerprint())
    out = Path(args.out) if args.out else HERE / "results" / f"step-{device.type}.json"
    data = {"benchmark": "step", "device": meta["device"], "device_type": device.type, **meta["environment"],
            "config": config, **summary, "wall_s": time.perf_counter() - started}
    print(f"wrote {harness.write_json(out, data)} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
