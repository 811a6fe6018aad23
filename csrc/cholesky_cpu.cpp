// Batched small Cholesky factor + solve on CPU: A_i = R_i (G_i + lam I)^-1 for every system i.
//
// Systems run in parallel over the batch (at::parallel_for); each thread allocates its scratch once, never per
// system. M = G_i + lam I is formed from G_i's lower triangle and factored in double for both dtypes. Two paths:
//
// r <= kLockMaxR (96): L systems in lockstep, one per lane of a vector of doubles (L = 8 in two registers with
// AVX2 up to r = 24, else 4; 2 in the baseline build). Their M are gathered lane-interleaved and, with vector
// instructions on whole lanes (no shuffles, no horizontal reductions), factored as M = V^T D V (V unit upper
// triangular), inverted to M^-1 = V^-1 D^-1 V^-T (r^3 / 3 flops each step, left-looking, blocks of 8 registers
// of accumulators). Then per system: M^-1 is copied out of its lane (rounded to the input dtype) and
// A_i = R_i M^-1 is one GEMM (p x r x r) in the register tiles of the other path, straight from R_i into A_i.
// A small r costs little more than its flops: no per-system dependency chain of r pivots, and the solve is one
// GEMM with K = r rather than 2 r / NR short blocked ones. Forward errors match the triangular solves' (float64)
// and beat torch's float32 path (the inverse is formed in double). Work: r^3 flops (double, lockstep) +
// 2 p r^2 (the GEMM).
//
// r > kLockMaxR: per system,
//   1. factor M = U^T U (U = L^T, upper triangular) in double. Blocked left-looking: a block of 6 rows of U
//      takes the update from all finished rows as register tiles (the tile of step 2, on doubles), then its
//      rows are finished one by one with vector axpys. No horizontal reductions anywhere.
//   2. solve A_i U^T U = R_i as two blocked triangular solves over column blocks of NR = 8..16 columns,
//      Y = R_i U^-1 then A_i = Y U^-T, each block a GEMM-like update from the blocks already solved followed
//      by a product with the inverse of U's diagonal block (inverted in double): every flop runs in a
//      register-blocked micro-kernel (MR rows x NV vectors of accumulators, broadcast-FMA over k) with no
//      dependency chain and no transpose of R_i or A_i. The rows of R_i go through an L1-sized panel of MR
//      rows, so R_i and A_i are each streamed once. U, U^T and the diagonal inverses are rounded to the input
//      dtype: the solve accumulates in the input dtype, like torch.cholesky_solve does.
//   Work: r^3 / 3 flops (step 1, double) + 2 p r^2 (step 2) + O(r^2 NR) for the diagonal blocks.
//
// A pivot that is not a finite positive number (in the lockstep path: D_j, the square of the Cholesky pivot)
// flags the system in `failed` and its A_i is filled with NaN (the Python side solves it by the general path);
// in lockstep the other lanes of its group go on unaffected.
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

#if defined(__linux__)
#include <sys/mman.h>
#endif

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
#define GLOBE_SIMD(T, W)                                                        \
  template <>                                                                   \
  struct Simd<T, W> {                                                           \
    static constexpr int kLanes = W / static_cast<int>(sizeof(T));              \
    typedef T V __attribute__((vector_size(W)));                                \
    typedef T U __attribute__((vector_size(W), aligned(sizeof(T)), may_alias)); \
  };
#define GLOBE_VECTOR_EXT 1
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
      friend V operator/(const V& a, const V& b) {                  \
        V c;                                                        \
        for (int i = 0; i < kLanes; ++i) c.x[i] = a.x[i] / b.x[i];  \
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

// Two 32-byte vectors of doubles as one vector of 8 lanes, for the lockstep path at small r (8 systems at a
// time halve its per-group costs there). Kept as a pair of registers: GCC's own 64-byte vectors, split for
// AVX2, compiled to much slower code.
template <>
struct Simd<double, 64> {
  static constexpr int kLanes = 8;
  using H = Simd<double, 32>::V;
  struct V {
    H lo, hi;
    GLOBE_INLINE V& operator+=(const V& o) {
      lo += o.lo;
      hi += o.hi;
      return *this;
    }
    GLOBE_INLINE V& operator-=(const V& o) {
      lo -= o.lo;
      hi -= o.hi;
      return *this;
    }
    friend GLOBE_INLINE V operator+(V a, const V& b) {
      return a += b;
    }
    friend GLOBE_INLINE V operator*(const V& a, const V& b) {
      return V{a.lo * b.lo, a.hi * b.hi};
    }
    friend GLOBE_INLINE V operator/(const V& a, const V& b) {
      return V{a.lo / b.lo, a.hi / b.hi};
    }
  };
};

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

// Unaligned loads and stores. With vector extensions through an unaligned, may_alias vector type: GCC merged
// memcpy-based stores of a tile's row into one block copy, which it then staged through the stack.
template <typename T, int W>
GLOBE_INLINE Vec<T, W> vload(const T* p) {
#if defined(GLOBE_VECTOR_EXT)
  return *reinterpret_cast<const typename Simd<T, W>::U*>(p);
#else
  Vec<T, W> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
#endif
}

template <typename T, int W>
GLOBE_INLINE void vstore(T* p, const Vec<T, W>& v) {
#if defined(GLOBE_VECTOR_EXT)
  *reinterpret_cast<typename Simd<T, W>::U*>(p) = v;
#else
  std::memcpy(p, &v, sizeof(v));
#endif
}

template <>
GLOBE_INLINE Vec<double, 64> vsplat<double, 64>(double s) {
  return {vsplat<double, 32>(s), vsplat<double, 32>(s)};
}

template <>
GLOBE_INLINE Vec<double, 64> vload<double, 64>(const double* p) {
  return {vload<double, 32>(p), vload<double, 32>(p + 4)};
}

template <>
GLOBE_INLINE void vstore<double, 64>(double* p, const Vec<double, 64>& v) {
  vstore<double, 32>(p, v.lo);
  vstore<double, 32>(p + 4, v.hi);
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
  int64_t n, r, p;
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

// ---- small r: one system per lane ------------------------------------------------------------------------

// S holds the L systems' matrices lane-interleaved, the upper triangle packed by rows: element (i, j >= i) is
// the vector of L doubles at S + L (row(i) + j). Every step is a sum of products of such vectors, each block of
// up to lock_cb columns of one row accumulating in registers. The factorisation is the square-root-free
// M = V^T D V: its pivots D_j are the squares of the Cholesky factor's diagonal, so they flag exactly the same
// systems, and no step needs a square root (one vector division per pivot).
constexpr int64_t kLockMaxR = 96;

// the widest block of columns: 8 registers of accumulators (with the operands, 10 of the 16 vector registers)
template <int LW>
constexpr int lock_cb() {
  return LW > 32 ? 4 : 8;
}

GLOBE_INLINE int64_t packed_row(int64_t r, int64_t i) {
  return i * r - i * (i + 1) / 2;
}

// Columns [c, c + CB) of row j of V (left-looking): V(j, c) = (M(j, c) - sum_{k<j} V(k, j) D_k V(k, c)) / D_j,
// with D_k kept on the diagonal and 1 / D_k in Di. The block that starts at the diagonal takes the pivot: a
// lane whose pivot is not a finite positive number sets its bit in `bad` and goes on with pivot 1 (the other
// lanes are unaffected).
template <int LW, int CB>
GLOBE_INLINE void lock_factor_block(double* S, double* Di, int64_t r, int64_t j, int64_t c, unsigned& bad) {
  using V = Vec<double, LW>;
  constexpr int L = Simd<double, LW>::kLanes;
  double* sj = S + L * packed_row(r, j);
  V acc[CB];
  for (int b = 0; b < CB; ++b) acc[b] = vload<double, LW>(sj + L * (c + b));
  const double* sk = S;  // row k
  for (int64_t k = 0; k < j; ++k, sk += L * (r - k)) {
    const V a = vload<double, LW>(sk + L * j) * vload<double, LW>(sk + L * k);
    for (int b = 0; b < CB; ++b) acc[b] -= a * vload<double, LW>(sk + L * (c + b));
  }
  int b0 = 0;
  V dinv;
  if (c == j) {
    // the division goes first; the lanes are checked beside it and, rarely, patched
    V dv = acc[0];
    dinv = vsplat<double, LW>(1.0) / dv;
    double d[L];
    vstore<double, LW>(d, dv);
    unsigned lane_bad = 0;
    for (int l = 0; l < L; ++l) lane_bad |= static_cast<unsigned>(!good_pivot(d[l])) << l;
    if (lane_bad != 0) {
      double di[L];
      vstore<double, LW>(di, dinv);
      for (int l = 0; l < L; ++l) {
        if ((lane_bad >> l) & 1u) {
          d[l] = 1.0;
          di[l] = 1.0;
        }
      }
      dv = vload<double, LW>(d);
      dinv = vload<double, LW>(di);
      bad |= lane_bad;
    }
    vstore<double, LW>(sj + L * j, dv);
    vstore<double, LW>(Di + L * j, dinv);
    b0 = 1;
  } else {
    dinv = vload<double, LW>(Di + L * j);
  }
  for (int b = b0; b < CB; ++b) vstore<double, LW>(sj + L * (c + b), acc[b] * dinv);
}

template <int LW>
GLOBE_INLINE void lock_factor_row(double* S, double* Di, int64_t r, int64_t j, unsigned& bad) {
  int64_t c = j;
  constexpr int CB = lock_cb<LW>();
  for (; c + CB <= r; c += CB) lock_factor_block<LW, CB>(S, Di, r, j, c, bad);
  if (c + 4 <= r) {
    lock_factor_block<LW, 4>(S, Di, r, j, c, bad);
    c += 4;
  }
  if (c + 2 <= r) {
    lock_factor_block<LW, 2>(S, Di, r, j, c, bad);
    c += 2;
  }
  if (c < r) {
    lock_factor_block<LW, 1>(S, Di, r, j, c, bad);
  }
}

// Columns [c, c + CB) (c > i) of row i of Y = V^-1 (unit upper triangular, its diagonal stored as ones),
// rows below i already inverted in place: Y(i, j) = -sum_{k=i+1}^{j} V(i, k) Y(k, j). Reads V(i, k) for
// k < c + CB only, so a row's blocks go from right to left.
template <int LW, int CB>
GLOBE_INLINE void lock_inverse_block(double* S, int64_t r, int64_t i, int64_t c) {
  using V = Vec<double, LW>;
  constexpr int L = Simd<double, LW>::kLanes;
  double* si = S + L * packed_row(r, i);
  V acc[CB];
  for (int b = 0; b < CB; ++b) acc[b] = vsplat<double, LW>(0.0);
  const double* sk = S + L * packed_row(r, i + 1);
  for (int64_t k = i + 1; k <= c; ++k, sk += L * (r - k)) {  // every column of the block
    const V a = vload<double, LW>(si + L * k);
    for (int b = 0; b < CB; ++b) acc[b] += a * vload<double, LW>(sk + L * (c + b));
  }
#pragma GCC unroll 8
  for (int kk = 1; kk < CB; ++kk) {  // the block's triangle: row c + kk reaches columns c + kk ..
    const V a = vload<double, LW>(si + L * (c + kk));
#pragma GCC unroll 8
    for (int b = kk; b < CB; ++b) acc[b] += a * vload<double, LW>(sk + L * (c + b));
    sk += L * (r - c - kk - 1);
  }
  const V minus = vsplat<double, LW>(-1.0);
  for (int b = 0; b < CB; ++b) vstore<double, LW>(si + L * (c + b), acc[b] * minus);
}

template <int LW>
GLOBE_INLINE void lock_inverse_row(double* S, int64_t r, int64_t i) {
  // blocks of CB from i + 1, then 4, 2, 1; visited from the right
  constexpr int CB = lock_cb<LW>();
  const int64_t c0 = i + 1;
  const int64_t nb = (r - c0) / CB;
  int64_t c = c0 + CB * nb;
  const int64_t rem = r - c;
  const int64_t c4 = c, c2 = c4 + (rem & 4), c1 = c2 + (rem & 2);
  if (rem & 1) lock_inverse_block<LW, 1>(S, r, i, c1);
  if (rem & 2) lock_inverse_block<LW, 2>(S, r, i, c2);
  if (rem & 4) lock_inverse_block<LW, 4>(S, r, i, c4);
  for (c -= CB; c >= c0; c -= CB) lock_inverse_block<LW, CB>(S, r, i, c);
}

// Columns [c, c + CB) (c >= i) of row i of M^-1 = Y D^-1 Y^T, rows < i already done in place:
// M^-1(i, j) = sum_{k>=j} Y(i, k) Di_k Y(j, k). Reads Y(i, k) for k >= c only, so a row's blocks go from left to
// right.
template <int LW, int CB>
GLOBE_INLINE void lock_product_block(double* S, const double* Di, int64_t r, int64_t i, int64_t c) {
  using V = Vec<double, LW>;
  constexpr int L = Simd<double, LW>::kLanes;
  double* si = S + L * packed_row(r, i);
  const double* sb[CB];
  for (int b = 0; b < CB; ++b) sb[b] = S + L * packed_row(r, c + b);
  V acc[CB];
  for (int b = 0; b < CB; ++b) acc[b] = vsplat<double, LW>(0.0);
#pragma GCC unroll 8
  for (int kk = 0; kk + 1 < CB; ++kk) {  // the block's triangle: column c + b starts at k = c + b
    const V a = vload<double, LW>(si + L * (c + kk)) * vload<double, LW>(Di + L * (c + kk));
#pragma GCC unroll 8
    for (int b = 0; b <= kk; ++b) acc[b] += a * vload<double, LW>(sb[b] + L * (c + kk));
  }
  for (int64_t k = c + CB - 1; k < r; ++k) {
    const V a = vload<double, LW>(si + L * k) * vload<double, LW>(Di + L * k);
    for (int b = 0; b < CB; ++b) acc[b] += a * vload<double, LW>(sb[b] + L * k);
  }
  for (int b = 0; b < CB; ++b) vstore<double, LW>(si + L * (c + b), acc[b]);
}

template <int LW>
GLOBE_INLINE void lock_product_row(double* S, const double* Di, int64_t r, int64_t i) {
  int64_t c = i;
  constexpr int CB = lock_cb<LW>();
  for (; c + CB <= r; c += CB) lock_product_block<LW, CB>(S, Di, r, i, c);
  if (c + 4 <= r) {
    lock_product_block<LW, 4>(S, Di, r, i, c);
    c += 4;
  }
  if (c + 2 <= r) {
    lock_product_block<LW, 2>(S, Di, r, i, c);
    c += 2;
  }
  if (c < r) {
    lock_product_block<LW, 1>(S, Di, r, i, c);
  }
}

// Rows [i0, i0 + M) of A_i = R_i B (B: r x ld, zero columns r .. ld), each column block a K = r Overwrite tile
// straight from R_i into A_i; a last block narrower than NR goes through Q (M x NR) and is copied element by
// element (a few elements a row: cheaper inline than a call to memcpy).
template <typename T, int W, int M, int NV>
GLOBE_INLINE void gemm_panel(const T* Ri, T* Ai, int64_t i0, int64_t r, const T* B, int64_t ld, T* Q) {
  constexpr int64_t NR = NV * Simd<T, W>::kLanes;
  const T* a = Ri + i0 * r;
  T* out = Ai + i0 * r;
  int64_t c0 = 0;
  for (; c0 + NR <= r; c0 += NR) tile<T, W, M, NV, Mode::Overwrite>(a, r, 1, B + c0, ld, r, out + c0, r);
  if (c0 < r) {
    tile<T, W, M, NV, Mode::Overwrite>(a, r, 1, B + c0, ld, r, Q, NR);
    for (int m = 0; m < M; ++m) {
      for (int64_t c = c0; c < r; ++c) out[m * r + c] = Q[m * NR + c - c0];
    }
  }
}

// A_i = R_i B (p x r times r x r) in panels of MR rows; the last p % MR rows in one panel of that height.
template <typename T, int W, int MR, int NV>
GLOBE_INLINE void gemm_rows(const T* Ri, T* Ai, int64_t p, int64_t r, const T* B, int64_t ld, T* Q) {
  static_assert(MR <= 8, "tails of up to 7 rows");
  int64_t i0 = 0;
  for (; i0 + MR <= p; i0 += MR) gemm_panel<T, W, MR, NV>(Ri, Ai, i0, r, B, ld, Q);
  switch (p - i0) {
    case 7: gemm_panel<T, W, (MR > 7 ? 7 : 1), NV>(Ri, Ai, i0, r, B, ld, Q); break;
    case 6: gemm_panel<T, W, (MR > 6 ? 6 : 1), NV>(Ri, Ai, i0, r, B, ld, Q); break;
    case 5: gemm_panel<T, W, (MR > 5 ? 5 : 1), NV>(Ri, Ai, i0, r, B, ld, Q); break;
    case 4: gemm_panel<T, W, (MR > 4 ? 4 : 1), NV>(Ri, Ai, i0, r, B, ld, Q); break;
    case 3: gemm_panel<T, W, (MR > 3 ? 3 : 1), NV>(Ri, Ai, i0, r, B, ld, Q); break;
    case 2: gemm_panel<T, W, (MR > 2 ? 2 : 1), NV>(Ri, Ai, i0, r, B, ld, Q); break;
    case 1: gemm_panel<T, W, 1, NV>(Ri, Ai, i0, r, B, ld, Q); break;
    default: break;
  }
}

// The scratch of one thread for the lockstep path.
template <typename T>
struct LockScratch {
  int64_t ld;  // row stride of B (r rounded up to whole solve tiles)
  double* S;   // L packed upper triangles, lane-interleaved
  double* Di;  // the reciprocal pivots, r vectors
  T *B, *Q;    // B: L matrices r x ld; Q: MR x NR
};

// Systems g0 .. g0 + L - 1 (those < n): form M = G_i + lam I in S (lanes past n repeat the last system and are
// dropped), factor, invert, then per system copy M^-1 out of its lane into B_l (both triangles, in T) and
// A_i = R_i B_l. With p = 0 only the flags are wanted: no inversion.
template <typename T, int W, int LW, int MR, int NV>
GLOBE_INLINE void lock_group(const Problem<T>& pb, const LockScratch<T>& s, int64_t g0) {
  constexpr int L = Simd<double, LW>::kLanes;
  const int64_t r = pb.r, p = pb.p, ld = s.ld;
  const int nl = static_cast<int>(std::min<int64_t>(L, pb.n - g0));
  double* S = s.S;
  double* Di = s.Di;
  // lanes past n repeat the last system (their results are dropped)
  const T* Gl[L];
  for (int l = 0; l < L; ++l) Gl[l] = pb.G + (g0 + std::min(l, nl - 1)) * r * r;
  for (int64_t c = 0; c < r; ++c) {  // row c of G_i's lower triangle is column c of M's upper one
    double* sjc = S + L * c;             // element (j, c), j = 0 .. c
    for (int64_t j = 0; j <= c; sjc += L * (r - j - 1), ++j) {
      double t[L];
      for (int l = 0; l < L; ++l) t[l] = static_cast<double>(Gl[l][c * r + j]);
      vstore<double, LW>(sjc, vload<double, LW>(t));
    }
    double* scc = S + L * (packed_row(r, c) + c);
    vstore<double, LW>(scc, vload<double, LW>(scc) + vsplat<double, LW>(pb.lam));
  }
  unsigned bad = 0;
  for (int64_t j = 0; j < r; ++j) lock_factor_row<LW>(S, Di, r, j, bad);
  bad &= (1u << nl) - 1;
  for (int l = 0; l < nl; ++l) {
    const bool failed = (bad >> l) & 1u;
    pb.failed[g0 + l] = failed;
    if (failed) {
      T* Ai = pb.A + (g0 + l) * p * r;
      std::fill(Ai, Ai + p * r, std::numeric_limits<T>::quiet_NaN());
    }
  }
  if (p == 0 || bad == (1u << nl) - 1) {
    return;
  }
  for (int64_t j = 0; j < r; ++j) vstore<double, LW>(S + L * (packed_row(r, j) + j), vsplat<double, LW>(1.0));
  for (int64_t i = r - 2; i >= 0; --i) lock_inverse_row<LW>(S, r, i);
  for (int64_t i = 0; i < r; ++i) lock_product_row<LW>(S, Di, r, i);
  // M^-1 of lane l into B_l (both triangles, in T), row by row
  const int64_t nb = r * ld;
  for (int64_t i = 0; i < r; ++i) {
    T* bi = s.B + i * ld;
    const double* sji = S + L * i;  // element (j, i), j = 0 .. i - 1
    for (int64_t j = 0; j < i; sji += L * (r - j - 1), ++j) {
      double t[L];
      vstore<double, LW>(t, vload<double, LW>(sji));
      for (int l = 0; l < nl; ++l) bi[l * nb + j] = static_cast<T>(t[l]);
    }
    const double* si = S + L * packed_row(r, i);
    for (int64_t j = i; j < r; ++j) {
      double t[L];
      vstore<double, LW>(t, vload<double, LW>(si + L * j));
      for (int l = 0; l < nl; ++l) bi[l * nb + j] = static_cast<T>(t[l]);
    }
  }
  for (int l = 0; l < nl; ++l) {
    if (((bad >> l) & 1u) == 0) {
      const int64_t i = g0 + l;
      gemm_rows<T, W, MR, NV>(pb.R + i * p * r, pb.A + i * p * r, p, r, s.B + l * nb, ld, s.Q);
    }
  }
}

template <typename T>
using LockRangeFn = void (*)(const Problem<T>&, const LockScratch<T>&, int64_t, int64_t);

// groups [begin, end) of L systems
template <typename T, int MR, int NV>
void lock_range(const Problem<T>& pb, const LockScratch<T>& s, int64_t begin, int64_t end) {
  constexpr int L = Simd<double, 16>::kLanes;
  for (int64_t g = begin; g < end; ++g) lock_group<T, 16, 16, MR, NV>(pb, s, g * L);
}

#if GLOBE_X86_CLONES
template <typename T, int LW, int MR, int NV>
__attribute__((target("avx2,fma"), flatten)) void lock_range_avx2(const Problem<T>& pb, const LockScratch<T>& s,
                                                                   int64_t begin, int64_t end) {
  constexpr int L = Simd<double, LW>::kLanes;
  for (int64_t g = begin; g < end; ++g) lock_group<T, 32, LW, MR, NV>(pb, s, g * L);
}
#endif

template <typename T, int W, int LW, int MR, int NV>
void run_lock(const Problem<T>& pb, LockRangeFn<T> range) {
  constexpr int L = Simd<double, LW>::kLanes;
  constexpr int64_t NR = NV * Simd<T, W>::kLanes;
  const int64_t r = pb.r, p = pb.p;
  const int64_t ld = round_up(r, NR);
  const int64_t groups = (pb.n + L - 1) / L;
  // go parallel once a chunk holds about 1 Mflop
  const double flops = L * r * r * (r + 2.0 * p) + 1.0;
  const int64_t grain = std::max<int64_t>(1, static_cast<int64_t>(1e6 / flops));
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    constexpr size_t kAlign = 64;
    const size_t nd = static_cast<size_t>(L * r * (r + 3) / 2);
    const size_t nt = static_cast<size_t>(L * r * ld + MR * NR);
    std::vector<double> dbuf(nd + kAlign / sizeof(double), 0.0);
    std::vector<T> tbuf(nt + kAlign / sizeof(T), T(0));  // B's padding columns stay zero
    auto aligned = [](auto* q) {
      const uintptr_t a = (reinterpret_cast<uintptr_t>(q) + kAlign - 1) & ~static_cast<uintptr_t>(kAlign - 1);
      return reinterpret_cast<decltype(q)>(a);
    };
    LockScratch<T> s;
    s.ld = ld;
    s.S = aligned(dbuf.data());
    s.Di = s.S + L * r * (r + 1) / 2;
    s.B = aligned(tbuf.data());
    s.Q = s.B + L * r * ld;
    range(pb, s, begin, end);
  });
}

// Solve tiles of MR rows x NV vectors of accumulators: 6 x 2 (12 of the 16 vector registers); 8 x 1 when r
// fits in one vector, so that a small r pads no columns (lockstep path only: the other starts above 96); in
// the lockstep GEMM in float64 with AVX2 from r = 32, 3 x 4 (measured 10-15% faster there than 6 x 2). With
// AVX2 the lockstep path takes 8 systems at a time up to r = 24 (6-14% faster there), 4 above.
template <typename T>
void run(const Problem<T>& pb, int64_t n) {
  const bool lock = pb.r <= kLockMaxR;
#if GLOBE_X86_CLONES
  if (use_avx2()) {
    const bool pair = pb.r <= 24;
    if (!lock) {
      run_tiles<T, 32, 6, 2>(pb, n, &solve_range_avx2<T, 6, 2>);
    } else if (pb.r <= Simd<T, 32>::kLanes) {
      run_lock<T, 32, 64, 8, 1>(pb, &lock_range_avx2<T, 64, 8, 1>);
    } else if (pair) {
      run_lock<T, 32, 64, 6, 2>(pb, &lock_range_avx2<T, 64, 6, 2>);
    } else if (sizeof(T) == sizeof(double) && pb.r >= 32) {
      run_lock<T, 32, 32, 3, 4>(pb, &lock_range_avx2<T, 32, 3, 4>);
    } else {
      run_lock<T, 32, 32, 6, 2>(pb, &lock_range_avx2<T, 32, 6, 2>);
    }
    return;
  }
#endif
  if (!lock) {
    run_tiles<T, 16, 6, 2>(pb, n, &solve_range<T, 6, 2>);
  } else if (pb.r <= Simd<T, 16>::kLanes) {
    run_lock<T, 16, 16, 8, 1>(pb, &lock_range<T, 8, 1>);
  } else {
    run_lock<T, 16, 16, 6, 2>(pb, &lock_range<T, 6, 2>);
  }
}

// The output is written once, front to back, right after it is allocated: a large one is fresh memory from the
// system, and faulting it in 4 KiB pages costs as much as the solve itself at r = 32 in float64 (about 2 us a
// page on a virtual machine). On Linux, ask for transparent huge pages on its 2 MiB-aligned interior (what torch
// does for every large tensor under THP_MEM_ALLOC_ENABLE=1): one fault per 2 MiB. A hint only: where THP is
// off or the memory is already mapped, nothing changes.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const size_t nbytes = t.nbytes();
  if (nbytes < 4 * kHuge) {
    return;
  }
  const uintptr_t start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (start + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (start + nbytes) & ~(kHuge - 1);
  if (hi > lo) {
    (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#else
  (void)t;
#endif
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
  advise_huge_pages(A);
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
                               A.mutable_data_ptr<scalar_t>(), failed.mutable_data_ptr<bool>(), lam, n, r, p};
    run<scalar_t>(pb, n);
  });
  return {A, failed};
}

}  // namespace globe_ext

TORCH_LIBRARY_IMPL(globe_ext, CPU, m) {
  m.impl("cholesky_solve_batched", &globe_ext::cholesky_solve_batched_cpu);
}
