// Fused multi-tensor distillation loss CUDA kernels (launchers declared in distill_loss.cuh).
#include <algorithm>
#include <type_traits>

#include "cuda_common.cuh"
#include "distill_loss.cuh"

namespace safeprune {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// the pair whose chunk range holds `chunk` (binary search over the first-chunk prefix)
__device__ __forceinline__ int find_pair(const int64_t* first_chunk, int num_pairs, int64_t chunk) {
  int lo = 0, hi = num_pairs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (first_chunk[mid] <= chunk)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

template <typename S, typename T>
__device__ float chunk_squared_error(const DistillPair& p, int64_t start, int64_t end) {
  const S* s = static_cast<const S*>(p.student);
  const T* t = static_cast<const T*>(p.teacher);
  float acc = 0.f;
  for (int64_t e = start + threadIdx.x; e < end; e += blockDim.x) {
    const float d = load_float(s + e) - load_float(t + e);
    acc += d * d;
  }
  return acc;
}

template <typename S, typename T>
__device__ void chunk_gradient(const DistillPair& p, int64_t start, int64_t end, float k) {
  const S* s = static_cast<const S*>(p.student);
  const T* t = static_cast<const T*>(p.teacher);
  S* g = static_cast<S*>(p.grad);
  for (int64_t e = start + threadIdx.x; e < end; e += blockDim.x)
    store_float(g + e, k * (load_float(s + e) - load_float(t + e)));
}

// calls fn(S{}, T{}) with null pointers of the pair's element types (one branch per block, not per element)
template <typename Fn>
__device__ __forceinline__ void with_types(const DistillPair& p, Fn&& fn) {
  auto with_teacher = [&](auto student_tag) {
    switch (p.teacher_type) {
      case DistillElement::float16: fn(student_tag, static_cast<const __half*>(nullptr)); break;
      case DistillElement::bfloat16: fn(student_tag, static_cast<const __nv_bfloat16*>(nullptr)); break;
      default: fn(student_tag, static_cast<const float*>(nullptr)); break;
    }
  };
  switch (p.student_type) {
    case DistillElement::float16: with_teacher(static_cast<const __half*>(nullptr)); break;
    case DistillElement::bfloat16: with_teacher(static_cast<const __nv_bfloat16*>(nullptr)); break;
    default: with_teacher(static_cast<const float*>(nullptr)); break;
  }
}

// partial: this launch's slice of the per-chunk partials
__global__ void __launch_bounds__(kThreads) forward_kernel(const DistillLaunch launch, float* __restrict__ partial) {
  __shared__ float scratch[32];
  const int64_t chunk = blockIdx.x;
  const int i = find_pair(launch.first_chunk, launch.num_pairs, chunk);
  const DistillPair p = launch.pairs[i];
  const int64_t start = (chunk - launch.first_chunk[i]) * kDistillChunk;
  const int64_t end = min(start + kDistillChunk, p.numel);
  float acc = 0.f;
  with_types(p, [&](auto s_tag, auto t_tag) {
    using S = typename std::remove_const<typename std::remove_pointer<decltype(s_tag)>::type>::type;
    using T = typename std::remove_const<typename std::remove_pointer<decltype(t_tag)>::type>::type;
    acc = chunk_squared_error<S, T>(p, start, end);
  });
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) partial[chunk] = acc * p.scale;
}

// one block adds the partials in a fixed order (deterministic loss)
__global__ void __launch_bounds__(kThreads) sum_kernel(const float* __restrict__ partial, int64_t n,
                                                       float* __restrict__ loss) {
  __shared__ float scratch[32];
  float acc = 0.f;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) acc += partial[j];
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) *loss = acc;
}

__global__ void __launch_bounds__(kThreads) backward_kernel(const DistillLaunch launch,
                                                            const float* __restrict__ upstream) {
  const int64_t chunk = blockIdx.x;
  const int i = find_pair(launch.first_chunk, launch.num_pairs, chunk);
  const DistillPair p = launch.pairs[i];
  const int64_t start = (chunk - launch.first_chunk[i]) * kDistillChunk;
  const int64_t end = min(start + kDistillChunk, p.numel);
  const float k = *upstream * p.scale;
  with_types(p, [&](auto s_tag, auto t_tag) {
    using S = typename std::remove_const<typename std::remove_pointer<decltype(s_tag)>::type>::type;
    using T = typename std::remove_const<typename std::remove_pointer<decltype(t_tag)>::type>::type;
    chunk_gradient<S, T>(p, start, end, k);
  });
}

// calls launch_fn(launch, chunks, first_chunk_overall) for each group of up to kDistillMaxPairsPerLaunch pairs
// with at least one chunk; built on the host, so launching reads no device memory
template <typename Fn>
cudaError_t for_each_launch(const DistillPair* pairs, int num_pairs, Fn&& launch_fn) {
  int64_t done = 0;
  for (int begin = 0; begin < num_pairs; begin += kDistillMaxPairsPerLaunch) {
    DistillLaunch launch{};
    launch.num_pairs = std::min(kDistillMaxPairsPerLaunch, num_pairs - begin);
    int64_t chunks = 0;
    for (int i = 0; i < launch.num_pairs; ++i) {
      launch.pairs[i] = pairs[begin + i];
      launch.first_chunk[i] = chunks;
      chunks += distill_chunks(launch.pairs[i].numel);
    }
    if (chunks > 0) launch_fn(launch, chunks, done);
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return status;
    done += chunks;
  }
  return cudaSuccess;
}

}  // namespace

int64_t distill_total_chunks(const DistillPair* pairs, int num_pairs) {
  int64_t chunks = 0;
  for (int i = 0; i < num_pairs; ++i) chunks += distill_chunks(pairs[i].numel);
  return chunks;
}

cudaError_t distill_loss_forward(const DistillPair* pairs, int num_pairs, float* partial, float* loss,
                                 cudaStream_t stream) {
  const cudaError_t status = for_each_launch(pairs, num_pairs, [&](const DistillLaunch& launch, int64_t chunks,
                                                                   int64_t done) {
    forward_kernel<<<chunks, kThreads, 0, stream>>>(launch, partial + done);
  });
  if (status != cudaSuccess) return status;
  sum_kernel<<<1, kThreads, 0, stream>>>(partial, distill_total_chunks(pairs, num_pairs), loss);
  return cudaGetLastError();
}

cudaError_t distill_loss_backward(const DistillPair* pairs, int num_pairs, const float* upstream, cudaStream_t stream) {
  return for_each_launch(pairs, num_pairs, [&](const DistillLaunch& launch, int64_t chunks, int64_t) {
    backward_kernel<<<chunks, kThreads, 0, stream>>>(launch, upstream);
  });
}

}  // namespace cuda
}  // namespace safeprune
