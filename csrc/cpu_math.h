// Vectorisable scalar maths for the CPU kernels. No includes and no namespace: it is included inside each ISA
// namespace (see cpu_isa.h) after <cmath>, <cstdint> and <cstring>, so every ISA copy gets its own inlined code.

// e^x for float in a form `#pragma omp simd` vectorises (libm's expf only does so under -ffast-math):
// x = n ln2 + r with |r| <= ln2/2, e^r by the Cephes degree-7 polynomial, 2^n through the exponent bits.
// Relative error below 2e-7 on the clamped range [-87.3, 88.3] (beyond it SiLU's result no longer changes).
inline float fast_exp(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  float n = (x * 1.44269504088896341f + round_magic) - round_magic;
  float r = x - n * 0.693359375f;         // ln2 split in a high part exact in float ...
  r = r - n * (-2.12194440e-4f);          // ... and the low remainder
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline double fast_exp(double x) { return std::exp(x); }  // float64 is for gradcheck: exact, not fast

template <typename A>
inline A sigmoid_of(A z) {
  return A(1) / (A(1) + fast_exp(-z));
}

// silu(z) = z * sigmoid(z)
template <typename A>
inline A silu_of(A z) {
  return z * sigmoid_of(z);
}

// d silu / dz = s (1 + z (1 - s)) with s = sigmoid(z)
template <typename A>
inline A silu_grad_of(A z) {
  A s = sigmoid_of(z);
  return s * (A(1) + z * (A(1) - s));
}
