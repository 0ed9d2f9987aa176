// Op schemas for the `ascood` namespace: the one place they are defined (those
// of the ops with CUDA kernels in schema.h, shared with the test-only emulated
// CUDA library).
// Kernels live beside each other in cpu/ and cuda/ and register themselves for
// their dispatch key with TORCH_LIBRARY_IMPL; the Python side
// (ascood_kernels/ops/*.py) adds fake (meta) kernels and autograd with
// torch.library, so the ops run under torch.compile and pass opcheck.
// Semantics: docs/OPS.md.
#include <Python.h>
#include <torch/library.h>

#include "schema.h"

namespace ascood {

// CUDA_VERSION the extension was compiled against, or -1 when it was built
// without its CUDA kernels (lets Python report backends without a GPU).
int64_t cuda_version() {
#ifdef ASCOOD_WITH_CUDA
  return ASCOOD_CUDA_VERSION;
#else
  return -1;
#endif
}

TORCH_LIBRARY(ascood, m) {
  define_kernel_schemas(m);  // the ops with CUDA kernels (schema.h)
  m.def("shuffle_outlier(Tensor x, Tensor saliency, float p_inv, Tensor perm) -> Tensor");
  m.def("random_permutations(Tensor seeds, int n) -> Tensor");
  m.def("_cuda_version() -> int", &cuda_version);
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
