// Pruned convolution CUDA kernels: plain C++ launchers over raw pointers, sizes and a stream (no torch headers,
// so this header and pruned_conv.cu compile with nvcc alone and can be reused outside torch).
//
// The op (definition: safeprune_engine/ops/pruned_conv.py) is a k x k conv (stride, padding) of the pruned
// (physically sliced) weight [C_out, C_in, k, k]; optional prologue a = silu(x * scale[n, c] + shift[n, c]) on
// its input and epilogue out = (conv + bias[o] + temb[n, o] + residual[n, o, ., .]) * out_scale.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace safeprune {
namespace pruned_conv_cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

struct Params {
  // --- inputs (element type `DType` unless noted) ---
  const void* x = nullptr;          // [N, C_in, H, W], element strides sx (NCHW, channels_last, ...)
  const void* weight = nullptr;     // [C_out, C_in, k, k] contiguous
  const void* bias = nullptr;       // [C_out], or null
  const void* temb = nullptr;       // [N, C_out] contiguous, or null
  const void* residual = nullptr;   // [N, C_out, Ho, Wo] contiguous, or null
  const void* grad_out = nullptr;   // [N, C_out, Ho, Wo], element strides sg (backward only)
  const float* scale = nullptr;     // [N, C_in] fp32 prologue scale, or null (no prologue)
  const float* shift = nullptr;     // [N, C_in] fp32 prologue shift
  // --- outputs ---
  void* out = nullptr;              // forward: [N, C_out, Ho, Wo] contiguous
  void* grad_x = nullptr;           // grad_input: like x (same strides sx)
  float* grad_scale = nullptr;      // grad_input with prologue: [N, C_in] fp32, zero-filled, accumulated
  float* grad_shift = nullptr;      // grad_input with prologue: [N, C_in] fp32, zero-filled, accumulated
  float* grad_weight = nullptr;     // grad_weight: [C_out, C_in, k, k] fp32, zero-filled (atomic split sums)
  // --- sizes ---
  int64_t sx[4] = {0, 0, 0, 0};
  int64_t sg[4] = {0, 0, 0, 0};
  int N = 0, H = 0, W = 0;
  int C_out = 0, C_in = 0, k = 1;
  int stride = 1, padding = 0, Ho = 0, Wo = 0;
  float out_scale = 1.f;
};

// Tensor-core (WMMA) tiles for fp16/bf16, and for fp32 when allow_tf32; exact fp32 FMA tiles otherwise.
// Each returns the launch error (cudaSuccess when the kernel was queued).
cudaError_t forward(const Params& p, DType dtype, bool allow_tf32, cudaStream_t stream);
cudaError_t grad_input(const Params& p, DType dtype, bool allow_tf32, cudaStream_t stream);
cudaError_t grad_weight(const Params& p, DType dtype, bool allow_tf32, int sm_count, cudaStream_t stream);

}  // namespace pruned_conv_cuda
}  // namespace safeprune
