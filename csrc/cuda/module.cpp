// The Python module of ascood_kernels._C_cuda, the CUDA kernels' library: its
// import runs the kernels' STABLE_TORCH_LIBRARY_IMPL(ascood, CUDA) registrations
// (the schemas come from ascood_kernels._C, imported first). It is a library
// of its own so that the CPU kernels of _C load under a CPU-only torch, where
// this one cannot (it needs libtorch_cuda and the CUDA runtime).
#include <Python.h>

extern "C" {
PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  // CUDA_VERSION the kernels were compiled against (lets Python report it without a GPU).
  if (module != nullptr && PyModule_AddIntConstant(module, "CUDA_VERSION", ASCOOD_CUDA_VERSION) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
