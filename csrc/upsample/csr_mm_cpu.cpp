// csr_mm: y = P @ x for a CSR matrix P given by its three dense arrays, x [V, C] row-major (the mesh upsampling's
// batch folded into C). One pass over P's rows, each a weighted sum of a few rows of x, so a graph can hold the
// product (a sparse tensor cannot be a graph constant), and 20x faster than torch.sparse.mm at batch 32 (SMPL's
// 431 -> 6890 on 2 Zen 4 cores: 105-125 us against 2.3 ms; batch 1: 36 against 50-58 us).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_isa.h"

#include <algorithm>

namespace tore_kernels {
namespace {

// Row r of y is the sum of val[j] * x[col[j]] over its entries, accumulated in registers: C = 3 (coordinates at
// batch 1) as three scalars, wider rows 16 columns at a time (a fixed-size loop the compiler vectorises for the ISA
// of the clone it is inlined into), then the last C % 16 columns.
template <typename scalar_t>
__attribute__((always_inline)) inline void csr_rows(const int64_t* crow, const int64_t* col, const scalar_t* val,
                                                    const scalar_t* x, int64_t C, scalar_t* y, int64_t begin,
                                                    int64_t end) {
  constexpr int64_t kBlock = 16;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t j0 = crow[r], j1 = crow[r + 1];
    scalar_t* out = y + r * C;
    if (C == 3) {
      scalar_t a = 0, b = 0, c = 0;
      for (int64_t j = j0; j < j1; ++j) {
        const scalar_t* in = x + col[j] * 3;
        a += val[j] * in[0];
        b += val[j] * in[1];
        c += val[j] * in[2];
      }
      out[0] = a, out[1] = b, out[2] = c;
      continue;
    }
    int64_t c0 = 0;
    for (; c0 + kBlock <= C; c0 += kBlock) {
      scalar_t acc[kBlock] = {};
      for (int64_t j = j0; j < j1; ++j) {
        const scalar_t* in = x + col[j] * C + c0;
        for (int64_t k = 0; k < kBlock; ++k) acc[k] += val[j] * in[k];
      }
      for (int64_t k = 0; k < kBlock; ++k) out[c0 + k] = acc[k];
    }
    for (int64_t k = c0; k < C; ++k) {
      scalar_t acc = 0;
      for (int64_t j = j0; j < j1; ++j) acc += val[j] * x[col[j] * C + k];
      out[k] = acc;
    }
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
template <typename scalar_t>
__attribute__((target("avx2,fma,avx512f,avx512dq,avx512vl"))) void csr_rows_avx512(
    const int64_t* crow, const int64_t* col, const scalar_t* val, const scalar_t* x, int64_t C, scalar_t* y,
    int64_t begin, int64_t end) {
  csr_rows(crow, col, val, x, C, y, begin, end);
}
template <typename scalar_t>
__attribute__((target("avx2,fma"))) void csr_rows_avx2(const int64_t* crow, const int64_t* col, const scalar_t* val,
                                                       const scalar_t* x, int64_t C, scalar_t* y, int64_t begin,
                                                       int64_t end) {
  csr_rows(crow, col, val, x, C, y, begin, end);
}
#endif

// the widest clone ATen's dispatch allows on this CPU (cpu_isa.h)
template <typename scalar_t>
void csr_rows_isa(const int64_t* crow, const int64_t* col, const scalar_t* val, const scalar_t* x, int64_t C,
                  scalar_t* y, int64_t begin, int64_t end) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (cpu_isa() == Isa::avx512) return csr_rows_avx512(crow, col, val, x, C, y, begin, end);
  if (cpu_isa() == Isa::avx2) return csr_rows_avx2(crow, col, val, x, C, y, begin, end);
#endif
  csr_rows(crow, col, val, x, C, y, begin, end);
}

at::Tensor csr_mm_cpu(const at::Tensor& crow_indices, const at::Tensor& col_indices, const at::Tensor& values,
                      int64_t rows, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "csr_mm: x must be a 2-D float32 or float64 tensor, got ", x.dim(), "-D ", x.scalar_type());
  TORCH_CHECK(rows >= 0 && crow_indices.dim() == 1 && crow_indices.size(0) == rows + 1 &&
                  crow_indices.scalar_type() == at::kLong,
              "csr_mm: crow_indices must be an int64 [rows + 1 = ", rows + 1, "] tensor");
  const int64_t nnz = col_indices.numel();
  TORCH_CHECK(col_indices.dim() == 1 && col_indices.scalar_type() == at::kLong,
              "csr_mm: col_indices must be a 1-D int64 tensor");
  TORCH_CHECK(values.dim() == 1 && values.size(0) == nnz && values.scalar_type() == x.scalar_type(),
              "csr_mm: values must be a 1-D tensor of x's dtype with one value per column index (", nnz, ")");
  const at::Tensor crow = crow_indices.contiguous(), col = col_indices.contiguous();
  const int64_t* cr = crow.const_data_ptr<int64_t>();
  const int64_t* cc = col.const_data_ptr<int64_t>();
  // checked on every call (O(rows + nnz), a few microseconds): a bad index must not read out of bounds
  bool rows_ok = cr[0] == 0 && cr[rows] == nnz;
  for (int64_t r = 0; r < rows && rows_ok; ++r) rows_ok = cr[r] <= cr[r + 1];
  TORCH_CHECK(rows_ok, "csr_mm: crow_indices must start at 0, never decrease and end at nnz = ", nnz);
  const int64_t V = x.size(0);
  const bool cols_ok = std::all_of(cc, cc + nnz, [V](int64_t c) { return c >= 0 && c < V; });
  TORCH_CHECK(cols_ok, "csr_mm: col_indices must lie in [0, x.shape[0] = ", V, ")");

  const at::Tensor xc = x.contiguous(), vc = values.contiguous();
  const int64_t C = x.size(1);
  at::Tensor y = at::empty({rows, C}, x.options());
  // about 32k multiply-adds per task: a batch-1 product runs on one thread, without waking the others
  const int64_t per_row = std::max<int64_t>(1, C * (rows ? nnz / rows : 1));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "csr_mm", [&] {
    const scalar_t* val = vc.const_data_ptr<scalar_t>();
    const scalar_t* in = xc.const_data_ptr<scalar_t>();
    scalar_t* out = y.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / per_row), [&](int64_t begin, int64_t end) {
      csr_rows_isa(cr, cc, val, in, C, out, begin, end);
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tore_kernels, m) {
  m.def("csr_mm(Tensor crow_indices, Tensor col_indices, Tensor values, int rows, Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(tore_kernels, CPU, m) {
  m.impl("csr_mm", &csr_mm_cpu);
}

}  // namespace tore_kernels
