"""Triton kernels for GroupNorm (affine) + SiLU: plain launchers, no autograd (that lives in
safeprune_engine/ops/groupnorm_silu.py).

Layout: x is viewed as (N, C, HW) with strides (s_n, s_c, s_hw): NCHW-contiguous (s_hw = 1) or channels_last
(s_c = 1). A program owns one tile of one group: BLOCK_HW pixels x the group's CG channels. The reduction is
split so that batch 1 still fills a GPU: N * G * ceil(HW / BLOCK_HW) programs per pass, not N * G.

Forward (two launches):
  1. partial moments per (n, g, hw block): mean_b and M2_b = sum (x - mean_b)^2 (fp32, exact two-pass in
     registers);
  2. each program merges its group's partials (Chan: mean = sum cnt_b mean_b / M,
     M2 = sum M2_b + cnt_b (mean_b - mean)^2), then writes y = silu((x - mean) rstd gamma_c + beta_c).
Backward (two launches + one torch sum), with xhat = (x - mean) rstd, z = xhat gamma + beta,
dz = dy s (1 + z (1 - s)), s = sigmoid(z):
  1. per (n, hw block, channel) partial sums of dz and dz xhat;
  2. each program reduces its group's partials to c1 = sum gamma_c dz / M and c2 = sum gamma_c dz xhat / M and
     writes dx = rstd (gamma_c dz - c1 - xhat c2);
  dgamma = sum of the dz xhat partials, dbeta = sum of the dz partials (over n and blocks).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

INTERPRETED = bool(triton.knobs.runtime.interpret)
# elements per program tile; the interpreter's cost grows with the number of programs, a GPU wants enough of them
_TILE_GPU_MIN, _TILE_GPU_MAX, _TILE_INTERPRETER = 1024, 4096, 1 << 14
_GPU_PROGRAMS_WANTED = 1024


@triton.jit
def _partial_moments_kernel(
    x_ptr,  # (N, C, HW) via strides
    part_ptr,  # (N * G, NBLK, 2) fp32: block mean, block M2
    HW, CG, G, NBLK, s_n, s_c, s_hw,
    BLOCK_HW: tl.constexpr, BLOCK_CG: tl.constexpr,
):
    ng = tl.program_id(0)
    blk = tl.program_id(1)
    n = (ng // G).to(tl.int64)
    g = ng % G
    hw = blk * BLOCK_HW + tl.arange(0, BLOCK_HW)[:, None]
    c = tl.arange(0, BLOCK_CG)[None, :]
    mask = (hw < HW) & (c < CG)
    offsets = n * s_n + (g * CG + c).to(tl.int64) * s_c + hw.to(tl.int64) * s_hw
    v = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    count = (tl.minimum(HW - blk * BLOCK_HW, BLOCK_HW) * CG).to(tl.float32)
    mean = tl.sum(tl.sum(v, axis=1), axis=0) / count
    d = tl.where(mask, v - mean, 0.0)
    m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
    tl.store(part_ptr + (ng * NBLK + blk) * 2, mean)
    tl.store(part_ptr + (ng * NBLK + blk) * 2 + 1, m2)


@triton.jit
def _group_stats(part_ptr, ng, HW, CG, NBLK, total, eps, BLOCK_HW: tl.constexpr, BLOCK_P: tl.constexpr):
    """Chan merge of one group's block moments -> (mean, rstd); total = HW * CG as a float."""
    p = tl.arange(0, BLOCK_P)
    valid = p < NBLK
    pmean = tl.load(part_ptr + (ng * NBLK + p) * 2, mask=valid, other=0.0)
    pm2 = tl.load(part_ptr + (ng * NBLK + p) * 2 + 1, mask=valid, other=0.0)
    pcount = tl.where(valid, tl.minimum(HW - p * BLOCK_HW, BLOCK_HW) * CG, 0).to(tl.float32)
    mean = tl.sum(pcount * pmean, axis=0) / total
    dm = tl.where(valid, pmean - mean, 0.0)
    m2 = tl.sum(pm2 + pcount * dm * dm, axis=0)
    rstd = 1.0 / tl.sqrt(m2 / total + eps)
    return mean, rstd


@triton.jit
def _apply_kernel(
    x_ptr, y_ptr,  # (N, C, HW) via strides, same strides
    w_ptr, b_ptr,  # (C,)
    part_ptr,  # (N * G, NBLK, 2) fp32
    mean_ptr, rstd_ptr,  # (N * G,) fp32
    HW, CG, G, NBLK, s_n, s_c, s_hw, total, eps,
    BLOCK_HW: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_P: tl.constexpr,
):
    ng = tl.program_id(0)
    blk = tl.program_id(1)
    mean, rstd = _group_stats(part_ptr, ng, HW, CG, NBLK, total, eps, BLOCK_HW, BLOCK_P)
    if blk == 0:
        tl.store(mean_ptr + ng, mean)
        tl.store(rstd_ptr + ng, rstd)
    n = (ng // G).to(tl.int64)
    g = ng % G
    c1 = tl.arange(0, BLOCK_CG)
    gamma = tl.load(w_ptr + g * CG + c1, mask=c1 < CG, other=0.0).to(tl.float32)
    beta = tl.load(b_ptr + g * CG + c1, mask=c1 < CG, other=0.0).to(tl.float32)
    a = (gamma * rstd)[None, :]
    shift = (beta - mean * gamma * rstd)[None, :]
    hw = blk * BLOCK_HW + tl.arange(0, BLOCK_HW)[:, None]
    c = c1[None, :]
    mask = (hw < HW) & (c < CG)
    offsets = n * s_n + (g * CG + c).to(tl.int64) * s_c + hw.to(tl.int64) * s_hw
    z = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * a + shift
    y = z * tl.sigmoid(z)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_partials_kernel(
    x_ptr, dy_ptr,  # (N, C, HW) via strides, same strides
    w_ptr, b_ptr,  # (C,)
    mean_ptr, rstd_ptr,  # (N * G,) fp32
    pdz_ptr, pdzx_ptr,  # (N, NBLK, C) fp32
    C, HW, CG, G, NBLK, s_n, s_c, s_hw,
    BLOCK_HW: tl.constexpr, BLOCK_CG: tl.constexpr,
):
    ng = tl.program_id(0)
    blk = tl.program_id(1)
    n = ng // G
    g = ng % G
    mean = tl.load(mean_ptr + ng)
    rstd = tl.load(rstd_ptr + ng)
    c1 = tl.arange(0, BLOCK_CG)
    cmask = c1 < CG
    gamma = tl.load(w_ptr + g * CG + c1, mask=cmask, other=0.0).to(tl.float32)[None, :]
    beta = tl.load(b_ptr + g * CG + c1, mask=cmask, other=0.0).to(tl.float32)[None, :]
    hw = blk * BLOCK_HW + tl.arange(0, BLOCK_HW)[:, None]
    c = c1[None, :]
    mask = (hw < HW) & (c < CG)
    offsets = n.to(tl.int64) * s_n + (g * CG + c).to(tl.int64) * s_c + hw.to(tl.int64) * s_hw
    xhat = (tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
    z = xhat * gamma + beta
    s = tl.sigmoid(z)
    dz = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * s * (1.0 + z * (1.0 - s))
    dz = tl.where(mask, dz, 0.0)
    out = (n * NBLK + blk) * C + g * CG + c1
    tl.store(pdz_ptr + out, tl.sum(dz, axis=0), mask=cmask)
    tl.store(pdzx_ptr + out, tl.sum(dz * xhat, axis=0), mask=cmask)


@triton.jit
def _grad_apply_kernel(
    x_ptr, dy_ptr, dx_ptr,  # (N, C, HW) via strides, same strides
    w_ptr, b_ptr,  # (C,)
    mean_ptr, rstd_ptr,  # (N * G,) fp32
    pdz_ptr, pdzx_ptr,  # (N, NBLK, C) fp32
    C, HW, CG, G, NBLK, s_n, s_c, s_hw, total,
    BLOCK_HW: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_P: tl.constexpr,
):
    ng = tl.program_id(0)
    blk = tl.program_id(1)
    n = ng // G
    g = ng % G
    mean = tl.load(mean_ptr + ng)
    rstd = tl.load(rstd_ptr + ng)
    c1 = tl.arange(0, BLOCK_CG)
    cmask = c1 < CG
    gamma1 = tl.load(w_ptr + g * CG + c1, mask=cmask, other=0.0).to(tl.float32)
    beta = tl.load(b_ptr + g * CG + c1, mask=cmask, other=0.0).to(tl.float32)[None, :]
    # the group's per-channel sums over all pixel blocks -> c1, c2
    p = tl.arange(0, BLOCK_P)[:, None]
    pmask = (p < NBLK) & cmask[None, :]
    poffs = (n * NBLK + p) * C + g * CG + c1[None, :]
    sdz = tl.sum(tl.load(pdz_ptr + poffs, mask=pmask, other=0.0), axis=0)
    sdzx = tl.sum(tl.load(pdzx_ptr + poffs, mask=pmask, other=0.0), axis=0)
    k1 = tl.sum(gamma1 * sdz, axis=0) / total
    k2 = tl.sum(gamma1 * sdzx, axis=0) / total
    gamma = gamma1[None, :]
    hw = blk * BLOCK_HW + tl.arange(0, BLOCK_HW)[:, None]
    c = c1[None, :]
    mask = (hw < HW) & (c < CG)
    offsets = n.to(tl.int64) * s_n + (g * CG + c).to(tl.int64) * s_c + hw.to(tl.int64) * s_hw
    xhat = (tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
    z = xhat * gamma + beta
    s = tl.sigmoid(z)
    dz = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * s * (1.0 + z * (1.0 - s))
    dx = rstd * (gamma * dz - k1 - xhat * k2)
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ---- launchers ---------------------------------------------------------------------------------------------
def _geometry(x: torch.Tensor, num_groups: int):
    """(N, C, HW, CG, strides (s_n, s_c, s_hw)) of x, which is NCHW-contiguous or channels_last."""
    n, c = x.shape[0], x.shape[1]
    hw = x.numel() // max(1, n * c)
    if x.dim() == 4 and not x.is_contiguous():  # channels_last (the caller guarantees one of the two)
        strides = (hw * c, 1, c)
    else:
        strides = (c * hw, hw, 1)
    return n, c, hw, c // num_groups, strides


def _tiles(groups: int, hw: int, cg: int) -> tuple[int, int, int]:
    """(BLOCK_HW, BLOCK_CG, number of pixel blocks)."""
    block_cg = triton.next_power_of_2(cg)
    if INTERPRETED:
        tile = max(_TILE_INTERPRETER, block_cg)
    else:
        # shrink tiles until the launch has about _GPU_PROGRAMS_WANTED programs (batch 1 still fills the GPU)
        tile = _TILE_GPU_MAX
        while tile > _TILE_GPU_MIN and groups * triton.cdiv(hw * block_cg, tile) < _GPU_PROGRAMS_WANTED:
            tile //= 2
        tile = max(tile, block_cg)
    block_hw = min(triton.next_power_of_2(hw), max(1, tile // block_cg))
    return block_hw, block_cg, triton.cdiv(hw, block_hw)


def _num_warps(block_hw: int, block_cg: int) -> int:
    """At most 8 tile elements per thread: at 16, ptxas spills the fp16 channels_last apply / grad-partials
    kernels on sm_90 (12-32 bytes of spill stores, benchmarks/triton_aot.py); at 8 nothing spills."""
    return max(4, min(16, block_hw * block_cg // 256))


def forward(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """y, mean, rstd = GroupNorm(x) then SiLU.

    x: (N, C, *) fp32/fp16/bf16, NCHW-contiguous or (4-d) channels_last; weight, bias: (C,).
    Returns y like x (same layout and dtype), mean and rstd (N, num_groups) fp32.
    """
    n, c, hw, cg, (s_n, s_c, s_hw) = _geometry(x, num_groups)
    y = torch.empty_like(x)
    mean = torch.empty((n, num_groups), device=x.device, dtype=torch.float32)
    rstd = torch.empty((n, num_groups), device=x.device, dtype=torch.float32)
    if x.numel() == 0:
        return y, mean.fill_(float("nan")), rstd.fill_(float("nan"))
    groups = n * num_groups
    block_hw, block_cg, nblk = _tiles(groups, hw, cg)
    part = torch.empty((groups, nblk, 2), device=x.device, dtype=torch.float32)
    warps = _num_warps(block_hw, block_cg)
    _partial_moments_kernel[(groups, nblk)](
        x, part, hw, cg, num_groups, nblk, s_n, s_c, s_hw, BLOCK_HW=block_hw, BLOCK_CG=block_cg, num_warps=warps)
    _apply_kernel[(groups, nblk)](
        x, y, weight, bias, part, mean, rstd, hw, cg, num_groups, nblk, s_n, s_c, s_hw, float(hw * cg), float(eps),
        BLOCK_HW=block_hw, BLOCK_CG=block_cg, BLOCK_P=triton.next_power_of_2(nblk), num_warps=warps)
    return y, mean, rstd


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
             rstd: torch.Tensor, num_groups: int):
    """dx, dweight, dbias of GroupNorm + SiLU. dy has x's shape, dtype and layout; mean, rstd (N, G) fp32."""
    n, c, hw, cg, (s_n, s_c, s_hw) = _geometry(x, num_groups)
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return dx, torch.zeros_like(weight), torch.zeros_like(bias)
    groups = n * num_groups
    block_hw, block_cg, nblk = _tiles(groups, hw, cg)
    pdz = torch.empty((n, nblk, c), device=x.device, dtype=torch.float32)
    pdzx = torch.empty((n, nblk, c), device=x.device, dtype=torch.float32)
    mean, rstd = mean.float().contiguous(), rstd.float().contiguous()
    warps = _num_warps(block_hw, block_cg)
    _grad_partials_kernel[(groups, nblk)](
        x, dy, weight, bias, mean, rstd, pdz, pdzx, c, hw, cg, num_groups, nblk, s_n, s_c, s_hw,
        BLOCK_HW=block_hw, BLOCK_CG=block_cg, num_warps=warps)
    _grad_apply_kernel[(groups, nblk)](
        x, dy, dx, weight, bias, mean, rstd, pdz, pdzx, c, hw, cg, num_groups, nblk, s_n, s_c, s_hw, float(hw * cg),
        BLOCK_HW=block_hw, BLOCK_CG=block_cg, BLOCK_P=triton.next_power_of_2(nblk), num_warps=warps)
    dweight = pdzx.sum(dim=(0, 1)).to(weight.dtype)
    dbias = pdz.sum(dim=(0, 1)).to(bias.dtype)
    return dx, dweight, dbias
