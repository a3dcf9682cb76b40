// Schemas of the projection ops (torch.ops.tore_kernels.*) and their shared argument checks.
#include <torch/library.h>

#include "projection/projection.h"

namespace tore_kernels {
namespace projection {

namespace {
bool is_float(const at::Tensor& t) {
  const auto d = t.scalar_type();
  return d == at::kFloat || d == at::kDouble || d == at::kHalf || d == at::kBFloat16;
}
}  // namespace

void check_project(const at::Tensor& points, const at::Tensor& camera) {
  TORCH_CHECK_TYPE(is_float(points), "weak_perspective_project: points must be float32/float64/float16/bfloat16, got ",
                   points.scalar_type());
  TORCH_CHECK_TYPE(camera.scalar_type() == points.scalar_type(), "weak_perspective_project: camera must have the dtype of "
                   "points (", points.scalar_type(), "), got ", camera.scalar_type());
  TORCH_CHECK_VALUE(camera.device() == points.device(), "weak_perspective_project: camera must be on the device of points (",
                    points.device(), "), got ", camera.device());
  TORCH_CHECK_VALUE(points.dim() >= 2 && points.size(-1) == 3, "weak_perspective_project: points must have shape "
                    "[..., P, 3], got ", points.sizes());
  TORCH_CHECK_VALUE(camera.dim() == points.dim() - 1 && camera.size(-1) == 3 &&
                        camera.sizes().slice(0, camera.dim() - 1) == points.sizes().slice(0, points.dim() - 2),
                    "weak_perspective_project: camera must have shape [..., 3] with the leading dims of points ",
                    points.sizes(), ", got ", camera.sizes());
}

void check_project_backward(const at::Tensor& grad, const at::Tensor& points, const at::Tensor& camera) {
  check_project(points, camera);
  TORCH_CHECK_TYPE(grad.scalar_type() == points.scalar_type(), "weak_perspective_project_backward: grad must have the "
                   "dtype of points (", points.scalar_type(), "), got ", grad.scalar_type());
  TORCH_CHECK_VALUE(grad.device() == points.device(), "weak_perspective_project_backward: grad must be on the device "
                    "of points");
  TORCH_CHECK_VALUE(grad.dim() == points.dim() && grad.size(-1) == 2 &&
                        grad.sizes().slice(0, grad.dim() - 1) == points.sizes().slice(0, points.dim() - 1),
                    "weak_perspective_project_backward: grad must have shape [..., P, 2] matching points ",
                    points.sizes(), ", got ", grad.sizes());
}

void check_occupancy(const at::Tensor& points2d, int64_t grid_h, int64_t grid_w) {
  TORCH_CHECK_TYPE(is_float(points2d), "token_occupancy: points2d must be float32/float64/float16/bfloat16, got ",
                   points2d.scalar_type());
  TORCH_CHECK_VALUE(points2d.dim() == 3 && points2d.size(2) == 2, "token_occupancy: points2d must have shape [B, P, 2], "
                    "got ", points2d.sizes());
  // Cells (and one spare for dropped points) are indexed with int32 in the kernels.
  TORCH_CHECK_VALUE(grid_h >= 1 && grid_w >= 1 && grid_h * grid_w <= int64_t(0x7fffffff) - 1,
                    "token_occupancy: grid_h and grid_w must be >= 1 with grid_h * grid_w < 2^31, got ", grid_h,
                    " and ", grid_w);
}

}  // namespace projection
}  // namespace tore_kernels

TORCH_LIBRARY_FRAGMENT(tore_kernels, m) {
  // s * (X[..., :2] + (tx, ty)) for camera (s, tx, ty): translation before scale, as the released code.
  m.def("weak_perspective_project(Tensor points, Tensor camera) -> Tensor", {at::Tag::pt2_compliant_tag});
  // (grad_points [..., P, 3], grad_camera [..., 3]) for grad [..., P, 2].
  m.def("weak_perspective_project_backward(Tensor grad, Tensor points, Tensor camera) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  // [B, grid_h, grid_w] in the dtype of points2d: 1 where a point's token cell is. Not differentiable.
  m.def("token_occupancy(Tensor points2d, int grid_h, int grid_w) -> Tensor", {at::Tag::pt2_compliant_tag});
}
