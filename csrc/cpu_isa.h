// The x86 SIMD clones of the C++ CPU kernels: the widest the CPU can execute (hardware_isa) and the widest both the
// CPU and ATen's dispatch allow (cpu_isa), which the kernels run. ATEN_CPU_CAPABILITY=default|avx2 caps it like it
// caps torch's own kernels, so the tests can run every clone on one machine. Off x86 (aarch64) there is one,
// portable, build.
#pragma once
#include <ATen/Version.h>  // at::get_cpu_capability

#include <string>

namespace tore_kernels {

enum class Isa { base, avx2, avx512 };

inline const char* isa_name(Isa isa) {
  return isa == Isa::avx512 ? "avx512" : isa == Isa::avx2 ? "avx2" : "baseline";
}

// AVX-512 as ATen's AVX512 kernels need it (F, BW, VL, DQ); AVX2 with FMA.
inline Isa hardware_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma"))
      return Isa::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
    return Isa::base;
  }();
  return isa;
#else
  return Isa::base;
#endif
}

inline Isa cpu_isa() {
  static const Isa isa = [] {
    const std::string cap = at::get_cpu_capability();  // "DEFAULT", "AVX2", "AVX512" (after the cap)
    const Isa hw = hardware_isa();
    if (cap == "AVX512" && hw == Isa::avx512) return Isa::avx512;
    if ((cap == "AVX512" || cap == "AVX2") && hw != Isa::base) return Isa::avx2;
    return Isa::base;
  }();
  return isa;
}

}  // namespace tore_kernels
