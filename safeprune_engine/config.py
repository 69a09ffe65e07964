"""RunConfig: every setting of a run, one versioned dataclass that round-trips through JSON and YAML.

Each field is also a CLI flag of the same name (``prune_ratio`` <-> ``--prune-ratio``); YAML files may use
either spelling. Flags given on the command line override the file.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from .errors import SafepruneError

CONFIG_VERSION = 1
METHODS = ("bilevel", "interleaved", "alternating", "two-stage", "distill-only")
MIXED_PRECISION = ("no", "bf16", "fp16")
KERNEL_MODES = ("auto", "off", "triton", "cuda", "cpp")  # --kernels: fused ops for the UNets (patch_unet)
OUTER_OPTIMIZERS = ("factored", "factored-lean", "adamw-8bit", "adamw")  # --outer-optimizer (memory.optimizer_factory)

# Fields that define *what* a run computes. A run directory refuses to continue under different values.
IDENTITY_FIELDS = (
    "teacher", "data", "erase", "erase_data", "erase_prompts", "anchor", "prune_ratio", "target_macs", "prune_importance",
    "method", "batch_size", "concept_batch_size", "resolution", "lr", "lr_upper", "seed", "mixed_precision",
    "w_diff", "w_out", "w_feat", "snr_gamma", "caption_dropout", "erase_method", "eta", "bilevel_lambda",
    "bilevel_inner_steps", "quality_tolerance", "quality_dual_rate",
    "upper_every", "two_stage_erase_steps", "esd_pool_size", "esd_ddim_steps", "esd_guidance",
    "prune_method", "prune_calibration_batches", "preserve", "preserve_from_data", "preserve_weight", "uce_when",
    "uce_lambda",
    "salun_base", "salun_topk", "salun_batches",
    "use_8bit_adam", "outer_optimizer", "teacher_int8", "teacher_dtype", "concept_targets", "concept_target_pool",
)
LAUNCHERS = ("deepspeed", "torchrun")
ESD_ETA = 1.0  # ESD's published negative-guidance strength (two-stage, interleaved, alternating)
BILEVEL_ETA = 0.5  # bilevel's: see the eta field
ZERO_STAGES = (0, 1, 2, 3)
TEACHER_DTYPES = ("fp32", "bf16", "fp16")


def setting(default: Any, help: str = "", *, choices: tuple | None = None, unset: str | None = None,
            flag: bool = True) -> Any:
    """A RunConfig field with what the CLI shows for it: its help, its allowed values (`choices`), what None or an
    empty list means (`unset`, e.g. "5 x lr"); flag=False for the few fields that are no command-line flag."""
    metadata = {"help": help, "choices": choices, "unset": unset, "flag": flag}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    """Settings of one prune -> bilevel fine-tune -> export run. Defaults follow METHOD.md's reference."""

    out: str = setting("runs/default", "run directory: checkpoints, logs and the exported pipeline (RUN/pipeline)")
    teacher: str | None = setting(None, "StableDiffusionPipeline directory (or hub id when online)",
                                  unset="none, the built-in default run on the toy world")
    data: str | None = setting(None, "image folder with metadata.jsonl lines {\"file_name\", \"text\"}",
                               unset="the built-in default's data")
    erase: list[str] = setting([], "concept prompt to suppress; repeat for several", unset="none")
    erase_data: str | None = setting(None, "image folder of concept images", unset="the teacher's own sampling "
                                     "trajectories")
    # e.g. full captions "a red circle by X" with --anchor strip keep the object and drop the style
    erase_prompts: list[str] = setting([], "a prompt whose teacher trajectories feed the upper level (repeatable)",
                                       unset="the --erase prompts")
    anchor: str | list[str] = setting("empty", "anchor for the concept: empty (the empty prompt) | strip (the "
                                      "caption minus the concept) | any other text; repeat to give each --erase "
                                      "its own")
    preserve: list[str] = setting([], "a prompt whose outputs are held to the teacher's (repeatable)", unset="none")
    preserve_from_data: int = setting(0, "also hold the N fine-tuning captions nearest the erase prompts (text-encoder "
                                      "similarity; none naming an --erase concept) to the teacher, like --preserve "
                                      "prompts: protects look-alike concepts the data shows without naming them (0: "
                                      "off)")
    preserve_weight: float = setting(1.0, "weight of holding the --preserve prompts")

    prune_ratio: float | None = setting(0.5, "fraction of internal width units removed, in (0, 1)")
    target_macs: float | None = setting(None, "prune to this fraction of the teacher's MACs instead of a fixed "
                                        "ratio (replaces --prune-ratio)", unset="off")
    prune_importance: str = setting("l2", "magnitude pruning's importance", choices=("l2", "l1"))
    prune_method: str = setting("magnitude", "pruning method: magnitude | taylor | bk-base | bk-small | bk-tiny "
                                "(or a plug-in's name)")
    prune_calibration_batches: int = setting(4, "taylor: batches of --data that score the units")

    method: str = setting("bilevel", "how erasing and fine-tuning are combined", choices=METHODS)
    steps: int = setting(1000, "training steps")
    batch_size: int = setting(4, "data batch size per step (all ranks together)")
    concept_batch_size: int | None = setting(None, "concept batch size of upper steps", unset="--batch-size")
    resolution: int | None = setting(None, "image resolution in pixels", unset="the teacher's native size")
    lr: float = setting(1e-5, "learning rate of the lower level")
    lr_upper: float | None = setting(None, "learning rate of the upper level", unset="5 x lr, the reference code's "
                                     "ratio")
    seed: int = setting(0, "random seed")
    mixed_precision: str = setting("no", "autocast dtype of training", choices=MIXED_PRECISION)
    device: str | None = setting(None, "cpu | cuda | cuda:N", unset="cuda when available")
    # "auto" picks per call: the backend measured fastest for each op shape (eager torch included), timed once and
    # cached per device (ops/autotune.py); under ZeRO-3 it leaves the UNets alone. Not an identity field: it changes
    # speed, not what is computed (outputs agree within dtype tolerance), so a run may resume with other kernels.
    # train() unpatches the UNets before returning them.
    kernels: str = setting("auto", "fused ops in the student and teacher UNets (auto: the backend measured fastest "
                           "per op shape, eager included; off: plain diffusers UNets)", choices=KERNEL_MODES)

    w_diff: float = setting(1.0, "weight of the diffusion loss")
    w_out: float = setting(2.0, "weight of output distillation")
    w_feat: float = setting(0.1, "weight of feature distillation")
    snr_gamma: float | None = setting(None, "min-SNR gamma for the diffusion loss", unset="off")
    # Sampling with classifier-free guidance reads the unconditional prediction at every step and amplifies its
    # errors by the guidance scale. Captioned data alone never trains it, so an erasing objective moved it unseen:
    # L_ft held while unrelated prompts broke (docs/status.md, issue 12). 0.1 is Stable Diffusion's own rate.
    caption_dropout: float = setting(0.1, "fraction of fine-tuning rows trained (and distilled) on the empty caption, "
                                     "so L_ft also holds the unconditional prediction that guided sampling uses")

    # every weight (the reference code's upper step): on the toy world at prune ratio 0.3 ESD-u's parameter set could
    # not erase within the quality tolerance, and ESD-x's cross-attention edits spilled over to other prompts
    erase_method: str = setting("esd", "erasing objective: esd (every weight) | esd-u | esd-x | "
                                "concept-ablation-model | concept-ablation-noise | uce | salun (or a plug-in's name)")
    # Bilevel erases in every student step, alongside distillation, and guided sampling multiplies whatever the
    # erasing moved in the (conditional - unconditional) difference: at 1.0 the glyph world's purple "... by Quen"
    # prompts were drawn orange (content 0.91-0.94); at 0.5 every validation cell met every target (docs/status.md,
    # issue 12). Two-stage erases after distillation, as ESD does, and keeps ESD's published 1.0.
    eta: float | None = setting(None, "ESD negative-guidance strength", unset="0.5 with --method bilevel, 1.0 "
                                "(ESD's own) with the other methods")
    bilevel_lambda: float = setting(1.0, "bilevel: lambda, the weight of the fine-tuning loss in every student step "
                                    "(d L_cu + lambda d L_ft), fixed with --quality-tolerance none, else where the "
                                    "multiplier starts; interleaved: the weight of L_ft in the outer step")
    bilevel_inner_steps: int = setting(1, "inner steps per outer step: bilevel's constraint form, steps of the value "
                                       "model (a copy trained on L_ft alone) per student step; interleaved, steps of "
                                       "the student on L_ft alone")
    quality_tolerance: float | None = setting(
        0.1, "bilevel constraint form: minimise L_cu subject to L_ft <= (1 + TOL) x min L_ft, with lambda found by "
        "dual ascent against a value model trained on L_ft alone (a second student copy, replicated on every rank, "
        "and one more forward+backward of the data rows per step); none: the penalty form with a fixed "
        "--bilevel-lambda")
    quality_dual_rate: float = setting(0.1, "constraint form: how fast the multiplier moves, the step of log lambda "
                                       "per check (every 10 steps) at a violation of the tolerance's own size")
    bilevel_joint_forward: bool = setting(
        False, "bilevel outer steps: one student forward over the data and concept rows and one backward of "
        "lambda L_ft + L_cu, instead of a forward and backward for each (needs an objective that trains the whole "
        "student, e.g. --erase-method esd; one process)")
    upper_every: int = setting(10, "alternating: one upper step every N iterations")
    two_stage_erase_steps: int | None = setting(None, "two-stage: erase steps at the end", unset="steps // 4")
    esd_pool_size: int = setting(64, "trajectory latents per concept when there is no --erase-data")
    esd_ddim_steps: int = setting(20, "DDIM steps of the trajectory sampler")
    esd_guidance: float = setting(3.0, "guidance scale of the trajectory sampler")
    concept_targets: str = setting(
        "cached", "the teacher's upper-level predictions: cached (computed once, before training, for a fixed pool of "
        "concept rows: the trajectory pool, or --concept-target-pool noised draws of --erase-data; upper steps then "
        "run no concept rows through the teacher) or live (every upper step runs its concept rows through the "
        "teacher, with fresh noise for --erase-data)", choices=("cached", "live"))
    concept_target_pool: int = setting(512, "cached --concept-targets with --erase-data (or anchor images): the "
                                       "number of fixed noised draws whose teacher predictions are stored")
    uce_when: str = setting("after", "uce: closed-form edit before | after training, or every:N steps")
    uce_lambda: float = setting(0.1, "uce: weight of keeping the edited matrices close to their old values")
    salun_base: str = setting("concept-ablation-model", "salun: the gradient objective whose updates the saliency "
                              "mask restricts")
    salun_topk: float = setting(0.5, "salun: fraction of the base objective's weights the mask keeps")
    salun_batches: int = setting(4, "salun: concept batches the saliency is measured on")
    plugins: list[str] = setting([], "a module to import first, whose decorators register plug-ins (repeatable)",
                                 unset="none")

    cache_dir: str | None = setting(None, "where encoded latents, captions and trajectories are cached "
                                    "(fingerprinted, shareable between runs)", unset="OUT/cache")
    checkpoint_every: int = setting(500, "save a checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = setting(2, "checkpoints to keep")
    # not an identity field: snapshots are extra outputs (e.g. points of an erase-strength sweep), not what is computed
    snapshot_steps: list[int] = setting([], "also save the student's weights alone after step N to "
                                        "OUT/snapshots/step-N, never removed by --keep-checkpoints (repeatable)",
                                        unset="none")
    resume: str | None = setting(None, "latest | CHECKPOINT_DIR", unset="start fresh")
    log_every: int = setting(10, "log scalars every N steps")
    progress: bool = setting(True, "progress bar")

    # scale: processes, ZeRO sharding and memory options (see safeprune_engine/distributed)
    launcher: str | None = setting(None, "start --nproc processes on this machine", choices=LAUNCHERS,
                                   unset="this process only")
    nproc: int = setting(1, "processes (ranks) to start with --launcher")
    zero_stage: int = setting(0, "DeepSpeed ZeRO stage of the student (0: plain data parallel)", choices=ZERO_STAGES)
    teacher_zero3: bool = setting(False, "shard the frozen teacher across ranks (optimizer-less ZeRO-3 engine)")
    zero3_persistence_threshold: int | None = setting(None, "ZeRO-3 keeps tensors with fewer elements whole",
                                                      unset="100000")
    gradient_checkpointing: bool = setting(False, "recompute student activations in backward (less memory, more "
                                           "time)")
    channels_last: bool = setting(False, "NHWC memory format for the UNets' convolutions")
    use_8bit_adam: bool = setting(False, "bitsandbytes AdamW8bit states for the optimizers that step every "
                                  "iteration (the once-per-period one: --outer-optimizer)")
    outer_optimizer: str | None = setting(
        None, "optimizer of the once-per-period step (bilevel's outer step, alternating's upper step): "
        "factored (AdamW's step with an Adafactor-factored second moment and a bfloat16 first moment: 2 bytes per "
        "parameter), factored-lean (no first moment: ~0 bytes, at a measured cost in erasure on the built-in "
        "default), adamw-8bit (bitsandbytes, 2 bytes) or adamw (torch, 8 bytes)", choices=OUTER_OPTIMIZERS,
        unset="adamw-8bit where bitsandbytes is installed, else factored (adamw with --zero-stage 1-3, whose flat "
        "partitions have no rows and columns to factor)")
    teacher_int8: bool = setting(False, "bitsandbytes int8 Linear layers in the teacher (the output error is "
                                 "reported)")
    teacher_dtype: str | None = setting(None, "dtype of the frozen teacher", choices=TEACHER_DTYPES,
                                        unset="the --mixed-precision dtype")
    export_dtype: str = setting("fp32", "weights of the exported pipeline (fp32 masters, cast)",
                                choices=TEACHER_DTYPES)
    export_remote_code: bool = setting(False, "also write the pruned UNet class into the exported unet folder, so the "
                                       "pipeline loads with trust_remote_code where safeprune-engine is not "
                                       "installed (width-pruned students)")
    version: int = setting(CONFIG_VERSION, "config format version", flag=False)  # written, never a flag

    # ---- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        """Settings by field name (or its dashed flag spelling); values are checked against the fields' types."""
        return cls(**checked_settings(values, lambda key, part: ""))

    @classmethod
    def from_file(cls, path: str | Path) -> "RunConfig":
        return cls(**read_config_file(path))

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    # ---- derived values ----------------------------------------------------------------------------
    @property
    def effective_lr_upper(self) -> float:
        return self.lr_upper if self.lr_upper is not None else 5.0 * self.lr

    @property
    def effective_eta(self) -> float:
        if self.eta is not None:
            return self.eta
        return BILEVEL_ETA if self.method == "bilevel" else ESD_ETA

    @property
    def effective_outer_optimizer(self) -> str:
        """--outer-optimizer, else adamw-8bit where bitsandbytes is installed, else factored (adamw under ZeRO,
        whose flat partitions cannot be factored). Both defaults hold 2 bytes per parameter; measured on the
        built-in default, adamw-8bit kept the metrics of a full AdamW closest (docs/status.md)."""
        if self.outer_optimizer is not None:
            return self.outer_optimizer
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is not None:
            return "adamw-8bit"
        return "adamw" if self.zero_stage > 0 else "factored"

    @property
    def effective_concept_batch_size(self) -> int:
        return self.concept_batch_size or self.batch_size

    @property
    def anchors(self) -> list[str]:
        """One anchor per --erase concept (a single --anchor applies to all)."""
        if isinstance(self.anchor, str):
            return [self.anchor] * max(1, len(self.erase))
        return list(self.anchor)

    @property
    def effective_two_stage_erase_steps(self) -> int:
        if self.two_stage_erase_steps is not None:
            return self.two_stage_erase_steps
        return max(1, self.steps // 4)

    @property
    def zero3_sharded(self) -> bool:
        """ZeRO-3 partitions the student or the teacher (the fused UNet forwards cannot run on them)."""
        return self.zero_stage == 3 or self.teacher_zero3

    @property
    def patches_kernels(self) -> bool:
        """Whether the run swaps the UNets' pieces for the fused ops: --kernels other than off, except auto under
        ZeRO-3 (forced backends are refused there by validate())."""
        return self.kernels != "off" and not (self.kernels == "auto" and self.zero3_sharded)

    def identity(self) -> dict[str, Any]:
        """What the run computes. eta counts by its effective value: its default depends on the method, and runs
        stored before that default moved hold 1.0 (a two-stage run at 1.0 is the same run as one at the default).
        Other None-defaulted fields stay as given, so checkpoints that stored them as None keep resuming."""
        values = {name: getattr(self, name) for name in IDENTITY_FIELDS}
        values["eta"] = self.effective_eta
        return values

    # ---- validation --------------------------------------------------------------------------------
    def validate(self) -> "RunConfig":
        """Raise SafepruneError on the first bad value; return self so calls chain."""
        if self.method not in METHODS:
            raise SafepruneError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise SafepruneError(
                f"unknown mixed precision {self.mixed_precision!r}; choose one of {', '.join(MIXED_PRECISION)}"
            )
        if self.bilevel_joint_forward and (self.method != "bilevel" or self.nproc > 1 or self.zero_stage > 0):
            raise SafepruneError("--bilevel-joint-forward is a single-process bilevel option (--method bilevel, "
                                 "--nproc 1, --zero-stage 0)")
        if self.quality_tolerance is not None:  # only --method bilevel reads it
            if not self.quality_tolerance > 0:
                raise SafepruneError(f"--quality-tolerance must be positive, got {self.quality_tolerance}")
            if not self.quality_dual_rate > 0:
                raise SafepruneError(f"--quality-dual-rate must be positive, got {self.quality_dual_rate}")
        if self.outer_optimizer in ("factored", "factored-lean") and self.zero_stage > 0:
            raise SafepruneError(f"--outer-optimizer {self.outer_optimizer} needs whole weight matrices; ZeRO "
                                 f"(--zero-stage {self.zero_stage}) hands the optimizer flat partitions: use adamw "
                                 "or adamw-8bit")
        if self.outer_optimizer is not None and self.outer_optimizer not in OUTER_OPTIMIZERS:
            raise SafepruneError(f"unknown --outer-optimizer {self.outer_optimizer!r}; choose one of "
                                 f"{', '.join(OUTER_OPTIMIZERS)}")
        if self.concept_targets not in ("cached", "live"):
            raise SafepruneError(f"unknown --concept-targets {self.concept_targets!r}; choose cached or live")
        if self.kernels not in KERNEL_MODES:
            raise SafepruneError(f"unknown --kernels {self.kernels!r}; choose one of {', '.join(KERNEL_MODES)}")
        if self.kernels != "off":
            from .patching import check_backend

            check_backend(self.kernels)  # a forced backend that is not built fails before anything is written
        if self.kernels not in ("off", "auto") and self.zero3_sharded:  # auto simply does not patch under ZeRO-3
            raise SafepruneError(f"--kernels {self.kernels} does not work with ZeRO-3 sharding (--zero-stage 3 / "
                                 "--teacher-zero3): the fused resnet forward reads GroupNorm parameters outside the "
                                 "modules whose hooks gather them; use --kernels auto or off")
        from .prune.base import PRUNE_METHODS
        from .registry import load_plugins
        from .unlearn.base import OBJECTIVES

        load_plugins(self.plugins)
        if self.erase_method not in OBJECTIVES:
            raise SafepruneError(
                f"unknown erase method {self.erase_method!r}; choose one of {', '.join(OBJECTIVES.names())}"
            )
        if self.prune_method not in PRUNE_METHODS:
            raise SafepruneError(
                f"unknown prune method {self.prune_method!r}; choose one of {', '.join(PRUNE_METHODS.names())}"
            )
        if not isinstance(self.anchor, str):
            if len(self.anchor) != len(self.erase):
                raise SafepruneError(f"give one --anchor for all concepts or one per --erase: {len(self.erase)} "
                                     f"concepts, {len(self.anchor)} anchors")
        for prompt in self.preserve:
            if not isinstance(prompt, str) or not prompt.strip():
                raise SafepruneError("a --preserve prompt is empty")
        if self.preserve_weight < 0:
            raise SafepruneError(f"--preserve-weight must be >= 0, got {self.preserve_weight}")
        if not 0 <= self.caption_dropout < 1:
            raise SafepruneError(f"--caption-dropout must be in [0, 1), got {self.caption_dropout}")
        if self.preserve_from_data < 0:
            raise SafepruneError(f"--preserve-from-data must be >= 0, got {self.preserve_from_data}")
        if self.erase_method == "uce":
            from .unlearn.uce import parse_uce_when

            parse_uce_when(self.uce_when)
            if self.uce_lambda <= 0:
                raise SafepruneError(f"--uce-lambda must be positive, got {self.uce_lambda}")
        if self.erase_method == "salun":
            if self.salun_base not in OBJECTIVES or self.salun_base == "salun":
                raise SafepruneError(f"--salun-base must be another erase method, got {self.salun_base!r}")
            if not 0.0 < self.salun_topk <= 1.0:
                raise SafepruneError(f"--salun-topk must be a fraction in (0, 1], got {self.salun_topk}")
        for concept in self.erase:
            if not isinstance(concept, str) or not concept.strip():
                raise SafepruneError("an --erase concept is empty; give the text of the concept to suppress")
        for prompt in self.erase_prompts:
            if not isinstance(prompt, str) or not prompt.strip():
                raise SafepruneError("an --erase-prompts entry is empty")
        if self.method != "distill-only" and not self.erase:
            raise SafepruneError(f"method {self.method!r} erases concepts: give at least one --erase TEXT")
        if self.target_macs is not None:
            if not 0.0 < self.target_macs <= 1.0:
                raise SafepruneError(f"--target-macs must be in (0, 1], got {self.target_macs}")
        elif self.prune_ratio is None or not 0.0 < self.prune_ratio < 1.0:
            raise SafepruneError(f"--prune-ratio must be in (0, 1) (exclusive), got {self.prune_ratio}")
        for name in ("steps", "batch_size", "bilevel_inner_steps", "upper_every", "esd_pool_size", "esd_ddim_steps",
                     "concept_target_pool", "keep_checkpoints", "log_every", "prune_calibration_batches",
                     "salun_batches"):
            if getattr(self, name) < 1:
                raise SafepruneError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.concept_batch_size is not None and self.concept_batch_size < 1:
            raise SafepruneError("--concept-batch-size must be at least 1")
        if self.checkpoint_every < 0:
            raise SafepruneError("--checkpoint-every must be >= 0")
        for step in self.snapshot_steps:
            if not 1 <= step <= self.steps:
                raise SafepruneError(f"--snapshot-steps {step} is not a step of this run (1..{self.steps})")
        if self.eta is not None and self.eta < 0:  # 0 maps the concept onto its anchor; < 0 would guide towards it
            raise SafepruneError(f"--eta must be >= 0 (the strength of the guidance away from the concept), "
                                 f"got {self.eta}")
        if self.lr <= 0 or (self.lr_upper is not None and self.lr_upper <= 0):
            raise SafepruneError("learning rates must be positive")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise SafepruneError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        if self.method == "two-stage" and self.effective_two_stage_erase_steps >= self.steps:
            raise SafepruneError("--two-stage-erase-steps must be smaller than --steps (some steps must distill)")
        self.validate_scale()
        return self

    def validate_scale(self) -> None:
        """The process / ZeRO / memory options (checks that need no import of deepspeed or bitsandbytes)."""
        if self.launcher is not None and self.launcher not in LAUNCHERS:
            raise SafepruneError(f"unknown launcher {self.launcher!r}; choose one of {', '.join(LAUNCHERS)}")
        if isinstance(self.nproc, bool) or not isinstance(self.nproc, int) or self.nproc < 1:
            raise SafepruneError(f"--nproc must be a whole number >= 1, got {self.nproc!r}")
        if self.nproc > 1 and self.launcher is None:
            raise SafepruneError(f"--nproc {self.nproc} needs --launcher deepspeed or --launcher torchrun")
        if self.zero_stage not in ZERO_STAGES:
            raise SafepruneError(f"--zero-stage must be one of {', '.join(map(str, ZERO_STAGES))}, "
                                 f"got {self.zero_stage!r}")
        if self.teacher_dtype is not None and self.teacher_dtype not in TEACHER_DTYPES:
            raise SafepruneError(f"unknown teacher dtype {self.teacher_dtype!r}; choose one of "
                                 f"{', '.join(TEACHER_DTYPES)}")
        if self.export_dtype not in TEACHER_DTYPES:
            raise SafepruneError(f"unknown export dtype {self.export_dtype!r}; choose one of "
                                 f"{', '.join(TEACHER_DTYPES)}")
        if self.teacher_int8 and self.teacher_zero3:
            raise SafepruneError("--teacher-int8 and --teacher-zero3 exclude each other: ZeRO-3 partitions and "
                                 "gathers plain parameters, not bitsandbytes' int8 weights with their scales")
        if self.zero3_persistence_threshold is not None and self.zero3_persistence_threshold < 0:
            raise SafepruneError("--zero3-persistence-threshold must be >= 0")
        for name in ("batch_size", "concept_batch_size"):
            value = getattr(self, name)
            if value is not None and value % self.nproc:
                raise SafepruneError(f"--{name.replace('_', '-')} {value} is the global batch and must split "
                                     f"evenly over --nproc {self.nproc} ranks")


# ---- settings from files and mappings: every problem is one line naming where it is ------------------------
Locate = Callable[[str, str], str]  # (field name, "key" | "value") -> "file:line:col" or "file" or ""


@functools.cache
def setting_type(name: str) -> tuple[type, bool, bool]:
    """(value type, repeatable, optional) of a RunConfig field, read from its annotation.

    repeatable: a list of values is accepted (``list[str]``, ``str | list[str]``); optional: None is accepted.
    """
    hint = typing.get_type_hints(RunConfig)[name]
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kinds = [member for member in members if member is not type(None)]
    repeatable = any(typing.get_origin(kind) is list for kind in kinds)
    kind = next(typing.get_args(kind)[0] if typing.get_origin(kind) is list else kind for kind in kinds)
    return kind, repeatable, len(kinds) < len(members)


def flag_fields() -> list[dataclasses.Field]:
    """RunConfig's fields that are flags of `safeprune run` (every field not declared with flag=False)."""
    return [f for f in fields(RunConfig) if f.metadata.get("flag", True)]


def default_text(f: dataclasses.Field) -> str:
    """A field's default as --help shows it: the value, or what None or an empty list stands for."""
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if value is None or value == []:
        return f.metadata.get("unset") or "none"
    return str(value)


def checked_value(name: str, value: Any) -> Any:
    """value as RunConfig field `name` holds it, or a SafepruneError saying what the field takes."""
    kind, repeatable, optional = setting_type(name)
    if value is None and optional:
        return None
    if repeatable:
        items = value if isinstance(value, list) else [value]
        if kind is int:  # bool is an int subclass, but `true` is no step number
            if all(isinstance(item, int) and not isinstance(item, bool) for item in items):
                return value
            raise SafepruneError(f"{name} must be an integer or a list of integers, got {value!r}")
        if all(isinstance(item, str) for item in items):
            return value
        raise SafepruneError(f"{name} must be a string or a list of strings, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise SafepruneError(f"{name} must be true or false, got {value!r}")
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as text
            try:
                return float(value)
            except ValueError:
                pass
    if kind is str and isinstance(value, str):
        return value
    what = {int: "an integer", float: "a number", str: "a string"}[kind]
    hint = " (YAML reads unquoted no/yes/off/on as booleans: quote the value)" if isinstance(value, bool) else ""
    raise SafepruneError(f"{name} must be {what}, got {value!r}{hint}")


def checked_settings(values: dict, locate: Locate) -> dict[str, Any]:
    """values by RunConfig field name: keys in either spelling (prune_ratio / prune-ratio), checked types,
    a single value where a list is expected becomes a one-item list."""
    known = [f.name for f in fields(RunConfig)]
    settings: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(sorted(known))}"
            raise SafepruneError(f"{locate(name, 'key')}unknown config key {key!r}{hint}")
        try:
            settings[name] = checked_value(name, value)
        except SafepruneError as error:
            raise SafepruneError(f"{locate(name, 'value')}{error}") from None
    version = settings.get("version", CONFIG_VERSION)
    if version > CONFIG_VERSION:
        raise SafepruneError(f"{locate('version', 'value')}config version {version} is newer than this "
                             f"safeprune-engine ({CONFIG_VERSION})")
    for name, value in settings.items():
        if value is not None and not isinstance(value, list) and setting_type(name)[1] and name != "anchor":
            settings[name] = [value]
    if isinstance(settings.get("anchor"), list) and len(settings["anchor"]) == 1:
        settings["anchor"] = settings["anchor"][0]  # one anchor for every concept: the plain form
    return settings


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings of a YAML or JSON (*.json) config file, checked: syntax errors and bad keys or values are
    one SafepruneError line that starts with ``file:line:column:`` (just ``file:`` where JSON has no position)."""
    path = Path(path)
    if not path.is_file():
        raise SafepruneError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise SafepruneError(f"config file {path} cannot be read: {error}") from None
    values, marks = _parse_json(path, text) if path.suffix == ".json" else _parse_yaml(path, text)
    if not isinstance(values, dict):
        raise SafepruneError(f"{path}: a config file holds a mapping of keys to values, got a "
                             f"{type(values).__name__}")

    def locate(name: str, part: str) -> str:
        mark = marks.get((name, part))
        return f"{path}:{mark[0]}:{mark[1]}: " if mark else f"{path}: "

    return checked_settings(values, locate)


def _parse_json(path: Path, text: str) -> tuple[Any, dict]:
    def no_repeats(pairs):
        seen = set()
        for key, _ in pairs:
            if key.replace("-", "_") in seen:
                raise SafepruneError(f"{path}: key {key!r} is given twice")
            seen.add(key.replace("-", "_"))
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=no_repeats), {}
    except json.JSONDecodeError as error:
        raise SafepruneError(f"{path}:{error.lineno}:{error.colno}: JSON syntax error: {error.msg}") from None


def _parse_yaml(path: Path, text: str) -> tuple[Any, dict]:
    """The document and, for a top-level mapping, 1-based (line, column) of each key and value."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        values = loader.construct_document(node) if node is not None else {}
    except yaml.MarkedYAMLError as error:
        # a construct left open (a bracket, a quote) is reported where it starts; the problem's place follows
        mark = error.context_mark or error.problem_mark
        what = ", ".join(part for part in (error.context, error.problem) if part)
        if error.context_mark and error.problem_mark:
            what += f" at line {error.problem_mark.line + 1}, column {error.problem_mark.column + 1}"
        kind = "YAML error" if isinstance(error, yaml.constructor.ConstructorError) else "YAML syntax error"
        raise SafepruneError(f"{path}:{mark.line + 1}:{mark.column + 1}: {kind}: {what}") from None
    except yaml.YAMLError as error:
        raise SafepruneError(f"{path}: YAML error: {' '.join(str(error).split())}") from None
    finally:
        loader.dispose()
    marks: dict[tuple[str, str], tuple[int, int]] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            name = str(key_node.value).replace("-", "_")
            at = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            if (name, "key") in marks:
                raise SafepruneError(f"{path}:{at[0]}:{at[1]}: key {key_node.value!r} is given twice")
            marks[name, "key"] = at
            marks[name, "value"] = (value_node.start_mark.line + 1, value_node.start_mark.column + 1)
    return values, marks
