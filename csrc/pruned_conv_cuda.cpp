// Torch glue for the pruned convolution CUDA kernels (pruned_conv.cu): tensor checks, dtype mapping, the
// current stream and device, zero-filled outputs, and the CUDA kernels of the safeprune_C::pruned_conv_* ops
// whose schemas pruned_conv_cpu.cpp defines.
#include "checks.h"
#include "pruned_conv.cuh"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace safeprune {
namespace pruned_conv_cuda {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "pruned_conv (CUDA): dtype ", t.scalar_type(), " not supported (float32, float16, bfloat16)");
  }
  return DType::kFloat32;
}

at::Tensor dense_layout(const at::Tensor& t) { return t.is_non_overlapping_and_dense() ? t : t.contiguous(); }

at::Tensor optional_as(const std::optional<at::Tensor>& t, at::ScalarType dtype) {
  return t.has_value() && t->defined() ? t->to(dtype).contiguous() : at::Tensor();
}

template <typename P>
const P* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<P>() : nullptr; }

struct Prepared {
  Params p;
  at::Tensor x, weight, scale, shift;  // keep the converted tensors alive
};

// Shape checks only: everything here reads sizes and strides, never tensor values, so no call waits on the GPU.
Prepared prepare(const at::Tensor& x_, const at::Tensor& weight_, int64_t stride, int64_t padding,
                 const std::optional<at::Tensor>& norm_scale, const std::optional<at::Tensor>& norm_shift,
                 double out_scale) {
  SAFEPRUNE_CHECK_DEVICE(x_, at::kCUDA);
  SAFEPRUNE_CHECK_SAME_DEVICE(x_, weight_);
  SAFEPRUNE_CHECK_DIM(x_, 4);
  SAFEPRUNE_CHECK_DIM(weight_, 4);
  TORCH_CHECK(x_.scalar_type() == weight_.scalar_type(), "pruned_conv: x and weight dtypes differ");
  TORCH_CHECK(weight_.size(2) == weight_.size(3), "pruned_conv: square kernels only, got ", weight_.sizes());
  TORCH_CHECK(stride >= 1 && padding >= 0, "pruned_conv: stride >= 1 and padding >= 0 expected");
  Prepared r;
  r.x = dense_layout(x_);
  r.weight = weight_.contiguous();
  r.scale = optional_as(norm_scale, at::kFloat);
  r.shift = optional_as(norm_shift, at::kFloat);
  Params& p = r.p;
  p.N = x_.size(0); p.H = x_.size(2); p.W = x_.size(3);
  p.C_out = weight_.size(0); p.C_in = weight_.size(1); p.k = weight_.size(2);
  p.stride = stride; p.padding = padding;
  p.Ho = (p.H + 2 * padding - p.k) / stride + 1;
  p.Wo = (p.W + 2 * padding - p.k) / stride + 1;
  TORCH_CHECK(p.Ho > 0 && p.Wo > 0, "pruned_conv: the input is smaller than the kernel");
  TORCH_CHECK(x_.size(1) == p.C_in, "pruned_conv: x has ", x_.size(1), " channels, the weight reads ", p.C_in);
  TORCH_CHECK(r.scale.defined() == r.shift.defined(), "pruned_conv: norm_scale and norm_shift go together");
  if (r.scale.defined()) {
    SAFEPRUNE_CHECK_SAME_DEVICE(x_, r.scale);
    SAFEPRUNE_CHECK_SAME_DEVICE(x_, r.shift);
    TORCH_CHECK(r.scale.numel() == p.N * p.C_in && r.shift.numel() == p.N * p.C_in,
                "pruned_conv: norm_scale/norm_shift must be [N, C_in]");
  }
  p.x = r.x.data_ptr();
  p.weight = r.weight.data_ptr();
  p.scale = ptr_or_null<float>(r.scale);
  p.shift = ptr_or_null<float>(r.shift);
  for (int d = 0; d < 4; ++d) p.sx[d] = r.x.stride(d);
  p.out_scale = static_cast<float>(out_scale);
  return r;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "pruned_conv ", what, " (CUDA): ", cudaGetErrorString(err));
}

bool allow_tf32() { return at::globalContext().allowTF32CuDNN(); }

at::Tensor forward_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        int64_t stride, int64_t padding, const std::optional<at::Tensor>& norm_scale,
                        const std::optional<at::Tensor>& norm_shift, const std::optional<at::Tensor>& temb_bias,
                        const std::optional<at::Tensor>& residual, double out_scale) {
  const c10::cuda::CUDAGuard guard(x.device());
  Prepared r = prepare(x, weight, stride, padding, norm_scale, norm_shift, out_scale);
  Params& p = r.p;
  const at::Tensor b = optional_as(bias, x.scalar_type());
  if (b.defined()) {
    SAFEPRUNE_CHECK_SAME_DEVICE(x, b);
    TORCH_CHECK(b.numel() == p.C_out, "pruned_conv: bias must have C_out = ", p.C_out, " entries");
  }
  const at::Tensor temb = optional_as(temb_bias, x.scalar_type());
  if (temb.defined()) {
    SAFEPRUNE_CHECK_SAME_DEVICE(x, temb);
    TORCH_CHECK(temb.numel() == int64_t(p.N) * p.C_out, "pruned_conv: temb_bias must be [N, C_out]");
  }
  const at::Tensor res = optional_as(residual, x.scalar_type());
  if (res.defined()) {
    SAFEPRUNE_CHECK_SAME_DEVICE(x, res);
    TORCH_CHECK(res.sizes() == at::IntArrayRef({p.N, p.C_out, p.Ho, p.Wo}), "pruned_conv: residual must have the output's shape");
  }
  at::Tensor out = at::empty({p.N, p.C_out, p.Ho, p.Wo}, x.options());
  p.bias = b.defined() ? b.data_ptr() : nullptr;
  p.temb = temb.defined() ? temb.data_ptr() : nullptr;
  p.residual = res.defined() ? res.data_ptr() : nullptr;
  p.out = out.data_ptr();
  check_launch(pruned_conv_cuda::forward(p, dtype_of(x), allow_tf32(), c10::cuda::getCurrentCUDAStream()), "forward");
  return out;
}

// grad_out in x's dtype and a dense layout, on x's device (a same-device dtype conversion: queued, not waited on)
at::Tensor prepared_grad(const at::Tensor& grad_out, const at::Tensor& x, Params& p) {
  SAFEPRUNE_CHECK_SAME_DEVICE(x, grad_out);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({p.N, p.C_out, p.Ho, p.Wo}), "pruned_conv: grad_out shape");
  at::Tensor g = dense_layout(grad_out.to(x.scalar_type()));
  for (int d = 0; d < 4; ++d) p.sg[d] = g.stride(d);
  p.grad_out = g.data_ptr();
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grad_input_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, int64_t stride, int64_t padding,
    const std::optional<at::Tensor>& norm_scale, const std::optional<at::Tensor>& norm_shift, double out_scale) {
  const c10::cuda::CUDAGuard guard(x.device());
  Prepared r = prepare(x, weight, stride, padding, norm_scale, norm_shift, out_scale);
  Params& p = r.p;
  const at::Tensor g = prepared_grad(grad_out, x, p);
  // grad_x has x's strides (the kernel writes through sx)
  at::Tensor grad_x = at::empty_like(r.x);
  const bool prologue = r.scale.defined();
  at::Tensor grad_scale = at::zeros({prologue ? p.N : 0, prologue ? p.C_in : 0}, x.options().dtype(at::kFloat));
  at::Tensor grad_shift = at::zeros_like(grad_scale);
  p.grad_x = grad_x.data_ptr();
  p.grad_scale = prologue ? grad_scale.data_ptr<float>() : nullptr;
  p.grad_shift = prologue ? grad_shift.data_ptr<float>() : nullptr;
  check_launch(pruned_conv_cuda::grad_input(p, dtype_of(x), allow_tf32(), c10::cuda::getCurrentCUDAStream()), "grad_input");
  if (!prologue) {
    grad_scale = at::empty({0}, grad_scale.options());
    grad_shift = at::empty({0}, grad_shift.options());
  }
  return {grad_x, grad_scale, grad_shift};
}

at::Tensor grad_weight_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                            int64_t padding, const std::optional<at::Tensor>& norm_scale,
                            const std::optional<at::Tensor>& norm_shift, double out_scale) {
  const c10::cuda::CUDAGuard guard(x.device());
  Prepared r = prepare(x, weight, stride, padding, norm_scale, norm_shift, out_scale);
  Params& p = r.p;
  const at::Tensor g = prepared_grad(grad_out, x, p);
  at::Tensor grad_w32 = at::zeros(weight.sizes(), weight.options().dtype(at::kFloat));
  p.grad_weight = grad_w32.data_ptr<float>();
  // the SM count is a host-side attribute query (cached by the runtime), not a synchronisation
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index());
  check_launch(pruned_conv_cuda::grad_weight(p, dtype_of(x), allow_tf32(), sms, c10::cuda::getCurrentCUDAStream()),
               "grad_weight");
  return grad_w32.to(weight.scalar_type());
}

}  // namespace
}  // namespace pruned_conv_cuda
}  // namespace safeprune

TORCH_LIBRARY_IMPL(safeprune_C, CUDA, m) {
  m.impl("pruned_conv_forward", &safeprune::pruned_conv_cuda::forward_cuda);
  m.impl("pruned_conv_grad_input", &safeprune::pruned_conv_cuda::grad_input_cuda);
  m.impl("pruned_conv_grad_weight", &safeprune::pruned_conv_cuda::grad_weight_cuda);
}
