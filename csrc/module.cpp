// The Python module of each native library (safeprune_engine._C and safeprune_engine._C_cuda). It binds nothing:
// the ops register themselves with the torch dispatcher (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL in the
// per-op files) when the shared library loads; this only makes the library importable.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "safeprune-engine native ops; use them through torch.ops.safeprune_C or safeprune_engine.ops";
}
