// few_rows_linear: y = x @ W^T + bias (then ReLU) for a few rows of x (one sample's joint tokens: 14-16 rows), W
// packed once into 32-column panels [N / 32, K, 32]. A panel is streamed once per row tile while every row's
// partial sums stay in registers, and the panels are split over the threads; oneDNN and MKL block such products
// for many rows and run them at half the speed or less (14 x 512 x 512 on 2 Zen 4 cores: 35-58 against 57-89 us;
// 14 x 128 x 128: 4-11 against 20-42 us).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_isa.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <memory>
#include <utility>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define TORE_FR_X86 1
#endif

namespace tore_kernels {
namespace {

constexpr int64_t kPanel = 32;  // columns per packed panel

// Arguments of one row tile times one panel: rows of x at x + r * ldx (K floats each), the panel's [K, 32] block,
// its 32 bias values (or nullptr), y rows at y + r * ldy.
struct TileArgs {
  const float* x;
  int64_t ldx, K;
  const float* w;
  const float* bias;
  bool relu;
  float* y;
  int64_t ldy;
};

// Portable: any row count, the compiler vectorises the 32-column loops.
void tile_portable(const TileArgs& a, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r) {
    float acc[kPanel];
    for (int64_t c = 0; c < kPanel; ++c) acc[c] = a.bias ? a.bias[c] : 0.0f;
    const float* xr = a.x + r * a.ldx;
    for (int64_t k = 0; k < a.K; ++k)
      for (int64_t c = 0; c < kPanel; ++c) acc[c] += xr[k] * a.w[k * kPanel + c];
    for (int64_t c = 0; c < kPanel; ++c) a.y[r * a.ldy + c] = a.relu ? std::max(acc[c], 0.0f) : acc[c];
  }
}

#ifdef TORE_FR_X86
// AVX-512: M rows x 32 columns of sums in 2M registers (M <= 14 of the 32), each weight vector loaded once per k
// and used by every row.
template <int M>
__attribute__((target("avx2,fma,avx512f,avx512dq,avx512vl,avx512bw"))) void tile_avx512(const TileArgs& a) {
  __m512 acc[M][2];
  const __m512 b0 = a.bias ? _mm512_loadu_ps(a.bias) : _mm512_setzero_ps();
  const __m512 b1 = a.bias ? _mm512_loadu_ps(a.bias + 16) : _mm512_setzero_ps();
  for (int r = 0; r < M; ++r) acc[r][0] = b0, acc[r][1] = b1;
  for (int64_t k = 0; k < a.K; ++k) {
    const float* w = a.w + k * kPanel;
    _mm_prefetch(reinterpret_cast<const char*>(w + 8 * kPanel), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + 8 * kPanel + 16), _MM_HINT_T0);
    const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16);
#pragma GCC unroll 14
    for (int r = 0; r < M; ++r) {
      const __m512 xr = _mm512_set1_ps(a.x[r * a.ldx + k]);
      acc[r][0] = _mm512_fmadd_ps(xr, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(xr, w1, acc[r][1]);
    }
  }
  const __m512 zero = _mm512_setzero_ps();
  for (int r = 0; r < M; ++r) {
    if (a.relu) {  // the masked form: GCC 12 warns about _mm512_max_ps's undefined pass-through operand
      acc[r][0] = _mm512_mask_max_ps(acc[r][0], 0xFFFF, acc[r][0], zero);
      acc[r][1] = _mm512_mask_max_ps(acc[r][1], 0xFFFF, acc[r][1], zero);
    }
    _mm512_storeu_ps(a.y + r * a.ldy, acc[r][0]);
    _mm512_storeu_ps(a.y + r * a.ldy + 16, acc[r][1]);
  }
}

// AVX2: 16 registers, so M <= 6 rows x 16 columns (12 sums), each half of the panel in turn. The first half's
// pass prefetches both halves 8 rows ahead, as the AVX-512 tile does: in a forward each weight comes from memory
// (capped at AVX2 on 2 Zen 4 cores, weights cycled through 64 MB: 14 x 512 x 2048 1.2x faster than without).
template <int M>
__attribute__((target("avx2,fma"))) void tile_avx2(const TileArgs& a) {
  for (int half = 0; half < 2; ++half) {
    __m256 acc[M][2];
    const float* bias = a.bias ? a.bias + 16 * half : nullptr;
    const __m256 b0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
    const __m256 b1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
    for (int r = 0; r < M; ++r) acc[r][0] = b0, acc[r][1] = b1;
    for (int64_t k = 0; k < a.K; ++k) {
      const float* w = a.w + k * kPanel + 16 * half;
      if (half == 0) {  // both halves' lines: the second pass then reads the panel from cache, not memory
        _mm_prefetch(reinterpret_cast<const char*>(w + 8 * kPanel), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(w + 8 * kPanel + 16), _MM_HINT_T0);
      }
      const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
#pragma GCC unroll 6
      for (int r = 0; r < M; ++r) {
        const __m256 xr = _mm256_broadcast_ss(a.x + r * a.ldx + k);
        acc[r][0] = _mm256_fmadd_ps(xr, w0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(xr, w1, acc[r][1]);
      }
    }
    const __m256 zero = _mm256_setzero_ps();
    for (int r = 0; r < M; ++r) {
      if (a.relu) acc[r][0] = _mm256_max_ps(acc[r][0], zero), acc[r][1] = _mm256_max_ps(acc[r][1], zero);
      _mm256_storeu_ps(a.y + r * a.ldy + 16 * half, acc[r][0]);
      _mm256_storeu_ps(a.y + r * a.ldy + 16 * half + 8, acc[r][1]);
    }
  }
}

using TileFn = void (*)(const TileArgs&);
template <int... I>
constexpr std::array<TileFn, sizeof...(I)> avx512_tiles(std::integer_sequence<int, I...>) {
  return {&tile_avx512<I + 1>...};
}
template <int... I>
constexpr std::array<TileFn, sizeof...(I)> avx2_tiles(std::integer_sequence<int, I...>) {
  return {&tile_avx2<I + 1>...};
}
constexpr auto kAvx512Tiles = avx512_tiles(std::make_integer_sequence<int, 14>{});
constexpr auto kAvx2Tiles = avx2_tiles(std::make_integer_sequence<int, 6>{});
#endif

// The most rows one tile of the clone ATen's dispatch allows on this CPU holds (cpu_isa.h).
int64_t max_tile_rows() {
#ifdef TORE_FR_X86
  if (cpu_isa() == Isa::avx512) return static_cast<int64_t>(kAvx512Tiles.size());
  if (cpu_isa() == Isa::avx2) return static_cast<int64_t>(kAvx2Tiles.size());
#endif
  return 16;
}

void run_tile(const TileArgs& a, int64_t rows) {
#ifdef TORE_FR_X86
  if (cpu_isa() == Isa::avx512) return kAvx512Tiles[rows - 1](a);
  if (cpu_isa() == Isa::avx2) return kAvx2Tiles[rows - 1](a);
#endif
  tile_portable(a, rows);
}

at::Tensor few_rows_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                               bool relu) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat,
              "few_rows_linear: x must be a 2-D float32 [M, K] tensor, got ", x.dim(), "-D ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(packed.dim() == 3 && packed.size(1) == K && packed.size(2) == kPanel &&
                  packed.scalar_type() == at::kFloat && packed.is_contiguous(),
              "few_rows_linear: packed must be a contiguous float32 [N / 32, K = ", K,
              ", 32] tensor (pack_few_rows_weight), got ", packed.scalar_type(), " ", packed.sizes());
  const int64_t panels = packed.size(0), N = panels * kPanel;
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous() &&
                                    bias->scalar_type() == at::kFloat),
              "few_rows_linear: bias must be a contiguous float32 [N = ", N, "] tensor");
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  // The tile reads its rows of x at the same column together: rows a multiple of 4 KB apart (K = 1024, 2048)
  // share one L1 set and evict each other, so there x is copied to rows K + 16 floats apart (read in place, 14-40
  // x 2048 x 512 ran 0.85x as fast). Other contiguous x is read in place: the copy is serial work before the
  // threads start (in place 1.04-1.27x per call at 6-40 x 128-512, AVX-512 and AVX2 tiles, on an AMD EPYC (Zen 4)).
  const bool in_place = x.is_contiguous() && K % 1024 != 0;
  const int64_t ldx = in_place ? K : K + 16;
  std::unique_ptr<float[]> copy(in_place ? nullptr : new float[M * ldx]);
  const float* xs = in_place ? x.const_data_ptr<float>() : copy.get();
  if (!in_place) {
    const at::Tensor xc = x.contiguous();
    for (int64_t r = 0; r < M && K > 0; ++r)
      std::memcpy(copy.get() + r * ldx, xc.const_data_ptr<float>() + r * K, K * sizeof(float));
  }
  const float* w = packed.const_data_ptr<float>();
  const float* b = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
  float* out = y.data_ptr<float>();
  const int64_t tiles = (M + max_tile_rows() - 1) / max_tile_rows();  // row tiles of near-equal size
  // at least 2^18 multiply-adds per task: the smallest products run on one thread, without waking the others
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, M * K * kPanel));
  at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      for (int64_t t = 0, r0 = 0; t < tiles; ++t) {
        const int64_t rows = (M - r0) / (tiles - t);
        run_tile(TileArgs{xs + r0 * ldx, ldx, K, w + p * K * kPanel, b ? b + p * kPanel : nullptr, relu,
                          out + r0 * N + p * kPanel, N},
                 rows);
        r0 += rows;
      }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tore_kernels, m) {
  m.def("few_rows_linear(Tensor x, Tensor packed, Tensor? bias, bool relu) -> Tensor");
}

TORCH_LIBRARY_IMPL(tore_kernels, CPU, m) {
  m.impl("few_rows_linear", &few_rows_linear_cpu);
}

}  // namespace tore_kernels
