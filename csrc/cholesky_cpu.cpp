// Batched small Cholesky factor + solve on CPU: A_i = R_i (G_i + lam I)^-1 for every system i.
//
// Systems run in parallel over the batch (at::parallel_for); each thread allocates its scratch once, never per
// system. Per system:
//   1. factor M = G_i + lam I = U^T U (U = L^T, upper triangular) in double for both dtypes, reading only
//      G_i's lower triangle. Blocked left-looking: a block of 6 rows of U takes the update from all finished
//      rows as register tiles (the tile of step 2, on doubles), then its rows are finished one by one with
//      vector axpys. No horizontal reductions anywhere.
//   2. solve A_i U^T U = R_i as two blocked triangular solves over column blocks of NR = 8..16 columns,
//      Y = R_i U^-1 then A_i = Y U^-T, each block a GEMM-like update from the blocks already solved followed
//      by a product with the inverse of U's diagonal block (inverted in double): every flop runs in a
//      register-blocked micro-kernel (MR rows x NV vectors of accumulators, broadcast-FMA over k) with no
//      dependency chain and no transpose of R_i or A_i. The rows of R_i go through an L1-sized panel of MR
//      rows, so R_i and A_i are each streamed once. U, U^T and the diagonal inverses are rounded to the input
//      dtype: the solve accumulates in the input dtype, like torch.cholesky_solve does.
// Work: r^3 / 3 flops (step 1, double) + 2 p r^2 (step 2) + O(r^2 NR) for the diagonal blocks.
//
// A pivot that is not a finite positive number stops the factorisation: the system is flagged in `failed`
// and its A_i is filled with NaN (the Python side solves it by the general path).
//
// SIMD without -march flags: the kernels are templates over the vector width, written with GCC/Clang vector
// extensions (a plain struct for other compilers). They are instantiated twice: with 16-byte vectors in the
// build's baseline ISA (SSE2 on x86-64, NEON on arm64), and on x86-64 with 32-byte vectors inside a
// __attribute__((target("avx2,fma"), flatten)) function, which inlines every callee so the whole solve is
// compiled for AVX2 + FMA. The AVX2 path is taken at run time when the CPU has it (__builtin_cpu_supports), so
// a distributed build runs everywhere and is fast where AVX2 exists. GLOBE_EXT_ISA=generic forces the baseline
// path (tests use it). setup.py and _ext.py pass -ffp-contract=fast so that acc + a * b is always fused into one
// FMA where the ISA has it, whatever the compiler's default for the language mode.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "cholesky.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define GLOBE_X86_CLONES 1
#else
#define GLOBE_X86_CLONES 0
#endif

#if defined(__GNUC__)
#define GLOBE_INLINE inline __attribute__((always_inline))
#if !defined(__clang__)
// 32-byte vectors passed between inlined helpers of the baseline build: no ABI is crossed
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#else
#define GLOBE_INLINE inline
#endif

namespace globe_ext {

namespace {

// ---- SIMD vectors of W bytes ----------------------------------------------------------------------------

template <typename T, int W>
struct Simd;

#if defined(__GNUC__) && !defined(GLOBE_PORTABLE_SIMD)
#define GLOBE_SIMD(T, W)                                            \
  template <>                                                       \
  struct Simd<T, W> {                                               \
    static constexpr int kLanes = W / static_cast<int>(sizeof(T));  \
    typedef T V __attribute__((vector_size(W)));                    \
  };
#else  // element-wise structs the optimiser may vectorise (also built with -DGLOBE_PORTABLE_SIMD to test)
#define GLOBE_SIMD(T, W)                                            \
  template <>                                                       \
  struct Simd<T, W> {                                               \
    static constexpr int kLanes = W / static_cast<int>(sizeof(T));  \
    struct V {                                                      \
      T x[kLanes];                                                  \
      V& operator+=(const V& o) {                                   \
        for (int i = 0; i < kLanes; ++i) x[i] += o.x[i];            \
        return *this;                                               \
      }                                                             \
      V& operator-=(const V& o) {                                   \
        for (int i = 0; i < kLanes; ++i) x[i] -= o.x[i];            \
        return *this;                                               \
      }                                                             \
      friend V operator+(V a, const V& b) {                         \
        return a += b;                                              \
      }                                                             \
      friend V operator*(const V& a, const V& b) {                  \
        V c;                                                        \
        for (int i = 0; i < kLanes; ++i) c.x[i] = a.x[i] * b.x[i];  \
        return c;                                                   \
      }                                                             \
    };                                                              \
  };
#endif
GLOBE_SIMD(float, 16)
GLOBE_SIMD(float, 32)
GLOBE_SIMD(double, 16)
GLOBE_SIMD(double, 32)
#undef GLOBE_SIMD

template <typename T, int W>
using Vec = typename Simd<T, W>::V;

// Every lane = s. Written through memory on purpose: GCC turns this into one broadcast in both builds, while a
// vector constructor of equal lanes, once inlined into the AVX2 clone, became a chain of lane inserts.
template <typename T, int W>
GLOBE_INLINE Vec<T, W> vsplat(T s) {
  T lanes[Simd<T, W>::kLanes];
  for (int i = 0; i < Simd<T, W>::kLanes; ++i) lanes[i] = s;
  Vec<T, W> v;
  std::memcpy(&v, lanes, sizeof(v));
  return v;
}

template <typename T, int W>
GLOBE_INLINE Vec<T, W> vload(const T* p) {
  Vec<T, W> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T, int W>
GLOBE_INLINE void vstore(T* p, const Vec<T, W>& v) {
  std::memcpy(p, &v, sizeof(v));
}

constexpr int64_t round_up(int64_t x, int64_t m) {
  return (x + m - 1) / m * m;
}

inline bool good_pivot(double d) {
  return d > 0.0 && d <= std::numeric_limits<double>::max();
}

// ---- the register tile shared by every step ----------------------------------------------------------------

// For MR rows m and NV vectors of columns v of dst (row stride ldd):
//   Overwrite:  dst[m][v] =          sum_{k<K} a[m*sm + k*sk] * B[k*ldb + v]
//   Subtract:   dst[m][v] = dst[m][v] - (the same sum)
// a's element (m, k) is read as a broadcast, B's row k as NV vectors. dst may overlap a or B: every load
// happens before the first store.
enum class Mode { Overwrite, Subtract };

template <typename T, int W, int MR, int NV, Mode mode>
GLOBE_INLINE void tile(const T* a, int64_t sm, int64_t sk, const T* B, int64_t ldb, int64_t K, T* dst, int64_t ldd) {
  using V = Vec<T, W>;
  constexpr int L = Simd<T, W>::kLanes;
  V acc[MR][NV];
  for (int m = 0; m < MR; ++m) {
    for (int v = 0; v < NV; ++v) {
      acc[m][v] = mode == Mode::Subtract ? vload<T, W>(dst + m * ldd + v * L) : vsplat<T, W>(T(0));
    }
  }
  for (int64_t k = 0; k < K; ++k, a += sk, B += ldb) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = vload<T, W>(B + v * L);
    for (int m = 0; m < MR; ++m) {
      const V am = vsplat<T, W>(a[m * sm]);
      for (int v = 0; v < NV; ++v) {
        if (mode == Mode::Subtract) {
          acc[m][v] -= am * b[v];
        } else {
          acc[m][v] += am * b[v];
        }
      }
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int v = 0; v < NV; ++v) vstore<T, W>(dst + m * ldd + v * L, acc[m][v]);
  }
}

// y[0:n) += s x[0:n), n a multiple of the vector width
template <typename T, int W>
GLOBE_INLINE void axpy(T* y, T s, const T* x, int64_t n) {
  constexpr int L = Simd<T, W>::kLanes;
  const Vec<T, W> sv = vsplat<T, W>(s);
  for (int64_t c = 0; c < n; c += L) vstore<T, W>(y + c, vload<T, W>(y + c) + sv * vload<T, W>(x + c));
}

// y[0:n) *= s, n a multiple of the vector width
template <typename T, int W>
GLOBE_INLINE void scale(T* y, T s, int64_t n) {
  constexpr int L = Simd<T, W>::kLanes;
  const Vec<T, W> sv = vsplat<T, W>(s);
  for (int64_t c = 0; c < n; c += L) vstore<T, W>(y + c, vload<T, W>(y + c) * sv);
}

// ---- step 1: M = U^T U, in double ------------------------------------------------------------------------

// Wm (rows x ldw; rows a multiple of MR, ldw of NV vectors) holds M's upper triangle, zeros below it and in
// the padding. On success its first r rows hold U (zeros below the diagonal) and dinv the reciprocals of U's
// diagonal. Blocked left-looking: the MR rows j0.. first take the update from every finished row k < j0 as
// register tiles (their elements U[k][j0 + m] are contiguous in row k), then are finished one by one.
template <int W, int MR, int NV>
GLOBE_INLINE bool factor(double* Wm, int64_t ldw, int64_t r, double* dinv) {
  constexpr int64_t NC = NV * Simd<double, W>::kLanes;
  for (int64_t j0 = 0; j0 < r; j0 += MR) {
    const int64_t c_start = j0 / NC * NC;
    if (j0 > 0) {
      for (int64_t c0 = c_start; c0 < ldw; c0 += NC) {
        tile<double, W, MR, NV, Mode::Subtract>(Wm + j0, 1, ldw, Wm + c0, ldw, j0, Wm + j0 * ldw + c0, ldw);
      }
    }
    // finish rows j0.. one by one, in whole vectors from c_start (columns left of the diagonal are zeroed)
    const int64_t j1 = std::min(j0 + MR, r);
    for (int64_t j = j0; j < j1; ++j) {
      double* wj = Wm + j * ldw;
      for (int64_t k = j0; k < j; ++k) {
        axpy<double, W>(wj + c_start, -Wm[k * ldw + j], Wm + k * ldw + c_start, ldw - c_start);
      }
      const double d = wj[j];
      if (!good_pivot(d)) {
        return false;
      }
      const double sd = std::sqrt(d);
      const double inv = 1.0 / sd;
      scale<double, W>(wj + c_start, inv, ldw - c_start);
      for (int64_t c = c_start; c < j; ++c) wj[c] = 0.0;
      wj[j] = sd;
      dinv[j] = inv;
    }
  }
  return true;
}

// ---- step 2: the solve, A_i <- R_i U^-1 U^-T, in the input dtype --------------------------------------------

// Blocked substitution over column blocks of NR = NV vectors, on one panel P of MR rows of R_i (row stride ld,
// in L1). With U1 = U and U2 = U^T (r x ld, zero-padded) and D1[b] = (U's diagonal block b)^-1,
// D2[b] = D1[b]^T (NR x NR each):
//   Y = P U^-1:   blocks left to right, Y_b = (P_b - Y_{<b} U1[<b, b]) D1[b]
//   Z = Y U^-T:   blocks right to left, Z_b = (Y_b - Z_{>b} U2[>b, b]) D2[b]
// each as a Subtract tile then an Overwrite tile, in place.
template <typename T, int W, int MR, int NV>
GLOBE_INLINE void solve_panel(T* P, int64_t ld, int64_t r, const T* U1, const T* U2, const T* D1, const T* D2) {
  constexpr int64_t NR = NV * Simd<T, W>::kLanes;
  const int64_t nb = (r + NR - 1) / NR;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t j0 = b * NR;
    if (j0 > 0) {
      tile<T, W, MR, NV, Mode::Subtract>(P, ld, 1, U1 + j0, ld, j0, P + j0, ld);
    }
    tile<T, W, MR, NV, Mode::Overwrite>(P + j0, ld, 1, D1 + b * NR * NR, NR, std::min(NR, r - j0), P + j0, ld);
  }
  for (int64_t b = nb - 1; b >= 0; --b) {
    const int64_t j0 = b * NR;
    if (j0 + NR < r) {
      tile<T, W, MR, NV, Mode::Subtract>(P + j0 + NR, ld, 1, U2 + (j0 + NR) * ld + j0, ld, r - j0 - NR, P + j0, ld);
    }
    tile<T, W, MR, NV, Mode::Overwrite>(P + j0, ld, 1, D2 + b * NR * NR, NR, std::min(NR, r - j0), P + j0, ld);
  }
}

// U1 = U and U2 = U^T in T (r x ld; only needed with more than one block), and the inverses of U's diagonal
// blocks D1[b], D2[b] = D1[b]^T (NR x NR), inverted in double by back substitution (Xb: NR x NR scratch), all
// zero-padded.
template <typename T, int W>
GLOBE_INLINE void prepare_solve(const double* U, const double* dinv, int64_t ldw, int64_t r, int64_t ld, int64_t NR,
                                T* U1, T* U2, T* D1, T* D2, double* Xb) {
  if (r > NR) {
    for (int64_t k = 0; k < r; ++k) {
      const double* uk = U + k * ldw;
      T* u1 = U1 + k * ld;
      for (int64_t j = 0; j < r; ++j) u1[j] = static_cast<T>(uk[j]);
      for (int64_t j = r; j < ld; ++j) u1[j] = T(0);
    }
    constexpr int64_t TB = 8;  // transpose U1 in TB x TB blocks
    for (int64_t j0 = 0; j0 < r; j0 += TB) {
      for (int64_t k0 = 0; k0 < r; k0 += TB) {
        for (int64_t k = k0; k < std::min(k0 + TB, r); ++k) {
          for (int64_t j = j0; j < std::min(j0 + TB, r); ++j) U2[k * ld + j] = U1[j * ld + k];
        }
      }
    }
    for (int64_t k = 0; k < r; ++k) {
      for (int64_t j = r; j < ld; ++j) U2[k * ld + j] = T(0);
    }
  }
  for (int64_t j0 = 0; j0 < r; j0 += NR) {
    const int64_t kb = std::min(NR, r - j0);
    // Xb (upper) = the block's inverse, rows from the bottom: row q = -dinv_q sum_{k>q} U[q][k] Xb[k] (whole
    // rows of Xb, which are zero left of their diagonal and past kb)
    for (int64_t q = NR - 1; q >= 0; --q) {
      double* xq = Xb + q * NR;
      for (int64_t c = 0; c < NR; ++c) xq[c] = 0.0;
      if (q >= kb) {
        continue;
      }
      const double* uq = U + (j0 + q) * ldw + j0;
      for (int64_t k = q + 1; k < kb; ++k) axpy<double, W>(xq, uq[k], Xb + k * NR, NR);
      scale<double, W>(xq, -dinv[j0 + q], NR);
      xq[q] = dinv[j0 + q];
    }
    T* d1 = D1 + j0 * NR;  // block j0 / NR
    T* d2 = D2 + j0 * NR;
    for (int64_t q = 0; q < NR; ++q) {
      for (int64_t c = 0; c < NR; ++c) {
        d1[q * NR + c] = static_cast<T>(Xb[q * NR + c]);
        d2[c * NR + q] = static_cast<T>(Xb[q * NR + c]);
      }
    }
  }
}

// ---- driver ------------------------------------------------------------------------------------------------

template <typename T>
struct Problem {
  const T* G;
  const T* R;
  T* A;
  bool* failed;
  double lam;
  int64_t r, p;
};

// The scratch of one thread, laid out for the batch's (r, p) and tile shape.
template <typename T>
struct Scratch {
  int64_t ldw;    // row stride of the double work matrix (r rounded up to whole factor tiles)
  int64_t ld;     // row stride of U1, U2 and the panel P (r rounded up to whole solve tiles)
  int64_t wrows;  // r rounded up to whole factor tiles
  double *Wm, *dinv, *Xb;
  T *U1, *U2, *D1, *D2, *P;
};

// factor tiles: 6 rows x 2 vectors of doubles
constexpr int kFactorMR = 6;
constexpr int kFactorNV = 2;

template <typename T, int W, int MR, int NV>
GLOBE_INLINE void solve_one(const Problem<T>& pb, const Scratch<T>& s, int64_t i) {
  constexpr int64_t NR = NV * Simd<T, W>::kLanes;
  const int64_t r = pb.r, p = pb.p, ldw = s.ldw, ld = s.ld;
  const T* Gi = pb.G + i * r * r;
  const T* Ri = pb.R + i * p * r;
  T* Ai = pb.A + i * p * r;
  // Wm <- the upper triangle of G_i + lam I, read from G_i's lower triangle (rows past r stay zero)
  for (int64_t j = 0; j < r; ++j) {
    double* wj = s.Wm + j * ldw;
    for (int64_t c = 0; c < j; ++c) wj[c] = 0.0;
    for (int64_t c = j; c < r; ++c) wj[c] = static_cast<double>(Gi[c * r + j]);
    for (int64_t c = r; c < ldw; ++c) wj[c] = 0.0;
    wj[j] += pb.lam;
  }
  std::fill(s.Wm + r * ldw, s.Wm + s.wrows * ldw, 0.0);
  if (!factor<W, kFactorMR, kFactorNV>(s.Wm, ldw, r, s.dinv)) {
    std::fill(Ai, Ai + p * r, std::numeric_limits<T>::quiet_NaN());
    pb.failed[i] = true;
    return;
  }
  pb.failed[i] = false;
  if (p == 0) {
    return;
  }
  prepare_solve<T, W>(s.Wm, s.dinv, ldw, r, ld, NR, s.U1, s.U2, s.D1, s.D2, s.Xb);
  // one panel of MR rows at a time: R_i and A_i are each passed over once, the panel stays in L1
  for (int64_t i0 = 0; i0 < p; i0 += MR) {
    const int64_t mr = std::min<int64_t>(MR, p - i0);
    for (int64_t m = 0; m < mr; ++m) {
      std::memcpy(s.P + m * ld, Ri + (i0 + m) * r, static_cast<size_t>(r) * sizeof(T));
    }
    if (mr < MR) {
      std::fill(s.P + mr * ld, s.P + MR * ld, T(0));
    }
    solve_panel<T, W, MR, NV>(s.P, ld, r, s.U1, s.U2, s.D1, s.D2);
    for (int64_t m = 0; m < mr; ++m) {
      std::memcpy(Ai + (i0 + m) * r, s.P + m * ld, static_cast<size_t>(r) * sizeof(T));
    }
  }
}

template <typename T>
using RangeFn = void (*)(const Problem<T>&, const Scratch<T>&, int64_t, int64_t);

// the baseline build: 16-byte vectors (SSE2 on x86-64, NEON on arm64)
template <typename T, int MR, int NV>
void solve_range(const Problem<T>& pb, const Scratch<T>& s, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) solve_one<T, 16, MR, NV>(pb, s, i);
}

#if GLOBE_X86_CLONES
// the same templates for AVX2 + FMA: flatten inlines every callee, which then takes this function's target
template <typename T, int MR, int NV>
__attribute__((target("avx2,fma"), flatten)) void solve_range_avx2(const Problem<T>& pb, const Scratch<T>& s,
                                                                   int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) solve_one<T, 32, MR, NV>(pb, s, i);
}
#endif

bool use_avx2() {
#if GLOBE_X86_CLONES
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* env = std::getenv("GLOBE_EXT_ISA");
  return has && !(env != nullptr && std::strcmp(env, "generic") == 0);
#else
  return false;
#endif
}

template <typename T, int W, int MR, int NV>
void run_tiles(const Problem<T>& pb, int64_t n, RangeFn<T> range) {
  const int64_t r = pb.r, p = pb.p;
  constexpr int64_t NR = NV * Simd<T, W>::kLanes;
  constexpr int64_t NC = kFactorNV * Simd<double, W>::kLanes;
  const int64_t ldw = round_up(r, NC);
  const int64_t wrows = round_up(r, kFactorMR);
  const int64_t ld = round_up(r, NR);
  // go parallel once a chunk holds about 1 Mflop (some tens of microseconds)
  const double flops = r * r * (r / 3.0 + 2.0 * p) + 1.0;
  const int64_t grain = std::max<int64_t>(1, static_cast<int64_t>(1e6 / flops));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    constexpr size_t kAlign = 64;
    const size_t nd = static_cast<size_t>(wrows * ldw + r + NR * NR);
    const size_t nt = static_cast<size_t>(2 * r * ld + 2 * ld * NR + MR * ld);
    std::vector<double> dbuf(nd + kAlign / sizeof(double), 0.0);
    std::vector<T> tbuf(nt + kAlign / sizeof(T), T(0));
    auto aligned = [](auto* q) {  // rows of whole vectors then start on vector boundaries
      const uintptr_t a = (reinterpret_cast<uintptr_t>(q) + kAlign - 1) & ~static_cast<uintptr_t>(kAlign - 1);
      return reinterpret_cast<decltype(q)>(a);
    };
    Scratch<T> s;
    s.ldw = ldw;
    s.ld = ld;
    s.wrows = wrows;
    s.Wm = aligned(dbuf.data());
    s.dinv = s.Wm + wrows * ldw;
    s.Xb = s.dinv + r;
    s.U1 = aligned(tbuf.data());
    s.U2 = s.U1 + r * ld;
    s.D1 = s.U2 + r * ld;
    s.D2 = s.D1 + ld * NR;
    s.P = s.D2 + ld * NR;
    range(pb, s, begin, end);
  });
}

// Solve tiles of MR rows x NV vectors of accumulators: 6 x 2 (12 of the 16 vector registers); 8 x 1 when r
// fits in one vector, so that a small r pads no columns.
template <typename T>
void run(const Problem<T>& pb, int64_t n) {
#if GLOBE_X86_CLONES
  if (use_avx2()) {
    if (pb.r <= Simd<T, 32>::kLanes) {
      run_tiles<T, 32, 8, 1>(pb, n, &solve_range_avx2<T, 8, 1>);
    } else {
      run_tiles<T, 32, 6, 2>(pb, n, &solve_range_avx2<T, 6, 2>);
    }
    return;
  }
#endif
  if (pb.r <= Simd<T, 16>::kLanes) {
    run_tiles<T, 16, 8, 1>(pb, n, &solve_range<T, 8, 1>);
  } else {
    run_tiles<T, 16, 6, 2>(pb, n, &solve_range<T, 6, 2>);
  }
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
  if (n == 0) {
    return {A, failed};
  }
  if (r == 0) {
    failed.fill_(false);
    return {A, failed};
  }
  AT_DISPATCH_FLOATING_TYPES(Gc.scalar_type(), "cholesky_solve_batched_cpu", [&] {
    const Problem<scalar_t> pb{Gc.const_data_ptr<scalar_t>(), Rc.const_data_ptr<scalar_t>(),
                               A.mutable_data_ptr<scalar_t>(), failed.mutable_data_ptr<bool>(), lam, r, p};
    run<scalar_t>(pb, n);
  });
  return {A, failed};
}

}  // namespace globe_ext

TORCH_LIBRARY_IMPL(globe_ext, CPU, m) {
  m.impl("cholesky_solve_batched", &globe_ext::cholesky_solve_batched_cpu);
}
