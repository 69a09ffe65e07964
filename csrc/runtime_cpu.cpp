// Facts about the CPU library at run time, for `python -m safeprune_engine.info` and the tests:
//   safeprune_C::cpu_isa() -> str: the instruction set the CPU kernels use now ("avx512", "avx2", "generic").
#include <string>

#include "checks.h"
#include "cpu_isa.h"

namespace {
std::string cpu_isa_in_use() { return safeprune::cpu_isa_name(safeprune::cpu_isa()); }
}  // namespace

TORCH_LIBRARY_FRAGMENT(safeprune_C, m) { m.def("cpu_isa() -> str", &cpu_isa_in_use); }
