// Torch glue of the GroupNorm + SiLU CUDA kernels: tensor checks, the current stream, CUDA registration of the
// schema defined in groupnorm_silu_cpu.cpp. Built only into safeprune_engine._C_cuda (CUDA torch + nvcc).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks.h"
#include "groupnorm_silu.cuh"

namespace {

using safeprune::cuda::ElementType;
using safeprune::cuda::GroupNormShape;

ElementType element_type(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return ElementType::float32;
    case at::kHalf:
      return ElementType::float16;
    case at::kBFloat16:
      return ElementType::bfloat16;
    default:
      TORCH_CHECK(false, "groupnorm_silu (cuda): dtype ", x.scalar_type(), " not supported (float32/float16/bfloat16)");
  }
}

GroupNormShape check_inputs(const at::Tensor& x, int64_t num_groups, const at::Tensor& weight, const at::Tensor& bias) {
  SAFEPRUNE_CHECK_DEVICE(x, at::kCUDA);
  TORCH_CHECK(x.dim() >= 2, "groupnorm_silu: x must be (N, C, ...), got sizes ", x.sizes());
  const int64_t C = x.size(1);
  TORCH_CHECK(num_groups > 0 && C % num_groups == 0, "groupnorm_silu: num_groups=", num_groups, " must divide the ",
              C, " channels");
  for (const at::Tensor* t : {&weight, &bias}) {
    SAFEPRUNE_CHECK_SAME_DEVICE(x, *t);
    TORCH_CHECK(t->dim() == 1 && t->size(0) == C, "groupnorm_silu: weight and bias must be (", C, ",), got ",
                t->sizes());
  }
  const int64_t HW = x.numel() / std::max<int64_t>(1, x.size(0) * C);
  return {x.size(0), C, HW, num_groups, safeprune_is_channels_last(x)};
}

at::Tensor kernel_layout(const at::Tensor& x, bool channels_last) {
  return channels_last ? x.contiguous(at::MemoryFormat::ChannelsLast) : x.contiguous();
}

void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, " failed: ", cudaGetErrorString(status));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x_in, int64_t num_groups,
                                                       const at::Tensor& weight, const at::Tensor& bias, double eps) {
  const GroupNormShape shape = check_inputs(x_in, num_groups, weight, bias);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = kernel_layout(x_in, shape.channels_last);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({shape.N, shape.G}, f32), rstd = at::empty({shape.N, shape.G}, f32);
  if (x.numel() == 0) return {y, mean.fill_(NAN), rstd.fill_(NAN)};
  const at::Tensor gamma = weight.to(at::kFloat).contiguous(), beta = bias.to(at::kFloat).contiguous();
  at::Tensor work = at::empty({safeprune::cuda::groupnorm_silu_forward_workspace(shape)}, f32);
  check_launch(safeprune::cuda::groupnorm_silu_forward(
                   element_type(x), x.const_data_ptr(), gamma.const_data_ptr<float>(), beta.const_data_ptr<float>(),
                   y.mutable_data_ptr(), mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(),
                   work.mutable_data_ptr<float>(), shape, static_cast<float>(eps), c10::cuda::getCurrentCUDAStream().stream()),
               "groupnorm_silu_forward (cuda)");
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                        const at::Tensor& weight, const at::Tensor& bias,
                                                        const at::Tensor& mean_in, const at::Tensor& rstd_in,
                                                        int64_t num_groups) {
  const GroupNormShape shape = check_inputs(x_in, num_groups, weight, bias);
  TORCH_CHECK(dy_in.sizes() == x_in.sizes() && dy_in.scalar_type() == x_in.scalar_type(),
              "groupnorm_silu_backward: dy must have x's shape and dtype");
  SAFEPRUNE_CHECK_SAME_DEVICE(x_in, dy_in);
  for (const at::Tensor* t : {&mean_in, &rstd_in})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == shape.N && t->size(1) == shape.G,
                "groupnorm_silu_backward: mean and rstd must be (N, num_groups), got ", t->sizes());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = kernel_layout(x_in, shape.channels_last), dy = kernel_layout(dy_in, shape.channels_last);
  const at::Tensor mean = mean_in.to(at::kFloat).contiguous(), rstd = rstd_in.to(at::kFloat).contiguous();
  const at::Tensor gamma = weight.to(at::kFloat).contiguous(), beta = bias.to(at::kFloat).contiguous();
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dx = at::empty_like(x);
  at::Tensor dgamma = at::zeros({shape.C}, f32), dbeta = at::zeros({shape.C}, f32);
  if (x.numel() > 0) {
    at::Tensor work = at::empty({safeprune::cuda::groupnorm_silu_backward_workspace(shape)}, f32);
    check_launch(safeprune::cuda::groupnorm_silu_backward(
                     element_type(x), dy.const_data_ptr(), x.const_data_ptr(), gamma.const_data_ptr<float>(),
                     beta.const_data_ptr<float>(), mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(),
                     dx.mutable_data_ptr(), dgamma.mutable_data_ptr<float>(), dbeta.mutable_data_ptr<float>(),
                     work.mutable_data_ptr<float>(), shape, c10::cuda::getCurrentCUDAStream().stream()),
                 "groupnorm_silu_backward (cuda)");
  }
  return {dx, dgamma.to(weight.scalar_type()), dbeta.to(bias.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(safeprune_C, CUDA, m) {
  m.impl("groupnorm_silu_forward", &forward);
  m.impl("groupnorm_silu_backward", &backward);
}
