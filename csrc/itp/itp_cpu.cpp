// Image Token Pruner on CPU: everything after the conv3x3, fused (tore-model.md section 1).
//
// image_token_prune_post_conv(conv [B, C/4, H, W], features [B, C, H, W], fc_w [N, C/4], fc_b [N], ln_w [N, C],
// ln_b [N, C], eps, seq_first) -> (tokens [B, N, C] or [N, B, C], heatmap [B, N, H*W]), with `conv` the conv's
// output including its bias. One at::parallel_for over the batch (one fork/join instead of one per eager op);
// per sample, all intermediates stay in thread-local buffers (cache resident):
//   g  = GELU(conv)          [C/4, HWp]  positions padded to whole vectors
//   lg = fc_w @ g + fc_b     [N, HWp]    logits, already in the heatmap layout
//   a  = softmax over H*W    heatmap out, and transposed into at [HW, Np] (N padded to whole vectors)
//   zt = F @ at              [C, Np]     the pre-norm tokens transposed: the GEMM reads F in place
//   tokens = LayerNorm over [N, C] of zt^T, written straight into the output layout.
// The intermediates eager rounds to the input dtype (GELU output, logits, heatmap, pre-norm tokens) are
// rounded the same way here; arithmetic is fp32 (fp64 for fp64 inputs).
//
// The GEMMs are register-tiled micro-kernels on 32-byte GCC vectors; the sample function is compiled three times,
// for the baseline ISA, AVX2+FMA and AVX-512VL (more registers: bigger tiles), the widest the CPU has picked at run
// time. The LayerNorm write-out transposes L x L blocks of zt in registers.
// fp32 GELU uses the same erf approximation as ATen's vectorised CPU GELU (Abramowitz-Stegun 7.1.26,
// |error| < 1.5e-7); fp64 uses std::erf / std::exp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_isa.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace tore_kernels {
namespace {

#define TORE_INLINE inline __attribute__((always_inline))
#pragma GCC diagnostic ignored "-Wpsabi"  // vector types only cross always-inlined calls

template <typename T>
struct Vec {
  static constexpr int L = 32 / sizeof(T);
  typedef T V __attribute__((vector_size(32)));
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> I;
  typedef I VI __attribute__((vector_size(32)));
  static TORE_INLINE V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static TORE_INLINE void store(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  // a shuffle of lane 0: GCC emits one broadcast (V{} + s costs an add as 0 + -0 is +0, and a lane-by-lane
  // initialiser is built with inserts when the helper is compiled for the baseline ISA and inlined into AVX2)
  static TORE_INLINE V splat(T s) { return __builtin_shuffle(V{s}, VI{}); }
};

// exp for fp32 lanes: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial (Cephes expf), 2^n from the
// exponent bits. Inputs below -87.3 flush to 0 (the softmax only takes exp of non-positive numbers).
TORE_INLINE Vec<float>::V exp_f32(Vec<float>::V x) {
  using W = Vec<float>;
  x = x < W::splat(-87.3f) ? W::splat(-87.3f) : x;
  x = x > W::splat(88.3f) ? W::splat(88.3f) : x;
  W::V y = x * 1.44269504088896341f + 0.5f;
  W::V n = __builtin_convertvector(__builtin_convertvector(y, W::VI), W::V);
  n = n > y ? n - 1.0f : n;  // floor
  W::V r = x - n * 0.693359375f + n * 2.12194440e-4f;
  W::V p = W::splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  W::VI bits = (__builtin_convertvector(n, W::VI) + 127) << 23;
  W::V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

template <typename T>
TORE_INLINE typename Vec<T>::V vexp(typename Vec<T>::V x) {
  if constexpr (std::is_same_v<T, float>) {
    return exp_f32(x);
  } else {
    for (int i = 0; i < Vec<T>::L; ++i) x[i] = std::exp(x[i]);
    return x;
  }
}

template <typename T>
TORE_INLINE typename Vec<T>::V vgelu(typename Vec<T>::V x) {
  if constexpr (std::is_same_v<T, float>) {
    using W = Vec<float>;
    const W::V u = x * 0.70710678118654752f;
    const W::V au = u < 0.0f ? -u : u;
    const W::V t = 1.0f / (au * 0.3275911f + 1.0f);
    W::V p = W::splat(1.061405429f);
    p = p * t - 1.453152027f;
    p = p * t + 1.421413741f;
    p = p * t - 0.284496736f;
    p = p * t + 0.254829592f;
    const W::V e = 1.0f - p * t * exp_f32(-au * au);
    return x * 0.5f * (1.0f + (u < 0.0f ? -e : e));
  } else {
    for (int i = 0; i < Vec<T>::L; ++i) x[i] = T(0.5) * x[i] * (T(1) + std::erf(x[i] * T(M_SQRT1_2)));
    return x;
  }
}

// Out[r, v] (+ bias[r]) = sum_k A[r, k] * B[k, v] for a tile of R rows x NV vectors: A read element-wise
// (broadcast), B and Out whole vectors. R*NV independent accumulators hide the FMA latency.
template <int R, int NV, typename T, typename A_t>
TORE_INLINE void tile(const A_t* a, int64_t lda, const T* b, int64_t ldb, T* out, int64_t ldo, int64_t K,
                      const A_t* bias) {
  using W = Vec<T>;
  typename W::V acc[R][NV] = {};
  for (int64_t k = 0; k < K; ++k) {
    typename W::V bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = W::load(b + k * ldb + j * W::L);
    for (int i = 0; i < R; ++i) {
      const typename W::V av = W::splat(T(a[i * lda + k]));
      for (int j = 0; j < NV; ++j) acc[i][j] += av * bv[j];
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NV; ++j)
      W::store(out + i * ldo + j * W::L, bias ? acc[i][j] + T(bias[i]) : acc[i][j]);
}

// Out [M, NVt vectors] = A [M, K] @ B [K, NVt vectors] (+ bias per row) in tiles of R rows x NV vectors (R*NV
// accumulators + NV loads + 1 broadcast must fit the register file), narrower and shorter tiles at the edges.
template <int R, int NV, typename T, typename A_t>
TORE_INLINE void gemm_rows(const A_t* a, int64_t lda, const T* b, int64_t ldb, T* out, int64_t ldo, int64_t NVt,
                           int64_t K, const A_t* bias) {
  constexpr int L = Vec<T>::L;
  int64_t v = 0;
  for (; v + NV <= NVt; v += NV) tile<R, NV>(a, lda, b + v * L, ldb, out + v * L, ldo, K, bias);
  if constexpr (NV > 1)
    if (v < NVt) gemm_rows<R, NV - 1>(a, lda, b + v * L, ldb, out + v * L, ldo, NVt - v, K, bias);
}

template <int R, int NV, typename T, typename A_t>
TORE_INLINE void gemm_tail(const A_t* a, int64_t lda, const T* b, int64_t ldb, T* out, int64_t ldo, int64_t M,
                           int64_t NVt, int64_t K, const A_t* bias) {
  if constexpr (R > 0) {
    if (M == R) return gemm_rows<R, NV>(a, lda, b, ldb, out, ldo, NVt, K, bias);
    gemm_tail<R - 1, NV>(a, lda, b, ldb, out, ldo, M, NVt, K, bias);
  }
}

template <int R, int NV, typename T, typename A_t>
TORE_INLINE void gemm(const A_t* a, int64_t lda, const T* b, int64_t ldb, T* out, int64_t ldo, int64_t M,
                      int64_t NVt, int64_t K, const A_t* bias) {
  int64_t r = 0;
  for (; r + R <= M; r += R)
    gemm_rows<R, NV>(a + r * lda, lda, b, ldb, out + r * ldo, ldo, NVt, K, bias ? bias + r : bias);
  gemm_tail<R - 1, NV>(a + r * lda, lda, b, ldb, out + r * ldo, ldo, M - r, NVt, K, bias ? bias + r : bias);
}

// r[i][j] <- r[j][i] for an L x L block: log2(L) rounds of two-input shuffles (unpack, then pairs, then halves)
template <typename T>
TORE_INLINE void transpose(typename Vec<T>::V* r) {
  using W = Vec<T>;
  using VI = typename W::VI;
  typename W::V t[W::L];
  if constexpr (W::L == 8) {
    for (int i = 0; i < 8; i += 2) {
      t[i] = __builtin_shuffle(r[i], r[i + 1], VI{0, 8, 1, 9, 4, 12, 5, 13});
      t[i + 1] = __builtin_shuffle(r[i], r[i + 1], VI{2, 10, 3, 11, 6, 14, 7, 15});
    }
    for (int i = 0; i < 8; i += 4)
      for (int j = 0; j < 2; ++j) {
        r[i + 2 * j] = __builtin_shuffle(t[i + j], t[i + j + 2], VI{0, 1, 8, 9, 4, 5, 12, 13});
        r[i + 2 * j + 1] = __builtin_shuffle(t[i + j], t[i + j + 2], VI{2, 3, 10, 11, 6, 7, 14, 15});
      }
    for (int k = 0; k < 4; ++k) {
      t[k] = __builtin_shuffle(r[k], r[k + 4], VI{0, 1, 2, 3, 8, 9, 10, 11});
      t[k + 4] = __builtin_shuffle(r[k], r[k + 4], VI{4, 5, 6, 7, 12, 13, 14, 15});
    }
  } else {
    static_assert(W::L == 4);
    for (int i = 0; i < 4; i += 2) {
      t[i] = __builtin_shuffle(r[i], r[i + 1], VI{0, 4, 2, 6});
      t[i + 1] = __builtin_shuffle(r[i], r[i + 1], VI{1, 5, 3, 7});
    }
    for (int k = 0; k < 2; ++k) {
      const typename W::V lo = __builtin_shuffle(t[k], t[k + 2], VI{0, 1, 4, 5});
      t[k + 2] = __builtin_shuffle(t[k], t[k + 2], VI{2, 3, 6, 7});
      t[k] = lo;
    }
  }
  for (int k = 0; k < W::L; ++k) r[k] = t[k];
}

// L consecutive scalar_t as a vector of T (a plain load when they are the same type), and back
template <typename T, typename scalar_t>
TORE_INLINE void load_as(const scalar_t* p, typename Vec<T>::V& v) {
  if constexpr (std::is_same_v<scalar_t, T>) v = Vec<T>::load(p);
  else for (int j = 0; j < Vec<T>::L; ++j) v[j] = T(p[j]);
}

template <typename scalar_t, typename T>
TORE_INLINE void store_as(scalar_t* p, typename Vec<T>::V v) {
  if constexpr (std::is_same_v<scalar_t, T>) Vec<T>::store(p, v);
  else for (int j = 0; j < Vec<T>::L; ++j) p[j] = scalar_t(v[j]);
}

struct Shape {
  int64_t B, C, C4, HW, N, HWp, Np;
  double eps;
  int64_t tok_sb, tok_sn;  // tokens' batch and token strides (the channel stride is 1)
};

template <typename scalar_t>
struct Buffers {
  using T = at::opmath_type<scalar_t>;
  std::vector<T> g, lg, at, zt;
  explicit Buffers(const Shape& s)
      : g(s.C4 * s.HWp), lg(s.N * s.HWp), at(s.HW * s.Np, T(0)), zt(s.C * s.Np) {}
};

template <typename scalar_t, typename T>
TORE_INLINE T round_to(T v) {  // the rounding eager applies when it stores an intermediate in scalar_t
  if constexpr (std::is_same_v<scalar_t, T>) return v;
  else return T(scalar_t(v));
}

template <int R, int NV, typename scalar_t>
TORE_INLINE void sample_body(const Shape& s, int64_t b, const scalar_t* conv, const scalar_t* x, const scalar_t* fw,
                             const scalar_t* fb, const scalar_t* lw, const scalar_t* lb, scalar_t* tok,
                             scalar_t* heat, Buffers<scalar_t>& buf) {
  using T = at::opmath_type<scalar_t>;
  using W = Vec<T>;
  constexpr int L = W::L;
  const int64_t C = s.C, C4 = s.C4, HW = s.HW, N = s.N, HWp = s.HWp, Np = s.Np;
  const scalar_t* hb = conv + b * C4 * HW;
  const scalar_t* xb = x + b * C * HW;
  T *g = buf.g.data(), *lg = buf.lg.data(), *at = buf.at.data(), *zt = buf.zt.data();

  // GELU, rounded to scalar_t; padded positions are 0 (they stay finite through the GEMM and are dropped)
  for (int64_t co = 0; co < C4; ++co) {
    T* gr = g + co * HWp;
    for (int64_t p = 0; p < HW; ++p) gr[p] = T(hb[co * HW + p]);
    for (int64_t p = HW; p < HWp; ++p) gr[p] = T(0);
    for (int64_t p = 0; p < HWp; p += L) W::store(gr + p, vgelu<T>(W::load(gr + p)));
    for (int64_t p = 0; p < HW; ++p) gr[p] = round_to<scalar_t>(gr[p]);
  }
  // logits = fc_w @ g + fc_b
  gemm<R, NV, T, scalar_t>(fw, C4, g, HWp, lg, HWp, N, HWp / L, C4, fb);
  // softmax over the H*W positions of each row: heatmap out, and at = heatmap^T [HW, Np] for the projection
  scalar_t* hr = heat + b * N * HW;
  for (int64_t n = 0; n < N; ++n) {
    T* row = lg + n * HWp;
    T mx = -std::numeric_limits<T>::infinity();
    for (int64_t p = 0; p < HW; ++p) mx = std::max(mx, row[p] = round_to<scalar_t>(row[p]));
    for (int64_t p = 0; p < HWp; p += L) W::store(row + p, vexp<T>(W::load(row + p) - mx));
    T sum = 0;
    for (int64_t p = 0; p < HW; ++p) sum += row[p];
    const T inv = T(1) / sum;
    for (int64_t p = 0; p < HW; ++p) {
      const scalar_t a = scalar_t(row[p] * inv);
      hr[n * HW + p] = a;
      at[p * Np + n] = T(a);
    }
  }
  // zt = F @ at ([C, HW] @ [HW, Np]): the pre-norm tokens transposed, vectorised along N and reading F in place
  gemm<R, NV, T, scalar_t>(xb, HW, at, Np, zt, Np, C, Np / L, HW, nullptr);
  // LayerNorm statistics over [N, C] (zt rounded to scalar_t as eager's bmm output). Columns n >= N of zt are
  // exactly 0 (so are those of at); `valid` masks them out of the squared deviations.
  typename W::V valid;
  for (int j = 0; j < L; ++j) valid[j] = (Np - L + j) < N ? T(1) : T(0);
  typename W::V vs = {};
  for (int64_t i = 0; i < C * Np; i += L) {
    typename W::V v = W::load(zt + i);
    if constexpr (!std::is_same_v<scalar_t, T>) {
      for (int j = 0; j < L; ++j) v[j] = round_to<scalar_t>(v[j]);
      W::store(zt + i, v);
    }
    vs += v;
  }
  double sum = 0;
  for (int j = 0; j < L; ++j) sum += vs[j];
  const T mean = T(sum / double(N * C));
  typename W::V vm = {};
  for (int64_t c = 0; c < C; ++c) {
    const T* zr = zt + c * Np;
    for (int64_t n = 0; n + L < Np; n += L) {
      const typename W::V d = W::load(zr + n) - mean;
      vm += d * d;
    }
    const typename W::V d = (W::load(zr + Np - L) - mean) * valid;
    vm += d * d;
  }
  double m2 = 0;
  for (int j = 0; j < L; ++j) m2 += vm[j];
  const T rstd = T(1.0 / std::sqrt(m2 / double(N * C) + s.eps));
  // tokens[n, c] = (zt[c, n] - mean) * rstd * ln_w[n, c] + ln_b[n, c]: L x L blocks of zt transposed in registers,
  // each column then one contiguous run of L channels of an output row
  scalar_t* tb = tok + b * s.tok_sb;
  const int64_t Cv = C / L * L;
  for (int64_t n0 = 0; n0 < N; n0 += L) {
    const int64_t nn = std::min<int64_t>(L, N - n0);
    for (int64_t c0 = 0; c0 < Cv; c0 += L) {
      typename W::V r[L];
      for (int j = 0; j < L; ++j) r[j] = W::load(zt + (c0 + j) * Np + n0);
      transpose<T>(r);
      for (int64_t k = 0; k < nn; ++k) {
        const int64_t n = n0 + k;
        typename W::V wv, bv;
        load_as<T>(lw + n * C + c0, wv);
        load_as<T>(lb + n * C + c0, bv);
        store_as<scalar_t, T>(tb + n * s.tok_sn + c0, (r[k] - mean) * rstd * wv + bv);
      }
    }
  }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = Cv; c < C; ++c)
      tb[n * s.tok_sn + c] = scalar_t((zt[c * Np + n] - mean) * rstd * T(lw[n * C + c]) + T(lb[n * C + c]));
}

// Every dtype's sample function is compiled per ISA (the baseline build splits each 32-byte vector op and is many
// times slower). Register tiles: 6 x 2 with 16 vector registers (baseline, AVX2); 4 x 5 with AVX-512VL's 32, still
// 32-byte vectors (F @ at's Np = 40 columns are 5 of them, and Zen 4 splits 64-byte FMAs in two anyway).
template <typename scalar_t>
void sample_default(const Shape& s, int64_t b, const scalar_t* conv, const scalar_t* x, const scalar_t* fw,
                    const scalar_t* fb, const scalar_t* lw, const scalar_t* lb, scalar_t* tok, scalar_t* heat,
                    Buffers<scalar_t>& buf) {
  sample_body<6, 2>(s, b, conv, x, fw, fb, lw, lb, tok, heat, buf);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TORE_ITP_X86 1
template <typename scalar_t>
__attribute__((target("avx2,fma"))) void sample_avx2(const Shape& s, int64_t b, const scalar_t* conv,
                                                     const scalar_t* x, const scalar_t* fw, const scalar_t* fb,
                                                     const scalar_t* lw, const scalar_t* lb, scalar_t* tok,
                                                     scalar_t* heat, Buffers<scalar_t>& buf) {
  sample_body<6, 2>(s, b, conv, x, fw, fb, lw, lb, tok, heat, buf);
}

template <typename scalar_t>
__attribute__((target("avx2,fma,avx512f,avx512vl"))) void sample_avx512(
    const Shape& s, int64_t b, const scalar_t* conv, const scalar_t* x, const scalar_t* fw, const scalar_t* fb,
    const scalar_t* lw, const scalar_t* lb, scalar_t* tok, scalar_t* heat, Buffers<scalar_t>& buf) {
  sample_body<4, 5>(s, b, conv, x, fw, fb, lw, lb, tok, heat, buf);
}

#endif

template <typename scalar_t>
void run_sample(int isa, const Shape& s, int64_t b, const scalar_t* conv, const scalar_t* x, const scalar_t* fw,
                const scalar_t* fb, const scalar_t* lw, const scalar_t* lb, scalar_t* tok, scalar_t* heat,
                Buffers<scalar_t>& buf) {
#ifdef TORE_ITP_X86
  if (isa == int(Isa::avx512)) return sample_avx512(s, b, conv, x, fw, fb, lw, lb, tok, heat, buf);
  if (isa == int(Isa::avx2)) return sample_avx2(s, b, conv, x, fw, fb, lw, lb, tok, heat, buf);
#endif
  sample_default(s, b, conv, x, fw, fb, lw, lb, tok, heat, buf);
}

std::tuple<at::Tensor, at::Tensor> image_token_prune_post_conv_cpu(const at::Tensor& conv, const at::Tensor& x,
                                                                   const at::Tensor& fw, const at::Tensor& fb,
                                                                   const at::Tensor& lw, const at::Tensor& lb,
                                                                   double eps, bool seq_first) {
  TORCH_CHECK(x.dim() == 4 && x.size(1) % 4 == 0, "image_token_prune_post_conv: features must be [B, C, H, W] "
              "with C a multiple of 4, got ", x.sizes());
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  TORCH_CHECK(fw.dim() == 2 && fw.size(1) == C / 4, "image_token_prune_post_conv: fc_weight must be [N, C/4], got ",
              fw.sizes());
  const int64_t N = fw.size(0);
  TORCH_CHECK(conv.sizes() == at::IntArrayRef({B, C / 4, x.size(2), x.size(3)}),
              "image_token_prune_post_conv: conv must be [B, C/4, H, W] = ", at::IntArrayRef({B, C / 4, x.size(2),
              x.size(3)}), ", got ", conv.sizes());
  TORCH_CHECK(fb.sizes() == at::IntArrayRef({N}) && lw.sizes() == at::IntArrayRef({N, C}) &&
              lb.sizes() == at::IntArrayRef({N, C}), "image_token_prune_post_conv: fc_bias must be [N], ln_weight and "
              "ln_bias [N, C] with N = ", N, ", C = ", C);
  TORCH_CHECK(N >= 1 && N <= HW && HW >= 1, "image_token_prune_post_conv: need 1 <= N <= H*W, got N = ", N,
              ", H*W = ", HW);
  for (const at::Tensor* t : {&conv, &fw, &fb, &lw, &lb}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "image_token_prune_post_conv: every tensor must be ",
                x.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device().is_cpu() && x.device().is_cpu(), "image_token_prune_post_conv: the CPU kernel takes "
                "CPU tensors");
  }
  const at::Tensor conv_c = conv.contiguous(), x_c = x.contiguous(), fw_c = fw.contiguous(), fb_c = fb.contiguous();
  const at::Tensor lw_c = lw.contiguous(), lb_c = lb.contiguous();
  at::Tensor tokens = seq_first ? at::empty({N, B, C}, x.options()) : at::empty({B, N, C}, x.options());
  at::Tensor heatmap = at::empty({B, N, HW}, x.options());
#ifdef TORE_ITP_X86
  const int isa = int(cpu_isa());
#else
  const int isa = 0;
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "image_token_prune_post_conv", [&] {
    using T = at::opmath_type<scalar_t>;
    constexpr int64_t L = Vec<T>::L;
    const Shape s{B, C, C / 4, HW, N, (HW + L - 1) / L * L, (N + L - 1) / L * L, eps,
                  seq_first ? C : N * C, seq_first ? B * C : C};
    const scalar_t *cp = conv_c.const_data_ptr<scalar_t>(), *xp = x_c.const_data_ptr<scalar_t>(),
                   *fwp = fw_c.const_data_ptr<scalar_t>(), *fbp = fb_c.const_data_ptr<scalar_t>();
    const scalar_t *lwp = lw_c.const_data_ptr<scalar_t>(), *lbp = lb_c.const_data_ptr<scalar_t>();
    scalar_t *tp = tokens.data_ptr<scalar_t>(), *hp = heatmap.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      Buffers<scalar_t> buf(s);
      for (int64_t b = begin; b < end; ++b) run_sample(isa, s, b, cp, xp, fwp, fbp, lwp, lbp, tp, hp, buf);
    });
  });
  return {tokens, heatmap};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tore_kernels, m) {
  m.def("image_token_prune_post_conv(Tensor conv, Tensor features, Tensor fc_weight, Tensor fc_bias, "
        "Tensor ln_weight, Tensor ln_bias, float eps, bool seq_first) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tore_kernels, CPU, m) {
  m.impl("image_token_prune_post_conv", &image_token_prune_post_conv_cpu);
}

}  // namespace tore_kernels
