// Fused multi-tensor distillation loss CUDA kernels: plain C++ launchers over raw pointers (no torch headers).
//
// loss = sum_i scale_i * sum_e (s_i[e] - t_i[e])^2 with scale_i = w_i / numel_i, over pairs of any sizes: the
// pairs' elements form one work list of kDistillChunk-element chunks; a CUDA block per chunk finds its pair by
// binary search over the first-chunk prefix. The pair table travels BY VALUE as a kernel argument (DistillLaunch,
// up to kDistillMaxPairsPerLaunch pairs; more pairs take more launches): no device table, so no host->device copy
// and no stream synchronisation per call. Elements are walked in memory order (each pair's two tensors share their
// dense strides). Math in float32; per pair, student and teacher element types may differ (e.g. float32 student,
// bfloat16 teacher).
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

// pairs per launch: the DistillLaunch argument stays under the 4 KiB kernel-parameter limit of every CUDA version
constexpr int kDistillMaxPairsPerLaunch = 32;

// one launch's pairs, passed by value (kernel-parameter space)
struct DistillLaunch {
  DistillPair pairs[kDistillMaxPairsPerLaunch];
  int64_t first_chunk[kDistillMaxPairsPerLaunch];  // chunks of this launch's pairs before pair i
  int num_pairs;
};
static_assert(sizeof(DistillLaunch) <= 4000, "DistillLaunch must fit the 4 KiB kernel-parameter space");

// sum of distill_chunks over the pairs
int64_t distill_total_chunks(const DistillPair* pairs, int num_pairs);

// pairs: HOST array of `num_pairs` entries (copied into the kernel arguments); partial: device scratch of
// max(1, distill_total_chunks) floats; loss: one device float (written, not accumulated).
cudaError_t distill_loss_forward(const DistillPair* pairs, int num_pairs, float* partial, float* loss,
                                 cudaStream_t stream);

// grad_i = upstream[0] * scale_i * (s_i - t_i) into each pair's `grad`; pairs: HOST array; upstream: one device float.
cudaError_t distill_loss_backward(const DistillPair* pairs, int num_pairs, const float* upstream, cudaStream_t stream);

}  // namespace cuda
}  // namespace safeprune
