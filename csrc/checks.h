// Shared argument checks for the torch glue files (csrc/*_cpu.cpp, csrc/*_cuda.cpp). Not for .cu/.cuh files:
// those are written against raw pointers and compile with nvcc alone.
//
// Registration rule: an op's schema is defined once, in its <op>_cpu.cpp, with
//   TORCH_LIBRARY_FRAGMENT(safeprune_C, m) { m.def("op(...) -> ..."); }
//   TORCH_LIBRARY_IMPL(safeprune_C, CPU, m) { m.impl("op", &op_cpu); }
// and <op>_cuda.cpp adds only TORCH_LIBRARY_IMPL(safeprune_C, CUDA, m). The CUDA library (_C_cuda) is loaded
// after the CPU one (_C) by safeprune_engine/ops/native.py.
#pragma once

#include <torch/extension.h>

#define SAFEPRUNE_CHECK_DEVICE(x, device_type)                                                          \
  TORCH_CHECK((x).device().type() == (device_type), #x " must be on ", (device_type), ", got ", (x).device())

#define SAFEPRUNE_CHECK_SAME_DEVICE(x, y) \
  TORCH_CHECK((x).device() == (y).device(), #x " and " #y " must be on one device, got ", (x).device(), " and ", (y).device())

#define SAFEPRUNE_CHECK_DTYPE(x, dtype) \
  TORCH_CHECK((x).scalar_type() == (dtype), #x " must be ", (dtype), ", got ", (x).scalar_type())

#define SAFEPRUNE_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")

#define SAFEPRUNE_CHECK_DIM(x, n) TORCH_CHECK((x).dim() == (n), #x " must have ", (n), " dims, got ", (x).dim())

#define SAFEPRUNE_CHECK_SHAPE(x, ...)                                                                   \
  TORCH_CHECK((x).sizes() == torch::IntArrayRef({__VA_ARGS__}), #x " must have shape (" #__VA_ARGS__ \
              "), got ", (x).sizes())

// 4-d tensors stored either NCHW-contiguous or channels_last (NHWC); the kernels take a layout flag.
inline bool safeprune_is_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

#define SAFEPRUNE_CHECK_NCHW_OR_NHWC(x)                                                               \
  TORCH_CHECK((x).dim() == 4 && ((x).is_contiguous() || (x).is_contiguous(at::MemoryFormat::ChannelsLast)), \
              #x " must be a 4-d NCHW-contiguous or channels_last tensor, got sizes ", (x).sizes(),       \
              " strides ", (x).strides())
