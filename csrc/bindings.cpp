// The op schema (namespace globe_ext) and the Python module that carries it.
//
// Importing the module registers torch.ops.globe_ext.cholesky_solve_batched; the CPU and CUDA kernels
// attach themselves with TORCH_LIBRARY_IMPL in their own files. The module is a bare CPython module (no
// pybind11) exposing a few build facts, so importing it costs one dlopen.
#include <Python.h>

#include <torch/library.h>

#ifdef GLOBE_WITH_CUDA
#include "cholesky_kernel.h"
#endif

TORCH_LIBRARY(globe_ext, m) {
  // A [n, p, r] = R (G + lam I)^-1 per system; failed [n] bool marks systems whose factorisation met a
  // pivot that is not a finite positive number (their rows of A are NaN, to be solved by the caller).
  m.def("cholesky_solve_batched(Tensor G, Tensor R, float lam) -> (Tensor A, Tensor failed)");
}

#define GLOBE_CONCAT_(a, b) a##b
#define GLOBE_CONCAT(a, b) GLOBE_CONCAT_(a, b)
#define GLOBE_STR_(a) #a
#define GLOBE_STR(a) GLOBE_STR_(a)

PyMODINIT_FUNC GLOBE_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef def = {
      PyModuleDef_HEAD_INIT,
      GLOBE_STR(TORCH_EXTENSION_NAME),
      "GloBE compiled kernels: registers torch.ops.globe_ext.cholesky_solve_batched.",
      -1,       // m_size: no per-module state
      nullptr,  // m_methods
      nullptr,  // m_slots
      nullptr,  // m_traverse
      nullptr,  // m_clear
      nullptr,  // m_free
  };
  PyObject* module = PyModule_Create(&def);
  if (module == nullptr) {
    return nullptr;
  }
#ifdef GLOBE_WITH_CUDA
  const long with_cuda = 1;
  const long cuda_max_r = globe_ext::kCudaMaxR;
  const long cuda_threads = globe_ext::kCudaThreads;
#else
  const long with_cuda = 0;
  const long cuda_max_r = 0;
  const long cuda_threads = 0;
#endif
  if (PyModule_AddIntConstant(module, "with_cuda", with_cuda) < 0 ||
      PyModule_AddIntConstant(module, "cuda_max_r", cuda_max_r) < 0 ||
      PyModule_AddIntConstant(module, "cuda_threads", cuda_threads) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
