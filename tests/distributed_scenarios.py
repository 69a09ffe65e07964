"""Runs several short multi-rank training scenarios in one launch (the ranks start once), for test_distributed.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_scenarios.py TEACHER DATA BASE SCENARIO...

Each scenario is a real `safeprune_engine.train` call with its own --out under BASE; rank 0 writes BASE/facts.json
with what the tests check that is only visible inside the ranks (sharded teacher sizes, the gathered student).
"""
import json
import os
import sys
from pathlib import Path

import torch


def common(teacher: str, data: str, out: Path, **overrides) -> dict:
    settings = dict(teacher=teacher, data=data, out=str(out), erase=["by monet"], prune_ratio=0.5, steps=4,
                    resolution=16, batch_size=4, esd_pool_size=4, esd_ddim_steps=3, bilevel_inner_steps=1,
                    progress=False, lr=1e-3, log_every=1, launcher="torchrun", nproc=2,
                    outer_optimizer="adamw")  # as test_distributed's single-process reference run
    settings.update(overrides)
    return settings


def main() -> None:
    from safeprune_engine.config import RunConfig
    from safeprune_engine.distributed.runtime import current_context
    from safeprune_engine.distributed.teacher import local_parameter_bytes
    from safeprune_engine.run import train

    teacher, data, base = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    scenarios = sys.argv[4:]
    facts = {}
    for name in scenarios:
        out = base / name
        if name == "zero3":  # ZeRO-3 student and ZeRO-3 teacher, a checkpoint half-way
            config = RunConfig(**common(teacher, data, out, zero_stage=3, teacher_zero3=True,
                                        zero3_persistence_threshold=0, checkpoint_every=2))
        elif name == "zero3_resume":  # the same run, continued from zero3's step-2 checkpoint in another out dir
            config = RunConfig(**common(teacher, data, out, zero_stage=3, teacher_zero3=True,
                                        zero3_persistence_threshold=0, checkpoint_every=2,
                                        resume=str(base / "zero3" / "checkpoints" / "step-00000002")))
        elif name == "adam8":  # ZeRO-2 with bitsandbytes AdamW8bit states, distillation only
            config = RunConfig(**common(teacher, data, out, zero_stage=2, use_8bit_adam=True, method="distill-only",
                                        steps=6, lr=3e-3, checkpoint_every=3))
        elif name == "int8":  # plain data parallel with an int8 teacher
            config = RunConfig(**common(teacher, data, out, zero_stage=0, teacher_int8=True, method="distill-only",
                                        steps=6, lr=3e-3))
        else:
            raise SystemExit(f"unknown scenario {name}")
        teacher_bundle = student = None
        if name in ("adam8", "int8"):  # prune here, so the tests can compare the trained student with its start
            from safeprune_engine.models.teacher import load_teacher
            from safeprune_engine.prune.width import prune

            teacher_bundle = load_teacher(teacher)
            student, _ = prune(teacher_bundle.unet, ratio=0.5)
            if os.environ.get("RANK", "0") == "0":
                student.save_pretrained(base / f"{name}-initial", safe_serialization=True)
        result = train(config, teacher=teacher_bundle, student=student)
        fact = {"steps_run": result.steps_run}
        engine_teacher = result.teacher_unet
        fact["teacher_local_bytes"] = local_parameter_bytes(engine_teacher)
        fact["teacher_whole_bytes"] = sum(
            (p.ds_numel if hasattr(p, "ds_numel") else p.numel()) * p.element_size() for p in engine_teacher.parameters())
        if current_context().is_main:
            from safetensors.torch import save_file

            gathered = {k: v.contiguous() for k, v in result.student.state_dict().items()}
            save_file(gathered, out / "gathered.safetensors")
        facts[name] = fact
    context = current_context()
    gathered = context.all_gather_object(facts)
    if context.is_main:
        (base / "facts.json").write_text(json.dumps({"ranks": gathered}, indent=2))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
