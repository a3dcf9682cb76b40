// tore_kernels::cpu_isa() -> (clone the kernels run, widest clone the CPU can execute): "baseline", "avx2" or
// "avx512". For `tore-kernels info` / `bench` and for tests that run a clone only where the CPU can execute it.
#include <torch/library.h>

#include "cpu_isa.h"

#include <tuple>

namespace tore_kernels {
namespace {

std::tuple<std::string, std::string> cpu_isa_op() {
  return {isa_name(cpu_isa()), isa_name(hardware_isa())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tore_kernels, m) {
  m.def("cpu_isa() -> (str, str)", &cpu_isa_op);
}

}  // namespace tore_kernels
