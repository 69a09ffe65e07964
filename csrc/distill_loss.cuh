// Fused multi-tensor distillation loss CUDA kernels: plain C++ launchers over raw pointers (no torch headers).
//
// loss = sum_i scale_i * sum_e (s_i[e] - t_i[e])^2 with scale_i = w_i / numel_i, over pairs of any sizes in one
// launch: the pairs' elements form one work list of kDistillChunk-element chunks; a CUDA block per chunk finds
// its pair in `first_chunk` and reads it through the device table of DistillPair entries. Elements are walked in
// memory order (each pair's two tensors share their dense strides). Math in float32; per pair, student and
// teacher element types may differ (e.g. float32 student, bfloat16 teacher).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace safeprune {
namespace cuda {

constexpr int64_t kDistillChunk = 8192;

enum class DistillElement : int32_t { float32 = 0, float16 = 1, bfloat16 = 2 };

struct DistillPair {
  const void* student;
  const void* teacher;
  void* grad;       // backward output (student's element type); unused by the forward
  int64_t numel;
  float scale;      // forward: w / numel; backward: 2 w / numel
  DistillElement student_type;
  DistillElement teacher_type;
};

// number of chunks of a pair of `numel` elements
inline int64_t distill_chunks(int64_t numel) { return (numel + kDistillChunk - 1) / kDistillChunk; }

// pairs, first_chunk: device arrays of `num_pairs` entries (first_chunk[i] = chunks of pairs before i);
// partial: device scratch of `chunks` floats; loss: one device float (written, not accumulated).
cudaError_t distill_loss_forward(const DistillPair* pairs, const int64_t* first_chunk, int num_pairs, int64_t chunks,
                                 float* partial, float* loss, cudaStream_t stream);

// grad_i = upstream[0] * scale_i * (s_i - t_i) into each pair's `grad`; upstream: one device float.
cudaError_t distill_loss_backward(const DistillPair* pairs, const int64_t* first_chunk, int num_pairs, int64_t chunks,
                                  const float* upstream, cudaStream_t stream);

}  // namespace cuda
}  // namespace safeprune
