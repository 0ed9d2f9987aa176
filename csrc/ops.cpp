// Op schemas for the `ascood` namespace: the one place they are defined (those
// of the ops with CUDA kernels in schema.h, shared with the test-only emulated
// CUDA library).
// Kernels live beside each other in cpu/ and cuda/ and register themselves for
// their dispatch key with STABLE_TORCH_LIBRARY_IMPL (the LibTorch stable ABI:
// abi.h, docs/OPS.md "Build and ABI"); the CUDA kernels are a second library,
// ascood_kernels._C_cuda (cuda_ops.cpp), loaded after this one. The Python side
// (ascood_kernels/ops/*.py) adds fake (meta) kernels and autograd with
// torch.library, so the ops run under torch.compile and pass opcheck.
// Semantics: docs/OPS.md.
#include <Python.h>

#include "abi.h"
#include "schema.h"

namespace ascood {

STABLE_TORCH_LIBRARY(ascood, m) {
  define_kernel_schemas(m);  // the ops with CUDA kernels (schema.h)
  m.def("shuffle_outlier(Tensor x, Tensor saliency, float p_inv, Tensor perm) -> Tensor");
  m.def("random_permutations(Tensor seeds, int n) -> Tensor");
}

}  // namespace ascood

// `import ascood_kernels._C` loads the shared library, which runs the static
// registrations above; the module itself holds nothing.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
