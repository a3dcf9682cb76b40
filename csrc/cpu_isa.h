// The widest x86 SIMD clone both the CPU and ATen's dispatch allow. ATEN_CPU_CAPABILITY=default|avx2 caps it like
// it caps torch's own kernels, so the tests can run every clone on one machine.
#pragma once
#include <ATen/Version.h>  // at::get_cpu_capability

#include <string>

namespace tore_kernels {

enum class Isa { base, avx2, avx512 };

inline Isa cpu_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const Isa isa = [] {
    const std::string cap = at::get_cpu_capability();  // "DEFAULT", "AVX2", "AVX512" (after the cap)
    if (cap == "AVX512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq"))
      return Isa::avx512;
    if (cap != "DEFAULT" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
    return Isa::base;
  }();
  return isa;
#else
  return Isa::base;
#endif
}

}  // namespace tore_kernels
