// The test library of the emulated CUDA kernels: namespace ASCOOD_EMU_NS
// (ascood_emu; the fault-injection builds use their own) with the schemas of
// the `ascood` ops that have CUDA kernels. The .cu files register their
// kernels for CPU tensors in it (ASCOOD_CUDA_OPS_IMPL under emulation).
#include <torch/library.h>

#include "../../schema.h"
#include "cuda_emu.h"

namespace {

// Sets an emulation option or tunable (value < 0 restores the default) and
// returns the previous value (-1: the default was in use).
int64_t emu_option(std::string name, int64_t value) { return ascood::emu::set_option(name, value); }

#define ASCOOD_EMU_STR2(x) #x
#define ASCOOD_EMU_STR(x) ASCOOD_EMU_STR2(x)
// Outputs the kernels leave unwritten read as NaN / all-ones (poison.cpp).
[[maybe_unused]] const bool poisoned = ascood::emu::poison_outputs_of(ASCOOD_EMU_STR(ASCOOD_EMU_NS));

}  // namespace

#ifdef ASCOOD_EMU_SELFTEST
namespace ascood {
namespace emu {
at::Tensor selftest(std::string name, int64_t arg);  // selftest.cpp
}  // namespace emu
}  // namespace ascood
#endif

TORCH_LIBRARY(ASCOOD_EMU_NS, m) {
  ascood::define_kernel_schemas(m);
  m.def("_emu_option(str name, int value) -> int", &emu_option);
#ifdef ASCOOD_EMU_SELFTEST
  m.def("_emu_selftest(str name, int arg) -> Tensor", &ascood::emu::selftest);
#endif
}
