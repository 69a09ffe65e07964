// Fused multi-tensor distillation loss on CPU: schema of the native ops and the CPU implementation.
//
//   safeprune_C::distill_loss_forward(Tensor[] students, Tensor[] teachers, float[] weights) -> Tensor
//       loss = sum_i weights[i] * mean((students[i] - teachers[i])^2), a 0-d float32 tensor (float64 when a
//       student is float64)
//   safeprune_C::distill_loss_backward(Tensor grad, Tensor[] students, Tensor[] teachers, float[] weights)
//       -> Tensor[]: d loss / d students[i] = grad * weights[i] * 2 (students[i] - teachers[i]) / numel_i,
//       in each student's dtype and layout (teachers get no gradient)
//
// Pairs may have any shapes (each pair's two tensors equal); teachers may be in a lower precision
// (bfloat16/float16) than the students. All pairs are one work list of fixed-size chunks spread over the threads
// by a single parallel loop; per-chunk sums are added in a fixed order (deterministic for a given thread count
// or not: the chunking does not depend on it).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>

#include "checks.h"
#include "cpu_isa.h"

namespace safeprune {
namespace distill_loss_cpu {

namespace generic {
#include "distill_loss_cpu_kernels.h"
}  // namespace generic

#if SAFEPRUNE_X86_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "distill_loss_cpu_kernels.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
namespace avx512 {
#include "distill_loss_cpu_kernels.h"
}  // namespace avx512
#pragma GCC pop_options
#endif

constexpr int64_t kChunk = 1 << 15;  // elements per work item

struct Pairs {
  std::vector<at::Tensor> students, teachers;  // equal strides per pair, dense
  std::vector<int64_t> first_chunk;            // prefix over pairs, size pairs + 1
};

Pairs prepare(at::TensorList students, at::TensorList teachers, at::ArrayRef<double> weights) {
  TORCH_CHECK(students.size() == teachers.size() && students.size() == weights.size(),
              "distill_loss: need as many teachers and weights as students, got ", students.size(), ", ",
              teachers.size(), " and ", weights.size());
  Pairs p;
  p.first_chunk.push_back(0);
  for (size_t i = 0; i < students.size(); ++i) {
    const at::Tensor &s = students[i], &t = teachers[i];
    SAFEPRUNE_CHECK_DEVICE(s, at::kCPU);
    SAFEPRUNE_CHECK_DEVICE(t, at::kCPU);
    TORCH_CHECK(s.sizes() == t.sizes(), "distill_loss: pair ", i, " has student shape ", s.sizes(),
                " but teacher shape ", t.sizes());
    TORCH_CHECK(at::isFloatingType(s.scalar_type()) && at::isFloatingType(t.scalar_type()),
                "distill_loss: pair ", i, " must be floating point, got ", s.scalar_type(), " and ", t.scalar_type());
    const bool same_dense_layout = s.is_non_overlapping_and_dense() && s.strides() == t.strides();
    p.students.push_back(same_dense_layout ? s : s.contiguous());
    p.teachers.push_back(same_dense_layout ? t : t.contiguous());
    p.first_chunk.push_back(p.first_chunk.back() + (s.numel() + kChunk - 1) / kChunk);
  }
  return p;
}

// calls fn(S*, T*) with null pointers of the element types of a (student, teacher) pair
template <typename Fn>
void dispatch_pair(const at::Tensor& s, const at::Tensor& t, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "distill_loss_student", [&] {
    using S = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "distill_loss_teacher", [&] {
      fn(static_cast<S*>(nullptr), static_cast<scalar_t*>(nullptr));
    });
  });
}

int64_t pair_of_chunk(const std::vector<int64_t>& first_chunk, int64_t chunk) {
  return std::upper_bound(first_chunk.begin(), first_chunk.end(), chunk) - first_chunk.begin() - 1;
}

at::ScalarType loss_dtype(at::TensorList students) {
  for (const at::Tensor& s : students)
    if (s.scalar_type() == at::kDouble) return at::kDouble;
  return at::kFloat;
}

at::Tensor forward(at::TensorList students, at::TensorList teachers, at::ArrayRef<double> weights) {
  const Pairs p = prepare(students, teachers, weights);
  const int64_t chunks = p.first_chunk.back();
  std::vector<double> partial(chunks, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t i = pair_of_chunk(p.first_chunk, chunk);
      const at::Tensor &s = p.students[i], &t = p.teachers[i];
      const int64_t start = (chunk - p.first_chunk[i]) * kChunk, n = std::min(kChunk, s.numel() - start);
      double sum = 0;
      dispatch_pair(s, t, [&](auto* s_tag, auto* t_tag) {
        using S = std::remove_pointer_t<decltype(s_tag)>;
        using T = std::remove_pointer_t<decltype(t_tag)>;
        const S* sp = s.const_data_ptr<S>() + start;
        const T* tp = t.const_data_ptr<T>() + start;
        SAFEPRUNE_ISA_SWITCH(safeprune::distill_loss_cpu, (sum = isa_ns::squared_error_sum<S, T>(sp, tp, n)));
      });
      partial[chunk] = sum * weights[i] / static_cast<double>(s.numel());
    }
  });
  double loss = 0;
  for (double v : partial) loss += v;
  return at::scalar_tensor(loss, at::TensorOptions().dtype(loss_dtype(students)));
}

std::vector<at::Tensor> backward(const at::Tensor& grad, at::TensorList students, at::TensorList teachers,
                                 at::ArrayRef<double> weights) {
  TORCH_CHECK(grad.numel() == 1, "distill_loss_backward: grad must be a scalar, got sizes ", grad.sizes());
  const Pairs p = prepare(students, teachers, weights);
  const double g = grad.item<double>();
  std::vector<at::Tensor> grads;
  for (const at::Tensor& s : p.students) grads.push_back(at::empty_like(s));
  at::parallel_for(0, p.first_chunk.back(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t i = pair_of_chunk(p.first_chunk, chunk);
      const at::Tensor &s = p.students[i], &t = p.teachers[i];
      const int64_t start = (chunk - p.first_chunk[i]) * kChunk, n = std::min(kChunk, s.numel() - start);
      const double scale = 2.0 * g * weights[i] / static_cast<double>(s.numel());
      at::Tensor& out = grads[i];
      dispatch_pair(s, t, [&](auto* s_tag, auto* t_tag) {
        using S = std::remove_pointer_t<decltype(s_tag)>;
        using T = std::remove_pointer_t<decltype(t_tag)>;
        const S* sp = s.const_data_ptr<S>() + start;
        const T* tp = t.const_data_ptr<T>() + start;
        S* gp = out.mutable_data_ptr<S>() + start;
        SAFEPRUNE_ISA_SWITCH(safeprune::distill_loss_cpu, (isa_ns::scaled_difference<S, T>(sp, tp, gp, n, scale)));
      });
    }
  });
  return grads;
}

}  // namespace distill_loss_cpu
}  // namespace safeprune

TORCH_LIBRARY_FRAGMENT(safeprune_C, m) {
  m.def("distill_loss_forward(Tensor[] students, Tensor[] teachers, float[] weights) -> Tensor");
  m.def("distill_loss_backward(Tensor grad, Tensor[] students, Tensor[] teachers, float[] weights) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(safeprune_C, CPU, m) {
  m.impl("distill_loss_forward", &safeprune::distill_loss_cpu::forward);
  m.impl("distill_loss_backward", &safeprune::distill_loss_cpu::backward);
}
