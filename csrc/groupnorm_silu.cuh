// GroupNorm (affine) + SiLU CUDA kernels: plain C++ launchers over raw pointers (no torch headers), so the
// kernels compile with `nvcc -c` alone and can be used outside torch.
//
// Tensors: x, y, dy, dx hold N images of C channels x HW pixels, NCHW (each (n, c) plane contiguous) or
// channels_last (each pixel's C channels contiguous), in the element type `dtype`. gamma, beta: (C,) float32.
// mean, rstd: (N, G) float32. dgamma, dbeta: (C,) float32. All arithmetic in float32.
// Every launcher returns cudaGetLastError() after its launches on `stream`.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace safeprune {
namespace cuda {

enum class ElementType : int { float32 = 0, float16 = 1, bfloat16 = 2 };

struct GroupNormShape {
  int64_t N, C, HW, G;
  bool channels_last;
};

// float32 scratch the forward (backward) launcher needs in `workspace`, in elements
int64_t groupnorm_silu_forward_workspace(const GroupNormShape& shape);
int64_t groupnorm_silu_backward_workspace(const GroupNormShape& shape);

// y = silu((x - mean) * rstd * gamma + beta), statistics per (n, group); writes y, mean, rstd.
cudaError_t groupnorm_silu_forward(ElementType dtype, const void* x, const float* gamma, const float* beta, void* y,
                                   float* mean, float* rstd, float* workspace, const GroupNormShape& shape,
                                   float eps, cudaStream_t stream);

// dx, dgamma, dbeta of the forward above, from its mean and rstd.
cudaError_t groupnorm_silu_backward(ElementType dtype, const void* dy, const void* x, const float* gamma,
                                    const float* beta, const float* mean, const float* rstd, void* dx, float* dgamma,
                                    float* dbeta, float* workspace, const GroupNormShape& shape, cudaStream_t stream);

}  // namespace cuda
}  // namespace safeprune
