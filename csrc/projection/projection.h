// Weak-perspective projection and token occupancy (tore-model.md section 6): argument checks shared
// by the CPU (projection_cpu.cpp) and CUDA (projection_cuda.cu) implementations. The op schemas are
// in projection_ops.cpp; the Python side (fake functions, autograd) is tore_kernels/ops/projection.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

namespace tore_kernels {
namespace projection {

// points [..., P, 3], camera [..., 3] with equal leading dims, same floating dtype and device.
void check_project(const at::Tensor& points, const at::Tensor& camera);
// As check_project, plus grad [..., P, 2] (the gradient of the projected points).
void check_project_backward(const at::Tensor& grad, const at::Tensor& points, const at::Tensor& camera);
// points2d [B, P, 2] floating, grid_h, grid_w >= 1, grid_h * grid_w < 2^31 - 1.
void check_occupancy(const at::Tensor& points2d, int64_t grid_h, int64_t grid_w);

// Token cell index along one axis of a G-cell grid for a coordinate x in [-1, 1], or -1 when the point is
// outside [0, G) (NaN included). Each step of g = (x + 1) / 2 * G is rounded to the point dtype, as eager
// torch (the released code) does, so cells on borders match it bit for bit. g = G converted via scalar_t.
// int32 (check_occupancy bounds the cell count) so that CPU compilers vectorise the conversion.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline int32_t token_cell(scalar_t x, acc_t g) {
  const acc_t v = acc_t(scalar_t(acc_t(scalar_t(acc_t(scalar_t(acc_t(x) + acc_t(1))) / acc_t(2))) * g));
  return (v >= acc_t(0) && v < g) ? static_cast<int32_t>(v) : -1;  // v >= 0: truncation is floor
}

// Leading dims of points [..., P, 3] flattened: the number of cameras.
inline int64_t num_cameras(const at::Tensor& camera) { return camera.numel() / 3; }

}  // namespace projection
}  // namespace tore_kernels
