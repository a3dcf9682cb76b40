// CUDA implementations of the projection ops (schemas in projection_ops.cpp), launched on the current
// stream. Half types are computed in float; the camera gradient is one block per camera (deterministic).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "projection/projection.h"

namespace tore_kernels {
namespace projection {
namespace {

constexpr int kThreads = 256;            // a multiple of the warp size (the block reduction relies on it)
constexpr int64_t kMaxBlocks = 1 << 16;  // grid-stride loops cover larger inputs

int64_t num_blocks(int64_t n) { return std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks); }

template <typename scalar_t>
__global__ void project_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ cam,
                               scalar_t* __restrict__ y, int64_t n, int64_t P) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const scalar_t* c = cam + (i / P) * 3;
    const acc_t s = c[0];
    y[2 * i] = static_cast<scalar_t>(s * (acc_t(x[3 * i]) + acc_t(c[1])));
    y[2 * i + 1] = static_cast<scalar_t>(s * (acc_t(x[3 * i + 1]) + acc_t(c[2])));
  }
}

// Sum of v over the block (kThreads threads); the result is valid in thread 0.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* shared) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? shared[threadIdx.x] : acc_t(0);
  if (warp == 0)
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// One block per camera b: grad_points of its P points and the three sums of its camera gradient.
template <typename scalar_t>
__global__ void project_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                        const scalar_t* __restrict__ cam, scalar_t* __restrict__ gx,
                                        scalar_t* __restrict__ gc, int64_t P) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t shared[kThreads / 32];
  const int64_t b = blockIdx.x;
  const acc_t s = cam[3 * b], tx = cam[3 * b + 1], ty = cam[3 * b + 2];
  acc_t sum_s = 0, sum_x = 0, sum_y = 0;
  for (int64_t p = b * P + threadIdx.x; p < (b + 1) * P; p += kThreads) {
    const acc_t g0 = g[2 * p], g1 = g[2 * p + 1];
    sum_s += g0 * (acc_t(x[3 * p]) + tx) + g1 * (acc_t(x[3 * p + 1]) + ty);
    sum_x += g0;
    sum_y += g1;
    gx[3 * p] = static_cast<scalar_t>(s * g0);
    gx[3 * p + 1] = static_cast<scalar_t>(s * g1);
    gx[3 * p + 2] = scalar_t(0);
  }
  sum_s = block_sum(sum_s, shared);
  sum_x = block_sum(sum_x, shared);
  sum_y = block_sum(sum_y, shared);
  if (threadIdx.x == 0) {
    gc[3 * b] = static_cast<scalar_t>(sum_s);
    gc[3 * b + 1] = static_cast<scalar_t>(s * sum_x);
    gc[3 * b + 2] = static_cast<scalar_t>(s * sum_y);
  }
}

// One thread per point; points of a sample in the same cell all store the same 1 (a benign race).
template <typename scalar_t>
__global__ void token_occupancy_kernel(const scalar_t* __restrict__ pts, scalar_t* __restrict__ occ, int64_t n,
                                       int64_t P, int64_t grid_h, int64_t grid_w) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t gh = acc_t(scalar_t(grid_h)), gw = acc_t(scalar_t(grid_w));
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t col = token_cell<scalar_t, acc_t>(pts[2 * i], gw);
    const int64_t row = token_cell<scalar_t, acc_t>(pts[2 * i + 1], gh);
    if (col >= 0 && row >= 0) occ[(i / P) * grid_h * grid_w + row * grid_w + col] = scalar_t(1);
  }
}

at::Tensor project_cuda(const at::Tensor& points_in, const at::Tensor& camera_in) {
  check_project(points_in, camera_in);
  const c10::cuda::CUDAGuard guard(points_in.device());
  const at::Tensor points = points_in.contiguous();
  const at::Tensor camera = camera_in.contiguous();
  auto sizes = points.sizes().vec();
  sizes.back() = 2;
  at::Tensor out = at::empty(sizes, points.options());
  const int64_t P = points.size(-2);
  const int64_t n = num_cameras(camera) * P;
  if (n == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, points.scalar_type(), "weak_perspective_project_cuda", [&] {
    project_kernel<scalar_t><<<num_blocks(n), kThreads, 0, stream>>>(
        points.const_data_ptr<scalar_t>(), camera.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n, P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> project_backward_cuda(const at::Tensor& grad_in, const at::Tensor& points_in,
                                                         const at::Tensor& camera_in) {
  check_project_backward(grad_in, points_in, camera_in);
  const c10::cuda::CUDAGuard guard(points_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor points = points_in.contiguous();
  const at::Tensor camera = camera_in.contiguous();
  at::Tensor grad_points = at::empty(points.sizes(), points.options());
  at::Tensor grad_camera = at::empty(camera.sizes(), camera.options());
  const int64_t P = points.size(-2);
  const int64_t B = num_cameras(camera);
  TORCH_CHECK_VALUE(B <= int64_t(0x7fffffff), "weak_perspective_project_backward: at most 2^31 - 1 cameras, got ", B);
  if (B == 0) return {grad_points, grad_camera};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, points.scalar_type(),
                                  "weak_perspective_project_backward_cuda", [&] {
    project_backward_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), points.const_data_ptr<scalar_t>(), camera.const_data_ptr<scalar_t>(),
        grad_points.mutable_data_ptr<scalar_t>(), grad_camera.mutable_data_ptr<scalar_t>(), P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_points, grad_camera};
}

at::Tensor token_occupancy_cuda(const at::Tensor& points2d_in, int64_t grid_h, int64_t grid_w) {
  check_occupancy(points2d_in, grid_h, grid_w);
  const c10::cuda::CUDAGuard guard(points2d_in.device());
  const at::Tensor points2d = points2d_in.contiguous();
  const int64_t B = points2d.size(0), P = points2d.size(1);
  at::Tensor out = at::zeros({B, grid_h, grid_w}, points2d.options());
  const int64_t n = B * P;
  if (n == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, points2d.scalar_type(), "token_occupancy_cuda", [&] {
    token_occupancy_kernel<scalar_t><<<num_blocks(n), kThreads, 0, stream>>>(
        points2d.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n, P, grid_h, grid_w);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace projection
}  // namespace tore_kernels

TORCH_LIBRARY_IMPL(tore_kernels, CUDA, m) {
  m.impl("weak_perspective_project", &tore_kernels::projection::project_cuda);
  m.impl("weak_perspective_project_backward", &tore_kernels::projection::project_backward_cuda);
  m.impl("token_occupancy", &tore_kernels::projection::token_occupancy_cuda);
}
