// Vectorisable scalar maths for the CPU kernels. No includes and no namespace: it is included inside each ISA
// namespace (see cpu_isa.h) after <cmath>, <cstdint> and <cstring>, so every ISA copy gets its own inlined code.

// Saturation of the sigmoid's exponent: e^-z is computed as 2^t, t = -z log2(e) clamped to [-64, 64]. Keep the
// bound well inside float's range: GCC if-converts the clamp by also evaluating the saturated branch for every
// lane, and with the natural bound (e^88, 2^126) that branch multiplies or divides by a subnormal constant
// (1 / (1 + 2^126)), a microcode assist on x86 that made the AVX2 copy 2.5x and the SSE2 copy 4x slower. At
// |t| = 64 the sigmoid is 1 - 5e-20 or 5e-20 (both normal): silu's error there is below 1e-17 absolute.
constexpr float kSigmoidExponentBound = 64.0f;

// 2^t for t in [-64, 64] in a form `#pragma omp simd` vectorises (libm's expf only does so under -ffast-math):
// t = n + f with n = round(t), |f| <= 1/2, 2^f by a degree-5 fit (relative error 2.2e-7), 2^n through the
// exponent bits.
inline float exp2_bounded(float t) {
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float n = (t + round_magic) - round_magic;
  const float f = t - n;
  float p = 1.3266970636e-3f;
  p = p * f + 9.6754599362e-3f;
  p = p * f + 5.5507425219e-2f;
  p = p * f + 2.4022121727e-1f;
  p = p * f + 6.9314694405e-1f;
  p = p * f + 1.0000001192f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// 1 / (1 + e^-z)
inline float sigmoid_of(float z) {
  float t = z * -1.44269504088896341f;
  t = t < -kSigmoidExponentBound ? -kSigmoidExponentBound : t;
  t = t > kSigmoidExponentBound ? kSigmoidExponentBound : t;
  return 1.0f / (1.0f + exp2_bounded(t));
}

inline double sigmoid_of(double z) { return 1.0 / (1.0 + std::exp(-z)); }  // float64 is for gradcheck: exact

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
