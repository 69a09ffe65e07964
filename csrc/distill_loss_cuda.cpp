// Torch glue of the fused distillation-loss CUDA kernels: checks, the host table of pairs, the current stream,
// CUDA registration of the schema defined in distill_loss_cpu.cpp. Built only into safeprune_engine._C_cuda.
// No device->host or blocking host->device traffic per call: the pair table goes to the kernels as launch
// arguments (distill_loss.cuh), so a call only queues work on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#include "checks.h"
#include "distill_loss.cuh"

namespace {

using safeprune::cuda::DistillElement;
using safeprune::cuda::DistillPair;

DistillElement element_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DistillElement::float32;
    case at::kHalf:
      return DistillElement::float16;
    case at::kBFloat16:
      return DistillElement::bfloat16;
    default:
      TORCH_CHECK(false, "distill_loss (cuda): dtype ", t.scalar_type(), " not supported (float32/float16/bfloat16)");
  }
}

struct Work {
  std::vector<at::Tensor> students, teachers;  // kept alive until the kernels are queued
  std::vector<DistillPair> pairs;               // host table, passed to the kernels by value
  int64_t chunks = 0;
};

// students/teachers with equal dense strides per pair; grads (backward) or empty
Work prepare(at::TensorList students, at::TensorList teachers, at::ArrayRef<double> weights, double factor,
             const std::vector<at::Tensor>* grads) {
  TORCH_CHECK(students.size() == teachers.size() && students.size() == weights.size(),
              "distill_loss: need as many teachers and weights as students");
  TORCH_CHECK(!students.empty(), "distill_loss (cuda): no pairs");
  Work w;
  for (size_t i = 0; i < students.size(); ++i) {
    at::Tensor s = students[i], t = teachers[i];
    SAFEPRUNE_CHECK_DEVICE(s, at::kCUDA);
    SAFEPRUNE_CHECK_SAME_DEVICE(s, t);
    SAFEPRUNE_CHECK_SAME_DEVICE(s, students[0]);
    TORCH_CHECK(s.sizes() == t.sizes(), "distill_loss: pair ", i, " has student shape ", s.sizes(),
                " but teacher shape ", t.sizes());
    if (!(s.is_non_overlapping_and_dense() && s.strides() == t.strides())) {
      s = s.contiguous();
      t = t.contiguous();
    }
    w.students.push_back(s);
    w.teachers.push_back(t);
    w.pairs.push_back(DistillPair{s.const_data_ptr(), t.const_data_ptr(),
                                  grads ? (*grads)[i].mutable_data_ptr() : nullptr, s.numel(),
                                  static_cast<float>(factor * weights[i] / std::max<int64_t>(1, s.numel())),
                                  element_type(s), element_type(t)});
    w.chunks += safeprune::cuda::distill_chunks(s.numel());
  }
  return w;
}

at::Tensor forward(at::TensorList students, at::TensorList teachers, at::ArrayRef<double> weights) {
  const c10::cuda::CUDAGuard guard(students[0].device());
  Work w = prepare(students, teachers, weights, 1.0, nullptr);
  const auto f32 = students[0].options().dtype(at::kFloat);
  at::Tensor partial = at::empty({std::max<int64_t>(1, w.chunks)}, f32);
  at::Tensor loss = at::empty({}, f32);
  const cudaError_t status = safeprune::cuda::distill_loss_forward(
      w.pairs.data(), static_cast<int>(w.pairs.size()), partial.mutable_data_ptr<float>(),
      loss.mutable_data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess, "distill_loss_forward (cuda) failed: ", cudaGetErrorString(status));
  return loss;
}

std::vector<at::Tensor> backward(const at::Tensor& grad, at::TensorList students, at::TensorList teachers,
                                 at::ArrayRef<double> weights) {
  TORCH_CHECK(grad.numel() == 1, "distill_loss_backward: grad must be a scalar, got sizes ", grad.sizes());
  const c10::cuda::CUDAGuard guard(students[0].device());
  std::vector<at::Tensor> grads;
  for (size_t i = 0; i < students.size(); ++i) {
    const at::Tensor& s = students[i];
    const bool keeps_layout = s.is_non_overlapping_and_dense() && s.strides() == teachers[i].strides();
    grads.push_back(at::empty_like(keeps_layout ? s : s.contiguous()));
  }
  Work w = prepare(students, teachers, weights, 2.0, &grads);
  // autograd hands the gradient on the loss's device, so this is at most an on-device cast, never a copy
  SAFEPRUNE_CHECK_SAME_DEVICE(grad, students[0]);
  const at::Tensor upstream = grad.to(at::kFloat).reshape({});
  const cudaError_t status = safeprune::cuda::distill_loss_backward(
      w.pairs.data(), static_cast<int>(w.pairs.size()), upstream.const_data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess, "distill_loss_backward (cuda) failed: ", cudaGetErrorString(status));
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(safeprune_C, CUDA, m) {
  m.impl("distill_loss_forward", &forward);
  m.impl("distill_loss_backward", &backward);
}
