// GroupNorm + SiLU CPU kernels, one ISA copy per inclusion (see cpu_isa.h): no includes, no namespace here.
//
// Shapes: x, y, dy, dx are (N, C, HW) stored NCHW (each (n, c) plane contiguous) or NHWC (each pixel's C
// channels contiguous). gamma, beta: (C,) in the accumulation type A (float, or double for float64 inputs).
// mean, rstd: (N, G) in A. Statistics are exact-order safe: each plane/row block sums (x - pivot) and
// (x - pivot)^2 around its first value, and blocks merge with Chan's formula in double.
//
// Forward, per group g of image n (M = C/G * HW elements):
//   mean, var over the group; rstd = 1/sqrt(var + eps); z = (x - mean) rstd gamma_c + beta_c; y = silu(z).
// Backward with xhat = (x - mean) rstd and dz = dy silu'(z):
//   dbeta_c = sum dz, dgamma_c = sum dz xhat (over n and pixels),
//   dx = rstd (gamma_c dz - c1 - xhat c2), c1 = sum_group gamma_c dz / M, c2 = sum_group gamma_c dz xhat / M.

template <typename T>
struct AccOf { using type = float; };
template <>
struct AccOf<double> { using type = double; };

template <typename T, typename A>
inline A load_as(const T* p, int64_t i) { return static_cast<A>(p[i]); }

constexpr int64_t kPlaneChunk = 2048;  // elements summed in A-precision lanes before a double add

// Mean and sum of squared deviations of count contiguous values.
template <typename T, typename A>
inline void plane_moments(const T* x, int64_t count, double& mean, double& m2) {
  const A pivot = load_as<T, A>(x, 0);
  double s = 0, q = 0;
  for (int64_t start = 0; start < count; start += kPlaneChunk) {
    const int64_t end = start + kPlaneChunk < count ? start + kPlaneChunk : count;
    A cs = 0, cq = 0;
#pragma omp simd reduction(+ : cs, cq)
    for (int64_t i = start; i < end; ++i) {
      A d = load_as<T, A>(x, i) - pivot;
      cs += d;
      cq += d * d;
    }
    s += cs;
    q += cq;
  }
  mean = static_cast<double>(pivot) + s / count;
  m2 = q - s * s / count;
  if (m2 < 0) m2 = 0;
}

// Chan's merge of `parts` blocks of equal size `count_each`, strided by `stride` in means/m2s.
template <typename A>
inline void merge_moments(const double* means, const double* m2s, int64_t parts, int64_t stride, int64_t count_each,
                          double eps, A& mean_out, A& rstd_out) {
  double mean = 0;
  for (int64_t i = 0; i < parts; ++i) mean += means[i * stride];
  mean /= parts;
  double m2 = 0;
  for (int64_t i = 0; i < parts; ++i) {
    const double d = means[i * stride] - mean;
    m2 += m2s[i * stride] + count_each * d * d;
  }
  const double var = m2 / (static_cast<double>(parts) * count_each);
  mean_out = static_cast<A>(mean);
  rstd_out = static_cast<A>(1.0 / std::sqrt(var + eps));
}

// y = silu(x a + b) over one plane (scalar a, b) or one pixel's channels (per-channel a, b). The avx512 copy
// specialises both for float (groupnorm_silu_cpu.cpp).
template <typename T, typename A>
inline void plane_apply(const T* x, T* y, int64_t count, A a, A b) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) y[i] = static_cast<T>(silu_of<A>(load_as<T, A>(x, i) * a + b));
}

template <typename T, typename A>
inline void row_apply(const T* x, T* y, int64_t count, const A* a, const A* b) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) y[i] = static_cast<T>(silu_of<A>(load_as<T, A>(x, i) * a[i] + b[i]));
}

// Sums of dz and dz * xhat over one plane; xhat = x r + o, z = xhat gamma + beta. With KeepDz, dz is also
// written to dz_out so the apply pass reads it instead of evaluating silu' a second time.
template <typename T, typename A, bool KeepDz = false>
inline void plane_grad_sums(const T* x, const T* dy, int64_t count, A r, A o, A gamma, A beta, double& sdz,
                            double& sdzx, A* dz_out = nullptr) {
  double s1 = 0, s2 = 0;
  for (int64_t start = 0; start < count; start += kPlaneChunk) {
    const int64_t end = start + kPlaneChunk < count ? start + kPlaneChunk : count;
    A c1 = 0, c2 = 0;
#pragma omp simd reduction(+ : c1, c2)
    for (int64_t i = start; i < end; ++i) {
      A xhat = load_as<T, A>(x, i) * r + o;
      A dz = load_as<T, A>(dy, i) * silu_grad_of<A>(xhat * gamma + beta);
      if (KeepDz) dz_out[i] = dz;
      c1 += dz;
      c2 += dz * xhat;
    }
    s1 += c1;
    s2 += c2;
  }
  sdz = s1;
  sdzx = s2;
}

// dx from the dz that plane_grad_sums<..., true> kept
template <typename T, typename A>
inline void plane_grad_apply_kept(const T* x, const A* dz, T* dx, int64_t count, A r, A o, A gamma, A c1, A c2) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    A xhat = load_as<T, A>(x, i) * r + o;
    dx[i] = static_cast<T>(r * (gamma * dz[i] - c1 - xhat * c2));
  }
}

template <typename T, typename A>
inline void plane_grad_apply(const T* x, const T* dy, T* dx, int64_t count, A r, A o, A gamma, A beta, A c1, A c2) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    A xhat = load_as<T, A>(x, i) * r + o;
    A dz = load_as<T, A>(dy, i) * silu_grad_of<A>(xhat * gamma + beta);
    dx[i] = static_cast<T>(r * (gamma * dz - c1 - xhat * c2));
  }
}

// ---- NCHW ------------------------------------------------------------------------------------------------
template <typename T, typename A>
void forward_nchw(const T* x, const A* gamma, const A* beta, T* y, A* mean, A* rstd, int64_t N, int64_t C, int64_t HW,
                  int64_t G, double eps) {
  const int64_t cg = C / G, groups = N * G;
  std::vector<double> pmean(N * C), pm2(N * C);
  auto apply_group = [&](int64_t ng) {
    const int64_t c0 = (ng % G) * cg;
    for (int64_t k = 0; k < cg; ++k) {
      const int64_t p = ng * cg + k;
      const A a = rstd[ng] * gamma[c0 + k];
      plane_apply<T, A>(x + p * HW, y + p * HW, HW, a, beta[c0 + k] - mean[ng] * a);
    }
  };
  if (groups >= at::get_num_threads()) {
    // one task per group: its planes are still in this core's cache when the apply pass re-reads them
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ng = begin; ng < end; ++ng) {
        for (int64_t k = 0; k < cg; ++k) {
          const int64_t p = ng * cg + k;
          plane_moments<T, A>(x + p * HW, HW, pmean[p], pm2[p]);
        }
        merge_moments<A>(&pmean[ng * cg], &pm2[ng * cg], cg, 1, HW, eps, mean[ng], rstd[ng]);
        apply_group(ng);
      }
    });
    return;
  }
  // fewer groups than threads (batch 1, G = 1): spread the planes instead
  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) plane_moments<T, A>(x + p * HW, HW, pmean[p], pm2[p]);
  });
  for (int64_t ng = 0; ng < groups; ++ng)
    merge_moments<A>(&pmean[ng * cg], &pm2[ng * cg], cg, 1, HW, eps, mean[ng], rstd[ng]);
  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t ng = p / cg, c = p % C;
      const A a = rstd[ng] * gamma[c];
      plane_apply<T, A>(x + p * HW, y + p * HW, HW, a, beta[c] - mean[ng] * a);
    }
  });
}

template <typename T, typename A>
void backward_nchw(const T* dy, const T* x, const A* gamma, const A* beta, const A* mean, const A* rstd, T* dx,
                   double* dgamma, double* dbeta, int64_t N, int64_t C, int64_t HW, int64_t G) {
  const int64_t cg = C / G, groups = N * G;
  const double M = static_cast<double>(cg) * HW;
  std::vector<double> sdz(N * C), sdzx(N * C);
  auto plane_sums = [&](int64_t p) {
    const int64_t ng = p / cg, c = p % C;
    plane_grad_sums<T, A>(x + p * HW, dy + p * HW, HW, rstd[ng], -mean[ng] * rstd[ng], gamma[c], beta[c], sdz[p],
                          sdzx[p]);
  };
  auto group_coefficients = [&](int64_t ng, A& c1, A& c2) {
    const int64_t c0 = (ng % G) * cg;
    double k1 = 0, k2 = 0;
    for (int64_t k = 0; k < cg; ++k) {
      k1 += static_cast<double>(gamma[c0 + k]) * sdz[ng * cg + k];
      k2 += static_cast<double>(gamma[c0 + k]) * sdzx[ng * cg + k];
    }
    c1 = static_cast<A>(k1 / M);
    c2 = static_cast<A>(k2 / M);
  };
  auto plane_apply_grad = [&](int64_t p, A c1, A c2) {
    const int64_t ng = p / cg, c = p % C;
    plane_grad_apply<T, A>(x + p * HW, dy + p * HW, dx + p * HW, HW, rstd[ng], -mean[ng] * rstd[ng], gamma[c], beta[c],
                           c1, c2);
  };
  if (groups >= at::get_num_threads()) {
    // one task per group; its dz (cg * HW values, cache-sized at UNet shapes) is kept between the two passes
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> dz(cg * HW);
      for (int64_t ng = begin; ng < end; ++ng) {
        for (int64_t k = 0; k < cg; ++k) {
          const int64_t p = ng * cg + k, c = p % C;
          plane_grad_sums<T, A, true>(x + p * HW, dy + p * HW, HW, rstd[ng], -mean[ng] * rstd[ng], gamma[c], beta[c],
                                      sdz[p], sdzx[p], dz.data() + k * HW);
        }
        A c1, c2;
        group_coefficients(ng, c1, c2);
        for (int64_t k = 0; k < cg; ++k) {
          const int64_t p = ng * cg + k;
          plane_grad_apply_kept<T, A>(x + p * HW, dz.data() + k * HW, dx + p * HW, HW, rstd[ng], -mean[ng] * rstd[ng],
                                      gamma[p % C], c1, c2);
        }
      }
    });
  } else {
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) plane_sums(p);
    });
    std::vector<A> c1(groups), c2(groups);
    for (int64_t ng = 0; ng < groups; ++ng) group_coefficients(ng, c1[ng], c2[ng]);
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) plane_apply_grad(p, c1[p / cg], c2[p / cg]);
    });
  }
  for (int64_t c = 0; c < C; ++c) {
    double g = 0, b = 0;
    for (int64_t n = 0; n < N; ++n) {
      g += sdzx[n * C + c];
      b += sdz[n * C + c];
    }
    dgamma[c] = g;
    dbeta[c] = b;
  }
}

// ---- NHWC ------------------------------------------------------------------------------------------------
// Pixels of one image are cut into row blocks of about kRowBlockElements values; one task per (image, block).
constexpr int64_t kRowBlockElements = 16384;

inline int64_t rows_per_block(int64_t C, int64_t HW) {
  int64_t rows = kRowBlockElements / (C > 0 ? C : 1);
  return rows < 1 ? 1 : (rows > HW ? HW : rows);
}

template <typename T, typename A>
void forward_nhwc(const T* x, const A* gamma, const A* beta, T* y, A* mean, A* rstd, int64_t N, int64_t C, int64_t HW,
                  int64_t G, double eps) {
  const int64_t cg = C / G, rows = rows_per_block(C, HW), blocks = (HW + rows - 1) / rows;
  // per (image, block, channel) sums of (x - pivot_c) and its square, pivot_c = x[n, pixel 0, c]
  std::vector<double> ps(N * blocks * C), pq(N * blocks * C);
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> pivot(C), s(C), q(C);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, r0 = (task % blocks) * rows, r1 = r0 + rows < HW ? r0 + rows : HW;
      const T* image = x + n * HW * C;
      for (int64_t c = 0; c < C; ++c) {
        pivot[c] = load_as<T, A>(image, c);
        s[c] = 0;
        q[c] = 0;
      }
      for (int64_t r = r0; r < r1; ++r) {
        const T* row = image + r * C;
        A* sp = s.data();
        A* qp = q.data();
        const A* kp = pivot.data();
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          A d = load_as<T, A>(row, c) - kp[c];
          sp[c] += d;
          qp[c] += d * d;
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        ps[task * C + c] = s[c];
        pq[task * C + c] = q[c];
      }
    }
  });
  // per channel moments, then per group; then the per-channel affine a x + b of the apply pass
  std::vector<double> cmean(N * C), cm2(N * C);
  std::vector<A> a(N * C), b(N * C);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      double s = 0, q = 0;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        s += ps[(n * blocks + blk) * C + c];
        q += pq[(n * blocks + blk) * C + c];
      }
      const double m2 = q - s * s / HW;
      cmean[n * C + c] = static_cast<double>(load_as<T, A>(x + n * HW * C, c)) + s / HW;
      cm2[n * C + c] = m2 < 0 ? 0 : m2;
    }
    for (int64_t g = 0; g < G; ++g) {
      const int64_t ng = n * G + g;
      merge_moments<A>(&cmean[n * C + g * cg], &cm2[n * C + g * cg], cg, 1, HW, eps, mean[ng], rstd[ng]);
      for (int64_t k = 0; k < cg; ++k) {
        const int64_t c = g * cg + k;
        a[n * C + c] = rstd[ng] * gamma[c];
        b[n * C + c] = beta[c] - mean[ng] * a[n * C + c];
      }
    }
  }
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, r0 = (task % blocks) * rows, r1 = r0 + rows < HW ? r0 + rows : HW;
      const A* an = a.data() + n * C;
      const A* bn = b.data() + n * C;
      for (int64_t r = r0; r < r1; ++r) row_apply<T, A>(x + (n * HW + r) * C, y + (n * HW + r) * C, C, an, bn);
    }
  });
}

template <typename T, typename A>
void backward_nhwc(const T* dy, const T* x, const A* gamma, const A* beta, const A* mean, const A* rstd, T* dx,
                   double* dgamma, double* dbeta, int64_t N, int64_t C, int64_t HW, int64_t G) {
  const int64_t cg = C / G, rows = rows_per_block(C, HW), blocks = (HW + rows - 1) / rows;
  const double M = static_cast<double>(cg) * HW;
  // per (image, channel): xhat = x r + o with the group's statistics
  std::vector<A> r(N * C), o(N * C);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t ng = n * G + c / cg;
      r[n * C + c] = rstd[ng];
      o[n * C + c] = -mean[ng] * rstd[ng];
    }
  std::vector<double> ps(N * blocks * C), pq(N * blocks * C);
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> s(C), q(C);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, r0 = (task % blocks) * rows, r1 = r0 + rows < HW ? r0 + rows : HW;
      const A* rn = r.data() + n * C;
      const A* on = o.data() + n * C;
      std::fill(s.begin(), s.end(), A(0));
      std::fill(q.begin(), q.end(), A(0));
      A* sp = s.data();
      A* qp = q.data();
      for (int64_t row = r0; row < r1; ++row) {
        const T* xr = x + (n * HW + row) * C;
        const T* gr = dy + (n * HW + row) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          A xhat = load_as<T, A>(xr, c) * rn[c] + on[c];
          A dz = load_as<T, A>(gr, c) * silu_grad_of<A>(xhat * gamma[c] + beta[c]);
          sp[c] += dz;
          qp[c] += dz * xhat;
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        ps[task * C + c] = s[c];
        pq[task * C + c] = q[c];
      }
    }
  });
  std::vector<A> k1(N * C), k2(N * C);
  for (int64_t c = 0; c < C; ++c) {
    dgamma[c] = 0;
    dbeta[c] = 0;
  }
  std::vector<double> sdz(C), sdzx(C);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      double s = 0, q = 0;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        s += ps[(n * blocks + blk) * C + c];
        q += pq[(n * blocks + blk) * C + c];
      }
      sdz[c] = s;
      sdzx[c] = q;
      dbeta[c] += s;
      dgamma[c] += q;
    }
    for (int64_t g = 0; g < G; ++g) {
      double c1 = 0, c2 = 0;
      for (int64_t k = 0; k < cg; ++k) {
        c1 += static_cast<double>(gamma[g * cg + k]) * sdz[g * cg + k];
        c2 += static_cast<double>(gamma[g * cg + k]) * sdzx[g * cg + k];
      }
      for (int64_t k = 0; k < cg; ++k) {
        k1[n * C + g * cg + k] = static_cast<A>(c1 / M);
        k2[n * C + g * cg + k] = static_cast<A>(c2 / M);
      }
    }
  }
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, r0 = (task % blocks) * rows, r1 = r0 + rows < HW ? r0 + rows : HW;
      const A* rn = r.data() + n * C;
      const A* on = o.data() + n * C;
      const A* k1n = k1.data() + n * C;
      const A* k2n = k2.data() + n * C;
      for (int64_t row = r0; row < r1; ++row) {
        const T* xr = x + (n * HW + row) * C;
        const T* gr = dy + (n * HW + row) * C;
        T* dr = dx + (n * HW + row) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          A xhat = load_as<T, A>(xr, c) * rn[c] + on[c];
          A dz = load_as<T, A>(gr, c) * silu_grad_of<A>(xhat * gamma[c] + beta[c]);
          dr[c] = static_cast<T>(rn[c] * (gamma[c] * dz - k1n[c] - xhat * k2n[c]));
        }
      }
    }
  });
}
