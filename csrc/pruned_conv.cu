// Pruned convolution CUDA kernels (see pruned_conv.cuh for the op and the launcher contract).
//
// One implicit-GEMM kernel template serves the three products, each a GEMM whose operand tiles are loaded on
// the fly (nothing is materialised: no im2col buffer):
//   forward      out[pixel, o]   = sum_{tap, c} act[pixel + tap, c] * W[o, c, tap]
//   grad_input   dact[pixel, c]  = sum_{tap, o} g[(pixel + pad - tap) / stride, o] * W[o, c, tap]
//   grad_weight  dW[o, c] (tap)  = sum_{pixels} g[pixel, o] * act[pixel*stride + tap - pad, c]
// act is the (optionally GroupNorm-apply + SiLU'd) input, zero in the padding. Tiles are BM x BN with a BK-deep
// reduction step staged in shared memory; the math is WMMA tensor-core fragments (fp16/bf16, TF32 for fp32 when
// allowed; sm_80+) or exact fp32 FMAs. Epilogues: forward adds bias/time-embedding/residual and scales;
// grad_input applies the prologue's backward and reduces the scale/shift gradients per (sample, channel) in
// shared memory before one atomic per column; grad_weight writes the fp32 gradient (atomically when the pixel
// reduction is split across blocks).
#include "pruned_conv.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <type_traits>

namespace safeprune {
namespace pruned_conv_cuda {
namespace {

enum class Mode { kForward, kGradInput, kGradWeight };

constexpr int BM = 64, BN = 64, BK = 32, THREADS = 128;  // 4 warps, 2 x 2 warps of 32 x 32
constexpr int LDA = BK + 8, LDB = BN + 8, LDC = BN + 4;  // padded leading dims (WMMA needs multiples of 8 / 4)
constexpr int SMEM_BYTES = (BM * LDA + BK * LDB) * 4 > BM * LDC * 4 ? (BM * LDA + BK * LDB) * 4 : BM * LDC * 4;

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float silu(float z) { return z / (1.f + __expf(-z)); }

// Fill a rows x cols shared tile from f(r, c); row_fastest puts consecutive threads on consecutive rows (the
// operand's contiguous dimension in global memory, for coalescing).
template <typename S, int ROWS, int COLS, bool ROW_FASTEST, typename F>
__device__ __forceinline__ void fill(S* tile, int ld, F&& f) {
  for (int idx = threadIdx.x; idx < ROWS * COLS; idx += THREADS) {
    const int r = ROW_FASTEST ? idx % ROWS : idx / COLS;
    const int c = ROW_FASTEST ? idx / ROWS : idx % COLS;
    tile[r * ld + c] = from_f<S>(f(r, c));
  }
}

// act[n, c, hi, wi] of the conv input: x's channel c with the prologue applied; 0 outside the image
template <typename T>
__device__ __forceinline__ float load_act(const Params& p, int n, int c, int hi, int wi) {
  if (hi < 0 || hi >= p.H || wi < 0 || wi >= p.W) return 0.f;
  float v = to_f(static_cast<const T*>(p.x)[n * p.sx[0] + c * p.sx[1] + hi * p.sx[2] + wi * p.sx[3]]);
  if (p.scale != nullptr) v = silu(v * p.scale[n * p.C_in + c] + p.shift[n * p.C_in + c]);
  return v;
}

template <typename T>
__device__ __forceinline__ float load_weight(const Params& p, int o, int c, int tap) {
  return to_f(static_cast<const T*>(p.weight)[(static_cast<int64_t>(o) * p.C_in + c) * (p.k * p.k) + tap]);
}

template <typename T>
__device__ __forceinline__ float load_grad(const Params& p, int n, int o, int ho, int wo) {
  return to_f(static_cast<const T*>(p.grad_out)[n * p.sg[0] + o * p.sg[1] + ho * p.sg[2] + wo * p.sg[3]]);
}

// ---- the tile math: exact fp32 FMAs (any arch) ----
template <typename S>
struct SimtTile {
  float acc[4][8];  // thread (tid / 8, tid % 8) of a 16 x 8 grid owns rows 4*r.., columns 8*c..
  __device__ void init() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
  }
  __device__ void step(const S* As, const S* Bs) {
    const int tr = threadIdx.x / 8, tc = threadIdx.x % 8;
#pragma unroll 4
    for (int kk = 0; kk < BK; ++kk) {
      float a[4], b[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = to_f(As[(tr * 4 + i) * LDA + kk]);
#pragma unroll
      for (int j = 0; j < 8; ++j) b[j] = to_f(Bs[kk * LDB + tc * 8 + j]);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }
  __device__ void store(float* Cs) const {
    const int tr = threadIdx.x / 8, tc = threadIdx.x % 8;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) Cs[(tr * 4 + i) * LDC + tc * 8 + j] = acc[i][j];
  }
};

// ---- the tile math: WMMA tensor cores (sm_80+: bf16 and TF32 fragments) ----
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
template <typename S> struct MmaTraits;
template <> struct MmaTraits<__half> { using frag = __half; static constexpr int K = 16; };
template <> struct MmaTraits<__nv_bfloat16> { using frag = __nv_bfloat16; static constexpr int K = 16; };
template <> struct MmaTraits<float> { using frag = nvcuda::wmma::precision::tf32; static constexpr int K = 8; };

template <typename S>
struct MmaTile {
  using Frag = typename MmaTraits<S>::frag;
  static constexpr int KF = MmaTraits<S>::K;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, KF, float> acc[2][2];  // warp's 32 x 32
  __device__ void init() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.f);
  }
  __device__ void step(const S* As, const S* Bs) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
#pragma unroll
    for (int kk = 0; kk < BK; kk += KF) {
      wmma::fragment<wmma::matrix_a, 16, 16, KF, Frag, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, KF, Frag, wmma::row_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(a[i], As + (wm * 32 + i * 16) * LDA + kk, LDA);
        wmma::load_matrix_sync(b[i], Bs + kk * LDB + wn * 32 + i * 16, LDB);
        if constexpr (std::is_same_v<S, float>) {
          for (int t = 0; t < a[i].num_elements; ++t) a[i].x[t] = wmma::__float_to_tf32(a[i].x[t]);
          for (int t = 0; t < b[i].num_elements; ++t) b[i].x[t] = wmma::__float_to_tf32(b[i].x[t]);
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }
  __device__ void store(float* Cs) const {
    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(Cs + (wm * 32 + i * 16) * LDC + wn * 32 + j * 16, acc[i][j], LDC,
                                        nvcuda::wmma::mem_row_major);
  }
};
#endif

template <Mode MODE, typename T, typename Tile>
__device__ __forceinline__ void conv_gemm_body(const Params& p, int64_t pix_per_split) {
  using S = T;  // staging type: the input type (fp32 tiles feed TF32 fragments or FMAs)
  __shared__ __align__(128) unsigned char smem[SMEM_BYTES];
  __shared__ float colsum_xd[BN], colsum_d[BN];  // grad_input's per-column prologue sums
  S* As = reinterpret_cast<S*>(smem);            // [BM][LDA]
  S* Bs = As + BM * LDA;                         // [BK][LDB]
  float* Cs = reinterpret_cast<float*>(smem);    // [BM][LDC], reuses the staging space after the main loop
  const int tid = threadIdx.x;
  const int taps = p.k * p.k;
  const int m0 = blockIdx.x * BM, j0 = blockIdx.y * BN;
  if (tid < BN) colsum_xd[tid] = colsum_d[tid] = 0.f;

  Tile tile;
  tile.init();
  if constexpr (MODE == Mode::kForward) {
    // rows: output pixels of sample n; columns: output channels; reduction: (tap, input channel)
    const int n = blockIdx.z, hw = p.Ho * p.Wo;
    for (int t = 0; t < taps; ++t) {
      const int kh = t / p.k, kw = t % p.k;
      for (int c0 = 0; c0 < p.C_in; c0 += BK) {
        fill<S, BM, BK, true>(As, LDA, [&](int m, int kk) {
          const int pix = m0 + m, c = c0 + kk;
          if (pix >= hw || c >= p.C_in) return 0.f;
          const int ho = pix / p.Wo, wo = pix % p.Wo;
          return load_act<T>(p, n, c, ho * p.stride + kh - p.padding, wo * p.stride + kw - p.padding);
        });
        fill<S, BK, BN, true>(Bs, LDB, [&](int kk, int j) {
          const int c = c0 + kk, o = j0 + j;
          return (c < p.C_in && o < p.C_out) ? load_weight<T>(p, o, c, t) : 0.f;
        });
        __syncthreads();
        tile.step(As, Bs);
        __syncthreads();
      }
    }
  } else if constexpr (MODE == Mode::kGradInput) {
    // rows: input pixels of sample n; columns: input channels; reduction: (tap, output channel)
    const int n = blockIdx.z, hw = p.H * p.W;
    for (int t = 0; t < taps; ++t) {
      const int kh = t / p.k, kw = t % p.k;
      for (int o0 = 0; o0 < p.C_out; o0 += BK) {
        fill<S, BM, BK, true>(As, LDA, [&](int m, int kk) {
          const int pix = m0 + m, o = o0 + kk;
          if (pix >= hw || o >= p.C_out) return 0.f;
          const int eh = pix / p.W + p.padding - kh, ew = pix % p.W + p.padding - kw;
          if (eh < 0 || ew < 0 || eh % p.stride || ew % p.stride) return 0.f;
          const int ho = eh / p.stride, wo = ew / p.stride;
          return (ho < p.Ho && wo < p.Wo) ? load_grad<T>(p, n, o, ho, wo) : 0.f;
        });
        fill<S, BK, BN, true>(Bs, LDB, [&](int kk, int j) {
          const int o = o0 + kk, c = j0 + j;
          return (o < p.C_out && c < p.C_in) ? load_weight<T>(p, o, c, t) : 0.f;
        });
        __syncthreads();
        tile.step(As, Bs);
        __syncthreads();
      }
    }
  } else {
    // rows: output channels; columns: input channels; reduction: this split's pixels (all samples)
    const int splits_taps = blockIdx.z, t = splits_taps % taps, split = splits_taps / taps;
    const int kh = t / p.k, kw = t % p.k;
    const int64_t hw = static_cast<int64_t>(p.Ho) * p.Wo, total = p.N * hw;
    const int64_t start = split * pix_per_split;
    const int64_t stop = start + pix_per_split < total ? start + pix_per_split : total;
    for (int64_t q0 = start; q0 < stop; q0 += BK) {
      fill<S, BM, BK, false>(As, LDA, [&](int m, int kk) {
        const int o = m0 + m;
        const int64_t q = q0 + kk;
        if (o >= p.C_out || q >= stop) return 0.f;
        const int n = static_cast<int>(q / hw), r = static_cast<int>(q % hw);
        return load_grad<T>(p, n, o, r / p.Wo, r % p.Wo);
      });
      fill<S, BK, BN, true>(Bs, LDB, [&](int kk, int j) {
        const int c = j0 + j;
        const int64_t q = q0 + kk;
        if (c >= p.C_in || q >= stop) return 0.f;
        const int n = static_cast<int>(q / hw), r = static_cast<int>(q % hw);
        const int ho = r / p.Wo, wo = r % p.Wo;
        return load_act<T>(p, n, c, ho * p.stride + kh - p.padding, wo * p.stride + kw - p.padding);
      });
      __syncthreads();
      tile.step(As, Bs);
      __syncthreads();
    }
  }
  __syncthreads();  // every warp is done with the staging tiles that Cs overwrites
  tile.store(Cs);
  __syncthreads();

  if constexpr (MODE == Mode::kForward) {
    const int n = blockIdx.z;
    const int64_t hw = static_cast<int64_t>(p.Ho) * p.Wo;
    for (int idx = tid; idx < BM * BN; idx += THREADS) {
      const int m = idx % BM, j = idx / BM, o = j0 + j;
      const int64_t pix = m0 + m;
      if (pix >= hw || o >= p.C_out) continue;
      float v = Cs[m * LDC + j];
      if (p.bias != nullptr) v += to_f(static_cast<const T*>(p.bias)[o]);
      if (p.temb != nullptr) v += to_f(static_cast<const T*>(p.temb)[static_cast<int64_t>(n) * p.C_out + o]);
      const int64_t off = (static_cast<int64_t>(n) * p.C_out + o) * hw + pix;
      if (p.residual != nullptr) v += to_f(static_cast<const T*>(p.residual)[off]);
      static_cast<T*>(p.out)[off] = from_f<T>(v * p.out_scale);
    }
  } else if constexpr (MODE == Mode::kGradInput) {
    const int n = blockIdx.z, hw = p.H * p.W;
    const bool prologue = p.scale != nullptr;
    for (int idx = tid; idx < BM * BN; idx += THREADS) {
      const int m = idx % BM, j = idx / BM, pix = m0 + m, c = j0 + j;
      if (pix >= hw || c >= p.C_in) continue;
      const int h = pix / p.W, w = pix % p.W;
      const int64_t off = n * p.sx[0] + c * p.sx[1] + h * p.sx[2] + w * p.sx[3];
      float v = Cs[m * LDC + j] * p.out_scale;
      if (prologue) {  // a = silu(z), z = x * scale + shift
        const float xv = to_f(static_cast<const T*>(p.x)[off]);
        const float sc = p.scale[n * p.C_in + c];
        const float z = xv * sc + p.shift[n * p.C_in + c];
        const float sig = 1.f / (1.f + __expf(-z));
        const float dz = v * sig * (1.f + z * (1.f - sig));
        atomicAdd(&colsum_xd[j], dz * xv);
        atomicAdd(&colsum_d[j], dz);
        v = dz * sc;
      }
      static_cast<T*>(p.grad_x)[off] = from_f<T>(v);
    }
    if (prologue) {
      __syncthreads();
      if (tid < BN && j0 + tid < p.C_in) {
        atomicAdd(&p.grad_scale[n * p.C_in + j0 + tid], colsum_xd[tid]);
        atomicAdd(&p.grad_shift[n * p.C_in + j0 + tid], colsum_d[tid]);
      }
    }
  } else {
    const int t = blockIdx.z % taps;
    const bool split = gridDim.z > static_cast<unsigned>(taps);
    for (int idx = tid; idx < BM * BN; idx += THREADS) {
      const int j = idx % BN, m = idx / BN, o = m0 + m, c = j0 + j;
      if (o >= p.C_out || c >= p.C_in) continue;
      float* dst = p.grad_weight + (static_cast<int64_t>(o) * p.C_in + c) * taps + t;
      const float v = Cs[m * LDC + j] * p.out_scale;
      if (split) atomicAdd(dst, v);
      else *dst = v;
    }
  }
}

template <Mode MODE, typename T, bool MMA>
__global__ void __launch_bounds__(THREADS) conv_gemm(Params p, int64_t pix_per_split) {
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 800
  using Tile = std::conditional_t<MMA, MmaTile<T>, SimtTile<T>>;
#else
  if (MMA) __trap();  // the launcher picks tensor-core tiles only on sm_80+
  using Tile = SimtTile<T>;
#endif
  conv_gemm_body<MODE, T, Tile>(p, pix_per_split);
#endif
}

int compute_major() {
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return 0;
  return major;
}

template <Mode MODE, typename T>
cudaError_t launch_typed(const Params& p, bool mma, dim3 grid, int64_t pix_per_split, cudaStream_t stream) {
  if (mma) conv_gemm<MODE, T, true><<<grid, THREADS, 0, stream>>>(p, pix_per_split);
  else conv_gemm<MODE, T, false><<<grid, THREADS, 0, stream>>>(p, pix_per_split);
  return cudaGetLastError();
}

template <Mode MODE>
cudaError_t launch(const Params& p, DType dtype, bool allow_tf32, dim3 grid, int64_t pix_per_split,
                   cudaStream_t stream) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  const bool tensor_cores = compute_major() >= 8;
  switch (dtype) {
    case DType::kFloat32:
      return launch_typed<MODE, float>(p, tensor_cores && allow_tf32, grid, pix_per_split, stream);
    case DType::kFloat16:
      return launch_typed<MODE, __half>(p, tensor_cores, grid, pix_per_split, stream);
    case DType::kBFloat16:
      return launch_typed<MODE, __nv_bfloat16>(p, tensor_cores, grid, pix_per_split, stream);
  }
  return cudaErrorInvalidValue;
}

unsigned blocks(int64_t n, int b) { return static_cast<unsigned>((n + b - 1) / b); }

}  // namespace

cudaError_t forward(const Params& p, DType dtype, bool allow_tf32, cudaStream_t stream) {
  const dim3 grid(blocks(static_cast<int64_t>(p.Ho) * p.Wo, BM), blocks(p.C_out, BN), p.N);
  return launch<Mode::kForward>(p, dtype, allow_tf32, grid, 0, stream);
}

cudaError_t grad_input(const Params& p, DType dtype, bool allow_tf32, cudaStream_t stream) {
  const dim3 grid(blocks(static_cast<int64_t>(p.H) * p.W, BM), blocks(p.C_in, BN), p.N);
  return launch<Mode::kGradInput>(p, dtype, allow_tf32, grid, 0, stream);
}

cudaError_t grad_weight(const Params& p, DType dtype, bool allow_tf32, int sm_count, cudaStream_t stream) {
  const int64_t taps = static_cast<int64_t>(p.k) * p.k;
  const int64_t tiles = static_cast<int64_t>(blocks(p.C_out, BM)) * blocks(p.C_in, BN) * taps;
  const int64_t total = static_cast<int64_t>(p.N) * p.Ho * p.Wo;
  // split the pixel reduction until about four blocks per SM exist, keeping >= 1024 pixels per split
  int64_t splits = (4 * static_cast<int64_t>(sm_count > 0 ? sm_count : 1) + tiles - 1) / tiles;
  const int64_t max_splits = total / 1024 > 1 ? total / 1024 : 1;
  splits = splits < 1 ? 1 : (splits > max_splits ? max_splits : splits);
  int64_t per_split = (total + splits - 1) / splits;
  per_split = (per_split + BK - 1) / BK * BK;
  splits = (total + per_split - 1) / per_split;
  if (splits * taps > 65535) {  // gridDim.z limit
    splits = 65535 / taps;
    per_split = ((total + splits - 1) / splits + BK - 1) / BK * BK;
    splits = (total + per_split - 1) / per_split;
  }
  const dim3 grid(blocks(p.C_out, BM), blocks(p.C_in, BN), static_cast<unsigned>(taps * splits));
  return launch<Mode::kGradWeight>(p, dtype, allow_tf32, grid, per_split, stream);
}

}  // namespace pruned_conv_cuda
}  // namespace safeprune
