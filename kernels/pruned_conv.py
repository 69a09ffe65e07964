"""Triton kernels of the pruned convolution (definition: ``safeprune_engine.ops.pruned_conv.pruned_conv_reference``).

Implicit GEMM: no im2col buffer. Every tile of the activation operand is loaded straight from ``x`` (the k*k
taps as shifted, masked loads, the optional GroupNorm-apply + SiLU prologue applied in registers), and every
weight tile straight from the weight. Plain launchers, no autograd (ops/pruned_conv.py owns that).

Shapes: ``x [N, C_in, H, W]``; ``weight [C_out, C_in, k, k]``; output ``[N, C_out, Ho, Wo]``. Any strides for
``x``/``grad_out``; ``weight`` contiguous.

Precision: operands go to ``tl.dot`` in the input dtype on a GPU (fp32 accumulate), and as fp32 under the
interpreter, whose bf16 dots are wrong. fp32 inputs on a GPU take ``input_precision="tf32"`` when the caller
passes ``allow_tf32`` (ops/pruned_conv.py passes torch's cuDNN switch, ``torch.backends.cudnn.allow_tf32``, and
then auto picks these kernels), else ``"ieee"`` (exact, no tensor cores: only a forced ``backend="triton"`` runs
it; auto sends fp32 to cuDNN then).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@triton.jit
def _silu(z):
    return z / (1.0 + tl.exp(-z))


@triton.jit
def _load_act(x_ptr, scale_ptr, shift_ptr, n, hi, wi, c, row_ok, c_ok,
              sxn, sxc, sxh, sxw, H, W, C_in,
              PROLOGUE: tl.constexpr):
    """Activation tile [BM, BC] at input positions (hi, wi) [BM] of samples n [BM], channels c [BC], fp32.

    Out-of-image positions read 0 (the conv zero-pads its input, which is the activation, after the prologue).
    """
    inside = row_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
    mask = inside[:, None] & c_ok[None, :]
    offs = (n.to(tl.int64) * sxn + hi * sxh + wi * sxw)[:, None] + (c.to(tl.int64) * sxc)[None, :]
    a = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PROLOGUE:
        nc = n[:, None] * C_in + c[None, :]
        sc = tl.load(scale_ptr + nc, mask=mask, other=0.0)
        sh = tl.load(shift_ptr + nc, mask=mask, other=0.0)
        a = tl.where(mask, _silu(a * sc + sh), 0.0)
    return a


@triton.jit
def _pruned_conv_fwd_kernel(
    x_ptr,          # [N, C_x, H, W], strides sx*
    w_ptr,          # [C_out, C_in, KS, KS] contiguous
    scale_ptr,      # [N, C_in] fp32 (PROLOGUE)
    shift_ptr,      # [N, C_in] fp32 (PROLOGUE)
    bias_ptr,       # [C_out] (HAS_BIAS)
    temb_ptr,       # [N, C_out] (HAS_TEMB)
    res_ptr,        # [N, C_out, Ho, Wo] contiguous (HAS_RES)
    out_ptr,        # [N, C_out, Ho, Wo] contiguous
    sxn, sxc, sxh, sxw,
    H, W, Ho, Wo, C_in, C_out, out_scale,
    STRIDE: tl.constexpr, PAD: tl.constexpr, KS: tl.constexpr,
    PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TEMB: tl.constexpr,
    HAS_RES: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    # program (pixel block, output-channel block, sample): one sample per program keeps the epilogue simple
    pid_m, pid_n, n0 = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pix = pid_m * BM + tl.arange(0, BM)
    row_ok = pix < Ho * Wo
    ho, wo = pix // Wo, pix % Wo
    n = tl.zeros([BM], dtype=tl.int32) + n0
    o = pid_n * BN + tl.arange(0, BN)
    o_ok = o < C_out
    orow = o.to(tl.int64)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for kh in tl.static_range(KS):
        for kw in tl.static_range(KS):
            hi = ho * STRIDE + kh - PAD
            wi = wo * STRIDE + kw - PAD
            for c0 in range(0, C_in, BK):
                c = c0 + tl.arange(0, BK)
                c_ok = c < C_in
                a = _load_act(x_ptr, scale_ptr, shift_ptr, n, hi, wi, c, row_ok, c_ok,
                              sxn, sxc, sxh, sxw, H, W, C_in, PROLOGUE)
                w_offs = (orow[None, :] * C_in + c[:, None]) * (KS * KS) + (kh * KS + kw)
                b = tl.load(w_ptr + w_offs, mask=c_ok[:, None] & o_ok[None, :], other=0.0)
                if IEEE:
                    acc += tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision="ieee")
                else:
                    acc += tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision="tf32")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + orow, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_TEMB:
        acc += tl.load(temb_ptr + n0 * C_out + o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    out_offs = (n0.to(tl.int64) * C_out + o[None, :]) * (Ho * Wo) + pix[:, None]
    mask = row_ok[:, None] & o_ok[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + out_offs, mask=mask, other=0.0).to(tl.float32)
    acc = acc * out_scale
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pruned_conv_grad_input_kernel(
    g_ptr,          # [N, C_out, Ho, Wo] output gradient, strides sg*
    w_ptr,          # [C_out, C_in, KS, KS] contiguous
    x_ptr,          # [N, C_in, H, W], strides sx* (PROLOGUE: recompute z)
    scale_ptr, shift_ptr,        # [N, C_in] fp32 (PROLOGUE)
    gscale_ptr, gshift_ptr,      # [N, C_in] fp32, zero-initialised, accumulated (PROLOGUE)
    gx_ptr,         # [N, C_in, H, W], strides sx* (same layout as x)
    sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
    H, W, Ho, Wo, C_in, C_out, out_scale,
    STRIDE: tl.constexpr, PAD: tl.constexpr, KS: tl.constexpr,
    PROLOGUE: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    # d act[n, c, h, w] = sum_{o, kh, kw} g[n, o, (h+P-kh)/S, (w+P-kw)/S] * W[o, c, kh, kw]
    # over the taps where the division is exact and in range; then the prologue's backward per (n, c).
    pid_m, pid_n, n0 = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pix = pid_m * BM + tl.arange(0, BM)
    row_ok = pix < H * W
    h, w = pix // W, pix % W
    c = pid_n * BN + tl.arange(0, BN)
    c_ok = c < C_in
    col = c.to(tl.int64)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for kh in tl.static_range(KS):
        for kw in tl.static_range(KS):
            eh = h + PAD - kh
            ew = w + PAD - kw
            # keep the numerators non-negative before // and % (their sign rules differ between backends)
            ehc = tl.maximum(eh, 0)
            ewc = tl.maximum(ew, 0)
            ho, wo = ehc // STRIDE, ewc // STRIDE
            ok = row_ok & (eh >= 0) & (ew >= 0) & (ehc % STRIDE == 0) & (ewc % STRIDE == 0) & (ho < Ho) & (wo < Wo)
            g_row = n0.to(tl.int64) * sgn + ho * sgh + wo * sgw
            for o0 in range(0, C_out, BK):
                o = o0 + tl.arange(0, BK)
                o_ok = o < C_out
                g = tl.load(g_ptr + g_row[:, None] + o[None, :] * sgc, mask=ok[:, None] & o_ok[None, :], other=0.0)
                w_offs = (o.to(tl.int64)[:, None] * C_in + col[None, :]) * (KS * KS) + (kh * KS + kw)
                b = tl.load(w_ptr + w_offs, mask=o_ok[:, None] & c_ok[None, :], other=0.0)
                if IEEE:
                    acc += tl.dot(g.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision="ieee")
                else:
                    acc += tl.dot(g.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision="tf32")
    acc = acc * out_scale
    offs = (n0.to(tl.int64) * sxn + h * sxh + w * sxw)[:, None] + (col * sxc)[None, :]
    mask = row_ok[:, None] & c_ok[None, :]
    if PROLOGUE:
        # a = silu(z), z = x * scale + shift
        xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + n0 * C_in + c, mask=c_ok, other=0.0)
        sh = tl.load(shift_ptr + n0 * C_in + c, mask=c_ok, other=0.0)
        z = xv * sc[None, :] + sh[None, :]
        sig = 1.0 / (1.0 + tl.exp(-z))
        dz = tl.where(mask, acc * sig * (1.0 + z * (1.0 - sig)), 0.0)
        tl.atomic_add(gscale_ptr + n0 * C_in + c, tl.sum(dz * xv, axis=0), mask=c_ok)
        tl.atomic_add(gshift_ptr + n0 * C_in + c, tl.sum(dz, axis=0), mask=c_ok)
        acc = dz * sc[None, :]
    tl.store(gx_ptr + offs, acc.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pruned_conv_grad_weight_kernel(
    g_ptr,          # [N, C_out, Ho, Wo] output gradient, strides sg*
    x_ptr,          # [N, C_in, H, W], strides sx*
    scale_ptr, shift_ptr,        # [N, C_in] fp32 (PROLOGUE)
    gw_ptr,         # [C_out, C_in, KS, KS] fp32, zero-initialised
    sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
    N, H, W, Ho, Wo, C_in, C_out, out_scale, pix_per_split,
    STRIDE: tl.constexpr, PAD: tl.constexpr, KS: tl.constexpr,
    PROLOGUE: tl.constexpr, ATOMIC: tl.constexpr,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    # gW[o, c, kh, kw] = sum_{n, pixel} g[n, o, pixel] * act[n, c, pixel*S + tap - P]
    # program (output-channel block, input-channel block, tap * splits); BK pixels per step over this split.
    pid_o, pid_c, pid_t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    tap = pid_t % (KS * KS)
    split = pid_t // (KS * KS)
    kh, kw = tap // KS, tap % KS
    o = pid_o * BM + tl.arange(0, BM)
    o_ok = o < C_out
    c = pid_c * BN + tl.arange(0, BN)
    c_ok = c < C_in
    total = N * Ho * Wo
    start = split * pix_per_split
    stop = tl.minimum(start + pix_per_split, total)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for p0 in range(start, stop, BK):
        p = p0 + tl.arange(0, BK)
        p_ok = p < stop
        n = p // (Ho * Wo)
        q = p % (Ho * Wo)
        ho, wo = q // Wo, q % Wo
        g_offs = (n.to(tl.int64) * sgn + ho * sgh + wo * sgw)[None, :] + (o.to(tl.int64) * sgc)[:, None]
        g = tl.load(g_ptr + g_offs, mask=o_ok[:, None] & p_ok[None, :], other=0.0)
        a = _load_act(x_ptr, scale_ptr, shift_ptr, n, ho * STRIDE + kh - PAD, wo * STRIDE + kw - PAD,
                      c, p_ok, c_ok, sxn, sxc, sxh, sxw, H, W, C_in, PROLOGUE)
        if IEEE:
            acc += tl.dot(g.to(DOT_DTYPE), a.to(DOT_DTYPE), input_precision="ieee")
        else:
            acc += tl.dot(g.to(DOT_DTYPE), a.to(DOT_DTYPE), input_precision="tf32")
    acc = acc * out_scale
    offs = (o.to(tl.int64)[:, None] * C_in + c[None, :]) * (KS * KS) + tap
    mask = o_ok[:, None] & c_ok[None, :]
    if ATOMIC:
        tl.atomic_add(gw_ptr + offs, acc, mask=mask)
    else:
        tl.store(gw_ptr + offs, acc, mask=mask)


# ------------------------------------------------------------------------------------------------- launchers
def _dot_dtype(dtype: torch.dtype):
    if _INTERPRET or dtype in (torch.float32, torch.float64):
        return tl.float32
    return tl.float16 if dtype == torch.float16 else tl.bfloat16


def _ieee(dtype: torch.dtype, allow_tf32: bool) -> bool:
    """Exact fp32 dots: fp32 operands (fp32 inputs, or any input under the interpreter) unless fp32 inputs may
    use TF32 on a GPU. fp16/bf16 operands ignore the setting (it is for fp32 operands only); the "tf32" they are
    given explicitly keeps a TRITON_F32_DEFAULT override from changing what fp32 inputs get."""
    tf32 = dtype == torch.float32 and not _INTERPRET and allow_tf32
    return _dot_dtype(dtype) == tl.float32 and not tf32


def _blocks(rows: int, cols: int, pixel_reduction: bool = False) -> tuple[int, int, int]:
    """(BM, BN, BK): tile rows, tile columns, reduction step; >= 16 everywhere (tl.dot's GPU minimum).

    The interpreter's cost grows with the number of programs and loop steps, not with tile size, so it gets
    the largest tiles that the problem fills."""
    if _INTERPRET:
        def fit(v, cap):
            return max(16, min(cap, triton.next_power_of_2(v)))
        return fit(rows, 256), fit(cols, 64), (256 if pixel_reduction else 64)
    bm = 64 if rows >= 64 else (32 if rows >= 32 else 16)
    bn = 64 if cols >= 64 else (32 if cols >= 32 else 16)
    return bm, bn, 32


def _num_warps(bm: int, bn: int) -> int:
    """8 warps for 64x64 tiles. At 4, ptxas spills at 255 registers (benchmarks/triton_aot.py, sm_80/sm_90):
    grad_input bf16/fp16 112-384 B/thread, forward fp32 (TF32) 24-72 B, and the bf16 forward sits at 205-255
    registers; at 8 the bf16/fp16 kernels need 121-238 registers and spill nothing."""
    return 8 if bm * bn >= 64 * 64 else 4


def _geometry(x, weight, stride, padding):
    n, _, h, w = x.shape
    k = weight.shape[2]
    ho = (h + 2 * padding - k) // stride + 1
    wo = (w + 2 * padding - k) // stride + 1
    return n, h, w, k, ho, wo


def forward(x, weight, bias, stride, padding, norm_scale, norm_shift, temb_bias, residual, out_scale, *,
            allow_tf32: bool):
    """Output ``[N, C_out, Ho, Wo]`` in x's dtype. ``norm_scale/norm_shift [N, C_in]`` fp32 or None;
    ``bias [C_out]`` or None; ``temb_bias [N, C_out]`` or None; ``residual [N, C_out, Ho, Wo]`` or None;
    ``allow_tf32``: fp32 inputs may use TF32 (see the module docstring)."""
    n, h, w, k, ho, wo = _geometry(x, weight, stride, padding)
    c_out, c_in = weight.shape[0], weight.shape[1]
    weight = weight.contiguous()
    out = torch.empty((n, c_out, ho, wo), device=x.device, dtype=x.dtype)
    residual = residual.contiguous() if residual is not None else None
    temb_bias = temb_bias.contiguous() if temb_bias is not None else None
    bm, bn, bk = _blocks(ho * wo, c_out)
    grid = (triton.cdiv(ho * wo, bm), triton.cdiv(c_out, bn), n)
    dummy = out
    _pruned_conv_fwd_kernel[grid](
        x, weight,
        norm_scale if norm_scale is not None else dummy, norm_shift if norm_shift is not None else dummy,
        bias if bias is not None else dummy, temb_bias if temb_bias is not None else dummy,
        residual if residual is not None else dummy, out,
        *x.stride(), h, w, ho, wo, c_in, c_out, float(out_scale),
        STRIDE=stride, PAD=padding, KS=k, PROLOGUE=norm_scale is not None,
        HAS_BIAS=bias is not None, HAS_TEMB=temb_bias is not None, HAS_RES=residual is not None,
        DOT_DTYPE=_dot_dtype(x.dtype), IEEE=_ieee(x.dtype, allow_tf32), BM=bm, BN=bn, BK=bk,
        num_warps=_num_warps(bm, bn),
    )
    return out


def grad_input(grad_out, x, weight, stride, padding, norm_scale, norm_shift, out_scale, *, allow_tf32: bool):
    """``(grad_x, grad_norm_scale, grad_norm_shift)``: grad_x like ``x``; the norm gradients ``[N, C_in]`` fp32,
    or empty tensors without a prologue."""
    n, h, w, k, ho, wo = _geometry(x, weight, stride, padding)
    c_out, c_in = weight.shape[0], weight.shape[1]
    weight = weight.contiguous()
    grad_x = torch.empty_like(x)
    prologue = norm_scale is not None
    shape = (n, c_in) if prologue else (0,)
    grad_scale = torch.zeros(shape, device=x.device, dtype=torch.float32)
    grad_shift = torch.zeros(shape, device=x.device, dtype=torch.float32)
    bm, bn, bk = _blocks(h * w, c_in)
    grid = (triton.cdiv(h * w, bm), triton.cdiv(c_in, bn), n)
    _pruned_conv_grad_input_kernel[grid](
        grad_out, weight, x,
        norm_scale if prologue else grad_scale, norm_shift if prologue else grad_shift, grad_scale, grad_shift,
        grad_x, *grad_out.stride(), *x.stride(),
        h, w, ho, wo, c_in, c_out, float(out_scale),
        STRIDE=stride, PAD=padding, KS=k, PROLOGUE=prologue,
        DOT_DTYPE=_dot_dtype(x.dtype), IEEE=_ieee(x.dtype, allow_tf32), BM=bm, BN=bn, BK=bk,
        num_warps=_num_warps(bm, bn),
    )
    return grad_x, grad_scale, grad_shift


def grad_weight(grad_out, x, weight, stride, padding, norm_scale, norm_shift, out_scale, *, allow_tf32: bool):
    """``[C_out, C_in, k, k]`` gradient in the weight's dtype."""
    n, h, w, k, ho, wo = _geometry(x, weight, stride, padding)
    c_out, c_in = weight.shape[0], weight.shape[1]
    bm, bn, bk = _blocks(c_out, c_in, pixel_reduction=True)
    tiles = triton.cdiv(c_out, bm) * triton.cdiv(c_in, bn) * k * k
    total = n * ho * wo
    # split the pixel reduction when the tile grid alone cannot fill a GPU (~4 programs per SM of an H100-class
    # part); the interpreter gains nothing from splitting
    splits = 1 if (_INTERPRET or x.device.type != "cuda") else max(1, min(triton.cdiv(528, tiles), total // 1024))
    per_split = triton.cdiv(triton.cdiv(total, splits), bk) * bk
    splits = triton.cdiv(total, per_split)
    # split reductions accumulate atomically into zeros; otherwise every element is stored once
    grad_w32 = (torch.zeros if splits > 1 else torch.empty)(weight.shape, device=x.device, dtype=torch.float32)
    dummy = grad_w32
    grid = (triton.cdiv(c_out, bm), triton.cdiv(c_in, bn), k * k * splits)
    _pruned_conv_grad_weight_kernel[grid](
        grad_out, x,
        norm_scale if norm_scale is not None else dummy, norm_shift if norm_shift is not None else dummy,
        grad_w32, *grad_out.stride(), *x.stride(),
        n, h, w, ho, wo, c_in, c_out, float(out_scale), per_split,
        STRIDE=stride, PAD=padding, KS=k, PROLOGUE=norm_scale is not None,
        ATOMIC=splits > 1, DOT_DTYPE=_dot_dtype(x.dtype), IEEE=_ieee(x.dtype, allow_tf32), BM=bm, BN=bn, BK=bk,
        num_warps=_num_warps(bm, bn),
    )
    return grad_w32.to(weight.dtype)
