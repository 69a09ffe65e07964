"""Triton kernels for the fused multi-tensor distillation loss: plain launchers, no autograd (that lives in
safeprune_engine/ops/distill_loss.py).

loss = sum_i w_i * mean((s_i - t_i)^2) over pairs of different shapes, in ONE launch: every pair is cut into
BLOCK-element chunks, the chunks of all pairs form one work list (program p handles chunk p), and each program
finds its pair from a table of first-chunk indices and reads the pair's tensors through a table of addresses.
Forward writes one fp32 partial per chunk (summed afterwards in a fixed order: deterministic); backward writes
grad_s_i = g * 2 w_i / numel_i * (s_i - t_i). Math in fp32; teachers may be lower precision than students.
Pairs of one launch share the student dtype and the teacher dtype (the launcher groups pairs by dtypes).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

INTERPRETED = bool(triton.knobs.runtime.interpret)
_BLOCK_GPU, _BLOCK_INTERPRETER = 4096, 1 << 14
# 16 warps: 8 elements per thread. With 16 (8 warps) ptxas spills the fp16 forward on sm_80/sm_90 (4-28 bytes
# of spill stores at 40-48 registers, benchmarks/triton_aot.py); bf16/fp32 do not, 8 per thread spills nowhere.
_NUM_WARPS = 16

_TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _pair_and_chunk(first_chunk_ptr, NPAIRS, BLOCK_PAIRS: tl.constexpr):
    """This program's pair (the last one whose first chunk is <= program id) and chunk within it."""
    pid = tl.program_id(0)
    pairs = tl.arange(0, BLOCK_PAIRS)
    firsts = tl.load(first_chunk_ptr + pairs, mask=pairs < NPAIRS, other=2147483647)
    pair = tl.sum((firsts <= pid).to(tl.int32), axis=0) - 1
    return pid, pair, pid - tl.load(first_chunk_ptr + pair)


@triton.jit
def _forward_kernel(
    student_addr_ptr, teacher_addr_ptr,  # (P,) int64 addresses of each pair's tensors
    scale_ptr,  # (P,) fp32: w_i / numel_i
    numel_ptr, first_chunk_ptr,  # (P,) int64, (P,) int32
    partial_ptr,  # (chunks,) fp32 out
    NPAIRS,
    S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_PAIRS: tl.constexpr,
):
    pid, pair, chunk = _pair_and_chunk(first_chunk_ptr, NPAIRS, BLOCK_PAIRS)
    s_ptr = tl.load(student_addr_ptr + pair).to(tl.pointer_type(S_DTYPE))
    t_ptr = tl.load(teacher_addr_ptr + pair).to(tl.pointer_type(T_DTYPE))
    offsets = chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < tl.load(numel_ptr + pair)
    d = tl.load(s_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - tl.load(
        t_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(partial_ptr + pid, tl.sum(d * d, axis=0) * tl.load(scale_ptr + pair))


@triton.jit
def _backward_kernel(
    student_addr_ptr, teacher_addr_ptr, grad_addr_ptr,  # (P,) int64 addresses
    scale_ptr,  # (P,) fp32: 2 w_i / numel_i
    numel_ptr, first_chunk_ptr,  # (P,) int64, (P,) int32
    upstream_ptr,  # () fp32: d total / d loss
    NPAIRS,
    S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_PAIRS: tl.constexpr,
):
    pid, pair, chunk = _pair_and_chunk(first_chunk_ptr, NPAIRS, BLOCK_PAIRS)
    s_ptr = tl.load(student_addr_ptr + pair).to(tl.pointer_type(S_DTYPE))
    t_ptr = tl.load(teacher_addr_ptr + pair).to(tl.pointer_type(T_DTYPE))
    g_ptr = tl.load(grad_addr_ptr + pair).to(tl.pointer_type(S_DTYPE))
    offsets = chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < tl.load(numel_ptr + pair)
    d = tl.load(s_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - tl.load(
        t_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    k = tl.load(upstream_ptr).to(tl.float32) * tl.load(scale_ptr + pair)
    tl.store(g_ptr + offsets, (k * d).to(S_DTYPE), mask=mask)


def _block() -> int:
    return _BLOCK_INTERPRETER if INTERPRETED else _BLOCK_GPU


def _tables(students, teachers, weights, factor, extra=()):
    """Address, scale, numel and first-chunk tables of one dtype group, on the tensors' device."""
    block = _block()
    firsts, first = [], 0
    for s in students:
        firsts.append(first)
        first += triton.cdiv(s.numel(), block)
    device = students[0].device
    rows = [[s.data_ptr() for s in students], [t.data_ptr() for t in teachers]] + [[e.data_ptr() for e in x]
                                                                                  for x in extra]
    addresses = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
    scales = torch.tensor([factor * w / s.numel() for s, w in zip(students, weights)], dtype=torch.float32)
    numels = torch.tensor([s.numel() for s in students], dtype=torch.int64)
    return (addresses, scales.to(device, non_blocking=True), numels.to(device, non_blocking=True),
            torch.tensor(firsts, dtype=torch.int32).to(device, non_blocking=True), first, block)


def _groups(students, teachers):
    """Pair indices grouped by (student dtype, teacher dtype), empty pairs left out."""
    groups: dict[tuple, list[int]] = {}
    for i, (s, t) in enumerate(zip(students, teachers)):
        if s.numel():
            groups.setdefault((s.dtype, t.dtype), []).append(i)
    return groups


def forward(students: list[torch.Tensor], teachers: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_i weights[i] * mean((students[i] - teachers[i])^2) as a 0-d fp32 tensor.

    students[i], teachers[i]: same shape, same dense strides (the op layer guarantees it), fp32/fp16/bf16.
    """
    device = students[0].device if students else torch.device("cpu")
    partials = []
    for (s_dtype, t_dtype), index in _groups(students, teachers).items():
        s_list, t_list = [students[i] for i in index], [teachers[i] for i in index]
        addresses, scales, numels, firsts, chunks, block = _tables(s_list, t_list, [weights[i] for i in index], 1.0)
        partial = torch.empty(chunks, device=device, dtype=torch.float32)
        _forward_kernel[(chunks,)](
            addresses[0], addresses[1], scales, numels, firsts, partial, len(index),
            S_DTYPE=_TRITON_DTYPES[s_dtype], T_DTYPE=_TRITON_DTYPES[t_dtype], BLOCK=block,
            BLOCK_PAIRS=triton.next_power_of_2(len(index)), num_warps=_NUM_WARPS)
        partials.append(partial)
    if not partials:
        return torch.zeros((), device=device, dtype=torch.float32)
    return torch.cat(partials).sum()


def backward(grad: torch.Tensor, students: list[torch.Tensor], teachers: list[torch.Tensor],
             weights: list[float]) -> list[torch.Tensor]:
    """d loss / d students[i] = grad * 2 weights[i] / numel_i * (students[i] - teachers[i]), students' dtypes."""
    grads = [torch.empty_like(s) for s in students]
    upstream = grad.detach().to(torch.float32).reshape(())
    for (s_dtype, t_dtype), index in _groups(students, teachers).items():
        s_list, t_list = [students[i] for i in index], [teachers[i] for i in index]
        addresses, scales, numels, firsts, chunks, block = _tables(
            s_list, t_list, [weights[i] for i in index], 2.0, extra=([grads[i] for i in index],))
        _backward_kernel[(chunks,)](
            addresses[0], addresses[1], addresses[2], scales, numels, firsts, upstream, len(index),
            S_DTYPE=_TRITON_DTYPES[s_dtype], T_DTYPE=_TRITON_DTYPES[t_dtype], BLOCK=block,
            BLOCK_PAIRS=triton.next_power_of_2(len(index)), num_warps=_NUM_WARPS)
    return grads
