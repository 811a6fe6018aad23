// Batched small Cholesky factor + solve on CUDA: one thread block per system (see cholesky_kernel.h).
//
// Shared memory per block (elements of the input type T unless noted):
//   col      r doubles          the column being factored, before scaling
//   inv_diag r                  1 / L[j][j]
//   L        r x (r + 1)        G_i's lower triangle, overwritten by its factor; the odd row stride keeps
//                               the per-row accesses of the factorisation free of bank conflicts
//   X        r x (kCudaThreads + 1)  a tile of R_i^T: column c is row p0 + c of R_i, solved by thread c
//
// Factorisation (left-looking, one column per step, two barriers per column): every thread computes the
// unscaled entries of column j for its rows i >= j, accumulating in double; all threads then read the pivot
// col[j] (so they agree on failure), take its square root and scale the column.
//
// Solve: thread c owns column c of the tile and runs forward substitution with L, then back substitution
// with L^T; the factor is read by broadcast (all threads the same address), the tile with stride 1 across
// threads. Tiles are loaded and stored through shared memory so global accesses are coalesced.
#include "cholesky_kernel.h"

#include <cuda_runtime.h>

namespace globe_ext {

namespace {

constexpr size_t kDefaultSmem = 48 * 1024;  // what a block may use without opting in
constexpr int kTileLd = kCudaThreads + 1;

// true when d is a finite positive number (false for NaN)
__device__ __forceinline__ bool good_pivot(double d) {
  return d > 0.0 && d <= 1.7976931348623157e308;
}

template <typename T>
__global__ void __launch_bounds__(kCudaThreads) cholesky_solve_kernel(
    const T* __restrict__ G,
    const T* __restrict__ R,
    double lam,
    T* __restrict__ A,
    bool* __restrict__ failed,
    int r,
    int64_t p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  double* col = reinterpret_cast<double*>(smem_raw);
  T* inv_diag = reinterpret_cast<T*>(col + r);
  T* L = inv_diag + r;
  T* X = L + r * (r + 1);
  const int ld = r + 1;
  const int tid = threadIdx.x;

  const int64_t sys = blockIdx.x;
  const int64_t rr = static_cast<int64_t>(r) * r;
  const T* Gi = G + sys * rr;
  const T* Ri = R + sys * p * r;
  T* Ai = A + sys * p * r;

  for (int e = tid; e < r * r; e += kCudaThreads) {
    const int i = e / r;
    const int j = e - i * r;
    if (j <= i) {
      L[i * ld + j] = Gi[e];
    }
  }
  __syncthreads();

  bool ok = true;
  for (int j = 0; j < r; ++j) {
    const T* Lj = L + j * ld;
    for (int i = j + tid; i < r; i += kCudaThreads) {
      const T* Li = L + i * ld;
      double s = static_cast<double>(Li[j]);
      if (i == j) {
        s += lam;
      }
      for (int k = 0; k < j; ++k) {
        s -= static_cast<double>(Li[k]) * static_cast<double>(Lj[k]);
      }
      col[i] = s;
    }
    __syncthreads();
    const double d = col[j];
    if (!good_pivot(d)) {
      ok = false;  // every thread read the same pivot, so all leave together
      break;
    }
    const double sd = sqrt(d);
    const double inv = 1.0 / sd;
    for (int i = j + tid; i < r; i += kCudaThreads) {
      L[i * ld + j] = static_cast<T>(i == j ? sd : col[i] * inv);
    }
    if (tid == 0) {
      inv_diag[j] = static_cast<T>(inv);
    }
    __syncthreads();
  }

  if (!ok) {
    const T nan = static_cast<T>(__longlong_as_double(0x7ff8000000000000ULL));
    for (int64_t e = tid; e < p * r; e += kCudaThreads) {
      Ai[e] = nan;
    }
    if (tid == 0) {
      failed[sys] = true;
    }
    return;
  }
  if (tid == 0) {
    failed[sys] = false;
  }

  for (int64_t p0 = 0; p0 < p; p0 += kCudaThreads) {
    const int rows = static_cast<int>(p - p0 < kCudaThreads ? p - p0 : kCudaThreads);
    const T* Rt = Ri + p0 * r;
    for (int e = tid; e < rows * r; e += kCudaThreads) {
      const int c = e / r;
      const int j = e - c * r;
      X[j * kTileLd + c] = Rt[e];
    }
    __syncthreads();
    if (tid < rows) {
      T* x = X + tid;
      // forward: L y = x
      for (int j = 0; j < r; ++j) {
        const T* Lj = L + j * ld;
        T s = x[j * kTileLd];
        // a bounded unroll: full unrolling of these loops makes ptxas spill in the double kernel
#pragma unroll 4
        for (int k = 0; k < j; ++k) {
          s -= Lj[k] * x[k * kTileLd];
        }
        x[j * kTileLd] = s * inv_diag[j];
      }
      // back: L^T a = y
      for (int j = r - 1; j >= 0; --j) {
        T s = x[j * kTileLd];
#pragma unroll 4
        for (int k = j + 1; k < r; ++k) {
          s -= L[k * ld + j] * x[k * kTileLd];
        }
        x[j * kTileLd] = s * inv_diag[j];
      }
    }
    __syncthreads();
    T* At = Ai + p0 * r;
    for (int e = tid; e < rows * r; e += kCudaThreads) {
      const int c = e / r;
      const int j = e - c * r;
      At[e] = X[j * kTileLd + c];
    }
    __syncthreads();
  }
}

}  // namespace

size_t cholesky_cuda_smem_bytes(int r, size_t elem_size) {
  const size_t rs = static_cast<size_t>(r);
  return rs * sizeof(double) + elem_size * (rs + rs * (rs + 1) + rs * kTileLd);
}

int cholesky_cuda_max_r(size_t elem_size, size_t smem_limit) {
  int r = kCudaMaxR;
  while (r > 0 && cholesky_cuda_smem_bytes(r, elem_size) > smem_limit) {
    --r;
  }
  return r;
}

cudaError_t cholesky_cuda_smem_optin(size_t* bytes) {
  int device = 0;
  int optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  }
  *bytes = err == cudaSuccess ? static_cast<size_t>(optin) : 0;
  return err;
}

template <typename scalar_t>
cudaError_t cholesky_solve_cuda_launch(
    const scalar_t* G,
    const scalar_t* R,
    double lam,
    scalar_t* A,
    bool* failed,
    int64_t n,
    int r,
    int64_t p,
    cudaStream_t stream) {
  if (n == 0) {
    return cudaSuccess;
  }
  if (r < 1 || r > kCudaMaxR || p < 0) {
    return cudaErrorInvalidValue;
  }
  const size_t smem = cholesky_cuda_smem_bytes(r, sizeof(scalar_t));
  if (smem > kDefaultSmem) {
    size_t optin = 0;
    cudaError_t err = cholesky_cuda_smem_optin(&optin);
    if (err != cudaSuccess) {
      return err;
    }
    if (smem > optin) {
      return cudaErrorInvalidValue;
    }
    err = cudaFuncSetAttribute(
        cholesky_solve_kernel<scalar_t>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) {
      return err;
    }
  }
  const int64_t max_grid = 2147483647;  // gridDim.x limit
  const int64_t rr = static_cast<int64_t>(r) * r;
  for (int64_t off = 0; off < n; off += max_grid) {
    const int64_t count = n - off < max_grid ? n - off : max_grid;
    cholesky_solve_kernel<scalar_t><<<static_cast<unsigned int>(count), kCudaThreads, smem, stream>>>(
        G + off * rr, R + off * p * r, lam, A + off * p * r, failed + off, r, p);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) {
      return err;
    }
  }
  return cudaSuccess;
}

template cudaError_t cholesky_solve_cuda_launch<float>(
    const float*, const float*, double, float*, bool*, int64_t, int, int64_t, cudaStream_t);
template cudaError_t cholesky_solve_cuda_launch<double>(
    const double*, const double*, double, double*, bool*, int64_t, int, int64_t, cudaStream_t);

}  // namespace globe_ext
