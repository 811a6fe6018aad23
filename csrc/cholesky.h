// Shared by the CPU and CUDA implementations of globe_ext::cholesky_solve_batched (torch side).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace globe_ext {

// G [n, r, r] and R [n, p, r] of one floating dtype (float32 or float64) on one device.
inline void check_cholesky_inputs(const at::Tensor& G, const at::Tensor& R) {
  TORCH_CHECK(G.dim() == 3 && G.size(1) == G.size(2), "cholesky_solve_batched: G must be [n, r, r], got ",
              G.sizes());
  TORCH_CHECK(R.dim() == 3 && R.size(0) == G.size(0) && R.size(2) == G.size(1),
              "cholesky_solve_batched: R must be [n, p, ", G.size(1), "] to match G ", G.sizes(), ", got ",
              R.sizes());
  TORCH_CHECK(G.scalar_type() == R.scalar_type(), "cholesky_solve_batched: G and R must share a dtype, got ",
              G.scalar_type(), " and ", R.scalar_type());
  TORCH_CHECK(G.scalar_type() == at::kFloat || G.scalar_type() == at::kDouble,
              "cholesky_solve_batched: the extension supports float32 and float64, got ", G.scalar_type());
  TORCH_CHECK(G.device() == R.device(), "cholesky_solve_batched: G and R must be on one device, got ",
              G.device(), " and ", R.device());
}

}  // namespace globe_ext
