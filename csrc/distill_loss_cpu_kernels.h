// Fused distillation-loss CPU kernels, one ISA copy per inclusion (see cpu_isa.h): no includes, no namespace.
//
// A chunk is a contiguous run of one (student, teacher) pair's elements, both read in memory order (the glue
// guarantees equal strides). Arithmetic in float (double when either side is float64), chunk sums in double.

template <typename S, typename T>
struct PairAcc { using type = float; };
template <typename T>
struct PairAcc<double, T> { using type = double; };
template <typename S>
struct PairAcc<S, double> { using type = double; };
template <>
struct PairAcc<double, double> { using type = double; };

constexpr int64_t kLaneChunk = 4096;  // elements summed in A-precision lanes before a double add

// sum (s - t)^2 over n elements
template <typename S, typename T>
double squared_error_sum(const S* s, const T* t, int64_t n) {
  using A = typename PairAcc<S, T>::type;
  double total = 0;
  for (int64_t start = 0; start < n; start += kLaneChunk) {
    const int64_t end = start + kLaneChunk < n ? start + kLaneChunk : n;
    A acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = start; i < end; ++i) {
      const A d = static_cast<A>(s[i]) - static_cast<A>(t[i]);
      acc += d * d;
    }
    total += acc;
  }
  return total;
}

// g[i] = scale * (s[i] - t[i])
template <typename S, typename T>
void scaled_difference(const S* s, const T* t, S* g, int64_t n, double scale) {
  using A = typename PairAcc<S, T>::type;
  const A k = static_cast<A>(scale);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) g[i] = static_cast<S>(k * (static_cast<A>(s[i]) - static_cast<A>(t[i])));
}
