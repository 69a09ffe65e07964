"""Memory options of a run: 8-bit optimizer states, an int8 or lower-precision teacher, gradient checkpointing and
channels-last convolutions. Each is one function; the run's one engine builder calls them for one rank or many, so
an option means the same thing either way.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from .errors import SafepruneError
from .models.conditioning import unet_kwargs

log = logging.getLogger("safeprune_engine")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRAINING_PRECISION = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}


def require_bitsandbytes(option: str):
    try:
        import bitsandbytes
    except ImportError as error:
        raise SafepruneError(f"{option} needs bitsandbytes (pip install 'safeprune-engine[scale]'): {error}") from None
    return bitsandbytes


# ---- optimizer states ----------------------------------------------------------------------------------------
# Every optimizer of a solver is built by the run's factory as make_optimizer(params, lr, role): role "lower" for
# the optimizers that step every iteration (the lower level, two-stage's phases), "outer" for the ones that step
# once per period (bilevel's outer step, alternating's upper step). A state used once per period is mostly idle
# memory, so the outer role gets a compact one by default (--outer-optimizer).


def adamw(params, lr: float, role: str = "lower", fused: bool = True) -> torch.optim.Optimizer:
    """torch AdamW with its defaults, fused: one vectorised pass per tensor (about 4x faster than the per-tensor
    loop on CPU, one kernel launch on CUDA), and each tensor is updated on its own, so results do not depend on
    how tensors are grouped and a resumed run repeats an uninterrupted one bit for bit. fused=False: the per-tensor
    loop (ZeRO steps the optimizer on flat partitions it swaps in, which the fused kernel's state cannot follow)."""
    params = list(params)
    fusable = (torch.float32, torch.float16, torch.bfloat16)
    fused = fused and all(p.device.type in ("cpu", "cuda") and p.dtype in fusable for p in _param_list(params))
    return torch.optim.AdamW(params, lr=lr, foreach=False if not fused else None, fused=fused or None)


def adamw_unfused(params, lr: float, role: str = "lower") -> torch.optim.Optimizer:
    return adamw(params, lr, role, fused=False)


def adamw_8bit(params, lr: float, role: str = "lower") -> torch.optim.Optimizer:
    """bitsandbytes AdamW8bit with torch AdamW's defaults (betas 0.9/0.999, eps 1e-8, weight decay 0.01).

    Moments are kept as blockwise-quantised uint8 (2 bytes per parameter instead of 8); tensors under 4096
    elements keep 32-bit states, as bitsandbytes does by default.
    """
    bnb = require_bitsandbytes("--use-8bit-adam / --outer-optimizer adamw-8bit")
    return bnb.optim.AdamW8bit(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)


def _param_list(params: list) -> list:
    out = []
    for item in params:
        out.extend(item["params"] if isinstance(item, dict) else [item])
    return out


class FactoredAdamW(torch.optim.Optimizer):
    """AdamW with Adafactor's factored second moment (Shazeer & Stern, 2018) and an optional low-precision first
    moment. A matrix-shaped gradient G (R x C; conv weights as out x in*k*k) keeps the running means of G^2 over its
    rows and over its columns, R + C numbers instead of R*C, and estimates V = (row_mean outer col_mean) /
    mean(row_mean); vectors keep a full second moment. The first moment (beta1 > 0) is stored in `momentum_dtype`
    (bfloat16: 2 bytes per parameter, against AdamW's 8 for both moments). The step is lr * M_hat / (sqrt(V_hat) +
    eps), bias-corrected like Adam's (for matrices eps is replaced by a 1e-30 floor under the squared-gradient means,
    as in Adafactor), plus AdamW's decoupled weight decay, so the learning rate means what it means for AdamW.
    Without a first moment (beta1 = 0: ~0 bytes per parameter) each step's update is clipped to an RMS of at most
    `clip`, Adafactor's safeguard for the missing averaging.
    """

    def __init__(self, params, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                 weight_decay: float = 1e-2, clip: float = 1.0, momentum_dtype: torch.dtype = torch.bfloat16):
        if lr <= 0 or not 0.0 <= beta1 < 1.0 or not 0.0 <= beta2 < 1.0 or eps <= 0 or weight_decay < 0 or clip <= 0:
            raise ValueError(f"FactoredAdamW: bad settings lr={lr} beta1={beta1} beta2={beta2} eps={eps} "
                             f"weight_decay={weight_decay} clip={clip}")
        super().__init__(params, dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, clip=clip,
                                      momentum_dtype=momentum_dtype))

    @staticmethod
    def _matrix(tensor: torch.Tensor) -> torch.Tensor | None:
        """The 2-D view the second moment is factored over, or None for a vector (kept whole)."""
        return tensor.reshape(tensor.shape[0], -1) if tensor.dim() >= 2 and tensor[0].numel() > 1 else None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("FactoredAdamW does not support sparse gradients")
                self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict) -> None:
        # A few passes over each tensor and no full-size temporary besides one fp32 buffer: the squared-gradient
        # means come from norms, and 1/sqrt(V_hat) = 1/sqrt(row * scale) (outer) 1/sqrt(col) is applied by broadcasts.
        lr, beta1, beta2, eps, wd, clip = (group[k] for k in ("lr", "beta1", "beta2", "eps", "weight_decay", "clip"))
        grad = param.grad.float()
        state = self.state[param]
        matrix = self._matrix(grad)
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            if matrix is None:
                state["exp_avg_sq"] = torch.zeros_like(grad)
            else:
                state["exp_avg_sq_row"] = grad.new_zeros(matrix.shape[0])
                state["exp_avg_sq_col"] = grad.new_zeros(matrix.shape[1])
            if beta1 > 0:
                state["exp_avg"] = torch.zeros_like(grad, dtype=group["momentum_dtype"])
        state["step"] += 1
        step = float(state["step"])
        correction2 = 1.0 - beta2 ** step
        if beta1 > 0:  # fp32 arithmetic, stored rounded to momentum_dtype
            update = state["exp_avg"].float().lerp_(grad, 1.0 - beta1) if state["exp_avg"].dtype != torch.float32 \
                else state["exp_avg"].lerp_(grad, 1.0 - beta1).clone()
            state["exp_avg"].copy_(update)
            update.mul_(1.0 / (1.0 - beta1 ** step))
        else:
            update = grad.clone()
        if matrix is None:
            state["exp_avg_sq"].lerp_(grad.square().add_(1e-30), 1.0 - beta2)
            update.div_((state["exp_avg_sq"] / correction2).sqrt_().add_(eps))
        else:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.lerp_(torch.linalg.vector_norm(matrix, dim=1).square_().div_(matrix.shape[1]).add_(1e-30), 1.0 - beta2)
            col.lerp_(torch.linalg.vector_norm(matrix, dim=0).square_().div_(matrix.shape[0]).add_(1e-30), 1.0 - beta2)
            # V_hat_ij = row_i col_j / (mean(row) correction2), applied as two broadcasts of 1/sqrt; the 1e-30 in
            # the means stands in for eps, which cannot be added inside a product (Adafactor does the same)
            row_factor = (row / (row.mean() * correction2)).rsqrt_()
            col_factor = col.rsqrt()
            view = update.view(matrix.shape)
            view.mul_(row_factor[:, None]).mul_(col_factor[None, :])
        if beta1 == 0:
            update.div_((update.square().mean().sqrt() / clip).clamp_(min=1.0))
        if wd:
            param.mul_(1.0 - lr * wd)
        param.add_(update.to(param.dtype), alpha=-lr)


def factored_adamw(params, lr: float, role: str = "outer") -> torch.optim.Optimizer:
    """Factored second moment, bfloat16 first moment: 2 bytes per parameter."""
    return FactoredAdamW(params, lr=lr)


def factored_adamw_lean(params, lr: float, role: str = "outer") -> torch.optim.Optimizer:
    """Factored second moment, no first moment: ~0 bytes per parameter."""
    return FactoredAdamW(params, lr=lr, beta1=0.0)


def optimizer_factory(config):
    """The factory every solver optimizer is built with, as (params, lr, role) -> optimizer: role "lower" takes
    bitsandbytes AdamW8bit with --use-8bit-adam, else torch AdamW; role "outer" (once-per-period steps) takes
    --outer-optimizer. The run passes it to the solver's constructor."""
    torch_adamw = adamw_unfused if config.zero_stage > 0 else adamw
    lower = adamw_8bit if config.use_8bit_adam else torch_adamw
    outer = {"factored": factored_adamw, "factored-lean": factored_adamw_lean, "adamw-8bit": adamw_8bit,
             "adamw": torch_adamw}[config.effective_outer_optimizer]

    def make(params, lr: float, role: str = "lower") -> torch.optim.Optimizer:
        return (outer if role == "outer" else lower)(params, lr, role)

    return make


# ---- precisions ------------------------------------------------------------------------------------------------
def teacher_precision(config) -> str:
    """"fp32" | "bf16" | "fp16": --teacher-dtype, else the training precision (the teacher runs in it)."""
    return config.teacher_dtype or TRAINING_PRECISION[config.mixed_precision]


def teacher_torch_dtype(config) -> torch.dtype:
    return DTYPES[teacher_precision(config)]


def cast_module(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast in place, only when needed (diffusers warns on every .to(dtype), even a no-op one)."""
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    return module


# ---- activations and layouts -----------------------------------------------------------------------------------
def apply_student_options(student: nn.Module, config) -> nn.Module:
    """--gradient-checkpointing and --channels-last on the student (in place)."""
    if config.gradient_checkpointing:
        if not hasattr(student, "enable_gradient_checkpointing"):
            raise SafepruneError(f"--gradient-checkpointing: {type(student).__name__} does not support it")
        student.enable_gradient_checkpointing()
    if config.channels_last:
        student.to(memory_format=torch.channels_last)
    return student


def apply_teacher_options(teacher_unet: nn.Module, config) -> nn.Module:
    """--channels-last on the teacher (in place). The dtype and int8 options have their own functions."""
    if config.channels_last:
        teacher_unet.to(memory_format=torch.channels_last)
    return teacher_unet


# ---- int8 teacher ----------------------------------------------------------------------------------------------
def int8_linear_names(unet: nn.Module, min_features: int = 1) -> list[str]:
    """Every nn.Linear of the UNet (attention projections, feed-forwards, time and text projections)."""
    return [name for name, module in unet.named_modules()
            if type(module) is nn.Linear and min(module.in_features, module.out_features) >= min_features]


def swap_linear_to_int8(unet: nn.Module, threshold: float = 6.0) -> int:
    """Replace every nn.Linear by a bitsandbytes Linear8bitLt with row-wise int8 weights (in place).

    threshold: LLM.int8()'s outlier threshold; input columns with larger magnitudes run in 16/32 bit.
    Returns the number of layers swapped. Quantisation happens when the layer is moved to its device.
    """
    bnb = require_bitsandbytes("--teacher-int8")
    swapped = 0
    for name in int8_linear_names(unet):
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        old = getattr(parent, child)
        device = old.weight.device
        new = bnb.nn.Linear8bitLt(old.in_features, old.out_features, bias=old.bias is not None,
                                  has_fp16_weights=False, threshold=threshold)
        state = {"weight": old.weight.detach().float().cpu()}
        if old.bias is not None:
            state["bias"] = old.bias.detach().to(old.weight.dtype).cpu()
        new.load_state_dict(state, strict=False)
        new.requires_grad_(False)
        setattr(parent, child, new.to(device))  # .to() quantises the weight rows to int8 + scale
        swapped += 1
    return swapped


def parameter_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


@torch.no_grad()
def quantize_teacher_int8(unet: nn.Module, latent_size: int, text_shape: tuple[int, int], seed: int = 0,
                          batch: int = 2) -> dict:
    """Swap the teacher's Linear layers to int8 and measure the output error that adds.

    The error is measured on `batch` fresh random latents / timesteps / text embeddings of the training shapes
    (latents (batch, C, latent_size, latent_size), text (batch, *text_shape)), same inputs before and after:
    rel_l2 = ||int8 - full|| / ||full||, plus max and mean absolute differences of the predictions.
    Returns that report (also holds the layer count and the weight bytes before and after).
    """
    param = next(unet.parameters())
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, unet.config.in_channels, latent_size, latent_size, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    text = torch.randn(batch, *text_shape, generator=generator)
    inputs = (latents.to(param.device, param.dtype), timesteps.to(param.device))
    text = text.to(param.device, param.dtype)
    condition = unet_kwargs(unet, text)
    reference = unet(*inputs, **condition).sample.float()
    bytes_before = parameter_bytes(unet)
    layers = swap_linear_to_int8(unet)
    quantized = unet(*inputs, **condition).sample.float()
    diff = quantized - reference
    report = {
        "layers": layers,
        "rel_l2": float(diff.norm() / reference.norm().clamp_min(1e-12)),
        "max_abs": float(diff.abs().max()),
        "mean_abs": float(diff.abs().mean()),
        "reference_rms": float(reference.pow(2).mean().sqrt()),
        "weight_bytes_before": bytes_before,
        "weight_bytes_after": parameter_bytes(unet),
        "inputs": {"batch": batch, "latent_size": latent_size, "seed": seed, "dtype": str(param.dtype)},
    }
    log.info("int8 teacher: %d Linear layers, output error rel L2 %.3g (max abs %.3g), weights %.1f -> %.1f MiB",
             layers, report["rel_l2"], report["max_abs"], bytes_before / 2**20, report["weight_bytes_after"] / 2**20)
    return report


def write_int8_report(out_dir: str | Path, report: dict) -> Path:
    path = Path(out_dir) / "teacher_int8_report.json"
    path.write_text(json.dumps(report, indent=2))
    return path
