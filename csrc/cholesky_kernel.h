// Batched small Cholesky factor + solve on CUDA: the launcher interface.
//
// Plain CUDA C++ (no torch headers), so cholesky_kernel.cu compiles on its own with nvcc and the torch
// binding (cholesky_cuda.cpp) is an ordinary C++ file.
//
// For every system i < n:   A_i = R_i (G_i + lam I)^-1,   G [n, r, r] symmetric (lower triangle read),
// R [n, p, r], A [n, p, r], all contiguous. One thread block per system; G_i's factor and a tile of R_i^T
// live in shared memory. Systems whose factorisation meets a pivot that is not a finite positive number
// get failed[i] = true and A_i filled with NaN (the caller solves them another way); the others get
// failed[i] = false.
//
// Precision: the dot products of the factorisation accumulate in double; the factor L is stored in the
// input precision; the triangular solves run in the input precision.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace globe_ext {

// Threads per block; also the number of rows of R_i solved at once (one row per thread).
constexpr int kCudaThreads = 128;

// Largest r the shared-memory kernel accepts at all; a device may allow less (see cholesky_cuda_max_r).
constexpr int kCudaMaxR = 128;

// Dynamic shared memory one block needs for an r x r system with elements of elem_size bytes.
size_t cholesky_cuda_smem_bytes(int r, size_t elem_size);

// Largest r (<= kCudaMaxR) whose block fits in smem_limit bytes of shared memory per block.
int cholesky_cuda_max_r(size_t elem_size, size_t smem_limit);

// Shared memory one block may opt in to on the current device.
cudaError_t cholesky_cuda_smem_optin(size_t* bytes);

// Launches the kernel on stream; returns the first CUDA error (cudaSuccess when none). n == 0 launches
// nothing. r must be in [1, kCudaMaxR] and the block must fit the device (cudaErrorInvalidValue otherwise).
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
    cudaStream_t stream);

}  // namespace globe_ext
