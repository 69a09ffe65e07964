// Pruned convolution on the CPU: a conv2d (k x k, stride s, padding p) of the pruned (physically sliced) weight
// [C_out, C_in, k, k], with an optional GroupNorm-apply + SiLU prologue on its input and a bias +
// time-embedding bias + residual epilogue.
// The definition is safeprune_engine/ops/pruned_conv.py (reference); this file defines the op schemas of
// safeprune_C::pruned_conv_{forward,grad_input,grad_weight} and their CPU kernels.
//
// How: every product is a blocked GEMM over channels-last (NHWC) scratch copies of the activations, with the
// k*k taps as shifted views of a zero-padded buffer (no im2col). The activation copy is where the prologue
// and the fp16/bf16 -> fp32 conversion happen, each once per element. The weight is copied only into the
// GEMM's transient packed panels (a few KB per block).
// Register tiles are MR pixels x NR channels held in GCC vector-extension registers; the micro-kernels
// (pruned_conv_cpu_kernels.h) are compiled for AVX-512, AVX2 and baseline x86-64 and picked per call (cpu_isa.h,
// SAFEPRUNE_CPU_ISA forces a lower one), so one portable build uses the wide units where they exist.
// Compute is fp32 (fp64 for double inputs, for gradcheck).
#include "checks.h"
#include "cpu_isa.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace safeprune {
namespace pruned_conv_cpu {

constexpr int64_t MR = 8;  // rows per register tile: pixels (forward, grad_input) or input channels (grad_weight)
template <typename T>
constexpr int64_t NR() { return 128 / int64_t(sizeof(T)); }  // columns per register tile: 128 bytes

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Register-tile micro-kernels, one copy per instruction set (see cpu_isa.h); picked once per op call.
#define SAFEPRUNE_VECTOR_BYTES 16
namespace generic {
#include "cpu_math.h"
#include "pruned_conv_cpu_kernels.h"
}  // namespace generic
#undef SAFEPRUNE_VECTOR_BYTES

#if SAFEPRUNE_X86_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define SAFEPRUNE_VECTOR_BYTES 32
namespace avx2 {
#include "cpu_math.h"
#include "pruned_conv_cpu_kernels.h"
}  // namespace avx2
#undef SAFEPRUNE_VECTOR_BYTES
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#define SAFEPRUNE_VECTOR_BYTES 64
namespace avx512 {
#include "cpu_math.h"
#include "pruned_conv_cpu_kernels.h"
}  // namespace avx512
#undef SAFEPRUNE_VECTOR_BYTES
#pragma GCC pop_options
#endif

template <typename T>
using PixelTileFn = void (*)(int64_t, const int64_t*, int64_t, const T*, int64_t, const T* const*, T*);
template <typename T>
using ChannelTileFn = void (*)(int64_t, int64_t, const T*, int64_t, int64_t, const T*, int64_t, int64_t, T*);
template <typename T>
using SiluRowFn = void (*)(T*, int64_t, T, T);
template <typename T>
using SiluBackwardRowFn = void (*)(const T*, const T*, int64_t, T, T, T*, T*, T*);

template <typename T>
struct TileKernels {
  PixelTileFn<T> pixel;
  ChannelTileFn<T> channel;
  SiluRowFn<T> silu_row;
  SiluBackwardRowFn<T> silu_backward_row;
};

template <typename T>
TileKernels<T> tile_kernels() {
  TileKernels<T> k{};
  SAFEPRUNE_ISA_SWITCH(safeprune::pruned_conv_cpu,
                       (k = {&isa_ns::pixel_tile<T>, &isa_ns::channel_tile<T>, &isa_ns::silu_affine_row<T>,
                             &isa_ns::silu_affine_backward_row<T>}));
  return k;
}

// ------------------------------------------------------------------------------------------- problem geometry
struct Geometry {
  int64_t N, H, W;                // input x [N, C_in, H, W]
  int64_t C_out, C_in, k;         // weight [C_out, C_in, k, k]
  int64_t s, p, Ho, Wo;
  bool prologue;
  int64_t xs_n, xs_c, xs_h, xs_w;  // element strides of x (and grad_x): NCHW, channels_last or any dense layout
  int64_t x_offset(int64_t n, int64_t c, int64_t h, int64_t w) const { return n * xs_n + c * xs_c + h * xs_h + w * xs_w; }
};

// Padded NHWC activations: a[n][hp][wp][c] = act(x[n][c][hp-p][wp-p]) inside the image, 0 in the padding
// (the conv pads its input, which is the activation, so the padding is 0 after the prologue, not silu(shift)).
// Channels are padded with zeros to Kc (a multiple of MR) so channel tiles never read past the end.
struct ActLayout {
  int64_t Hp, Wp, Kc;
  int64_t sample() const { return Hp * Wp * Kc; }
};

inline ActLayout act_layout(const Geometry& g) {
  const int64_t wo_tiles = round_up(g.Wo, MR);
  const int64_t Wp = std::max(g.W + 2 * g.p, (wo_tiles - 1) * g.s + g.k);
  return {g.H + 2 * g.p, Wp, round_up(g.C_in, MR)};
}

template <typename scalar_t, typename T>
void pack_activations(const Geometry& g, const ActLayout& L, const scalar_t* x, const T* scale, const T* shift,
                      const TileKernels<T>& kern, T* a) {
  at::parallel_for(0, g.N * L.Hp, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> line(g.W);
    for (int64_t nh = begin; nh < end; ++nh) {
      const int64_t n = nh / L.Hp, hp = nh % L.Hp, h = hp - g.p;
      T* row = a + nh * L.Wp * L.Kc;
      std::fill(row, row + L.Wp * L.Kc, T(0));
      if (h < 0 || h >= g.H) continue;
      for (int64_t c = 0; c < g.C_in; ++c) {
        const scalar_t* src = x + g.x_offset(n, c, h, 0);
        T* dst = row + g.p * L.Kc + c;
        for (int64_t w = 0; w < g.W; ++w) line[w] = static_cast<T>(src[w * g.xs_w]);
        if (g.prologue) kern.silu_row(line.data(), g.W, scale[n * g.C_in + c], shift[n * g.C_in + c]);
        for (int64_t w = 0; w < g.W; ++w) dst[w * L.Kc] = line[w];
      }
    }
  });
}

// Padded NHWC output gradient (times out_scale): gp[n][ho+P][wo+P][o] for o < C_out, zeros elsewhere; Ko is
// C_out rounded up to NR (grad_weight loads NR-wide vectors of it), P = k covers every transposed-conv offset.
struct GradLayout {
  int64_t P, Hp, Wp, Ko;
  int64_t sample() const { return Hp * Wp * Ko; }
};

template <typename T>
inline GradLayout grad_layout(const Geometry& g) {
  const int64_t P = g.k;
  // grad_input phase grids are at most ceil(H/s) x ceil(W/s), read in MR-wide tiles at offsets within [-P, P]
  const int64_t cols = std::max(round_up((g.W + g.s - 1) / g.s, MR), g.Wo);
  const int64_t rows = std::max((g.H + g.s - 1) / g.s, g.Ho);
  return {P, rows + 2 * P + 1, cols + 2 * P + 1, round_up(g.C_out, NR<T>())};
}

template <typename scalar_t, typename T>
void pack_grad(const Geometry& g, const GradLayout& L, const at::Tensor& grad_out_t, T out_scale, T* gp) {
  const scalar_t* grad_out = grad_out_t.data_ptr<scalar_t>();
  const int64_t gs_n = grad_out_t.stride(0), gs_c = grad_out_t.stride(1), gs_h = grad_out_t.stride(2),
                gs_w = grad_out_t.stride(3);
  at::parallel_for(0, g.N * L.Hp, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nh = begin; nh < end; ++nh) {
      const int64_t n = nh / L.Hp, ho = nh % L.Hp - L.P;
      T* row = gp + nh * L.Wp * L.Ko;
      std::fill(row, row + L.Wp * L.Ko, T(0));
      if (ho < 0 || ho >= g.Ho) continue;
      for (int64_t o = 0; o < g.C_out; ++o) {
        const scalar_t* src = grad_out + n * gs_n + o * gs_c + ho * gs_h;
        T* dst = row + L.P * L.Ko + o;
        for (int64_t w = 0; w < g.Wo; ++w) dst[w * L.Ko] = static_cast<T>(src[w * gs_w]) * out_scale;
      }
    }
  });
}

// Weight panels for the forward GEMM: panel[ob][t][c][j] = W[ob*NR+j][c][t] (0 past C_out).
template <typename scalar_t, typename T>
std::vector<T> pack_forward_panels(const Geometry& g, const scalar_t* w) {
  constexpr int64_t nr = NR<T>();
  const int64_t taps = g.k * g.k, blocks = (g.C_out + nr - 1) / nr;
  std::vector<T> panel(blocks * taps * g.C_in * nr, T(0));
  at::parallel_for(0, blocks * taps, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t ob = bt / taps, t = bt % taps;
      T* dst = panel.data() + bt * g.C_in * nr;
      for (int64_t j = 0; j < nr && ob * nr + j < g.C_out; ++j) {
        const scalar_t* src = w + (ob * nr + j) * g.C_in * taps + t;
        for (int64_t c = 0; c < g.C_in; ++c) dst[c * nr + j] = static_cast<T>(src[c * taps]);
      }
    }
  });
  return panel;
}

// Weight panels for grad_input (transposed product): panel[cb][t][o][j] = W[o][cb*NR+j][t].
template <typename scalar_t, typename T>
std::vector<T> pack_transposed_panels(const Geometry& g, const scalar_t* w) {
  constexpr int64_t nr = NR<T>();
  const int64_t taps = g.k * g.k, blocks = (g.C_in + nr - 1) / nr;
  std::vector<T> panel(blocks * taps * g.C_out * nr, T(0));
  at::parallel_for(0, blocks * taps, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t cb = bt / taps, t = bt % taps;
      T* dst = panel.data() + bt * g.C_out * nr;
      for (int64_t o = 0; o < g.C_out; ++o) {
        const scalar_t* src = w + o * g.C_in * taps + t;
        for (int64_t j = 0; j < nr && cb * nr + j < g.C_in; ++j) dst[o * nr + j] = static_cast<T>(src[(cb * nr + j) * taps]);
      }
    }
  });
  return panel;
}

// ------------------------------------------------------------------------------------------------- forward
template <typename scalar_t>
void forward_kernel(const Geometry& g, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                    const at::Tensor& scale,
                    const at::Tensor& shift, const at::Tensor& temb, const at::Tensor& residual, double out_scale,
                    at::Tensor& out) {
  using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  constexpr int64_t nr = NR<T>();
  const TileKernels<T> kern = tile_kernels<T>();
  const ActLayout L = act_layout(g);
  std::vector<T> a(g.N * L.sample());
  pack_activations<scalar_t, T>(g, L, x.data_ptr<scalar_t>(), g.prologue ? scale.data_ptr<T>() : nullptr,
                                g.prologue ? shift.data_ptr<T>() : nullptr, kern, a.data());
  const std::vector<T> panel = pack_forward_panels<scalar_t, T>(g, weight.data_ptr<scalar_t>());
  const int64_t taps = g.k * g.k, blocks = (g.C_out + nr - 1) / nr;
  std::vector<int64_t> tap_off(taps);
  for (int64_t t = 0; t < taps; ++t) tap_off[t] = ((t / g.k) * L.Wp + t % g.k) * L.Kc;

  const T* bias_p = bias.defined() ? bias.data_ptr<T>() : nullptr;       // [C_out]
  const T* temb_p = temb.defined() ? temb.data_ptr<T>() : nullptr;       // [N, C_out]
  const scalar_t* res_p = residual.defined() ? residual.data_ptr<scalar_t>() : nullptr;
  scalar_t* out_p = out.data_ptr<scalar_t>();
  const T oscale = static_cast<T>(out_scale);

  // one task = one output row of one sample for one block of NR output channels (its panel stays in L2)
  at::parallel_for(0, blocks * g.N * g.Ho, 1, [&](int64_t begin, int64_t end) {
    std::vector<const T*> b_taps(taps);
    alignas(64) T tile[MR * nr];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ob = task / (g.N * g.Ho), n = task / g.Ho % g.N, ho = task % g.Ho;
      for (int64_t t = 0; t < taps; ++t) b_taps[t] = panel.data() + (ob * taps + t) * g.C_in * nr;
      const T* a_row = a.data() + n * L.sample() + ho * g.s * L.Wp * L.Kc;
      const int64_t o_end = std::min(nr, g.C_out - ob * nr);
      for (int64_t wo0 = 0; wo0 < g.Wo; wo0 += MR) {
        kern.pixel(taps, tap_off.data(), g.C_in, a_row + wo0 * g.s * L.Kc, g.s * L.Kc, b_taps.data(), tile);
        const int64_t m_end = std::min(MR, g.Wo - wo0);
        for (int64_t j = 0; j < o_end; ++j) {
          const int64_t o = ob * nr + j;
          T add = bias_p ? bias_p[o] : T(0);
          if (temb_p) add += temb_p[n * g.C_out + o];
          const int64_t base = ((n * g.C_out + o) * g.Ho + ho) * g.Wo + wo0;
          for (int64_t m = 0; m < m_end; ++m) {
            T v = tile[m * nr + j] + add;
            if (res_p) v += static_cast<T>(res_p[base + m]);
            out_p[base + m] = static_cast<scalar_t>(v * oscale);
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------- grad_input
// grad wrt the conv input a (transposed conv of the output gradient), split into the s*s output phases so every
// phase is a dense stride-1 GEMM over the taps that reach it; then the prologue's backward (per (n, c) sums for
// the scale/shift gradients) when there is one.
template <typename scalar_t>
void grad_input_kernel(const Geometry& g, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& scale, const at::Tensor& shift, double out_scale, at::Tensor& grad_x, at::Tensor& grad_scale,
                       at::Tensor& grad_shift) {
  using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  constexpr int64_t nr = NR<T>();
  const TileKernels<T> kern = tile_kernels<T>();
  const GradLayout L = grad_layout<T>(g);
  std::vector<T> gp(g.N * L.sample());
  pack_grad<scalar_t, T>(g, L, grad_out, static_cast<T>(out_scale), gp.data());
  const std::vector<T> panel = pack_transposed_panels<scalar_t, T>(g, weight.data_ptr<scalar_t>());
  const int64_t taps = g.k * g.k, blocks = (g.C_in + nr - 1) / nr;

  // grad wrt the activation: straight into grad_x without a prologue, else into an fp32/fp64 buffer first
  std::vector<T> grad_act(g.prologue ? g.N * g.C_in * g.H * g.W : 0);
  scalar_t* gx = grad_x.data_ptr<scalar_t>();
  // element offset of (n, c, h, w) in the destination, and its step along w
  auto dest = [&](int64_t n, int64_t c, int64_t h, int64_t w) -> int64_t {
    return g.prologue ? ((n * g.C_in + c) * g.H + h) * g.W + w : g.x_offset(n, c, h, w);
  };
  const int64_t w_step = g.prologue ? 1 : g.xs_w;

  for (int64_t ph = 0; ph < g.s; ++ph) {
    for (int64_t pw = 0; pw < g.s; ++pw) {
      // output rows h = s*i + ph take taps kh with (ph + p - kh) % s == 0, from grad rows ho = i + (ph + p - kh)/s
      std::vector<int64_t> tap_off, tap_id;
      for (int64_t kh = 0; kh < g.k; ++kh) {
        for (int64_t kw = 0; kw < g.k; ++kw) {
          const int64_t eh = ph + g.p - kh, ew = pw + g.p - kw;
          if (((eh % g.s) + g.s) % g.s || ((ew % g.s) + g.s) % g.s) continue;
          tap_off.push_back(((eh / g.s) * L.Wp + ew / g.s) * L.Ko);  // exact division: remainder checked above
          tap_id.push_back(kh * g.k + kw);
        }
      }
      const int64_t rows = ph < g.H ? (g.H - ph + g.s - 1) / g.s : 0;
      const int64_t cols = pw < g.W ? (g.W - pw + g.s - 1) / g.s : 0;
      if (rows == 0 || cols == 0) continue;
      const int64_t ntaps = static_cast<int64_t>(tap_id.size());
      at::parallel_for(0, blocks * g.N * rows, 1, [&](int64_t begin, int64_t end) {
        std::vector<const T*> b_taps(std::max<int64_t>(ntaps, 1));
        alignas(64) T tile[MR * nr];
        for (int64_t task = begin; task < end; ++task) {
          const int64_t cb = task / (g.N * rows), n = task / rows % g.N, i = task % rows;
          for (int64_t t = 0; t < ntaps; ++t) b_taps[t] = panel.data() + (cb * taps + tap_id[t]) * g.C_out * nr;
          const T* a_row = gp.data() + n * L.sample() + ((i + L.P) * L.Wp + L.P) * L.Ko;
          const int64_t c_end = std::min(nr, g.C_in - cb * nr);
          const int64_t h = i * g.s + ph;
          for (int64_t j0 = 0; j0 < cols; j0 += MR) {
            kern.pixel(ntaps, tap_off.data(), g.C_out, a_row + j0 * L.Ko, L.Ko, b_taps.data(), tile);
            const int64_t m_end = std::min(MR, cols - j0);
            for (int64_t jj = 0; jj < c_end; ++jj) {
              const int64_t off = dest(n, cb * nr + jj, h, pw + j0 * g.s);
              const int64_t step = g.s * w_step;
              for (int64_t m = 0; m < m_end; ++m) {
                if (g.prologue) grad_act[off + m * step] = tile[m * nr + jj];
                else gx[off + m * step] = static_cast<scalar_t>(tile[m * nr + jj]);
              }
            }
          }
        }
      });
    }
  }
  if (!g.prologue) return;

  // a = silu(z), z = x*scale + shift:  dz = da * silu'(z);  dx = dz*scale;  dscale = sum dz*x;  dshift = sum dz
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const T* sc = scale.data_ptr<T>();
  const T* sh = shift.data_ptr<T>();
  T* gsc = grad_scale.data_ptr<T>();
  T* gsh = grad_shift.data_ptr<T>();
  const int64_t hw = g.H * g.W;
  at::parallel_for(0, g.N * g.C_in, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> xs(g.W), dxs(g.W);
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / g.C_in, c = nc % g.C_in;
      const T* da = grad_act.data() + nc * hw;
      T sum_dz_x = 0, sum_dz = 0;
      for (int64_t h = 0; h < g.H; ++h) {
        const int64_t row = g.x_offset(n, c, h, 0);
        for (int64_t w = 0; w < g.W; ++w) xs[w] = static_cast<T>(xp[row + w * g.xs_w]);
        T row_dz_x, row_dz;
        kern.silu_backward_row(xs.data(), da + h * g.W, g.W, sc[nc], sh[nc], dxs.data(), &row_dz_x, &row_dz);
        for (int64_t w = 0; w < g.W; ++w) gx[row + w * g.xs_w] = static_cast<scalar_t>(dxs[w]);
        sum_dz_x += row_dz_x;
        sum_dz += row_dz;
      }
      gsc[nc] = sum_dz_x;
      gsh[nc] = sum_dz;
    }
  });
}

// --------------------------------------------------------------------------------------------- grad_weight
// gw[t][c][o] = sum over samples and output pixels of a[pixel + tap t][c] * g[pixel][o]; pixels are taken in
// chunks of rows so that the chunk's activations and gradients stay in cache while every tile sweeps them.
template <typename scalar_t>
void grad_weight_kernel(const Geometry& g, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& scale,
                        const at::Tensor& shift, double out_scale, at::Tensor& grad_weight) {
  using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  constexpr int64_t nr = NR<T>();
  const TileKernels<T> kern = tile_kernels<T>();
  const ActLayout LA = act_layout(g);
  const GradLayout LG = grad_layout<T>(g);
  std::vector<T> a(g.N * LA.sample());
  pack_activations<scalar_t, T>(g, LA, x.data_ptr<scalar_t>(), g.prologue ? scale.data_ptr<T>() : nullptr,
                                g.prologue ? shift.data_ptr<T>() : nullptr, kern, a.data());
  std::vector<T> gp(g.N * LG.sample());
  pack_grad<scalar_t, T>(g, LG, grad_out, static_cast<T>(out_scale), gp.data());

  const int64_t taps = g.k * g.k, c_tiles = LA.Kc / MR, o_tiles = LG.Ko / nr;
  const int64_t tiles = taps * c_tiles * o_tiles;
  std::vector<T> acc(tiles * MR * nr, T(0));  // tile-major: each task owns one MR x NR block
  // ~256 KB of activations per chunk (for stride 1), at least one row
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, LA.Wp * LA.Kc * g.s));
  for (int64_t n = 0; n < g.N; ++n) {
    for (int64_t r0 = 0; r0 < g.Ho; r0 += chunk) {
      const int64_t nrows = std::min(chunk, g.Ho - r0);
      at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
        for (int64_t tile = begin; tile < end; ++tile) {
          const int64_t t = tile / (c_tiles * o_tiles), ct = tile / o_tiles % c_tiles, ot = tile % o_tiles;
          const int64_t kh = t / g.k, kw = t % g.k;
          const T* a0 = a.data() + n * LA.sample() + ((r0 * g.s + kh) * LA.Wp + kw) * LA.Kc + ct * MR;
          const T* g0 = gp.data() + n * LG.sample() + ((r0 + LG.P) * LG.Wp + LG.P) * LG.Ko + ot * nr;
          kern.channel(nrows, g.Wo, a0, g.s * LA.Wp * LA.Kc, g.s * LA.Kc, g0, LG.Wp * LG.Ko, LG.Ko,
                       acc.data() + tile * MR * nr);
        }
      });
    }
  }
  // tile-major accumulators -> [C_out, C_in, k, k]
  scalar_t* gw = grad_weight.data_ptr<scalar_t>();
  at::parallel_for(0, g.C_out, 1, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const int64_t ot = o / nr, j = o % nr;
      for (int64_t c = 0; c < g.C_in; ++c) {
        const int64_t ct = c / MR, m = c % MR;
        scalar_t* dst = gw + (o * g.C_in + c) * taps;
        for (int64_t t = 0; t < taps; ++t)
          dst[t] = static_cast<scalar_t>(acc[((t * c_tiles + ct) * o_tiles + ot) * MR * nr + m * nr + j]);
      }
    }
  });
}

// -------------------------------------------------------------------------------------------------- glue
// x and grad_out are read through their strides (NCHW, channels_last, ...); only overlapping views are copied
at::Tensor dense_layout(const at::Tensor& t) { return t.is_non_overlapping_and_dense() ? t : t.contiguous(); }

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor small(const std::optional<at::Tensor>& t, at::ScalarType dtype) {
  return t.has_value() && t->defined() ? t->to(dtype).contiguous() : at::Tensor();
}

Geometry check_and_describe(const at::Tensor& x, const at::Tensor& weight, int64_t stride, int64_t padding,
                            const at::Tensor& scale, const at::Tensor& shift) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, "pruned_conv: x [N, C, H, W] and weight [C_out, C_in, k, k] expected");
  TORCH_CHECK(weight.size(2) == weight.size(3), "pruned_conv: square kernels only, got ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "pruned_conv: x and weight dtypes differ");
  TORCH_CHECK(stride >= 1 && padding >= 0, "pruned_conv: stride >= 1 and padding >= 0 expected");
  Geometry g;
  g.N = x.size(0); g.H = x.size(2); g.W = x.size(3);
  g.C_out = weight.size(0); g.C_in = weight.size(1); g.k = weight.size(2);
  g.s = stride; g.p = padding;
  g.Ho = (g.H + 2 * g.p - g.k) / g.s + 1;
  g.Wo = (g.W + 2 * g.p - g.k) / g.s + 1;
  g.prologue = scale.defined();
  g.xs_n = x.stride(0); g.xs_c = x.stride(1); g.xs_h = x.stride(2); g.xs_w = x.stride(3);
  TORCH_CHECK(g.Ho > 0 && g.Wo > 0, "pruned_conv: the input is smaller than the kernel");
  TORCH_CHECK(x.size(1) == g.C_in, "pruned_conv: x has ", x.size(1), " channels, the weight reads ", g.C_in);
  TORCH_CHECK(scale.defined() == shift.defined(), "pruned_conv: norm_scale and norm_shift go together");
  if (g.prologue)
    TORCH_CHECK(scale.numel() == g.N * g.C_in && shift.numel() == g.N * g.C_in,
                "pruned_conv: norm_scale/norm_shift must be [N, C_in]");
  return g;
}

at::Tensor forward_cpu(const at::Tensor& x_, const at::Tensor& weight_, const std::optional<at::Tensor>& bias_,
                       int64_t stride, int64_t padding, const std::optional<at::Tensor>& norm_scale,
                       const std::optional<at::Tensor>& norm_shift, const std::optional<at::Tensor>& temb_bias,
                       const std::optional<at::Tensor>& residual_, double out_scale) {
  const at::Tensor x = dense_layout(x_), weight = weight_.contiguous();
  const at::ScalarType ct = compute_type(x.scalar_type());
  const at::Tensor scale = small(norm_scale, ct), shift = small(norm_shift, ct);
  const Geometry g = check_and_describe(x, weight, stride, padding, scale, shift);
  const at::Tensor bias = small(bias_, ct);
  if (bias.defined()) TORCH_CHECK(bias.numel() == g.C_out, "pruned_conv: bias must have C_out = ", g.C_out, " entries");
  const at::Tensor temb = small(temb_bias, ct);
  if (temb.defined()) TORCH_CHECK(temb.numel() == g.N * g.C_out, "pruned_conv: temb_bias must be [N, C_out]");
  at::Tensor residual;
  if (residual_.has_value() && residual_->defined()) {
    TORCH_CHECK(residual_->sizes() == at::IntArrayRef({g.N, g.C_out, g.Ho, g.Wo}),
                "pruned_conv: residual must have the output's shape");
    residual = residual_->to(x.scalar_type()).contiguous();
  }
  at::Tensor out = at::empty({g.N, g.C_out, g.Ho, g.Wo}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pruned_conv_forward_cpu", [&] {
    forward_kernel<scalar_t>(g, x, weight, bias, scale, shift, temb, residual, out_scale, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grad_input_cpu(
    const at::Tensor& grad_out_, const at::Tensor& x_, const at::Tensor& weight_, int64_t stride, int64_t padding,
    const std::optional<at::Tensor>& norm_scale, const std::optional<at::Tensor>& norm_shift, double out_scale) {
  const at::Tensor x = dense_layout(x_), weight = weight_.contiguous();
  const at::ScalarType ct = compute_type(x.scalar_type());
  const at::Tensor scale = small(norm_scale, ct), shift = small(norm_shift, ct);
  const Geometry g = check_and_describe(x, weight, stride, padding, scale, shift);
  TORCH_CHECK(grad_out_.sizes() == at::IntArrayRef({g.N, g.C_out, g.Ho, g.Wo}), "pruned_conv: grad_out shape");
  const at::Tensor grad_out = dense_layout(grad_out_.to(x.scalar_type()));
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_scale = g.prologue ? at::empty({g.N, g.C_in}, x.options().dtype(ct)) : at::empty({0}, x.options().dtype(ct));
  at::Tensor grad_shift = g.prologue ? at::empty({g.N, g.C_in}, x.options().dtype(ct)) : at::empty({0}, x.options().dtype(ct));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pruned_conv_grad_input_cpu", [&] {
    grad_input_kernel<scalar_t>(g, grad_out, x, weight, scale, shift, out_scale, grad_x, grad_scale, grad_shift);
  });
  return {grad_x, grad_scale, grad_shift};
}

at::Tensor grad_weight_cpu(const at::Tensor& grad_out_, const at::Tensor& x_, const at::Tensor& weight, int64_t stride,
                           int64_t padding, const std::optional<at::Tensor>& norm_scale,
                           const std::optional<at::Tensor>& norm_shift, double out_scale) {
  const at::Tensor x = dense_layout(x_);
  const at::ScalarType ct = compute_type(x.scalar_type());
  const at::Tensor scale = small(norm_scale, ct), shift = small(norm_shift, ct);
  const Geometry g = check_and_describe(x, weight, stride, padding, scale, shift);
  TORCH_CHECK(grad_out_.sizes() == at::IntArrayRef({g.N, g.C_out, g.Ho, g.Wo}), "pruned_conv: grad_out shape");
  const at::Tensor grad_out = dense_layout(grad_out_.to(x.scalar_type()));
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options());  // every element is written
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pruned_conv_grad_weight_cpu", [&] {
    grad_weight_kernel<scalar_t>(g, grad_out, x, scale, shift, out_scale, grad_weight);
  });
  return grad_weight;
}

}  // namespace pruned_conv_cpu
}  // namespace safeprune

// Schemas (defined once, here; the CUDA library adds its kernels for the same names)
TORCH_LIBRARY_FRAGMENT(safeprune_C, m) {
  m.def("pruned_conv_forward(Tensor x, Tensor weight, Tensor? bias, int stride, int padding, Tensor? norm_scale, "
        "Tensor? norm_shift, Tensor? temb_bias, Tensor? residual, float out_scale) -> Tensor");
  m.def("pruned_conv_grad_input(Tensor grad_out, Tensor x, Tensor weight, int stride, int padding, "
        "Tensor? norm_scale, Tensor? norm_shift, float out_scale) -> (Tensor, Tensor, Tensor)");
  m.def("pruned_conv_grad_weight(Tensor grad_out, Tensor x, Tensor weight, int stride, int padding, "
        "Tensor? norm_scale, Tensor? norm_shift, float out_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(safeprune_C, CPU, m) {
  m.impl("pruned_conv_forward", &safeprune::pruned_conv_cpu::forward_cpu);
  m.impl("pruned_conv_grad_input", &safeprune::pruned_conv_cpu::grad_input_cpu);
  m.impl("pruned_conv_grad_weight", &safeprune::pruned_conv_cpu::grad_weight_cpu);
}
