"""DeepSpeed configs for the student (ZeRO 1/2/3 with the solvers' SlotOptimizer) and the frozen teacher (ZeRO-3,
no optimizer). Plain dicts, built from a RunConfig; nothing here imports deepspeed."""
from __future__ import annotations

HALF_PRECISION = {"bf16": "bf16", "fp16": "fp16"}
DEFAULT_PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed's own default for stage3_param_persistence_threshold
TEACHER_LIVE_ELEMENTS = 50_000_000  # gathered teacher weights alive at once (SD's largest layer: ~6.6M elements)


def precision_block(precision: str) -> dict:
    """bf16 / fp16 sections: half-precision weights and gradients, fp32 master weights in the ZeRO optimizer."""
    return {
        "bf16": {"enabled": precision == "bf16"},
        # dynamic loss scaling, as torch's GradScaler does in the single-process fp16 path
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
    }


def student_config(config, world_size: int) -> dict:
    """The student engine: ZeRO stage config.zero_stage over world_size ranks.

    train_batch_size is the global batch (--batch-size); each rank computes batch_size / world_size rows.
    Gradient accumulation is unmanaged: solvers may call backward more than once before a step (the bilevel outer
    step adds lambda * L_ft and L_cu), and DeepSpeed reduces whatever has accumulated when step() runs.
    """
    stage = config.zero_stage
    zero = {"stage": stage, "contiguous_gradients": True, "overlap_comm": False,
            "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = (
            DEFAULT_PERSISTENCE_THRESHOLD if config.zero3_persistence_threshold is None
            else config.zero3_persistence_threshold)
        zero["stage3_prefetch_bucket_size"] = 50_000_000
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_batch_size": config.batch_size,
        "train_micro_batch_size_per_gpu": config.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        # the client optimizer is ours (SlotOptimizer around the solvers' own AdamW / AdamW8bit)
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        **precision_block(config.mixed_precision),
    }


def teacher_config(config, world_size: int, teacher_precision: str) -> dict:
    """The frozen teacher: ZeRO-3 parameter partitioning only (no optimizer, no gradients).

    teacher_precision: "fp32", "bf16" or "fp16", the dtype its weights are kept and gathered in.
    """
    threshold = (DEFAULT_PERSISTENCE_THRESHOLD if config.zero3_persistence_threshold is None
                 else config.zero3_persistence_threshold)
    return {
        "train_batch_size": config.batch_size,
        "train_micro_batch_size_per_gpu": config.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        # a frozen forward uses each weight once: release gathered weights right after use (reuse distance 0)
        # and cap what is gathered at a time, else DeepSpeed's defaults (1e9 live elements) regather the whole
        # teacher during each forward and the sharding saves nothing at the peak
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": threshold,
                              "stage3_prefetch_bucket_size": TEACHER_LIVE_ELEMENTS // 2,
                              "stage3_max_live_parameters": TEACHER_LIVE_ELEMENTS, "stage3_max_reuse_distance": 0,
                              "overlap_comm": False},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        **precision_block(teacher_precision),
    }
