// GroupNorm (affine) + SiLU on CPU: schema of the native ops, and the CPU kernels with their torch glue.
//
//   safeprune_C::groupnorm_silu_forward(x, num_groups, weight, bias, eps) -> (y, mean, rstd)
//   safeprune_C::groupnorm_silu_backward(dy, x, weight, bias, mean, rstd, num_groups) -> (dx, dweight, dbias)
//
// x: (N, C, *) float32/float16/bfloat16/float64, NCHW-contiguous or (4-d) channels_last; weight, bias: (C,) in
// x's dtype or float32. y, dx: like x (same layout). mean, rstd: (N, num_groups) float32 (float64 for float64 x).
// Statistics and all arithmetic in float32 (float64 for float64 x); one pass reads x for the statistics and one
// reads x and writes y (no intermediate normalised tensor).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <ATen/Parallel.h>

#include "checks.h"
#include "cpu_isa.h"
#if SAFEPRUNE_X86_MULTI_ISA
#include <immintrin.h>  // the avx512 copy's silu16 (GCC allows the intrinsics under #pragma GCC target)
#endif

namespace safeprune {
namespace groupnorm_silu_cpu {

namespace generic {
#include "cpu_math.h"
#include "groupnorm_silu_cpu_kernels.h"
}  // namespace generic

#if SAFEPRUNE_X86_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "cpu_math.h"
#include "groupnorm_silu_cpu_kernels.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
// GCC 12 flags the deliberate "__m512 __Y = __Y" of _mm512_undefined_ps inside the intrinsics (a false positive)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace avx512 {
#include "cpu_math.h"
#include "groupnorm_silu_cpu_kernels.h"

// silu(z) for 16 floats with the AVX-512 instructions the portable code cannot name: e^-z = 2^t, t = -z log2(e),
// as scalef(p(t - round(t)), round(t)) with p a degree-5 fit of 2^f on [-1/2, 1/2] (relative error 2.2e-7),
// and 1 / (1 + e^-z) by rcp14 plus one Newton step. t is clamped to +-100, where silu is exact to 1e-28.
inline __m512 silu16(__m512 z) {
  __m512 t = _mm512_mul_ps(z, _mm512_set1_ps(-1.44269504088896341f));
  t = _mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(-100.f)), _mm512_set1_ps(100.f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.3266970636e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6754599362e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5507425219e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022121727e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314694405e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001192f));
  const __m512 d = _mm512_add_ps(_mm512_scalef_ps(p, n), _mm512_set1_ps(1.f));
  __m512 r = _mm512_rcp14_ps(d);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));
  return _mm512_mul_ps(z, r);
}

template <>
inline void plane_apply<float, float>(const float* x, float* y, int64_t count, float a, float b) {
  const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b);
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) _mm512_storeu_ps(y + i, silu16(_mm512_fmadd_ps(_mm512_loadu_ps(x + i), va, vb)));
  if (i < count) {
    const __mmask16 m = static_cast<__mmask16>((1u << (count - i)) - 1u);
    _mm512_mask_storeu_ps(y + i, m, silu16(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + i), va, vb)));
  }
}

template <>
inline void row_apply<float, float>(const float* x, float* y, int64_t count, const float* a, const float* b) {
  int64_t i = 0;
  for (; i + 16 <= count; i += 16)
    _mm512_storeu_ps(y + i, silu16(_mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(a + i),
                                                   _mm512_loadu_ps(b + i))));
  if (i < count) {
    const __mmask16 m = static_cast<__mmask16>((1u << (count - i)) - 1u);
    _mm512_mask_storeu_ps(y + i, m, silu16(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, a + i),
                                                           _mm512_maskz_loadu_ps(m, b + i))));
  }
}
}  // namespace avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

struct Geometry {
  int64_t N, C, HW, G;
  bool channels_last;
};

Geometry check_inputs(const at::Tensor& x, int64_t num_groups, const at::Tensor& weight, const at::Tensor& bias) {
  SAFEPRUNE_CHECK_DEVICE(x, at::kCPU);
  TORCH_CHECK(x.dim() >= 2, "groupnorm_silu: x must be (N, C, ...), got sizes ", x.sizes());
  const int64_t C = x.size(1);
  TORCH_CHECK(num_groups > 0 && C % num_groups == 0, "groupnorm_silu: num_groups=", num_groups,
              " must divide the ", C, " channels");
  for (const at::Tensor* t : {&weight, &bias}) {
    SAFEPRUNE_CHECK_SAME_DEVICE(x, *t);
    TORCH_CHECK(t->dim() == 1 && t->size(0) == C, "groupnorm_silu: weight and bias must be (", C, ",), got ",
                t->sizes());
    TORCH_CHECK(t->scalar_type() == x.scalar_type() || t->scalar_type() == at::kFloat,
                "groupnorm_silu: weight/bias dtype must be x's (", x.scalar_type(), ") or float32, got ",
                t->scalar_type());
  }
  const int64_t HW = x.numel() / std::max<int64_t>(1, x.size(0) * C);
  return {x.size(0), C, HW, num_groups, safeprune_is_channels_last(x)};
}

// x in the layout the kernels read: NCHW-contiguous, or channels_last when x already is
at::Tensor kernel_layout(const at::Tensor& x, bool channels_last) {
  return channels_last ? x.contiguous(at::MemoryFormat::ChannelsLast) : x.contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x_in, int64_t num_groups,
                                                       const at::Tensor& weight, const at::Tensor& bias, double eps) {
  const Geometry g = check_inputs(x_in, num_groups, weight, bias);
  const at::Tensor x = kernel_layout(x_in, g.channels_last);
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({g.N, g.G}, x.options().dtype(acc_dtype));
  at::Tensor rstd = at::empty({g.N, g.G}, x.options().dtype(acc_dtype));
  if (x.numel() == 0) return {y, mean.fill_(NAN), rstd.fill_(NAN)};
  const at::Tensor gamma = weight.to(acc_dtype).contiguous(), beta = bias.to(acc_dtype).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "groupnorm_silu_forward_cpu", [&] {
    using A = typename generic::AccOf<scalar_t>::type;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const A* gp = gamma.const_data_ptr<A>();
    const A* bp = beta.const_data_ptr<A>();
    A* mp = mean.mutable_data_ptr<A>();
    A* rp = rstd.mutable_data_ptr<A>();
    if (g.channels_last)
      SAFEPRUNE_ISA_SWITCH(safeprune::groupnorm_silu_cpu,
                           (isa_ns::forward_nhwc<scalar_t, A>(xp, gp, bp, yp, mp, rp, g.N, g.C, g.HW, g.G, eps)));
    else
      SAFEPRUNE_ISA_SWITCH(safeprune::groupnorm_silu_cpu,
                           (isa_ns::forward_nchw<scalar_t, A>(xp, gp, bp, yp, mp, rp, g.N, g.C, g.HW, g.G, eps)));
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                        const at::Tensor& weight, const at::Tensor& bias,
                                                        const at::Tensor& mean_in, const at::Tensor& rstd_in,
                                                        int64_t num_groups) {
  const Geometry g = check_inputs(x_in, num_groups, weight, bias);
  TORCH_CHECK(dy_in.sizes() == x_in.sizes(), "groupnorm_silu_backward: dy must have x's shape ", x_in.sizes(),
              ", got ", dy_in.sizes());
  TORCH_CHECK(dy_in.scalar_type() == x_in.scalar_type(), "groupnorm_silu_backward: dy must have x's dtype");
  const auto acc_dtype = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const at::Tensor* t : {&mean_in, &rstd_in})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == g.N && t->size(1) == g.G,
                "groupnorm_silu_backward: mean and rstd must be (N, num_groups) = (", g.N, ", ", g.G, "), got ",
                t->sizes());
  const at::Tensor x = kernel_layout(x_in, g.channels_last), dy = kernel_layout(dy_in, g.channels_last);
  const at::Tensor mean = mean_in.to(acc_dtype).contiguous(), rstd = rstd_in.to(acc_dtype).contiguous();
  const at::Tensor gamma = weight.to(acc_dtype).contiguous(), beta = bias.to(acc_dtype).contiguous();
  at::Tensor dx = at::empty_like(x);
  at::Tensor dgamma = at::zeros({g.C}, x.options().dtype(at::kDouble));
  at::Tensor dbeta = at::zeros({g.C}, x.options().dtype(at::kDouble));
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "groupnorm_silu_backward_cpu", [&] {
      using A = typename generic::AccOf<scalar_t>::type;
      const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
      const A* gp = gamma.const_data_ptr<A>();
      const A* bp = beta.const_data_ptr<A>();
      const A* mp = mean.const_data_ptr<A>();
      const A* rp = rstd.const_data_ptr<A>();
      double* dgp = dgamma.mutable_data_ptr<double>();
      double* dbp = dbeta.mutable_data_ptr<double>();
      if (g.channels_last)
        SAFEPRUNE_ISA_SWITCH(safeprune::groupnorm_silu_cpu, (isa_ns::backward_nhwc<scalar_t, A>(
                                                                dyp, xp, gp, bp, mp, rp, dxp, dgp, dbp, g.N, g.C, g.HW, g.G)));
      else
        SAFEPRUNE_ISA_SWITCH(safeprune::groupnorm_silu_cpu, (isa_ns::backward_nchw<scalar_t, A>(
                                                                dyp, xp, gp, bp, mp, rp, dxp, dgp, dbp, g.N, g.C, g.HW, g.G)));
    });
  }
  return {dx, dgamma.to(weight.scalar_type()), dbeta.to(bias.scalar_type())};
}

}  // namespace groupnorm_silu_cpu
}  // namespace safeprune

TORCH_LIBRARY_FRAGMENT(safeprune_C, m) {
  m.def("groupnorm_silu_forward(Tensor x, int num_groups, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("groupnorm_silu_backward(Tensor dy, Tensor x, Tensor weight, Tensor bias, Tensor mean, Tensor rstd, int num_groups) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(safeprune_C, CPU, m) {
  m.impl("groupnorm_silu_forward", &safeprune::groupnorm_silu_cpu::forward);
  m.impl("groupnorm_silu_backward", &safeprune::groupnorm_silu_cpu::backward);
}
