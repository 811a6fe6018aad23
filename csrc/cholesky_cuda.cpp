// The CUDA implementation of globe_ext::cholesky_solve_batched: checks, allocation and the launch of the
// shared-memory kernel in cholesky_kernel.cu. Compiled only into CUDA builds (GLOBE_WITH_CUDA). Only
// c10/cuda headers are used (not ATen/cuda, which pulls in the cuBLAS and cuSPARSE headers).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "cholesky.h"
#include "cholesky_kernel.h"

namespace globe_ext {

std::tuple<at::Tensor, at::Tensor> cholesky_solve_batched_cuda(const at::Tensor& G, const at::Tensor& R,
                                                               double lam) {
  check_cholesky_inputs(G, R);
  TORCH_CHECK(G.is_cuda(), "cholesky_solve_batched_cuda: expected CUDA tensors, got ", G.device());
  const c10::cuda::CUDAGuard guard(G.device());
  const int64_t n = G.size(0);
  const int64_t r = G.size(1);
  const int64_t p = R.size(1);
  TORCH_CHECK(r <= kCudaMaxR, "cholesky_solve_batched: the CUDA kernel takes r <= ", kCudaMaxR, ", got r=", r);
  const size_t smem = cholesky_cuda_smem_bytes(static_cast<int>(r), G.element_size());
  size_t optin = 0;
  const cudaError_t query = cholesky_cuda_smem_optin(&optin);
  TORCH_CHECK(query == cudaSuccess, "cholesky_solve_batched: cannot query the device: ", cudaGetErrorString(query));
  TORCH_CHECK(smem <= optin, "cholesky_solve_batched: r=", r, " in ", G.scalar_type(), " needs ", smem,
              " bytes of shared memory per block, this device allows ", optin, " (largest r: ",
              cholesky_cuda_max_r(G.element_size(), optin), ")");
  const at::Tensor Gc = G.contiguous();
  const at::Tensor Rc = R.contiguous();
  at::Tensor A = at::empty({n, p, r}, Rc.options());
  if (r == 0) {
    return {A, at::zeros({n}, Rc.options().dtype(at::kBool))};
  }
  at::Tensor failed = at::empty({n}, Rc.options().dtype(at::kBool));
  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES(Gc.scalar_type(), "cholesky_solve_batched_cuda", [&] {
    err = cholesky_solve_cuda_launch<scalar_t>(Gc.const_data_ptr<scalar_t>(), Rc.const_data_ptr<scalar_t>(), lam,
                                               A.mutable_data_ptr<scalar_t>(), failed.mutable_data_ptr<bool>(),
                                               n, static_cast<int>(r), p, c10::cuda::getCurrentCUDAStream().stream());
  });
  TORCH_CHECK(err == cudaSuccess, "cholesky_solve_batched: CUDA launch failed: ", cudaGetErrorString(err));
  return {A, failed};
}

}  // namespace globe_ext

TORCH_LIBRARY_IMPL(globe_ext, CUDA, m) {
  m.impl("cholesky_solve_batched", &globe_ext::cholesky_solve_batched_cuda);
}
