// Schemas of the ops that have CUDA kernels, shared by the `ascood` library
// (ops.cpp) and the test-only emulated CUDA library (cuda/emulation/register.cpp),
// so both take exactly the same arguments. Semantics: docs/OPS.md.
// A template over the library type: ops.cpp defines with the stable ABI's
// StableLibrary, the emulated library (built for the torch at hand) with
// torch::Library; both have def(const char*).
#pragma once

namespace ascood {

template <typename Library>
inline void define_kernel_schemas(Library& m) {
  m.def("invariant_mask(Tensor grad, float p_inv) -> Tensor");
  m.def("gradient_outlier(Tensor x, Tensor grad, float p_inv, float alpha) -> Tensor");
  m.def("zscore(Tensor h, float sigma, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("zscore_backward(Tensor grad_out, Tensor h, Tensor mean, Tensor rstd, float sigma) -> Tensor");
  m.def("iodin_perturb(Tensor x, Tensor grad, float eps, Tensor std, int k) -> Tensor");
  m.def("ascood_loss(Tensor id_logits, Tensor target, Tensor ood_logits, float w) -> (Tensor, Tensor, Tensor)");
  m.def(
      "ascood_loss_backward(Tensor grad, Tensor id_logits, Tensor target, Tensor ood_logits, "
      "float w, Tensor lse_id, Tensor lse_ood) -> (Tensor, Tensor)");
}

}  // namespace ascood
