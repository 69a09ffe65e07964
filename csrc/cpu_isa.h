// Run-time choice of the instruction set for the CPU kernels.
//
// A kernel body lives in a header that is included three times, inside namespaces generic, avx2 and avx512,
// the last two under `#pragma GCC target`, so one shared library carries an SSE2 baseline plus AVX2/AVX-512
// copies and picks one per call from the running CPU (the wheel stays portable; loops vectorise through
// `#pragma omp simd`). SAFEPRUNE_CPU_ISA=generic|avx2|avx512 forces a lower one (tests use it to check
// every copy); asking for more than the CPU has gives the best it has.
#pragma once

#include <cstdlib>
#include <cstring>

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define SAFEPRUNE_X86_MULTI_ISA 1
#else
#define SAFEPRUNE_X86_MULTI_ISA 0
#endif

namespace safeprune {

enum class CpuIsa { generic = 0, avx2 = 1, avx512 = 2 };

inline CpuIsa detected_cpu_isa() {
#if SAFEPRUNE_X86_MULTI_ISA
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma"))
    return CpuIsa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::avx2;
#endif
  return CpuIsa::generic;
}

inline CpuIsa cpu_isa() {
  static const CpuIsa detected = detected_cpu_isa();
  const char* requested = std::getenv("SAFEPRUNE_CPU_ISA");
  CpuIsa wanted = detected;
  if (requested != nullptr) {
    if (std::strcmp(requested, "generic") == 0) wanted = CpuIsa::generic;
    else if (std::strcmp(requested, "avx2") == 0) wanted = CpuIsa::avx2;
  }
  return static_cast<int>(wanted) < static_cast<int>(detected) ? wanted : detected;
}

inline const char* cpu_isa_name(CpuIsa isa) {
  return isa == CpuIsa::avx512 ? "avx512" : isa == CpuIsa::avx2 ? "avx2" : "generic";
}

}  // namespace safeprune

// SAFEPRUNE_FOR_EACH_ISA(call): `call` is an expression naming `isa_ns::function(...)`; runs the copy that
// matches cpu_isa(). Kernel namespaces: safeprune::<op>::{generic, avx2, avx512}.
#if SAFEPRUNE_X86_MULTI_ISA
#define SAFEPRUNE_ISA_SWITCH(OP_NS, CALL)                              \
  do {                                                                 \
    switch (::safeprune::cpu_isa()) {                                  \
      case ::safeprune::CpuIsa::avx512: { namespace isa_ns = OP_NS::avx512; CALL; break; } \
      case ::safeprune::CpuIsa::avx2: { namespace isa_ns = OP_NS::avx2; CALL; break; }     \
      default: { namespace isa_ns = OP_NS::generic; CALL; break; }                         \
    }                                                                  \
  } while (0)
#else
#define SAFEPRUNE_ISA_SWITCH(OP_NS, CALL) \
  do {                                    \
    namespace isa_ns = OP_NS::generic;    \
    CALL;                                 \
  } while (0)
#endif
