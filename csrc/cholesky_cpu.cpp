// Batched small Cholesky factor + solve on CPU: A_i = R_i (G_i + lam I)^-1 for every system i.
//
// Per system (systems run in parallel with at::parallel_for, one scratch buffer per chunk):
//   1. factor G_i + lam I = L L^T in place of a scratch copy (left-looking, row by row, reading G_i's lower
//      triangle); the dot products accumulate in double for both dtypes and L is stored in the input dtype;
//   2. copy R_i^T into an r x p scratch X, so each substitution step is an axpy over p contiguous values;
//   3. forward substitution L Y = X, back substitution L^T Z = Y, in the input dtype (four rows of L per
//      pass over X, so X[j] is loaded and stored once per four updates);
//   4. copy Z^T into A_i.
// A pivot that is not a finite positive number stops the factorisation: the system is flagged in `failed`
// and its A_i is filled with NaN (the Python side solves it by the general path).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "cholesky.h"

namespace globe_ext {

namespace {

inline bool good_pivot(double d) {
  return d > 0.0 && d <= std::numeric_limits<double>::max();
}

// L (r x r, row-major, lower triangle written) with G + lam I = L L^T; inv_diag[j] = 1 / L[j][j].
template <typename T>
bool factor(const T* __restrict__ G, double lam, int64_t r, T* __restrict__ L, T* __restrict__ inv_diag) {
  for (int64_t i = 0; i < r; ++i) {
    const T* Gi = G + i * r;
    T* Li = L + i * r;
    for (int64_t j = 0; j < i; ++j) {
      const T* Lj = L + j * r;
      double s = static_cast<double>(Gi[j]);
      for (int64_t k = 0; k < j; ++k) {
        s -= static_cast<double>(Li[k]) * static_cast<double>(Lj[k]);
      }
      Li[j] = static_cast<T>(s / static_cast<double>(Lj[j]));
    }
    double d = static_cast<double>(Gi[i]) + lam;
    for (int64_t k = 0; k < i; ++k) {
      d -= static_cast<double>(Li[k]) * static_cast<double>(Li[k]);
    }
    if (!good_pivot(d)) {
      return false;
    }
    const double sd = std::sqrt(d);
    Li[i] = static_cast<T>(sd);
    inv_diag[i] = static_cast<T>(1.0 / sd);
  }
  return true;
}

// xj -= c0 x0 + c1 x1 + c2 x2 + c3 x3 over p values
template <typename T>
inline void axpy4(T* __restrict__ xj, const T* __restrict__ x0, const T* __restrict__ x1,
                  const T* __restrict__ x2, const T* __restrict__ x3, T c0, T c1, T c2, T c3, int64_t p) {
  for (int64_t c = 0; c < p; ++c) {
    xj[c] -= c0 * x0[c] + c1 * x1[c] + c2 * x2[c] + c3 * x3[c];
  }
}

template <typename T>
inline void axpy1(T* __restrict__ xj, const T* __restrict__ x0, T c0, int64_t p) {
  for (int64_t c = 0; c < p; ++c) {
    xj[c] -= c0 * x0[c];
  }
}

template <typename T>
inline void scale(T* __restrict__ xj, T s, int64_t p) {
  for (int64_t c = 0; c < p; ++c) {
    xj[c] *= s;
  }
}

// X (r x p) <- (L L^T)^-1 X
template <typename T>
void substitute(const T* __restrict__ L, const T* __restrict__ inv_diag, int64_t r, int64_t p, T* X) {
  for (int64_t j = 0; j < r; ++j) {  // forward: L Y = X
    const T* Lj = L + j * r;
    T* xj = X + j * p;
    int64_t k = 0;
    for (; k + 4 <= j; k += 4) {
      axpy4(xj, X + k * p, X + (k + 1) * p, X + (k + 2) * p, X + (k + 3) * p, Lj[k], Lj[k + 1], Lj[k + 2],
            Lj[k + 3], p);
    }
    for (; k < j; ++k) {
      axpy1(xj, X + k * p, Lj[k], p);
    }
    scale(xj, inv_diag[j], p);
  }
  for (int64_t j = r - 1; j >= 0; --j) {  // back: L^T Z = Y
    T* xj = X + j * p;
    int64_t k = j + 1;
    for (; k + 4 <= r; k += 4) {
      axpy4(xj, X + k * p, X + (k + 1) * p, X + (k + 2) * p, X + (k + 3) * p, L[k * r + j],
            L[(k + 1) * r + j], L[(k + 2) * r + j], L[(k + 3) * r + j], p);
    }
    for (; k < r; ++k) {
      axpy1(xj, X + k * p, L[k * r + j], p);
    }
    scale(xj, inv_diag[j], p);
  }
}

template <typename T>
void run(const T* G, const T* R, double lam, T* A, bool* failed, int64_t n, int64_t r, int64_t p) {
  // go parallel once a batch holds about 64k flops; each thread then takes one contiguous chunk
  const double flops = static_cast<double>(r) * r * (r / 3.0 + 2.0 * p) + 1.0;
  const int64_t grain = std::max<int64_t>(1, static_cast<int64_t>(65536.0 / flops));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> L(static_cast<size_t>(r * r));
    std::vector<T> inv_diag(static_cast<size_t>(r));
    std::vector<T> X(static_cast<size_t>(r * p));
    for (int64_t i = begin; i < end; ++i) {
      const T* Ri = R + i * p * r;
      T* Ai = A + i * p * r;
      if (!factor(G + i * r * r, lam, r, L.data(), inv_diag.data())) {
        std::fill(Ai, Ai + p * r, std::numeric_limits<T>::quiet_NaN());
        failed[i] = true;
        continue;
      }
      failed[i] = false;
      for (int64_t c = 0; c < p; ++c) {
        for (int64_t j = 0; j < r; ++j) {
          X[j * p + c] = Ri[c * r + j];
        }
      }
      substitute(L.data(), inv_diag.data(), r, p, X.data());
      for (int64_t c = 0; c < p; ++c) {
        for (int64_t j = 0; j < r; ++j) {
          Ai[c * r + j] = X[j * p + c];
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cholesky_solve_batched_cpu(const at::Tensor& G, const at::Tensor& R,
                                                              double lam) {
  check_cholesky_inputs(G, R);
  TORCH_CHECK(G.device().is_cpu(), "cholesky_solve_batched_cpu: expected CPU tensors, got ", G.device());
  const at::Tensor Gc = G.contiguous();
  const at::Tensor Rc = R.contiguous();
  const int64_t n = Gc.size(0);
  const int64_t r = Gc.size(1);
  const int64_t p = Rc.size(1);
  at::Tensor A = at::empty({n, p, r}, Rc.options());
  at::Tensor failed = at::empty({n}, Rc.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(Gc.scalar_type(), "cholesky_solve_batched_cpu", [&] {
    run<scalar_t>(Gc.const_data_ptr<scalar_t>(), Rc.const_data_ptr<scalar_t>(), lam,
                  A.mutable_data_ptr<scalar_t>(), failed.mutable_data_ptr<bool>(), n, r, p);
  });
  return {A, failed};
}

}  // namespace globe_ext

TORCH_LIBRARY_IMPL(globe_ext, CPU, m) {
  m.impl("cholesky_solve_batched", &globe_ext::cholesky_solve_batched_cpu);
}
