// Neighbour-list ("adjacency-masked") attention on CPU.
//
// Query row i of every (batch, head) attends to the keys `shared[0..P)` (columns open for every sparse
// row, e.g. FastMETRO's joint tokens) followed by `index[i, 0..count[i])`. A row with count[i] < 0 is
// handled by the caller (a dense row) and is skipped here: zero output, zero gradient. Scores are only
// formed for those pairs; gathered keys/values are never materialised. q/k/v are [B, H, L|S, d] with
// arbitrary strides (views of the in-projection output).
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 takes the AVX-512 intrinsics' undefined pass-through operands (_mm512_undefined_ps, inside
// immintrin.h) inlined into the kernels below for uninitialized values: hundreds of false warnings. Set before
// any header, since the warning is placed at the intrinsic's line in immintrin.h.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_isa.h"

#include <algorithm>
#include <cstring>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

namespace tore_kernels {
namespace {

struct View4 {  // a [B, H, N, d] tensor through its strides
  int64_t s0, s1, s2, s3;
  explicit View4(const at::Tensor& t) : s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)), s3(t.stride(3)) {}
  int64_t row(int64_t b, int64_t h, int64_t n) const { return b * s0 + h * s1 + n * s2; }
};

struct Table {
  const int32_t* index;
  const int32_t* count;
  const int32_t* shared;
  int64_t width, num_shared;
  // the j-th key of row i (j < num_shared + count[i])
  int64_t key(int64_t i, int64_t j) const {
    return j < num_shared ? shared[j] : index[i * width + (j - num_shared)];
  }
  int64_t degree(int64_t i) const { return count[i] < 0 ? -1 : num_shared + count[i]; }
  int64_t max_degree() const { return std::max<int64_t>(num_shared + width, 1); }
};

void check_table(const at::Tensor& index, const at::Tensor& count, const at::Tensor& shared, int64_t L, int64_t S) {
  TORCH_CHECK(index.dim() == 2 && index.size(0) == L && index.scalar_type() == at::kInt && index.is_contiguous(),
              "adjacency_attention: index must be a contiguous int32 [L, max_degree] tensor with L = ", L,
              ", got ", index.sizes(), " ", index.scalar_type());
  TORCH_CHECK(count.dim() == 1 && count.size(0) == L && count.scalar_type() == at::kInt && count.is_contiguous(),
              "adjacency_attention: count must be a contiguous int32 [L] tensor with L = ", L);
  TORCH_CHECK(shared.dim() == 1 && shared.scalar_type() == at::kInt && shared.is_contiguous(),
              "adjacency_attention: shared must be a contiguous int32 [P] tensor");
  TORCH_CHECK(index.device().is_cpu() && count.device().is_cpu() && shared.device().is_cpu(),
              "adjacency_attention: the neighbour table must be on the CPU");
  const int32_t* idx = index.data_ptr<int32_t>();
  const int32_t* cnt = count.data_ptr<int32_t>();
  const int32_t* sh = shared.data_ptr<int32_t>();
  const int64_t width = index.size(1);
  for (int64_t j = 0; j < shared.numel(); ++j)
    TORCH_CHECK(sh[j] >= 0 && sh[j] < S, "adjacency_attention: shared[", j, "] = ", sh[j], " is outside [0, ", S, ")");
  for (int64_t i = 0; i < L; ++i) {
    TORCH_CHECK(cnt[i] <= width, "adjacency_attention: count[", i, "] = ", cnt[i], " exceeds the table width ", width);
    TORCH_CHECK(cnt[i] < 0 || cnt[i] + shared.numel() > 0, "adjacency_attention: query row ", i, " has no key");
    for (int64_t j = 0; j < cnt[i]; ++j) {
      const int32_t c = idx[i * width + j];
      TORCH_CHECK(c >= 0 && c < S, "adjacency_attention: index[", i, ", ", j, "] = ", c, " is outside [0, ", S, ")");
    }
  }
}

// The fused inference ops take sparse rows only: a dense row (count < 0) goes through adjacency_attention_forward.
void check_no_dense_rows(const at::Tensor& count, const char* op) {
  const int32_t* cnt = count.data_ptr<int32_t>();
  for (int64_t i = 0; i < count.size(0); ++i)
    TORCH_CHECK(cnt[i] >= 0, op, ": query row ", i, " is a dense row (count < 0); tables with dense rows take "
                "adjacency_attention_forward");
}

// [B, L, N] stored [L, B, N] when seq_first: an output in its input's token order.
at::Tensor empty_tokens(int64_t B, int64_t L, int64_t N, bool seq_first, const at::TensorOptions& options) {
  return seq_first ? at::empty({L, B, N}, options).permute({1, 0, 2}) : at::empty({B, L, N}, options);
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "adjacency_attention: q, k, v must be [B, H, N, d]");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "adjacency_attention: the CPU kernel takes CPU tensors");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "adjacency_attention: q, k, v must share a dtype");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3) && v.sizes() == k.sizes(),
              "adjacency_attention: shapes q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(), " do not match");
}

// out is [B, H, L, d] stored as BHLd (0), BLHd (1) or LBHd (2) so the output projection reads it in place.
at::Tensor empty_out(const at::Tensor& q, int64_t layout) {
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), d = q.size(3);
  std::vector<int64_t> sizes{B, H, L, d}, strides;
  if (layout == 0) strides = {H * L * d, L * d, d, 1};
  else if (layout == 1) strides = {L * H * d, d, H * d, 1};
  else if (layout == 2) strides = {H * d, d, B * H * d, 1};
  else TORCH_CHECK(false, "adjacency_attention: layout must be 0 (BHLd), 1 (BLHd) or 2 (LBHd), got ", layout);
  return at::empty_strided(sizes, strides, q.options());
}

// Kernels are instantiated for the usual head dims with a unit-stride last dim (the inner loops then
// vectorise) and once for any d / stride. Heads are the innermost loop over a row's neighbours: in the
// in-projection's [L, B, 3, H, d] output the H heads of one key are adjacent, so each neighbour costs one
// contiguous read instead of H scattered ones.
template <typename scalar_t, int D, bool UNIT>
struct Kernels {
  using acc_t = at::opmath_type<scalar_t>;

  static int64_t dim(int64_t d) { return D > 0 ? D : d; }
  static int64_t st(int64_t s) { return UNIT ? 1 : s; }

  // weights: nullptr, or the head-averaged probabilities [B, L, S] (every entry written)
  static void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Table& tab, double scale,
                      at::Tensor& out, at::Tensor& lse, scalar_t* weights) {
    const int64_t B = q.size(0), H = q.size(1), L = q.size(2), d = dim(q.size(3)), S = k.size(2);
    const View4 qv(q), kv(k), vv(v), ov(out);
    const int64_t qs = st(qv.s3), ks = st(kv.s3), vs = st(vv.s3), os = st(ov.s3);
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    acc_t* lp = lse.data_ptr<acc_t>();
    const int64_t max_deg = tab.max_degree();
    at::parallel_for(0, B * L, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> qrow(H * d), acc(H * d), score(H * max_deg), mx(H), sum(H);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / L, i = r % L;
        const int64_t deg = tab.degree(i);
        scalar_t* wr = weights ? weights + r * S : nullptr;
        if (wr) std::fill(wr, wr + S, scalar_t(0));
        if (deg < 0) {  // a dense row, computed by the caller
          for (int64_t h = 0; h < H; ++h) {
            scalar_t* o = op + ov.row(b, h, i);
            for (int64_t c = 0; c < d; ++c) o[c * os] = scalar_t(0);
            lp[(b * H + h) * L + i] = acc_t(0);
          }
          continue;
        }
        for (int64_t h = 0; h < H; ++h) {
          const scalar_t* qr = qp + qv.row(b, h, i);
          for (int64_t c = 0; c < d; ++c) qrow[h * d + c] = acc_t(qr[c * qs]) * acc_t(scale);
          mx[h] = -std::numeric_limits<acc_t>::infinity();
          sum[h] = 0;
        }
        for (int64_t j = 0; j < deg; ++j) {
          const int64_t key = tab.key(i, j);
          for (int64_t h = 0; h < H; ++h) {
            const scalar_t* kr = kp + kv.row(b, h, key);
            const acc_t* qh = qrow.data() + h * d;
            acc_t s = 0;
            for (int64_t c = 0; c < d; ++c) s += qh[c] * acc_t(kr[c * ks]);
            score[h * max_deg + j] = s;
            mx[h] = std::max(mx[h], s);
          }
        }
        for (int64_t h = 0; h < H; ++h)
          for (int64_t j = 0; j < deg; ++j) {
            score[h * max_deg + j] = std::exp(score[h * max_deg + j] - mx[h]);
            sum[h] += score[h * max_deg + j];
          }
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t j = 0; j < deg; ++j) {
          const int64_t key = tab.key(i, j);
          for (int64_t h = 0; h < H; ++h) {
            const acc_t p = score[h * max_deg + j];
            const scalar_t* vr = vp + vv.row(b, h, key);
            acc_t* ah = acc.data() + h * d;
            for (int64_t c = 0; c < d; ++c) ah[c] += p * acc_t(vr[c * vs]);
          }
        }
        for (int64_t h = 0; h < H; ++h) {
          scalar_t* o = op + ov.row(b, h, i);
          const acc_t inv = acc_t(1) / sum[h];
          for (int64_t c = 0; c < d; ++c) o[c * os] = scalar_t(acc[h * d + c] * inv);
          lp[(b * H + h) * L + i] = mx[h] + std::log(sum[h]);
        }
        if (wr) {  // nn.MultiheadAttention's head average: sum over heads / H
          for (int64_t j = 0; j < deg; ++j) {
            acc_t m = 0;
            for (int64_t h = 0; h < H; ++h) m += score[h * max_deg + j] / sum[h];
            wr[tab.key(i, j)] = scalar_t(m / acc_t(H));
          }
        }
      }
    });
  }

  static void backward(const at::Tensor& go, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& out, const at::Tensor& lse, const Table& tab, double scale, at::Tensor& dq,
                       at::Tensor& dk, at::Tensor& dv) {
    const int64_t B = q.size(0), H = q.size(1), L = q.size(2), d = dim(q.size(3)), S = k.size(2);
    const View4 gv(go), qv(q), kv(k), vv(v), ov(out), dqv(dq), dkv(dk), dvv(dv);
    const int64_t gs = st(gv.s3), qs = st(qv.s3), ks = st(kv.s3), vs = st(vv.s3), os = st(ov.s3);
    const scalar_t* gp = go.const_data_ptr<scalar_t>();
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    const scalar_t* op = out.const_data_ptr<scalar_t>();
    const acc_t* lp = lse.const_data_ptr<acc_t>();
    scalar_t* dqp = dq.data_ptr<scalar_t>();
    scalar_t* dkp = dk.data_ptr<scalar_t>();
    scalar_t* dvp = dv.data_ptr<scalar_t>();
    const acc_t sc = acc_t(scale);
    // One task per (batch, head): it owns dk[b, h] and dv[b, h], so the scatter-adds need no atomics.
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> dk_acc(S * d), dv_acc(S * d), qrow(d), grow(d), dqrow(d);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        std::fill(dk_acc.begin(), dk_acc.end(), acc_t(0));
        std::fill(dv_acc.begin(), dv_acc.end(), acc_t(0));
        for (int64_t i = 0; i < L; ++i) {
          scalar_t* dqr = dqp + dqv.row(b, h, i);
          const int64_t deg = tab.degree(i);
          if (deg < 0) {
            for (int64_t c = 0; c < d; ++c) dqr[c * dqv.s3] = scalar_t(0);
            continue;
          }
          const scalar_t* qr = qp + qv.row(b, h, i);
          const scalar_t* gr = gp + gv.row(b, h, i);
          const scalar_t* orow = op + ov.row(b, h, i);
          acc_t delta = 0;
          for (int64_t c = 0; c < d; ++c) {
            qrow[c] = acc_t(qr[c * qs]);
            grow[c] = acc_t(gr[c * gs]);
            delta += grow[c] * acc_t(orow[c * os]);
            dqrow[c] = 0;
          }
          const acc_t l = lp[bh * L + i];
          for (int64_t j = 0; j < deg; ++j) {
            const int64_t key = tab.key(i, j);
            const scalar_t* kr = kp + kv.row(b, h, key);
            const scalar_t* vr = vp + vv.row(b, h, key);
            acc_t s = 0, dp = 0;
            for (int64_t c = 0; c < d; ++c) {
              s += qrow[c] * acc_t(kr[c * ks]);
              dp += grow[c] * acc_t(vr[c * vs]);
            }
            const acc_t pj = std::exp(s * sc - l);
            const acc_t ds = pj * (dp - delta) * sc;
            acc_t* dkr = dk_acc.data() + key * d;
            acc_t* dvr = dv_acc.data() + key * d;
            for (int64_t c = 0; c < d; ++c) {
              dqrow[c] += ds * acc_t(kr[c * ks]);
              dkr[c] += ds * qrow[c];
              dvr[c] += pj * grow[c];
            }
          }
          for (int64_t c = 0; c < d; ++c) dqr[c * dqv.s3] = scalar_t(dqrow[c]);
        }
        for (int64_t n = 0; n < S; ++n) {
          scalar_t* dkr = dkp + dkv.row(b, h, n);
          scalar_t* dvr = dvp + dvv.row(b, h, n);
          for (int64_t c = 0; c < d; ++c) {
            dkr[c * dkv.s3] = scalar_t(dk_acc[n * d + c]);
            dvr[c * dvv.s3] = scalar_t(dv_acc[n * d + c]);
          }
        }
      }
    });
  }

  static void probs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse, const Table& tab, double scale,
                    at::Tensor& probs) {
    const int64_t B = q.size(0), H = q.size(1), L = q.size(2), d = dim(q.size(3));
    const int64_t width = probs.size(3);
    const View4 qv(q), kv(k);
    const int64_t qs = st(qv.s3), ks = st(kv.s3);
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    const acc_t* lp = lse.const_data_ptr<acc_t>();
    scalar_t* pp = probs.data_ptr<scalar_t>();
    at::parallel_for(0, B * H * L, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / (H * L), h = (r / L) % H, i = r % L;
        scalar_t* pr = pp + r * width;
        const int64_t deg = std::max<int64_t>(tab.degree(i), 0);
        const scalar_t* qr = qp + qv.row(b, h, i);
        for (int64_t j = 0; j < deg; ++j) {
          const scalar_t* kr = kp + kv.row(b, h, tab.key(i, j));
          acc_t s = 0;
          for (int64_t c = 0; c < d; ++c) s += acc_t(qr[c * qs]) * acc_t(kr[c * ks]);
          pr[j] = scalar_t(std::exp(s * acc_t(scale) - lp[r]));
        }
        for (int64_t j = deg; j < width; ++j) pr[j] = scalar_t(0);
      }
    });
  }
};

// ---- fp32 forward, AVX2 -----------------------------------------------------------------------------------
// When each [H, d] block of q/k/v/out is contiguous (the in-projection's output viewed per head) and d is a
// multiple of 8, one neighbour is one contiguous H*d read: the dot products of 8 heads are reduced together
// (a transposing horizontal sum), softmax runs with heads as SIMD lanes, and the weighted sum of values
// runs 32 floats at a time with each lane broadcasting its head's probability. The extension is compiled
// for generic x86-64, so these functions carry target("avx2,fma") and are only called when the CPU has both.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TORE_AA_AVX2 1
#define TORE_AVX2_FN __attribute__((target("avx2,fma")))

template <typename T>  // the storage type of q, k, v, out and weights (float, or bf16 for the AVX-512 kernel)
struct Fused {
  const T *q, *k, *v;
  T* o;
  float* lse;
  T* w;  // head-averaged weights [B, L, S] or nullptr
  int64_t qb, qi, kb, kn, vb, vn, ob, oi;  // batch and token strides; the [H, d] block is contiguous
  int64_t B, H, L, S, d;
  Table tab;
  float scale;
  bool batch_inner;
  // row r -> sample b, token i, in q's memory order: token-major when the batch stride is the smaller one
  // (seq-first input)
  void split(int64_t r, int64_t& b, int64_t& i) const {
    b = batch_inner ? r % B : r / L;
    i = batch_inner ? r / B : r % L;
  }
};

// lane t = the sum of u[t]'s 8 lanes
TORE_AVX2_FN static inline __m256 sum8x8(const __m256* u) {
  const __m256 a0 = _mm256_hadd_ps(u[0], u[1]), a1 = _mm256_hadd_ps(u[2], u[3]);
  const __m256 a2 = _mm256_hadd_ps(u[4], u[5]), a3 = _mm256_hadd_ps(u[6], u[7]);
  const __m256 b0 = _mm256_hadd_ps(a0, a1), b1 = _mm256_hadd_ps(a2, a3);  // [u0..u3 low | u0..u3 high], ...
  return _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
}

// exp(x) for x <= 0 (scores minus their row max): 2^n * e^r with |r| <= ln2/2 and a degree-6 Taylor
// polynomial (relative error < 2e-7); NaN stays NaN (max_ps returns its second operand for a NaN). The constants
// serve the 8- and 16-lane versions.
struct ExpConst {
  static constexpr float lo = -87.0f, log2e = 1.4426950408889634f;
  static constexpr float ln2_hi = 0.693145751953125f, ln2_lo = 1.428606765330187e-06f;  // ln 2 = hi + lo
  static constexpr float taylor[7] = {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f};
};

TORE_AVX2_FN static inline __m256 exp_nonpositive8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(ExpConst::lo), x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(ExpConst::log2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(ExpConst::ln2_hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(ExpConst::ln2_lo), r);
  __m256 p = _mm256_set1_ps(ExpConst::taylor[0]);
  for (int t = 1; t < 7; ++t) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(ExpConst::taylor[t]));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// One query row r, all heads. scratch: key offsets [max_deg] then scores [max_deg, Hp] (Hp = H rounded up
// to 8), overwritten by the normalised probabilities. D > 0 fixes the head dim at compile time (the per-head
// loops unroll and keep the partial sums in registers; head = column / D is a shift).
template <int64_t D>
TORE_AVX2_FN static inline __attribute__((always_inline)) void fused_f32_row(const Fused<float>& a, int64_t r,
                                                                             int64_t* keys, float* score) {
  const int64_t H = a.H, d = D > 0 ? D : a.d, HD = H * d, Hp = (H + 7) / 8 * 8;
  int64_t b, i;
  a.split(r, b, i);
  float* o = a.o + b * a.ob + i * a.oi;
  float* wr = a.w ? a.w + (b * a.L + i) * a.S : nullptr;
  if (wr) std::memset(wr, 0, a.S * sizeof(float));
  const int64_t deg = a.tab.degree(i);
  if (deg < 0) {  // a dense row, computed by the caller
    std::memset(o, 0, HD * sizeof(float));
    for (int64_t h = 0; h < H; ++h) a.lse[(b * H + h) * a.L + i] = 0.0f;
    return;
  }
  for (int64_t j = 0; j < deg; ++j) keys[j] = a.tab.key(i, j);
  const float* qr = a.q + b * a.qb + i * a.qi;
  const float* kb = a.k + b * a.kb;
  const float* vb = a.v + b * a.vb;
  for (int64_t j = 0; j < deg; ++j) {
    const float* kr = kb + keys[j] * a.kn;
    for (int64_t hg = 0; hg < Hp; hg += 8) {
      __m256 u[8];
      for (int64_t t = 0; t < 8; ++t) {
        __m256 s = _mm256_setzero_ps();
        if (hg + t < H)
          for (int64_t c = (hg + t) * d; c < (hg + t + 1) * d; c += 8)
            s = _mm256_fmadd_ps(_mm256_loadu_ps(qr + c), _mm256_loadu_ps(kr + c), s);
        u[t] = s;
      }
      _mm256_storeu_ps(score + j * Hp + hg, _mm256_mul_ps(sum8x8(u), _mm256_set1_ps(a.scale)));
    }
  }
  for (int64_t hg = 0; hg < Hp; hg += 8) {  // softmax over the neighbours, 8 heads per vector
    __m256 mx = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < deg; ++j) mx = _mm256_max_ps(mx, _mm256_loadu_ps(score + j * Hp + hg));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < deg; ++j) {
      const __m256 p = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(score + j * Hp + hg), mx));
      _mm256_storeu_ps(score + j * Hp + hg, p);
      sum = _mm256_add_ps(sum, p);
    }
    const __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.0f), sum);
    for (int64_t j = 0; j < deg; ++j)
      _mm256_storeu_ps(score + j * Hp + hg, _mm256_mul_ps(_mm256_loadu_ps(score + j * Hp + hg), inv));
    alignas(32) float m8[8], s8[8];
    _mm256_store_ps(m8, mx);
    _mm256_store_ps(s8, sum);
    for (int64_t t = 0; t < 8 && hg + t < H; ++t) a.lse[(b * H + hg + t) * a.L + i] = m8[t] + std::log(s8[t]);
  }
  int64_t c0 = 0;
  for (; c0 + 32 <= HD; c0 += 32) {  // 4 independent accumulators hide the FMA latency
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t j = 0; j < deg; ++j) {
      const float* vr = vb + keys[j] * a.vn + c0;
      const float* pj = score + j * Hp;
      for (int64_t t = 0; t < 4; ++t)
        acc[t] = _mm256_fmadd_ps(_mm256_broadcast_ss(pj + (c0 + 8 * t) / d), _mm256_loadu_ps(vr + 8 * t), acc[t]);
    }
    for (int64_t t = 0; t < 4; ++t) _mm256_storeu_ps(o + c0 + 8 * t, acc[t]);
  }
  for (; c0 < HD; c0 += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < deg; ++j)
      acc = _mm256_fmadd_ps(_mm256_broadcast_ss(score + j * Hp + c0 / d), _mm256_loadu_ps(vb + keys[j] * a.vn + c0),
                            acc);
    _mm256_storeu_ps(o + c0, acc);
  }
  if (wr) {  // nn.MultiheadAttention's head average: sum over heads / H
    for (int64_t j = 0; j < deg; ++j) {
      float m = 0.0f;
      for (int64_t h = 0; h < H; ++h) m += score[j * Hp + h];
      wr[keys[j]] = m / static_cast<float>(H);
    }
  }
}

TORE_AVX2_FN static void fused_f32_rows(const Fused<float>& a, int64_t begin, int64_t end, int64_t* keys,
                                        float* score) {
  switch (a.d) {
    case 8: for (int64_t r = begin; r < end; ++r) fused_f32_row<8>(a, r, keys, score); break;
    case 16: for (int64_t r = begin; r < end; ++r) fused_f32_row<16>(a, r, keys, score); break;
    case 32: for (int64_t r = begin; r < end; ++r) fused_f32_row<32>(a, r, keys, score); break;
    case 64: for (int64_t r = begin; r < end; ++r) fused_f32_row<64>(a, r, keys, score); break;
    default: for (int64_t r = begin; r < end; ++r) fused_f32_row<0>(a, r, keys, score);
  }
}

// ---- fp32 / bf16 forward, AVX-512 ---------------------------------------------------------------------------
// Same row walk as the AVX2 kernel for d a multiple of 16 (bf16 storage is widened to fp32 on load and rounded
// once on store; all arithmetic is fp32): each head's dot product is one 16-lane vector per
// 16 columns, and the products of 16 (neighbour, head) pairs are reduced into one vector of 16 scores at once.
// The row's scaled q stays in registers (D = 16: 8 heads in 8 registers), the scores are laid out [neighbour,
// head] as in the AVX2 kernel, and the softmax runs on 16 heads per vector.
#define TORE_AVX512_FN __attribute__((target("avx2,fma,avx512f,avx512dq,avx512vl")))

// 16 values as fp32 lanes: bf16 is the upper half of an fp32
TORE_AVX512_FN static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
TORE_AVX512_FN static inline __m512 load16(const c10::BFloat16* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
TORE_AVX512_FN static inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
TORE_AVX512_FN static inline void store16(c10::BFloat16* p, __m512 x) {  // round to nearest even, NaN stays NaN
  const __m512i u = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}

// lane t = the sum of u[t]'s 16 lanes (a transposing reduction: 30 shuffles and 15 additions)
TORE_AVX512_FN static inline __m512 sum16x16(const __m512* u) {
  __m512 a[8], b[4], c[2];
  for (int t = 0; t < 8; ++t)  // per 128-bit block: [u0+u2, u1+u3 of pair members]
    a[t] = _mm512_add_ps(_mm512_unpacklo_ps(u[2 * t], u[2 * t + 1]), _mm512_unpackhi_ps(u[2 * t], u[2 * t + 1]));
  for (int t = 0; t < 4; ++t) {  // per block: the block sums of u[4t .. 4t+3]
    const __m512d x = _mm512_castps_pd(a[2 * t]), y = _mm512_castps_pd(a[2 * t + 1]);
    b[t] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int t = 0; t < 2; ++t)  // blocks: u[8t..8t+3] (halves 0+1, 2+3), u[8t+4..8t+7] (0+1, 2+3)
    c[t] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * t], b[2 * t + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[2 * t], b[2 * t + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// exp_nonpositive8 on 16 lanes
TORE_AVX512_FN static inline __m512 exp_nonpositive16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(ExpConst::lo), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(ExpConst::log2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(ExpConst::ln2_hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(ExpConst::ln2_lo), r);
  __m512 p = _mm512_set1_ps(ExpConst::taylor[0]);
  for (int t = 1; t < 7; ++t) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(ExpConst::taylor[t]));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// Lanes t = neighbour * H + head: every lane gets the max (or sum) over the lanes of its head.
template <int H, bool MAX>
TORE_AVX512_FN static inline __m512 fold_heads(__m512 x) {
  for (int o = H; o < 16; o *= 2) {  // lane t meets lane t ^ o: after the last step every lane has its head's total
    const __m512i idx = _mm512_xor_si512(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                         _mm512_set1_epi32(o));
    const __m512 y = _mm512_permutexvar_ps(idx, x);
    x = MAX ? _mm512_max_ps(x, y) : _mm512_add_ps(x, y);
  }
  return x;
}

// One query row r, all heads, for H dividing 16: the scores of 16 / H neighbours (lane t = neighbour t / H, head
// t % H) form one vector, so the scores of a row fit in a few registers and the softmax needs no lane shuffling
// beyond folding the per-head max and sum. scratch: key offsets [max_deg rounded up to 16 / H], probabilities
// [groups * 16] and the scaled q row [H * d]. D > 0 fixes the head dim (a multiple of 16) at compile time.
constexpr int64_t kMaxGroups = 8;  // up to 8 * 16 (neighbour, head) pairs per row in registers; more: AVX2 kernel

template <typename T, int64_t D, int H>
TORE_AVX512_FN static inline __attribute__((always_inline)) void fused_row_avx512(const Fused<T>& a, int64_t r,
                                                                                  int64_t* keys, float* prob,
                                                                                  float* qs, T* dst = nullptr,
                                                                                  const T* qsrc = nullptr) {
  constexpr int G = 16 / H;  // neighbours per vector
  const int64_t d = D > 0 ? D : a.d, HD = H * d, V = d / 16;  // V vectors per head
  int64_t b, i;
  a.split(r, b, i);
  T* o = dst ? dst : a.o + b * a.ob + i * a.oi;  // dst: the caller's row buffer
  T* wr = a.w ? a.w + (b * a.L + i) * a.S : nullptr;
  if (wr) std::fill(wr, wr + a.S, T(0));
  const int64_t deg = a.tab.degree(i);
  if (deg < 0) {  // a dense row, computed by the caller
    std::fill(o, o + HD, T(0));
    for (int64_t h = 0; h < H; ++h) a.lse[(b * H + h) * a.L + i] = 0.0f;
    return;
  }
  const int64_t groups = (deg + G - 1) / G;
  for (int64_t j = 0; j < groups * G; ++j) keys[j] = (j < deg ? a.tab.key(i, j) : a.tab.key(i, 0)) * a.kn;
  const T* qr = qsrc ? qsrc : a.q + b * a.qb + i * a.qi;  // qsrc: the caller's projected q row
  const T* kb = a.k + b * a.kb;
  const T* vb = a.v + b * a.vb;
  const __m512 scale = _mm512_set1_ps(a.scale);
  for (int64_t c = 0; c < HD; c += 16) _mm512_storeu_ps(qs + c, _mm512_mul_ps(load16(qr + c), scale));
  __m512 sc[kMaxGroups];
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 mx = neg_inf;
  for (int64_t g = 0; g < groups; ++g) {
    __m512 u[16];
    for (int t = 0; t < 16; ++t) {
      const T* kr = kb + keys[g * G + t / H] + (t % H) * d;
      const float* qh = qs + (t % H) * d;
      __m512 s = _mm512_mul_ps(_mm512_loadu_ps(qh), load16(kr));
      for (int64_t c = 1; c < V; ++c) s = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * c), load16(kr + 16 * c), s);
      u[t] = s;
    }
    const int64_t valid = std::min<int64_t>(16, (deg - g * G) * H);  // padding neighbours: -inf, probability 0
    sc[g] = _mm512_mask_blend_ps(__mmask16((1u << valid) - 1u), neg_inf, sum16x16(u));
    mx = _mm512_max_ps(mx, sc[g]);
  }
  mx = fold_heads<H, true>(mx);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    sc[g] = exp_nonpositive16(_mm512_sub_ps(sc[g], mx));
    sum = _mm512_add_ps(sum, sc[g]);
  }
  sum = fold_heads<H, false>(sum);
  const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), sum);
  for (int64_t g = 0; g < groups; ++g) _mm512_storeu_ps(prob + 16 * g, _mm512_mul_ps(sc[g], inv));
  alignas(64) float m16[16], s16[16];
  _mm512_store_ps(m16, mx);
  _mm512_store_ps(s16, sum);
  for (int h = 0; h < H; ++h) a.lse[(b * H + h) * a.L + i] = m16[h] + std::log(s16[h]);
  // out = sum_j p[j, head] v_j: 8 accumulators hide the FMA latency
  for (int64_t c0 = 0; c0 < HD; c0 += 128) {
    const int64_t nv = std::min<int64_t>(8, (HD - c0) / 16);
    __m512 acc[8];
    for (int t = 0; t < 8; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t j = 0; j < deg; ++j) {
      const T* vr = vb + keys[j] / a.kn * a.vn + c0;
      const float* pj = prob + j * H;
      for (int t = 0; t < 8; ++t)
        if (t < nv) acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(pj[(c0 + 16 * t) / d]), load16(vr + 16 * t), acc[t]);
    }
    for (int t = 0; t < 8; ++t)
      if (t < nv) store16(o + c0 + 16 * t, acc[t]);
  }
  if (wr) {  // nn.MultiheadAttention's head average: sum over heads / H
    for (int64_t j = 0; j < deg; ++j) {
      float s = 0.0f;
      for (int h = 0; h < H; ++h) s += prob[j * H + h];
      wr[keys[j] / a.kn] = T(s / static_cast<float>(H));
    }
  }
}

template <typename T, int64_t D, int H>
TORE_AVX512_FN static void fused_rows_avx512_d(const Fused<T>& a, int64_t begin, int64_t end, int64_t* keys,
                                               float* prob, float* qs) {
  for (int64_t r = begin; r < end; ++r) fused_row_avx512<T, D, H>(a, r, keys, prob, qs);
}

template <typename T>
TORE_AVX512_FN static void fused_rows_avx512(const Fused<T>& a, int64_t begin, int64_t end, int64_t* keys,
                                             float* prob, float* qs) {
  switch (a.H) {
    case 1: return fused_rows_avx512_d<T, 0, 1>(a, begin, end, keys, prob, qs);
    case 2: return fused_rows_avx512_d<T, 0, 2>(a, begin, end, keys, prob, qs);
    case 4: return fused_rows_avx512_d<T, 0, 4>(a, begin, end, keys, prob, qs);
    case 8: return a.d == 16 ? fused_rows_avx512_d<T, 16, 8>(a, begin, end, keys, prob, qs)
                             : fused_rows_avx512_d<T, 0, 8>(a, begin, end, keys, prob, qs);
    default: return fused_rows_avx512_d<T, 0, 16>(a, begin, end, keys, prob, qs);
  }
}

// Inference with the output projection fused: rows are attended kRows at a time into a buffer that stays in L1,
// and out-projected from there (y = o @ wt + bias, wt [HD, N] with N % 64 == 0) by a 4-row x 64-column
// register tile, so the attention output never goes to memory and the GEMM's arithmetic overlaps the kernel's
// gathers.
constexpr int64_t kRows = 16;

// y[r, :N] = x[r, :K] @ wt[:K, :N] + bias for r < rows: x row r at x + r * ldx, y row r at y + r * ldy, wt row k
// at wt + k * ldw (N % 64 == 0). A 4-row x 64-column register tile; 64-column panels outer, so a panel of weights
// serves every row tile from L1.
TORE_AVX512_FN static void gemm_rows(const float* x, int64_t ldx, int64_t rows, int64_t K, const float* wt,
                                     int64_t ldw, int64_t N, const float* bias, float* y, int64_t ldy) {
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    __m512 b0[4];
    for (int j = 0; j < 4; ++j) b0[j] = bias ? _mm512_loadu_ps(bias + n0 + 16 * j) : _mm512_setzero_ps();
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
      const int64_t nr = std::min<int64_t>(4, rows - r0);
      __m512 acc[4][4];
      const float* xr[4];
      for (int r = 0; r < 4; ++r) {
        xr[r] = x + (r0 + std::min<int64_t>(r, nr - 1)) * ldx;
        for (int j = 0; j < 4; ++j) acc[r][j] = b0[j];
      }
      for (int64_t k = 0; k < K; ++k) {
        const float* w = wt + k * ldw + n0;
        const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16), w2 = _mm512_loadu_ps(w + 32),
                     w3 = _mm512_loadu_ps(w + 48);
        for (int r = 0; r < 4; ++r) {
          const __m512 xk = _mm512_set1_ps(xr[r][k]);
          acc[r][0] = _mm512_fmadd_ps(xk, w0, acc[r][0]);
          acc[r][1] = _mm512_fmadd_ps(xk, w1, acc[r][1]);
          acc[r][2] = _mm512_fmadd_ps(xk, w2, acc[r][2]);
          acc[r][3] = _mm512_fmadd_ps(xk, w3, acc[r][3]);
        }
      }
      for (int r = 0; r < nr; ++r)
        for (int j = 0; j < 4; ++j) _mm512_storeu_ps(y + (r0 + r) * ldy + n0 + 16 * j, acc[r][j]);
    }
  }
}

template <int64_t D, int H>
TORE_AVX512_FN static void fused_projected_rows_d(const Fused<float>& a, int64_t begin, int64_t end, int64_t* keys,
                                                  float* prob, float* qs, float* obuf, const float* wt,
                                                  const float* bias, int64_t N, float* y) {
  const int64_t HD = a.H * a.d;
  for (int64_t r0 = begin; r0 < end; r0 += kRows) {
    const int64_t n = std::min<int64_t>(kRows, end - r0);
    for (int64_t t = 0; t < n; ++t) fused_row_avx512<float, D, H>(a, r0 + t, keys, prob, qs, obuf + t * HD);
    gemm_rows(obuf, HD, n, HD, wt, N, N, bias, y + r0 * N, N);  // y is in q's row order
  }
}

TORE_AVX512_FN static void fused_projected_rows(const Fused<float>& a, int64_t begin, int64_t end, int64_t* keys,
                                                float* prob, float* qs, float* obuf, const float* wt,
                                                const float* bias, int64_t N, float* y) {
#define TORE_PROJECTED(D, H) fused_projected_rows_d<D, H>(a, begin, end, keys, prob, qs, obuf, wt, bias, N, y)
  switch (a.H) {
    case 1: return TORE_PROJECTED(0, 1);
    case 2: return TORE_PROJECTED(0, 2);
    case 4: return TORE_PROJECTED(0, 4);
    case 8: return a.d == 16 ? TORE_PROJECTED(16, 8) : TORE_PROJECTED(0, 8);
    default: return TORE_PROJECTED(0, 16);
  }
#undef TORE_PROJECTED
}

bool heads_fused(const at::Tensor& t) {
  return t.size(3) <= 1 || (t.stride(3) == 1 && (t.size(1) <= 1 || t.stride(1) == t.size(3)));
}

template <typename T>
Fused<T> fused_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Table& tab, double scale,
                    at::Tensor& out, at::Tensor& lse, at::Tensor* weights) {
  return Fused<T>{q.const_data_ptr<T>(), k.const_data_ptr<T>(), v.const_data_ptr<T>(), out.data_ptr<T>(),
                  lse.data_ptr<float>(), weights ? weights->data_ptr<T>() : nullptr, q.stride(0), q.stride(2),
                  k.stride(0), k.stride(2), v.stride(0), v.stride(2), out.stride(0), out.stride(2), q.size(0),
                  q.size(1), q.size(2), k.size(2), q.size(3), tab, static_cast<float>(scale),
                  q.stride(0) < q.stride(2)};
}

// The AVX-512 row kernel applies: the CPU, d a multiple of 16, H dividing 16, at most kMaxGroups vectors of
// (neighbour, head) scores per row (avx512_shape), each [H, d] block contiguous (avx512_rows). prob_size: its
// per-row score buffer.
bool avx512_shape(int64_t d, int64_t H, int64_t max_degree) {
  return cpu_isa() == Isa::avx512 && d % 16 == 0 && 16 % H == 0 && (max_degree * H + 15) / 16 <= kMaxGroups;
}
bool avx512_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Table& tab) {
  return avx512_shape(q.size(3), q.size(1), tab.max_degree()) && heads_fused(q) && heads_fused(k) && heads_fused(v);
}
int64_t prob_size(const Table& tab, int64_t H) { return (tab.max_degree() * H + 15) / 16 * 16; }

// The fp32 kernels (AVX-512: also bf16 storage) when the CPU, the shapes and the strides allow; false otherwise.
bool try_fused_f32(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Table& tab, double scale,
                   at::Tensor& out, at::Tensor& lse, at::Tensor* weights) {
  const int64_t max_deg = tab.max_degree(), H = q.size(1), d = q.size(3);
  const bool avx512 = avx512_rows(q, k, v, tab);
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  if (!(q.scalar_type() == at::kFloat || (bf16 && avx512)) || d % 8 != 0 || cpu_isa() == Isa::base ||
      !heads_fused(q) || !heads_fused(k) || !heads_fused(v) || !heads_fused(out))
    return false;
  const int64_t score_size = avx512 ? prob_size(tab, H) : max_deg * ((H + 7) / 8 * 8);
  at::parallel_for(0, q.size(0) * q.size(2), 16, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> keys(max_deg + 16);
    std::vector<float> score(score_size), qs(avx512 ? H * d : 0);
    if (bf16)
      fused_rows_avx512(fused_args<c10::BFloat16>(q, k, v, tab, scale, out, lse, weights), begin, end, keys.data(),
                        score.data(), qs.data());
    else if (avx512)
      fused_rows_avx512(fused_args<float>(q, k, v, tab, scale, out, lse, weights), begin, end, keys.data(),
                        score.data(), qs.data());
    else
      fused_f32_rows(fused_args<float>(q, k, v, tab, scale, out, lse, weights), begin, end, keys.data(),
                     score.data());
  });
  return true;
}

// y [B, L, N] stored in q's token order (y[b, i] at b * yb + i * yi) when the AVX-512 kernel and the fused
// projection apply (fp32, N % 64 == 0; the caller has checked there are no dense rows); false otherwise.
bool try_fused_projected(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Table& tab,
                         double scale, const at::Tensor& wt, const at::Tensor& bias, at::Tensor& y) {
  const int64_t max_deg = tab.max_degree(), H = q.size(1), d = q.size(3), L = q.size(2), N = wt.size(1);
  if (q.scalar_type() != at::kFloat || N % 64 != 0 || !avx512_rows(q, k, v, tab)) return false;
  at::Tensor lse = at::empty({q.size(0), H, L}, q.options());
  Fused<float> a = fused_args<float>(q, k, v, tab, scale, y /* unused: rows go to obuf */, lse, nullptr);
  // kRows rows per task, fewer where that would leave threads idle (one sample's 14 joint tokens: 7 per thread
  // of 2, the captured TORE head at batch 1 1.02-1.03x faster than with one thread taking all 14)
  const int64_t rows = q.size(0) * L, threads = at::get_num_threads();
  const int64_t grain = std::min<int64_t>(kRows, (rows + threads - 1) / threads);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> keys(max_deg + 16);
    std::vector<float> prob(prob_size(tab, H)), qs(H * d), obuf(kRows * H * d);
    fused_projected_rows(a, begin, end, keys.data(), prob.data(), qs.data(), obuf.data(), wt.const_data_ptr<float>(),
                         bias.defined() ? bias.const_data_ptr<float>() : nullptr, N, y.data_ptr<float>());
  });
  return true;
}

// The whole inference block of nn.MultiheadAttention, one sample per task: k and v of the sample's S tokens are
// projected into a per-thread buffer that stays in L2, then each block of kRows queries is projected, attended
// (its gathers hit that buffer) and out-projected while in L1. q/k/v never go to memory.
struct Block {
  const float *xq, *xk, *xv;              // query [B, L, E], key / value [B, S, E] (element strides below)
  int64_t qb, qi, kb, ki, vb, vi, yb, yi;
  const float *in_wt, *in_b, *out_wt, *out_b;  // in_wt [E, 3E] (q | k | v columns), out_wt [E, E]
  float* y;
  int64_t E, H, L, S;
  Table tab;
  float scale;
};

template <int64_t D, int H>
TORE_AVX512_FN static void block_samples_d(const Block& m, int64_t begin, int64_t end) {
  const int64_t E = m.E, d = E / H;
  std::vector<int64_t> keys(m.tab.max_degree() + 16);
  std::vector<float> prob(prob_size(m.tab, H)), qs(E), kv(m.S * 2 * E), qbuf(kRows * E), obuf(kRows * E),
      lse(H * m.L);
  const float* kb_ = m.in_b ? m.in_b + E : nullptr;
  const float* vb_ = m.in_b ? m.in_b + 2 * E : nullptr;
  for (int64_t b = begin; b < end; ++b) {
    const float* xk = m.xk + b * m.kb;
    const float* xv = m.xv + b * m.vb;
    if (xk == xv && m.ki == m.vi) {
      gemm_rows(xk, m.ki, m.S, E, m.in_wt + E, 3 * E, 2 * E, kb_, kv.data(), 2 * E);
    } else {
      gemm_rows(xk, m.ki, m.S, E, m.in_wt + E, 3 * E, E, kb_, kv.data(), 2 * E);
      gemm_rows(xv, m.vi, m.S, E, m.in_wt + 2 * E, 3 * E, E, vb_, kv.data() + E, 2 * E);
    }
    const Fused<float> a{nullptr, kv.data(), kv.data() + E, nullptr, lse.data(), nullptr, 0, 0, 0, 2 * E, 0, 2 * E,
                         0, 0, 1, H, m.L, m.S, d, m.tab, m.scale, false};
    for (int64_t i0 = 0; i0 < m.L; i0 += kRows) {
      const int64_t n = std::min<int64_t>(kRows, m.L - i0);
      gemm_rows(m.xq + b * m.qb + i0 * m.qi, m.qi, n, E, m.in_wt, 3 * E, E, m.in_b, qbuf.data(), E);
      for (int64_t t = 0; t < n; ++t)
        fused_row_avx512<float, D, H>(a, i0 + t, keys.data(), prob.data(), qs.data(), obuf.data() + t * E,
                                      qbuf.data() + t * E);
      gemm_rows(obuf.data(), E, n, E, m.out_wt, E, E, m.out_b, m.y + b * m.yb + i0 * m.yi, m.yi);
    }
  }
}

TORE_AVX512_FN static void block_samples(const Block& m, int64_t begin, int64_t end) {
  switch (m.H) {
    case 1: return block_samples_d<0, 1>(m, begin, end);
    case 2: return block_samples_d<0, 2>(m, begin, end);
    case 4: return block_samples_d<0, 4>(m, begin, end);
    case 8: return m.E == 128 ? block_samples_d<16, 8>(m, begin, end) : block_samples_d<0, 8>(m, begin, end);
    default: return block_samples_d<0, 16>(m, begin, end);
  }
}

// gemm_rows needs E % 64 == 0; the row kernel reads the L2 buffer's [H, d] blocks contiguously.
bool block_applies(int64_t E, int64_t H, int64_t max_degree) {
  return E % 64 == 0 && avx512_shape(E / H, H, max_degree);
}

// ---- unmasked attention to few keys, fp32 inference, AVX-512 ------------------------------------------------
// SDPA runs FastMETRO's decoder cross-attention (445 queries x 49 image tokens, d 64) at about 80 GFLOP/s on 2
// cores: its blocked GEMMs are built for long key sequences. Here a task is one (sample, head): its keys, scaled
// and transposed to [d, S rounded up to 16], and its values stay in L1 while the scores of four query rows at a
// time (at most kFewKeys keys: four vectors per row) are formed in registers, soft-maxed, and multiplied by the
// values in registers, 64 columns at a time.
constexpr int64_t kFewKeys = 64;
constexpr int kFewRows = 4;

struct FewKeys {
  const float *q, *k, *v;
  float* o;
  View4 qs, ks, vs, os;  // element strides; the last dim is contiguous
  int64_t L, S, d;
  float scale;
};

// acc[r][t] = sum_j x[r][j] w[j * ldw + 16 t : + 16] for the kFewRows rows x[r]: a register tile N vectors wide
template <int N>
TORE_AVX512_FN static inline void few_keys_tile(const float* const* x, int64_t K, const float* w, int64_t ldw,
                                                __m512 (*acc)[N]) {
  for (int r = 0; r < kFewRows; ++r)
    for (int t = 0; t < N; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t j = 0; j < K; ++j) {
    __m512 wv[N];
    for (int t = 0; t < N; ++t) wv[t] = _mm512_loadu_ps(w + j * ldw + 16 * t);
    for (int r = 0; r < kFewRows; ++r) {
      const __m512 xj = _mm512_set1_ps(x[r][j]);
      for (int t = 0; t < N; ++t) acc[r][t] = _mm512_fmadd_ps(xj, wv[t], acc[r][t]);
    }
  }
}

// out[r][0 : 16 N] = sum_j prob[r][j] v[j, 0 : 16 N] for the block's first `rows` rows
template <int N>
TORE_AVX512_FN static inline void few_keys_values(const float* v, int64_t vj, int64_t S, const float* const* prob,
                                                  float* const* out, int rows) {
  __m512 acc[kFewRows][N];
  few_keys_tile<N>(prob, S, v, vj, acc);
  for (int r = 0; r < rows; ++r)
    for (int t = 0; t < N; ++t) _mm512_storeu_ps(out[r] + 16 * t, acc[r][t]);
}

template <int G>  // key vectors per row: S <= 16 G
TORE_AVX512_FN static void few_keys_head(const FewKeys& a, int64_t b, int64_t h, float* kt, float* prob) {
  const int64_t S = a.S, d = a.d, Sp = 16 * G;
  const float* k = a.k + a.ks.row(b, h, 0);
  const float* v = a.v + a.vs.row(b, h, 0);
  for (int64_t j = 0; j < Sp; ++j)  // key rows read contiguously
    for (int64_t c = 0; c < d; ++c) kt[c * Sp + j] = j < S ? k[j * a.ks.s2 + c] * a.scale : 0.f;
  const __mmask16 tail = static_cast<__mmask16>(S == Sp ? 0xFFFF : (1u << (S - 16 * (G - 1))) - 1);
  for (int64_t i0 = 0; i0 < a.L; i0 += kFewRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kFewRows, a.L - i0));
    const float* q[kFewRows];
    float* out[kFewRows];
    for (int r = 0; r < kFewRows; ++r) {  // a short block repeats its last row (computed, not stored)
      q[r] = a.q + a.qs.row(b, h, i0 + std::min(r, rows - 1));
      out[r] = a.o + a.os.row(b, h, i0 + std::min(r, rows - 1));
    }
    __m512 s[kFewRows][G];
    few_keys_tile<G>(q, d, kt, Sp, s);
    for (int r = 0; r < kFewRows; ++r) {  // softmax; padding lanes get probability 0, a NaN score makes the row NaN
      s[r][G - 1] = _mm512_mask_blend_ps(tail, _mm512_set1_ps(-std::numeric_limits<float>::infinity()), s[r][G - 1]);
      __m512 m = s[r][0];
      for (int g = 1; g < G; ++g) m = _mm512_max_ps(m, s[r][g]);
      m = _mm512_set1_ps(_mm512_reduce_max_ps(m));
      __m512 sum = _mm512_setzero_ps();
      for (int g = 0; g < G; ++g) {
        s[r][g] = exp_nonpositive16(_mm512_sub_ps(s[r][g], m));
        if (g == G - 1) s[r][g] = _mm512_maskz_mov_ps(tail, s[r][g]);
        sum = _mm512_add_ps(sum, s[r][g]);
      }
      const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
      for (int g = 0; g < G; ++g) _mm512_storeu_ps(prob + r * Sp + 16 * g, _mm512_mul_ps(s[r][g], inv));
    }
    const float* p[kFewRows];
    for (int r = 0; r < kFewRows; ++r) p[r] = prob + r * Sp;
    for (int64_t c0 = 0; c0 < d; c0 += 64) {
      float* o[kFewRows];
      for (int r = 0; r < kFewRows; ++r) o[r] = out[r] + c0;
      switch (std::min<int64_t>(4, (d - c0) / 16)) {
        case 1: few_keys_values<1>(v + c0, a.vs.s2, S, p, o, rows); break;
        case 2: few_keys_values<2>(v + c0, a.vs.s2, S, p, o, rows); break;
        case 3: few_keys_values<3>(v + c0, a.vs.s2, S, p, o, rows); break;
        default: few_keys_values<4>(v + c0, a.vs.s2, S, p, o, rows); break;
      }
    }
  }
}

TORE_AVX512_FN static void few_keys_heads(const FewKeys& a, int64_t H, int64_t begin, int64_t end) {
  const int64_t G = (a.S + 15) / 16;
  std::vector<float> kt(a.d * 16 * G), prob(kFewRows * 16 * G);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t b = t / H, h = t % H;
    switch (G) {
      case 1: few_keys_head<1>(a, b, h, kt.data(), prob.data()); break;
      case 2: few_keys_head<2>(a, b, h, kt.data(), prob.data()); break;
      case 3: few_keys_head<3>(a, b, h, kt.data(), prob.data()); break;
      default: few_keys_head<4>(a, b, h, kt.data(), prob.data()); break;
    }
  }
}

bool few_keys_applies(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return cpu_isa() == Isa::avx512 && q.scalar_type() == at::kFloat && k.size(2) >= 1 && k.size(2) <= kFewKeys &&
         q.size(3) % 16 == 0 && q.size(3) > 0 && q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1;
}

void few_keys_run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, at::Tensor& out) {
  const FewKeys a{q.const_data_ptr<float>(), k.const_data_ptr<float>(), v.const_data_ptr<float>(),
                  out.data_ptr<float>(), View4(q), View4(k), View4(v), View4(out), q.size(2), k.size(2), q.size(3),
                  static_cast<float>(scale)};
  const int64_t H = q.size(1);
  at::parallel_for(0, q.size(0) * H, 1, [&](int64_t begin, int64_t end) { few_keys_heads(a, H, begin, end); });
}
#else
bool try_fused_f32(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Table&, double, at::Tensor&,
                   at::Tensor&, at::Tensor*) {
  return false;
}
bool try_fused_projected(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Table&, double,
                         const at::Tensor&, const at::Tensor&, at::Tensor&) {
  return false;
}
struct Block {};
bool block_applies(int64_t, int64_t, int64_t) { return false; }
bool few_keys_applies(const at::Tensor&, const at::Tensor&, const at::Tensor&) { return false; }
void few_keys_run(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, at::Tensor&) {}
#endif

// Calls f.template operator()<Kernels<scalar_t, D, UNIT>>() for the tensors' head dim and strides.
template <typename scalar_t, typename F>
void dispatch_dim(std::initializer_list<const at::Tensor*> ts, F&& f) {
  bool unit = true;
  for (const at::Tensor* t : ts) unit = unit && (t->size(3) <= 1 || t->stride(3) == 1);
  const int64_t d = (*ts.begin())->size(3);
  if (!unit) return f(Kernels<scalar_t, 0, false>{});
  switch (d) {
    case 8: return f(Kernels<scalar_t, 8, true>{});
    case 16: return f(Kernels<scalar_t, 16, true>{});
    case 32: return f(Kernels<scalar_t, 32, true>{});
    case 64: return f(Kernels<scalar_t, 64, true>{});
    default: return f(Kernels<scalar_t, 0, true>{});
  }
}

Table make_table(const at::Tensor& index, const at::Tensor& count, const at::Tensor& shared) {
  return Table{index.data_ptr<int32_t>(), count.data_ptr<int32_t>(), shared.data_ptr<int32_t>(), index.size(1),
               shared.numel()};
}

at::ScalarType lse_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// out, lse and (want_weights) the head-averaged weights [B, L, S]
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& index,
                                                            const at::Tensor& count, const at::Tensor& shared,
                                                            double scale, int64_t layout, bool want_weights) {
  check_qkv(q, k, v);
  check_table(index, count, shared, q.size(2), k.size(2));
  at::Tensor out = empty_out(q, layout);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(lse_type(q)));
  at::Tensor weights;
  if (want_weights) weights = at::empty({q.size(0), q.size(2), k.size(2)}, q.options());
  const Table tab = make_table(index, count, shared);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "adjacency_attention_forward", [&] {
    if (try_fused_f32(q, k, v, tab, scale, out, lse, want_weights ? &weights : nullptr)) return;
    dispatch_dim<scalar_t>({&q, &k, &v, &out}, [&](auto kern) {
      decltype(kern)::forward(q, k, v, tab, scale, out, lse, want_weights ? weights.data_ptr<scalar_t>() : nullptr);
    });
  });
  return {out, lse, weights};
}

std::tuple<at::Tensor, at::Tensor> adjacency_attention_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, const at::Tensor& index,
                                                                  const at::Tensor& count, const at::Tensor& shared,
                                                                  double scale, int64_t layout) {
  auto [out, lse, weights] = forward_impl(q, k, v, index, count, shared, scale, layout, false);
  return {out, lse};
}

// Not differentiable: for inference callers that also want nn.MultiheadAttention's averaged weights.
std::tuple<at::Tensor, at::Tensor, at::Tensor> adjacency_attention_forward_weights_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& index, const at::Tensor& count,
    const at::Tensor& shared, double scale, int64_t layout) {
  return forward_impl(q, k, v, index, count, shared, scale, layout, true);
}

// Inference (not differentiable): the attention out-projected, y = out @ wt + bias as [B, L, N] in q's token order
// (seq-first q: y is [L, B, N] in memory). wt is the output projection's weight transposed, [H * d, N].
at::Tensor adjacency_attention_forward_projected_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const at::Tensor& index, const at::Tensor& count,
                                                     const at::Tensor& shared, double scale, const at::Tensor& wt,
                                                     const std::optional<at::Tensor>& bias) {
  check_qkv(q, k, v);
  check_table(index, count, shared, q.size(2), k.size(2));
  const int64_t B = q.size(0), L = q.size(2), HD = q.size(1) * q.size(3);
  TORCH_CHECK(wt.dim() == 2 && wt.size(0) == HD && wt.is_contiguous() && wt.scalar_type() == q.scalar_type(),
              "adjacency_attention_forward_projected: wt must be a contiguous [H * d = ", HD,
              ", N] tensor of q's dtype");
  const int64_t N = wt.size(1);
  at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  TORCH_CHECK(!b.defined() ||
                  (b.dim() == 1 && b.size(0) == N && b.is_contiguous() && b.scalar_type() == q.scalar_type()),
              "adjacency_attention_forward_projected: bias must be a contiguous [N = ", N, "] tensor of q's dtype");
  check_no_dense_rows(count, "adjacency_attention_forward_projected");
  const bool seq_first = q.stride(0) < q.stride(2);
  at::Tensor y = empty_tokens(B, L, N, seq_first, q.options());
  if (try_fused_projected(q, k, v, make_table(index, count, shared), scale, wt, b, y))
    return y;
  // Otherwise two steps: the attention written in y's token order with each [H, d] block contiguous (so the AVX2
  // row kernel applies: a BHLd output would take the portable kernel), then one GEMM straight into y.
  auto [out, lse, weights] = forward_impl(q, k, v, index, count, shared, scale, seq_first ? 2 : 1, false);
  const at::Tensor flat = (seq_first ? out.permute({2, 0, 1, 3}) : out.permute({0, 2, 1, 3})).view({B * L, HD});
  at::Tensor y_rows = (seq_first ? y.permute({1, 0, 2}) : y).view({B * L, N});
  if (b.defined()) at::addmm_out(y_rows, b, flat, wt);
  else at::mm_out(y_rows, flat, wt);
  return y;
}

// Inference (not differentiable): nn.MultiheadAttention's output (need_weights=False) for a neighbour table without
// dense rows. query [B, L, E], key and value [B, S, E] (last dim contiguous, any other strides); in_wt [E, 3E] and
// out_wt [E, E] are in_proj_weight and out_proj.weight transposed. y [B, L, E] in query's memory order.
at::Tensor adjacency_mha_forward_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                     const at::Tensor& in_wt, const std::optional<at::Tensor>& in_bias,
                                     const at::Tensor& index, const at::Tensor& count, const at::Tensor& shared,
                                     int64_t num_heads, double scale, const at::Tensor& out_wt,
                                     const std::optional<at::Tensor>& out_bias) {
  const char* op = "adjacency_mha_forward: ";
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3 && value.dim() == 3 && key.sizes() == value.sizes() &&
                  key.size(0) == query.size(0) && key.size(2) == query.size(2),
              op, "query must be [B, L, E] and key, value [B, S, E]");
  const int64_t B = query.size(0), L = query.size(1), S = key.size(1), E = query.size(2);
  for (const at::Tensor* t : {&query, &key, &value})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->stride(2) == 1, op,
                "query, key and value must be float32 with a contiguous last dimension");
  TORCH_CHECK(num_heads > 0 && E % num_heads == 0, op, "num_heads (", num_heads, ") must divide E (", E, ")");
  auto check_weight = [&](const at::Tensor& w, const std::optional<at::Tensor>& bias, int64_t cols, const char* name) {
    TORCH_CHECK(w.dim() == 2 && w.size(0) == E && w.size(1) == cols && w.is_contiguous() &&
                    w.scalar_type() == at::kFloat,
                op, name, " must be a contiguous float32 [", E, ", ", cols, "] tensor");
    TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == cols && bias->is_contiguous() &&
                                      bias->scalar_type() == at::kFloat),
                op, name, "'s bias must be a contiguous float32 [", cols, "] tensor");
  };
  check_weight(in_wt, in_bias, 3 * E, "in_wt");
  check_weight(out_wt, out_bias, E, "out_wt");
  check_table(index, count, shared, L, S);
  check_no_dense_rows(count, "adjacency_mha_forward");
  const Table tab = make_table(index, count, shared);
  at::Tensor y = empty_tokens(B, L, E, query.stride(1) > query.stride(0), query.options());
  const float* in_b = in_bias.has_value() ? in_bias->const_data_ptr<float>() : nullptr;
  const float* out_b = out_bias.has_value() ? out_bias->const_data_ptr<float>() : nullptr;
#ifdef TORE_AA_AVX2
  if (block_applies(E, num_heads, tab.max_degree())) {
    const Block m{query.const_data_ptr<float>(), key.const_data_ptr<float>(), value.const_data_ptr<float>(),
                  query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
                  y.stride(0), y.stride(1), in_wt.const_data_ptr<float>(), in_b, out_wt.const_data_ptr<float>(),
                  out_b, y.data_ptr<float>(), E, num_heads, L, S, tab, static_cast<float>(scale)};
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) { block_samples(m, begin, end); });
    return y;
  }
#endif
  // other CPUs and shapes: the in-projections, then the attention with its out-projection
  auto project = [&](const at::Tensor& x, int64_t part) {
    at::Tensor p = at::matmul(x, in_wt.slice(1, part * E, (part + 1) * E));
    if (in_bias.has_value()) p.add_(in_bias->slice(0, part * E, (part + 1) * E));
    return p.view({B, x.size(1), num_heads, E / num_heads}).permute({0, 2, 1, 3});
  };
  return y.copy_(adjacency_attention_forward_projected_cpu(project(query, 0), project(key, 1), project(value, 2),
                                                           index, count, shared, scale, out_wt, out_bias));
}

// Whether adjacency_mha_forward runs its fused kernel on this CPU for these sizes and is then the faster choice.
// Its tasks are whole samples: a batch that leaves more than a fifth of the threads' time idle (one sample on two
// threads, three on two) runs faster as separate steps parallel over rows.
bool adjacency_mha_fused(int64_t batch, int64_t embed_dim, int64_t num_heads, int64_t max_degree) {
  const int64_t threads = at::get_num_threads(), rounds = (batch + threads - 1) / threads;
  return batch > 0 && 4 * rounds * threads <= 5 * batch && num_heads > 0 && embed_dim % num_heads == 0 &&
         block_applies(embed_dim, num_heads, max_degree);
}

// Inference (not differentiable): unmasked softmax attention of q [B, H, L, d] to k, v [B, H, S, d], written in
// `layout` (see empty_out). The AVX-512 kernel for at most kFewKeys keys; otherwise ATen's SDPA, copied.
at::Tensor few_keys_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                  int64_t layout) {
  check_qkv(q, k, v);
  at::Tensor out = empty_out(q, layout);
  if (few_keys_applies(q, k, v))
    few_keys_run(q, k, v, scale, out);
  else
    out.copy_(at::scaled_dot_product_attention(q, k, v, {}, 0.0, false, scale));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> adjacency_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& index, const at::Tensor& count, const at::Tensor& shared, double scale) {
  check_qkv(q, k, v);
  check_table(index, count, shared, q.size(2), k.size(2));
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes() && grad_out.scalar_type() == q.scalar_type(),
              "adjacency_attention_backward: grad_out and out must match q");
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == lse_type(q) &&
                  lse.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2)}),
              "adjacency_attention_backward: lse must be a contiguous [B, H, L] tensor");
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "adjacency_attention_backward", [&] {
    dispatch_dim<scalar_t>({&grad_out, &q, &k, &v, &out, &dq, &dk, &dv}, [&](auto kern) {
      decltype(kern)::backward(grad_out, q, k, v, out, lse, make_table(index, count, shared), scale, dq, dk, dv);
    });
  });
  return {dq, dk, dv};
}

at::Tensor adjacency_attention_probs_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
                                         const at::Tensor& index, const at::Tensor& count, const at::Tensor& shared,
                                         double scale) {
  check_qkv(q, k, k);
  check_table(index, count, shared, q.size(2), k.size(2));
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == lse_type(q) &&
                  lse.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2)}),
              "adjacency_attention_probs: lse must be a contiguous [B, H, L] tensor");
  at::Tensor probs = at::empty({q.size(0), q.size(1), q.size(2), shared.numel() + index.size(1)}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "adjacency_attention_probs", [&] {
    dispatch_dim<scalar_t>({&q, &k}, [&](auto kern) {
      decltype(kern)::probs(q, k, lse, make_table(index, count, shared), scale, probs);
    });
  });
  return probs;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tore_kernels, m) {
  m.def("adjacency_attention_forward(Tensor q, Tensor k, Tensor v, Tensor index, Tensor count, Tensor shared, "
        "float scale, int layout) -> (Tensor, Tensor)");
  m.def("adjacency_attention_forward_weights(Tensor q, Tensor k, Tensor v, Tensor index, Tensor count, "
        "Tensor shared, float scale, int layout) -> (Tensor, Tensor, Tensor)");
  m.def("adjacency_attention_forward_projected(Tensor q, Tensor k, Tensor v, Tensor index, Tensor count, "
        "Tensor shared, float scale, Tensor wt, Tensor? bias) -> Tensor");
  m.def("adjacency_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor index, Tensor count, Tensor shared, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("adjacency_attention_probs(Tensor q, Tensor k, Tensor lse, Tensor index, Tensor count, Tensor shared, "
        "float scale) -> Tensor");
  m.def("adjacency_mha_forward(Tensor query, Tensor key, Tensor value, Tensor in_wt, Tensor? in_bias, Tensor index, "
        "Tensor count, Tensor shared, int num_heads, float scale, Tensor out_wt, Tensor? out_bias) -> Tensor");
  m.def("few_keys_attention(Tensor q, Tensor k, Tensor v, float scale, int layout) -> Tensor");
  m.def("adjacency_mha_fused(int batch, int embed_dim, int num_heads, int max_degree) -> bool", &adjacency_mha_fused);
}

TORCH_LIBRARY_IMPL(tore_kernels, CPU, m) {
  m.impl("adjacency_attention_forward", &adjacency_attention_forward_cpu);
  m.impl("adjacency_attention_forward_weights", &adjacency_attention_forward_weights_cpu);
  m.impl("adjacency_attention_forward_projected", &adjacency_attention_forward_projected_cpu);
  m.impl("adjacency_attention_backward", &adjacency_attention_backward_cpu);
  m.impl("adjacency_attention_probs", &adjacency_attention_probs_cpu);
  m.impl("adjacency_mha_forward", &adjacency_mha_forward_cpu);
  m.impl("few_keys_attention", &few_keys_attention_cpu);
}

}  // namespace tore_kernels
