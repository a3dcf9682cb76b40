// CPU implementations of the projection ops (schemas in projection_ops.cpp). Half types are computed
// in float; the camera gradient sums accumulate in the op-math type (float, or double for double).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "projection/projection.h"

namespace tore_kernels {
namespace projection {
namespace {

// Work per task for at::parallel_for: the ops are a few flops per point, so only split large inputs.
constexpr int64_t kGrainPoints = 32768;

at::Tensor project_cpu(const at::Tensor& points_in, const at::Tensor& camera_in) {
  check_project(points_in, camera_in);
  const at::Tensor points = points_in.contiguous();
  const at::Tensor camera = camera_in.contiguous();
  auto sizes = points.sizes().vec();
  sizes.back() = 2;
  at::Tensor out = at::empty(sizes, points.options());
  const int64_t P = points.size(-2);
  const int64_t n = num_cameras(camera) * P;
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, points.scalar_type(), "weak_perspective_project_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = points.const_data_ptr<scalar_t>();
    const scalar_t* cam = camera.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrainPoints, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* c = cam + (i / P) * 3;
        const acc_t s = c[0];
        y[2 * i] = static_cast<scalar_t>(s * (acc_t(x[3 * i]) + acc_t(c[1])));
        y[2 * i + 1] = static_cast<scalar_t>(s * (acc_t(x[3 * i + 1]) + acc_t(c[2])));
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> project_backward_cpu(const at::Tensor& grad_in, const at::Tensor& points_in,
                                                        const at::Tensor& camera_in) {
  check_project_backward(grad_in, points_in, camera_in);
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor points = points_in.contiguous();
  const at::Tensor camera = camera_in.contiguous();
  at::Tensor grad_points = at::empty(points.sizes(), points.options());
  at::Tensor grad_camera = at::empty(camera.sizes(), camera.options());
  const int64_t P = points.size(-2);
  const int64_t B = num_cameras(camera);
  if (B == 0) return {grad_points, grad_camera};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, points.scalar_type(), "weak_perspective_project_backward_cpu",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const scalar_t* x = points.const_data_ptr<scalar_t>();
    const scalar_t* cam = camera.const_data_ptr<scalar_t>();
    scalar_t* gx = grad_points.mutable_data_ptr<scalar_t>();
    scalar_t* gc = grad_camera.mutable_data_ptr<scalar_t>();
    // One camera per task item: its three sums stay in one thread (deterministic, no atomics).
    const int64_t grain = std::max<int64_t>(1, kGrainPoints / std::max<int64_t>(P, 1));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const acc_t s = cam[3 * b], tx = cam[3 * b + 1], ty = cam[3 * b + 2];
        acc_t sum_s = 0, sum_x = 0, sum_y = 0;
        for (int64_t p = b * P; p < (b + 1) * P; ++p) {
          const acc_t g0 = g[2 * p], g1 = g[2 * p + 1];
          sum_s += g0 * (acc_t(x[3 * p]) + tx) + g1 * (acc_t(x[3 * p + 1]) + ty);
          sum_x += g0;
          sum_y += g1;
          gx[3 * p] = static_cast<scalar_t>(s * g0);
          gx[3 * p + 1] = static_cast<scalar_t>(s * g1);
          gx[3 * p + 2] = scalar_t(0);
        }
        gc[3 * b] = static_cast<scalar_t>(sum_s);
        gc[3 * b + 1] = static_cast<scalar_t>(s * sum_x);
        gc[3 * b + 2] = static_cast<scalar_t>(s * sum_y);
      }
    });
  });
  return {grad_points, grad_camera};
}

at::Tensor token_occupancy_cpu(const at::Tensor& points2d_in, int64_t grid_h, int64_t grid_w) {
  check_occupancy(points2d_in, grid_h, grid_w);
  const at::Tensor points2d = points2d_in.contiguous();
  const int64_t B = points2d.size(0), P = points2d.size(1), cells = grid_h * grid_w;
  at::Tensor out = at::zeros({B, grid_h, grid_w}, points2d.options());
  if (B == 0 || P == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, points2d.scalar_type(), "token_occupancy_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t gh = acc_t(scalar_t(grid_h)), gw = acc_t(scalar_t(grid_w));
    const scalar_t* pts = points2d.const_data_ptr<scalar_t>();
    scalar_t* occ = out.mutable_data_ptr<scalar_t>();
    // One sample per task item, so no two threads write to the same grid. A chunk of cell indices is
    // computed without branches (the compiler vectorises that loop), then marked in a byte grid whose
    // spare last cell takes the dropped points.
    at::parallel_for(0, B, std::max<int64_t>(1, kGrainPoints / P), [&](int64_t begin, int64_t end) {
      constexpr int64_t kChunk = 256;
      int32_t cell[kChunk];
      const int32_t width = static_cast<int32_t>(grid_w), spare = static_cast<int32_t>(cells);
      std::vector<uint8_t> grid(cells + 1);
      for (int64_t b = begin; b < end; ++b) {
        std::fill(grid.begin(), grid.end(), uint8_t(0));
        const scalar_t* q = pts + 2 * b * P;
        for (int64_t p0 = 0; p0 < P; p0 += kChunk) {
          const int64_t n = std::min(kChunk, P - p0);
          for (int64_t i = 0; i < n; ++i) {
            const int32_t col = token_cell<scalar_t, acc_t>(q[2 * (p0 + i)], gw);
            const int32_t row = token_cell<scalar_t, acc_t>(q[2 * (p0 + i) + 1], gh);
            cell[i] = (col | row) < 0 ? spare : row * width + col;
          }
          for (int64_t i = 0; i < n; ++i) grid[cell[i]] = 1;
        }
        for (int64_t c = 0; c < cells; ++c) occ[b * cells + c] = scalar_t(grid[c]);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace projection
}  // namespace tore_kernels

TORCH_LIBRARY_IMPL(tore_kernels, CPU, m) {
  m.impl("weak_perspective_project", &tore_kernels::projection::project_cpu);
  m.impl("weak_perspective_project_backward", &tore_kernels::projection::project_backward_cpu);
  m.impl("token_occupancy", &tore_kernels::projection::token_occupancy_cpu);
}
