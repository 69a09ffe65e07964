// Pruned-convolution register-tile micro-kernels, one ISA copy per inclusion (see cpu_isa.h): no includes and
// no namespace here; pruned_conv_cpu.cpp includes it inside namespaces generic / avx2 / avx512 after defining
// MR and NR<T>(). A tile is MR rows x NR columns (NR = 128 bytes of T). Each copy keeps its accumulators in the
// widest vectors of its ISA (GCC vector extensions: 64 bytes for AVX-512, 32 for AVX2, 16 for SSE2) and walks
// the MR rows in passes of as many rows as its accumulator registers hold (24 of the 32 AVX-512 registers, 12
// of the 16 AVX2/SSE ones), so nothing spills.

// set by the includer per ISA copy (`#pragma GCC target` does not update __AVX2__/__AVX512F__ for C++)
constexpr int64_t VECTOR_BYTES = SAFEPRUNE_VECTOR_BYTES;

template <typename T>
struct Vec {
  // aligned(sizeof(T)): loads through it may be unaligned
  typedef T type __attribute__((vector_size(VECTOR_BYTES), aligned(sizeof(T))));
};

template <typename T>
constexpr int64_t vectors_per_row() { return NR<T>() * int64_t(sizeof(T)) / VECTOR_BYTES; }

template <typename T>
constexpr int64_t rows_per_pass() {  // the largest divisor of MR whose accumulators fit the vector registers
  constexpr int64_t budget = VECTOR_BYTES == 64 ? 24 : 12;
  int64_t best = 1;
  for (int64_t r = 1; r <= MR; ++r)
    if (MR % r == 0 && r * vectors_per_row<T>() <= budget) best = r;
  return best;
}

// out[m][j] = sum_t sum_{c<K} a[tap_off[t] + m*a_step + c] * b_taps[t][c*NR + j]      (m < MR, j < NR)
// (rows: pixels; columns: output channels for the forward, input channels for grad_input)
template <typename T>
void pixel_tile(int64_t ntaps, const int64_t* tap_off, int64_t K, const T* a, int64_t a_step,
                const T* const* b_taps, T* out) {
  typedef typename Vec<T>::type V;
  constexpr int64_t L = VECTOR_BYTES / sizeof(T), NV = vectors_per_row<T>(), RB = rows_per_pass<T>();
  constexpr int64_t nr = NR<T>();
  for (int64_t r0 = 0; r0 < MR; r0 += RB) {
    V acc[RB][NV];
    for (int64_t m = 0; m < RB; ++m)
      for (int64_t v = 0; v < NV; ++v) acc[m][v] = V{};
    for (int64_t t = 0; t < ntaps; ++t) {
      const T* at = a + tap_off[t] + r0 * a_step;
      const T* bt = b_taps[t];
      for (int64_t c = 0; c < K; ++c) {
        V b[NV];
        for (int64_t v = 0; v < NV; ++v) b[v] = *reinterpret_cast<const V*>(bt + c * nr + v * L);
        for (int64_t m = 0; m < RB; ++m) {
          const T av = at[m * a_step + c];
          for (int64_t v = 0; v < NV; ++v) acc[m][v] += av * b[v];
        }
      }
    }
    for (int64_t m = 0; m < RB; ++m)
      for (int64_t v = 0; v < NV; ++v) std::memcpy(out + (r0 + m) * nr + v * L, &acc[m][v], sizeof(V));
  }
}

// acc[m][j] += sum_{r<rows} sum_{q<cols} a[r*a_row + q*a_col + m] * g[r*g_row + q*g_col + j]   (m < MR, j < NR)
// (rows: input channels; columns: output channels; the sum runs over output pixels: grad_weight)
template <typename T>
void channel_tile(int64_t rows, int64_t cols, const T* a, int64_t a_row, int64_t a_col, const T* g,
                  int64_t g_row, int64_t g_col, T* acc_io) {
  typedef typename Vec<T>::type V;
  constexpr int64_t L = VECTOR_BYTES / sizeof(T), NV = vectors_per_row<T>(), RB = rows_per_pass<T>();
  constexpr int64_t nr = NR<T>();
  for (int64_t r0 = 0; r0 < MR; r0 += RB) {
    V acc[RB][NV];
    for (int64_t m = 0; m < RB; ++m)
      for (int64_t v = 0; v < NV; ++v) std::memcpy(&acc[m][v], acc_io + (r0 + m) * nr + v * L, sizeof(V));
    for (int64_t r = 0; r < rows; ++r) {
      const T* ar = a + r * a_row + r0;
      const T* gr = g + r * g_row;
      for (int64_t q = 0; q < cols; ++q) {
        V gv[NV];
        for (int64_t v = 0; v < NV; ++v) gv[v] = *reinterpret_cast<const V*>(gr + q * g_col + v * L);
        const T* aq = ar + q * a_col;
        for (int64_t m = 0; m < RB; ++m) {
          const T av = aq[m];
          for (int64_t v = 0; v < NV; ++v) acc[m][v] += av * gv[v];
        }
      }
    }
    for (int64_t m = 0; m < RB; ++m)
      for (int64_t v = 0; v < NV; ++v) std::memcpy(acc_io + (r0 + m) * nr + v * L, &acc[m][v], sizeof(V));
  }
}

// The GroupNorm-apply + SiLU prologue on one row: row[i] = silu(row[i] * scale + shift).
// (cpu_math.h's exp vectorises under `#pragma omp simd`; libm's would make the prologue cost more than the
// separate GroupNorm + SiLU pass it replaces)
template <typename T>
void silu_affine_row(T* row, int64_t n, T scale, T shift) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) row[i] = silu_of(row[i] * scale + shift);
}

// Its backward on one row, with z = x * scale + shift: dz = da * silu'(z); dx = dz * scale;
// returns sum(dz * x) (the scale's gradient) and sum(dz) (the shift's) over the row.
template <typename T>
void silu_affine_backward_row(const T* x, const T* da, int64_t n, T scale, T shift, T* dx, T* sum_dz_x, T* sum_dz) {
  T s_dzx = 0, s_dz = 0;
#pragma omp simd reduction(+ : s_dzx, s_dz)
  for (int64_t i = 0; i < n; ++i) {
    const T dz = da[i] * silu_grad_of(x[i] * scale + shift);
    dx[i] = dz * scale;
    s_dzx += dz * x[i];
    s_dz += dz;
  }
  *sum_dz_x = s_dzx;
  *sum_dz = s_dz;
}
