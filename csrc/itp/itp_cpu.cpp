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
// The GEMMs are register-tiled micro-kernels on 32-byte GCC vectors; the fp32 build of the sample function
// is compiled twice, for AVX2+FMA (picked at run time when the CPU has both) and for the baseline ISA.
// fp32 GELU uses the same erf approximation as ATen's vectorised CPU GELU (Abramowitz-Stegun 7.1.26,
// |error| < 1.5e-7); fp64 uses std::erf / std::exp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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
  static TORE_INLINE V splat(T s) { return V{} + s; }
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

// Out [M, NVt vectors] = A [M, K] @ B [K, NVt vectors] (+ bias per row): tiles of 6 rows x 2 vectors (12
// accumulators + 2 loads + 1 broadcast: AVX2's 16 registers), smaller tiles at the edges.
template <int R, typename T, typename A_t>
TORE_INLINE void gemm_rows(const A_t* a, int64_t lda, const T* b, int64_t ldb, T* out, int64_t ldo, int64_t NVt,
                           int64_t K, const A_t* bias) {
  constexpr int L = Vec<T>::L;
  int64_t v = 0;
  for (; v + 2 <= NVt; v += 2) tile<R, 2>(a, lda, b + v * L, ldb, out + v * L, ldo, K, bias);
  if (v < NVt) tile<R, 1>(a, lda, b + v * L, ldb, out + v * L, ldo, K, bias);
}

template <int R, typename T, typename A_t>
TORE_INLINE void gemm_tail(const A_t* a, int64_t lda, const T* b, int64_t ldb, T* out, int64_t ldo, int64_t M,
                           int64_t NVt, int64_t K, const A_t* bias) {
  if constexpr (R > 0) {
    if (M == R) return gemm_rows<R>(a, lda, b, ldb, out, ldo, NVt, K, bias);
    gemm_tail<R - 1>(a, lda, b, ldb, out, ldo, M, NVt, K, bias);
  }
}

template <typename T, typename A_t>
TORE_INLINE void gemm(const A_t* a, int64_t lda, const T* b, int64_t ldb, T* out, int64_t ldo, int64_t M,
                      int64_t NVt, int64_t K, const A_t* bias) {
  int64_t r = 0;
  for (; r + 6 <= M; r += 6)
    gemm_rows<6>(a + r * lda, lda, b, ldb, out + r * ldo, ldo, NVt, K, bias ? bias + r : bias);
  gemm_tail<5>(a + r * lda, lda, b, ldb, out + r * ldo, ldo, M - r, NVt, K, bias ? bias + r : bias);
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

template <typename scalar_t>
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
  gemm<T, scalar_t>(fw, C4, g, HWp, lg, HWp, N, HWp / L, C4, fb);
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
  gemm<T, scalar_t>(xb, HW, at, Np, zt, Np, C, Np / L, HW, nullptr);
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
  // tokens[n, c] = (zt[c, n] - mean) * rstd * ln_w[n, c] + ln_b[n, c], L channels at a time: gathered from L
  // rows of zt, then written as one contiguous vector of the output row
  scalar_t* tb = tok + b * s.tok_sb;
  const int64_t Cv = C / L * L;
  for (int64_t n = 0; n < N; ++n) {
    scalar_t* out = tb + n * s.tok_sn;
    const scalar_t *w = lw + n * C, *bias = lb + n * C;
    for (int64_t c0 = 0; c0 < Cv; c0 += L) {
      typename W::V v, wv, bv;
      for (int j = 0; j < L; ++j) {
        v[j] = zt[(c0 + j) * Np + n];
        wv[j] = T(w[c0 + j]);
        bv[j] = T(bias[c0 + j]);
      }
      v = (v - mean) * rstd * wv + bv;
      for (int j = 0; j < L; ++j) out[c0 + j] = scalar_t(v[j]);
    }
    for (int64_t c = Cv; c < C; ++c) out[c] = scalar_t((zt[c * Np + n] - mean) * rstd * T(w[c]) + T(bias[c]));
  }
}

template <typename scalar_t>
void sample_default(const Shape& s, int64_t b, const scalar_t* conv, const scalar_t* x, const scalar_t* fw,
                    const scalar_t* fb, const scalar_t* lw, const scalar_t* lb, scalar_t* tok, scalar_t* heat,
                    Buffers<scalar_t>& buf) {
  sample_body(s, b, conv, x, fw, fb, lw, lb, tok, heat, buf);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TORE_ITP_AVX2 1
__attribute__((target("avx2,fma"))) void sample_avx2(const Shape& s, int64_t b, const float* conv, const float* x,
                                                     const float* fw, const float* fb, const float* lw,
                                                     const float* lb, float* tok, float* heat,
                                                     Buffers<float>& buf) {
  sample_body(s, b, conv, x, fw, fb, lw, lb, tok, heat, buf);
}

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#endif

template <typename scalar_t>
void run_sample(const Shape& s, int64_t b, const scalar_t* conv, const scalar_t* x, const scalar_t* fw,
                const scalar_t* fb, const scalar_t* lw, const scalar_t* lb, scalar_t* tok, scalar_t* heat,
                Buffers<scalar_t>& buf) {
#ifdef TORE_ITP_AVX2
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (has_avx2()) return sample_avx2(s, b, conv, x, fw, fb, lw, lb, tok, heat, buf);
  }
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
      for (int64_t b = begin; b < end; ++b) run_sample(s, b, cp, xp, fwp, fbp, lwp, lbp, tp, hp, buf);
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
