"""Per-rank memory of multi-rank training: the teacher replicated vs ZeRO-3-sharded, and fp32 vs 8-bit Adam states.

Each variant is a real `safeprune run` (distill-only, ZeRO-2 student, 2 ranks over gloo or NCCL, a few steps) on a
mid-size SD-1.5-shaped pipeline with random weights, in fresh processes of its own:
  replicated     every rank holds the whole fp32 teacher UNet; fp32 AdamW states (ZeRO-2 partitions them)
  sharded        --teacher-zero3: each rank holds half the teacher's parameters; fp32 AdamW
  sharded-8bit   --teacher-zero3 --use-8bit-adam: bitsandbytes AdamW8bit states
Every rank reports exact bytes (teacher parameters it holds, optimizer states it holds, student parameters) and
peak memory over the steady training steps (all but the first, which builds the engine and the optimizer states):
on CUDA the allocator's peak, on CPU the process's peak RSS with glibc made to return freed blocks at once
(harness.exact_heap).
Expected: the teacher's per-rank bytes halve with sharding (less the small tensors ZeRO-3 keeps whole, below
--zero3-persistence-threshold), and 8-bit Adam needs about a quarter of fp32 Adam's state bytes.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/memory.py            # CPU, writes benchmarks/results/memory-cpu.json
    HF_HUB_OFFLINE=1 python benchmarks/memory.py --device cuda        # one node with >= 2 GPUs
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
if sys.path and Path(sys.path[0] or ".").resolve() == HERE:
    sys.path.pop(0)  # the script's folder: its scripts are not modules to import (harness is loaded by path)
try:
    import safeprune_engine  # noqa: F401  (installed, or found next to benchmarks/)
except ImportError:
    sys.path.insert(0, str(ROOT))


def _load_harness():
    """benchmarks/harness.py by path: putting benchmarks/ on sys.path would let its other files shadow packages."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("safeprune_benchmark_harness", HERE / "harness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


harness = _load_harness()

# SD-1.5's block structure at half its widths: about 215M UNet parameters
MID_UNET = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                block_out_channels=(160, 320, 640, 640), attention_head_dim=8, cross_attention_dim=384)
VARIANTS = {
    "replicated": dict(teacher_zero3=False, use_8bit_adam=False),
    "sharded": dict(teacher_zero3=True, use_8bit_adam=False),
    "sharded-8bit": dict(teacher_zero3=True, use_8bit_adam=True),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--steps", type=int, default=3, help="training steps (the first is not measured)")
    p.add_argument("--resolution", type=int, default=256, help="image pixels (latents are 1/8)")
    p.add_argument("--batch-size", type=int, default=2, help="global batch (1 row per rank)")
    p.add_argument("--ranks", type=int, default=2, help="processes (ranks)")
    p.add_argument("--out", default=None, help="JSON path; default benchmarks/results/memory-<device>.json")
    p.add_argument("--rank-worker", nargs=3, metavar=("TEACHER", "DATA", "RESULT_DIR"), help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- inside each rank ----------------------------------------------------------------------------------------------
def optimizer_state_bytes(solver) -> int:
    import torch

    workers = solver.slots.workers.values() if getattr(solver, "slots", None) else solver.optimizers.values()
    seen, total = set(), 0
    for worker in workers:
        for state in worker.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and id(value) not in seen:
                    seen.add(id(value))
                    total += value.numel() * value.element_size()
    return total


def rank_worker(args) -> None:
    import torch

    from safeprune_engine.config import RunConfig
    from safeprune_engine.distributed.runtime import current_context
    from safeprune_engine.distributed.teacher import local_parameter_bytes
    from safeprune_engine.run import session as session_module
    from safeprune_engine.run import train

    teacher_dir, data_dir, result_dir = args.rank_worker
    device = torch.device(args.device)
    captured = {}
    original = session_module.DistributedSession.build_solver

    def build_solver(self, engine, config, make_optimizer):
        solver = original(self, engine, config, make_optimizer)
        step = solver.step
        probe = harness.MemoryProbe(torch.device(self.device))

        def measured_step(iteration):
            # the first step builds the DeepSpeed engine and every optimizer state; the peak is measured over the
            # steady steps after it (a step's activations, gradients and the resident weights and states)
            if captured.get("steps_seen") == 1:
                probe.start()
                captured["probe"] = probe
                captured["started"] = time.perf_counter()
            captured["steps_seen"] = captured.get("steps_seen", 0) + 1
            return step(iteration)

        solver.step = measured_step
        captured["solver"] = solver
        return solver

    session_module.DistributedSession.build_solver = build_solver
    config = RunConfig(teacher=teacher_dir, data=data_dir, out=str(Path(result_dir) / "run"), method="distill-only",
                       steps=args.steps, batch_size=args.batch_size, resolution=args.resolution, prune_ratio=0.5,
                       lr=1e-5, progress=False, checkpoint_every=0, launcher="torchrun", nproc=args.ranks,
                       zero_stage=2, device=args.device, zero3_persistence_threshold=None, **VARIANTS[args.variant])
    with harness.exact_heap(device.type == "cpu"):
        result = train(config)
        memory = captured["probe"].read()
    solver = captured["solver"]
    context = current_context()
    row = {
        "rank": context.rank,
        "teacher_param_bytes": local_parameter_bytes(result.teacher.unet),
        "teacher_whole_bytes": sum((p.ds_numel if hasattr(p, "ds_numel") else p.numel()) * p.element_size()
                                   for p in result.teacher.unet.parameters()),
        "optimizer_state_bytes": optimizer_state_bytes(solver),
        "student_param_bytes": sum(p.numel() * p.element_size() for p in result.student.parameters()),
        "train_seconds": time.perf_counter() - captured["started"],
        "memory": memory,
    }
    rows = context.all_gather_object(row)
    if context.is_main:
        harness.write_json(Path(result_dir) / "ranks.json", {"ranks": rows})


# ---- the driver ----------------------------------------------------------------------------------------------------
def build_world(root: Path, resolution: int) -> tuple[str, str]:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from safeprune_engine.models.export import assemble_pipeline
    from safeprune_engine.testing import tiny_tokenizer, write_image_folder

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(model_max_length=77)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=384, intermediate_size=1536,
                                        num_hidden_layers=2, num_attention_heads=6, max_position_embeddings=77,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(32, 64, 64, 64), sample_size=resolution)
    unet = UNet2DConditionModel(**{**MID_UNET, "sample_size": resolution // 8})
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    assemble_pipeline(vae, text, tokenizer, unet, scheduler).save_pretrained(root / "teacher", safe_serialization=True)
    captions = [f"a {c} square" for c in ("red", "green", "blue", "yellow")]
    write_image_folder(root / "data", captions, size=resolution)
    return str(root / "teacher"), str(root / "data")


def run_variant(args, variant: str, teacher: str, data: str, workdir: Path) -> dict:
    result_dir = workdir / variant
    result_dir.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.ranks)), OMP_WAIT_POLICY="PASSIVE")
    if args.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    from safeprune_engine.distributed.runtime import free_port

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(Path(__file__).resolve()),
               "--rank-worker", teacher, data, str(result_dir), "--variant", variant, "--device", args.device,
               "--steps", str(args.steps), "--resolution", str(args.resolution), "--batch-size", str(args.batch_size),
               "--ranks", str(args.ranks)]
    started = time.perf_counter()
    with harness.ContentionMeter() as meter:
        done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"variant {variant} failed:\n{done.stderr[-6000:]}")
    ranks = json.loads((result_dir / "ranks.json").read_text())["ranks"]
    return {"ranks": ranks, "wall_s": time.perf_counter() - started, "other_processes_cpus": meter.other_cpus}


def summarise(results: dict) -> dict:
    def per_rank(variant, key):
        return [r[key] for r in results[variant]["ranks"]] if variant in results else None

    def peak(variant):  # absolute per-rank peak: the teacher's share is held before training starts
        return [r["memory"]["peak_bytes"] for r in results[variant]["ranks"]]

    summary = {}
    if "replicated" in results and "sharded" in results:
        replicated, sharded = per_rank("replicated", "teacher_param_bytes"), per_rank("sharded", "teacher_param_bytes")
        summary["teacher_bytes_sharded_over_replicated"] = [s / r for s, r in zip(sharded, replicated)]
        summary["peak_saved_by_sharding_bytes"] = [a - b for a, b in zip(peak("replicated"), peak("sharded"))]
        summary["teacher_bytes_saved"] = [r - s for r, s in zip(replicated, sharded)]
    if "sharded" in results and "sharded-8bit" in results:
        fp32, eight = per_rank("sharded", "optimizer_state_bytes"), per_rank("sharded-8bit", "optimizer_state_bytes")
        summary["adam_state_bytes_8bit_over_fp32"] = [e / f for e, f in zip(eight, fp32)]
        summary["peak_saved_by_8bit_adam_bytes"] = [a - b for a, b in zip(peak("sharded"), peak("sharded-8bit"))]
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.rank_worker:
        rank_worker(args)
        return 0
    import torch

    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    with tempfile.TemporaryDirectory(prefix="safeprune-memory-") as folder:
        workdir = Path(folder)
        teacher, data = build_world(workdir, args.resolution)
        results = {v: run_variant(args, v, teacher, data, workdir) for v in variants}
    summary = summarise(results)
    device = torch.device(args.device)
    out = Path(args.out) if args.out else HERE / "results" / f"memory-{device.type}.json"
    record = {"benchmark": "memory", "device": harness.device_description(device),
              "environment": harness.environment(),
              "settings": {"unet": MID_UNET, "steps": args.steps, "resolution": args.resolution,
                           "global_batch": args.batch_size, "ranks": args.ranks, "zero_stage": 2,
                           "method": "distill-only", "prune_ratio": 0.5},
              "variants": results, "summary": summary}
    harness.write_json(out, record)
    for variant, result in results.items():
        for row in result["ranks"]:
            print(f"{variant:13s} rank {row['rank']}: teacher {harness.mib(row['teacher_param_bytes'])} of "
                  f"{harness.mib(row['teacher_whole_bytes'])}, Adam states {harness.mib(row['optimizer_state_bytes'])}, "
                  f"student {harness.mib(row['student_param_bytes'])}, peak {harness.mib(row['memory']['peak_bytes'])} "
                  f"(+{harness.mib(harness.primary_memory(row['memory']))} during training)")
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
