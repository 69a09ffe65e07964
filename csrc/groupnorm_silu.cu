// GroupNorm (affine) + SiLU CUDA kernels (launchers declared in groupnorm_silu.cuh).
//
// The reduction is split so batch 1 still fills the GPU: a group's pixels are cut into blocks of BLOCK_HW
// (a power of two chosen so a launch has ~1024+ CUDA blocks), giving N * G * NBLK blocks per pass.
// Forward: (1) per (n, g, pixel block) mean and M2 around a pivot; (2) each CUDA block merges its group's
// partials (Chan) and writes y = silu(x a_c + b_c). Backward: (1) per (n, pixel block, channel) sums of dz and
// dz xhat; (2) each block reduces its group's sums to c1, c2 and writes dx = rstd (gamma dz - c1 - xhat c2);
// (3) dgamma, dbeta = per-channel sums of the partials. All reductions have a fixed order (deterministic).
#include "cuda_common.cuh"
#include "groupnorm_silu.cuh"

namespace safeprune {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kTileMax = 4096, kTileMin = 1024, kBlocksWanted = 1024;

struct Tiling {
  int64_t block_hw, nblk;
};

Tiling tiling(const GroupNormShape& s) {
  const int64_t cg = s.C / s.G, groups = s.N * s.G;
  int64_t tile = kTileMax;
  while (tile > kTileMin && groups * ceil_div(s.HW * cg, tile) < kBlocksWanted) tile /= 2;
  int64_t block_hw = 1;
  while (block_hw * 2 * cg <= tile && block_hw < s.HW) block_hw *= 2;
  return {block_hw, ceil_div(s.HW, block_hw)};
}

// Offset of element (channel c of the group, pixel r of the block) from the tile's first element.
template <bool kChannelsLast>
__device__ __forceinline__ int64_t tile_offset(int64_t c, int64_t r, int64_t C, int64_t HW) {
  return kChannelsLast ? r * C + c : c * HW + r;
}

template <bool kChannelsLast>
__device__ __forceinline__ int64_t tile_base(int64_t n, int64_t g, int64_t blk, int64_t C, int64_t HW, int64_t cg,
                                            int64_t block_hw) {
  return kChannelsLast ? (n * HW + blk * block_hw) * C + g * cg : (n * C + g * cg) * HW + blk * block_hw;
}

// element i of a tile of `rows` pixels x cg channels -> (c, r), walking the contiguous dimension fastest
// (32-bit: a tile holds at most max(4096, cg) elements, and 64-bit division is slow on GPUs)
template <bool kChannelsLast>
__device__ __forceinline__ void tile_coords(int i, int rows, int cg, int& c, int& r) {
  if (kChannelsLast) {
    r = i / cg;
    c = i - r * cg;
  } else {
    c = i / rows;
    r = i - c * rows;
  }
}

template <typename T, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads) partial_moments_kernel(const T* __restrict__ x, float* __restrict__ part,
                                                                   int64_t C, int64_t HW, int64_t G, int64_t block_hw,
                                                                   int64_t nblk) {
  __shared__ float scratch[32];
  const int64_t ng = blockIdx.x / nblk, blk = blockIdx.x % nblk, n = ng / G, g = ng % G, cg = C / G;
  const int rows = static_cast<int>(min(block_hw, HW - blk * block_hw)), count = rows * static_cast<int>(cg);
  const T* base = x + tile_base<kChannelsLast>(n, g, blk, C, HW, cg, block_hw);
  const float pivot = load_float(base);  // sums around a sample of the data: no catastrophic cancellation
  float s = 0.f, q = 0.f;
  for (int i = threadIdx.x; i < count; i += blockDim.x) {
    int c, r;
    tile_coords<kChannelsLast>(i, rows, static_cast<int>(cg), c, r);
    const float d = load_float(base + tile_offset<kChannelsLast>(c, r, C, HW)) - pivot;
    s += d;
    q += d * d;
  }
  s = block_sum(s, scratch);
  q = block_sum(q, scratch);
  if (threadIdx.x == 0) {
    part[blockIdx.x * 2] = pivot + s / count;
    part[blockIdx.x * 2 + 1] = fmaxf(q - s * s / count, 0.f);
  }
}

template <typename T, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads) apply_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                         const float* __restrict__ gamma, const float* __restrict__ beta,
                                                         const float* __restrict__ part, float* __restrict__ mean_out,
                                                         float* __restrict__ rstd_out, int64_t C, int64_t HW, int64_t G,
                                                         int64_t block_hw, int64_t nblk, float eps) {
  __shared__ float scratch[32];
  const int64_t ng = blockIdx.x / nblk, blk = blockIdx.x % nblk, n = ng / G, g = ng % G, cg = C / G;
  const float total = static_cast<float>(HW * cg);
  // Chan merge of the group's block moments
  float weighted = 0.f;
  for (int64_t p = threadIdx.x; p < nblk; p += blockDim.x)
    weighted += static_cast<float>(min(block_hw, HW - p * block_hw) * cg) * part[(ng * nblk + p) * 2];
  const float mean = block_sum(weighted, scratch) / total;
  float m2 = 0.f;
  for (int64_t p = threadIdx.x; p < nblk; p += blockDim.x) {
    const float d = part[(ng * nblk + p) * 2] - mean;
    m2 += part[(ng * nblk + p) * 2 + 1] + static_cast<float>(min(block_hw, HW - p * block_hw) * cg) * d * d;
  }
  const float rstd = rsqrtf(block_sum(m2, scratch) / total + eps);
  if (blk == 0 && threadIdx.x == 0) {
    mean_out[ng] = mean;
    rstd_out[ng] = rstd;
  }
  const int rows = static_cast<int>(min(block_hw, HW - blk * block_hw)), count = rows * static_cast<int>(cg);
  const int64_t offset0 = tile_base<kChannelsLast>(n, g, blk, C, HW, cg, block_hw);
  for (int i = threadIdx.x; i < count; i += blockDim.x) {
    int c, r;
    tile_coords<kChannelsLast>(i, rows, static_cast<int>(cg), c, r);
    const int64_t off = offset0 + tile_offset<kChannelsLast>(c, r, C, HW);
    const float a = rstd * gamma[g * cg + c];
    const float z = load_float(x + off) * a + (beta[g * cg + c] - mean * a);
    store_float(y + off, z / (1.f + __expf(-z)));
  }
}

// dz = dy * silu'(z), z = xhat * gamma + beta
__device__ __forceinline__ float silu_grad_times(float dy, float z) {
  const float s = 1.f / (1.f + __expf(-z));
  return dy * s * (1.f + z * (1.f - s));
}

// Per (n, pixel block, channel) sums of dz and dz * xhat -> pdz, pdzx (N, nblk, C).
template <typename T, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads) grad_partials_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ gamma, const float* __restrict__ beta,
    const float* __restrict__ mean, const float* __restrict__ rstd, float* __restrict__ pdz, float* __restrict__ pdzx,
    int64_t C, int64_t HW, int64_t G, int64_t block_hw, int64_t nblk) {
  __shared__ float sh_dz[kThreads], sh_dzx[kThreads];
  const int64_t ng = blockIdx.x / nblk, blk = blockIdx.x % nblk, n = ng / G, g = ng % G, cg = C / G;
  const int64_t rows = min(block_hw, HW - blk * block_hw);
  const int64_t offset0 = tile_base<kChannelsLast>(n, g, blk, C, HW, cg, block_hw);
  const float mu = mean[ng], rs = rstd[ng];
  float* out_dz = pdz + (n * nblk + blk) * C + g * cg;
  float* out_dzx = pdzx + (n * nblk + blk) * C + g * cg;
  if constexpr (!kChannelsLast) {
    // a warp per channel row (contiguous pixels), lanes stride over the pixels
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int64_t c = warp; c < cg; c += warps) {
      const float gm = gamma[g * cg + c], bt = beta[g * cg + c];
      float s1 = 0.f, s2 = 0.f;
      for (int64_t r = lane; r < rows; r += 32) {
        const int64_t off = offset0 + c * HW + r;
        const float xhat = (load_float(x + off) - mu) * rs;
        const float dz = silu_grad_times(load_float(dy + off), xhat * gm + bt);
        s1 += dz;
        s2 += dz * xhat;
      }
      s1 = warp_sum(s1);
      s2 = warp_sum(s2);
      if (lane == 0) {
        out_dz[c] = s1;
        out_dzx[c] = s2;
      }
    }
  } else {
    // channels_last: threads take (channel, row set) pairs of a channel chunk, then sum the row sets in order
    for (int64_t c0 = 0; c0 < cg; c0 += blockDim.x) {
      const int64_t width = min(static_cast<int64_t>(blockDim.x), cg - c0), sets = blockDim.x / width;
      float s1 = 0.f, s2 = 0.f;
      if (threadIdx.x < sets * width) {
        const int64_t c = c0 + threadIdx.x % width, set = threadIdx.x / width;
        const float gm = gamma[g * cg + c], bt = beta[g * cg + c];
        for (int64_t r = set; r < rows; r += sets) {
          const int64_t off = offset0 + r * C + c;
          const float xhat = (load_float(x + off) - mu) * rs;
          const float dz = silu_grad_times(load_float(dy + off), xhat * gm + bt);
          s1 += dz;
          s2 += dz * xhat;
        }
      }
      sh_dz[threadIdx.x] = s1;
      sh_dzx[threadIdx.x] = s2;
      __syncthreads();
      if (threadIdx.x < width) {
        float t1 = 0.f, t2 = 0.f;
        for (int64_t set = 0; set < sets; ++set) {
          t1 += sh_dz[set * width + threadIdx.x];
          t2 += sh_dzx[set * width + threadIdx.x];
        }
        out_dz[c0 + threadIdx.x] = t1;
        out_dzx[c0 + threadIdx.x] = t2;
      }
      __syncthreads();
    }
  }
}

template <typename T, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads) grad_apply_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ gamma, const float* __restrict__ beta,
    const float* __restrict__ mean, const float* __restrict__ rstd, const float* __restrict__ pdz,
    const float* __restrict__ pdzx, T* __restrict__ dx, int64_t C, int64_t HW, int64_t G, int64_t block_hw,
    int64_t nblk) {
  __shared__ float scratch[32];
  const int64_t ng = blockIdx.x / nblk, blk = blockIdx.x % nblk, n = ng / G, g = ng % G, cg = C / G;
  const float total = static_cast<float>(HW * cg);
  float k1 = 0.f, k2 = 0.f;
  for (int64_t c = threadIdx.x; c < cg; c += blockDim.x) {
    float s1 = 0.f, s2 = 0.f;
    for (int64_t p = 0; p < nblk; ++p) {
      s1 += pdz[(n * nblk + p) * C + g * cg + c];
      s2 += pdzx[(n * nblk + p) * C + g * cg + c];
    }
    k1 += gamma[g * cg + c] * s1;
    k2 += gamma[g * cg + c] * s2;
  }
  k1 = block_sum(k1, scratch) / total;
  k2 = block_sum(k2, scratch) / total;
  const float mu = mean[ng], rs = rstd[ng];
  const int rows = static_cast<int>(min(block_hw, HW - blk * block_hw)), count = rows * static_cast<int>(cg);
  const int64_t offset0 = tile_base<kChannelsLast>(n, g, blk, C, HW, cg, block_hw);
  for (int i = threadIdx.x; i < count; i += blockDim.x) {
    int c, r;
    tile_coords<kChannelsLast>(i, rows, static_cast<int>(cg), c, r);
    const int64_t off = offset0 + tile_offset<kChannelsLast>(c, r, C, HW);
    const float gm = gamma[g * cg + c];
    const float xhat = (load_float(x + off) - mu) * rs;
    const float dz = silu_grad_times(load_float(dy + off), xhat * gm + beta[g * cg + c]);
    store_float(dx + off, rs * (gm * dz - k1 - xhat * k2));
  }
}

// dgamma[c] = sum over (n, block) of pdzx, dbeta[c] likewise of pdz; a thread per channel, fixed order.
__global__ void __launch_bounds__(kThreads) channel_sums_kernel(const float* __restrict__ pdz,
                                                                const float* __restrict__ pdzx, float* __restrict__ dgamma,
                                                                float* __restrict__ dbeta, int64_t C, int64_t rows) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  float s1 = 0.f, s2 = 0.f;
  for (int64_t r = 0; r < rows; ++r) {
    s1 += pdz[r * C + c];
    s2 += pdzx[r * C + c];
  }
  dbeta[c] = s1;
  dgamma[c] = s2;
}

template <typename T>
void launch_forward(const T* x, const float* gamma, const float* beta, T* y, float* mean, float* rstd, float* work,
                    const GroupNormShape& s, float eps, cudaStream_t stream) {
  const Tiling t = tiling(s);
  const int64_t blocks = s.N * s.G * t.nblk;
  if (s.channels_last) {
    partial_moments_kernel<T, true><<<blocks, kThreads, 0, stream>>>(x, work, s.C, s.HW, s.G, t.block_hw, t.nblk);
    apply_kernel<T, true><<<blocks, kThreads, 0, stream>>>(x, y, gamma, beta, work, mean, rstd, s.C, s.HW, s.G,
                                                          t.block_hw, t.nblk, eps);
  } else {
    partial_moments_kernel<T, false><<<blocks, kThreads, 0, stream>>>(x, work, s.C, s.HW, s.G, t.block_hw, t.nblk);
    apply_kernel<T, false><<<blocks, kThreads, 0, stream>>>(x, y, gamma, beta, work, mean, rstd, s.C, s.HW, s.G,
                                                           t.block_hw, t.nblk, eps);
  }
}

template <typename T>
void launch_backward(const T* dy, const T* x, const float* gamma, const float* beta, const float* mean,
                     const float* rstd, T* dx, float* dgamma, float* dbeta, float* work, const GroupNormShape& s,
                     cudaStream_t stream) {
  const Tiling t = tiling(s);
  const int64_t blocks = s.N * s.G * t.nblk;
  float* pdz = work;
  float* pdzx = work + s.N * t.nblk * s.C;
  if (s.channels_last) {
    grad_partials_kernel<T, true><<<blocks, kThreads, 0, stream>>>(dy, x, gamma, beta, mean, rstd, pdz, pdzx, s.C,
                                                                  s.HW, s.G, t.block_hw, t.nblk);
    grad_apply_kernel<T, true><<<blocks, kThreads, 0, stream>>>(dy, x, gamma, beta, mean, rstd, pdz, pdzx, dx, s.C,
                                                               s.HW, s.G, t.block_hw, t.nblk);
  } else {
    grad_partials_kernel<T, false><<<blocks, kThreads, 0, stream>>>(dy, x, gamma, beta, mean, rstd, pdz, pdzx, s.C,
                                                                   s.HW, s.G, t.block_hw, t.nblk);
    grad_apply_kernel<T, false><<<blocks, kThreads, 0, stream>>>(dy, x, gamma, beta, mean, rstd, pdz, pdzx, dx, s.C,
                                                                s.HW, s.G, t.block_hw, t.nblk);
  }
  channel_sums_kernel<<<ceil_div(s.C, kThreads), kThreads, 0, stream>>>(pdz, pdzx, dgamma, dbeta, s.C,
                                                                        s.N * t.nblk);
}

}  // namespace

int64_t groupnorm_silu_forward_workspace(const GroupNormShape& shape) {
  return shape.N * shape.G * tiling(shape).nblk * 2;
}

int64_t groupnorm_silu_backward_workspace(const GroupNormShape& shape) {
  return 2 * shape.N * tiling(shape).nblk * shape.C;
}

cudaError_t groupnorm_silu_forward(ElementType dtype, const void* x, const float* gamma, const float* beta, void* y,
                                   float* mean, float* rstd, float* workspace, const GroupNormShape& shape,
                                   float eps, cudaStream_t stream) {
  if (shape.N * shape.C * shape.HW == 0) return cudaSuccess;
  switch (dtype) {
    case ElementType::float32:
      launch_forward(static_cast<const float*>(x), gamma, beta, static_cast<float*>(y), mean, rstd, workspace, shape,
                     eps, stream);
      break;
    case ElementType::float16:
      launch_forward(static_cast<const __half*>(x), gamma, beta, static_cast<__half*>(y), mean, rstd, workspace, shape,
                     eps, stream);
      break;
    case ElementType::bfloat16:
      launch_forward(static_cast<const __nv_bfloat16*>(x), gamma, beta, static_cast<__nv_bfloat16*>(y), mean, rstd,
                     workspace, shape, eps, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t groupnorm_silu_backward(ElementType dtype, const void* dy, const void* x, const float* gamma,
                                    const float* beta, const float* mean, const float* rstd, void* dx, float* dgamma,
                                    float* dbeta, float* workspace, const GroupNormShape& shape, cudaStream_t stream) {
  if (shape.N * shape.C * shape.HW == 0) return cudaSuccess;
  switch (dtype) {
    case ElementType::float32:
      launch_backward(static_cast<const float*>(dy), static_cast<const float*>(x), gamma, beta, mean, rstd,
                      static_cast<float*>(dx), dgamma, dbeta, workspace, shape, stream);
      break;
    case ElementType::float16:
      launch_backward(static_cast<const __half*>(dy), static_cast<const __half*>(x), gamma, beta, mean, rstd,
                      static_cast<__half*>(dx), dgamma, dbeta, workspace, shape, stream);
      break;
    case ElementType::bfloat16:
      launch_backward(static_cast<const __nv_bfloat16*>(dy), static_cast<const __nv_bfloat16*>(x), gamma, beta, mean,
                      rstd, static_cast<__nv_bfloat16*>(dx), dgamma, dbeta, workspace, shape, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace safeprune
