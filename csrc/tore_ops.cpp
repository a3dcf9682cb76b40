// The Python module stub of tore_kernels._C. Importing it loads this library, whose static
// initialisers register every op (TORCH_LIBRARY_FRAGMENT in each op family's files) in the
// `tore_kernels` namespace. The ops themselves are reached through torch.ops.tore_kernels.*.
#include <Python.h>

#ifndef TORE_CUDA_ARCHS
#define TORE_CUDA_ARCHS ""
#endif

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "tore-kernels C++/CUDA ops", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef TORE_WITH_CUDA
  const int with_cuda = 1;
#else
  const int with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(module, "with_cuda", with_cuda) < 0 ||
      PyModule_AddStringConstant(module, "cuda_archs", TORE_CUDA_ARCHS) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
