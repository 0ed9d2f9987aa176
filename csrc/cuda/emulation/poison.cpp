// Poisoned outputs for the emulated kernels: while an op of an emulated
// library runs (its namespace registered with poison_outputs_of), every fresh
// CPU allocation is filled with 0xff bytes (NaN in every float dtype, -1 in
// integers, an invalid bool), as the emulation already does for shared memory.
// A kernel that leaves an element of an `empty` output unwritten then fails
// the comparison with the reference instead of passing on whatever the memory
// held. The seam is outside the launchers: a CPU allocator that wraps torch's
// and a RecordFunction callback that marks the thread while such an op runs,
// so the kernels' glue (csrc/cuda/*.cu) is unchanged.
#include <ATen/record_function.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_emu.h"

namespace ascood {
namespace emu {
namespace {

constexpr unsigned char kOutputPoison = 0xff;

thread_local int t_poison_depth = 0;  // > 0 while an op of a registered namespace runs on this thread
std::mutex g_ns_mu;
std::vector<std::string> g_prefixes;  // "namespace::" of each registered library namespace

bool is_emulated_op(const at::RecordFunction& fn) {
  const char* name = fn.name();
  if (name == nullptr) return false;
  std::lock_guard<std::mutex> lk(g_ns_mu);
  for (const auto& p : g_prefixes) {
    if (std::strncmp(name, p.c_str(), p.size()) == 0) return true;
  }
  return false;
}

std::unique_ptr<at::ObserverContext> on_op_start(const at::RecordFunction& fn) {
  if (is_emulated_op(fn)) ++t_poison_depth;
  return nullptr;
}

void on_op_end(const at::RecordFunction& fn, at::ObserverContext*) {
  if (is_emulated_op(fn) && t_poison_depth > 0) --t_poison_depth;
}

class PoisoningAllocator final : public c10::Allocator {
 public:
  explicit PoisoningAllocator(c10::Allocator* inner) : inner_(inner) {}

  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr p = inner_->allocate(n);
    if (t_poison_depth > 0 && n > 0 && p.get() != nullptr) std::memset(p.get(), kOutputPoison, n);
    return p;
  }
  c10::DeleterFnPtr raw_deleter() const override { return inner_->raw_deleter(); }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    inner_->copy_data(dest, src, count);
  }

 private:
  c10::Allocator* inner_;
};

void install_once() {
  static std::once_flag once;
  std::call_once(once, [] {
    // Never freed: tensors allocated through it may outlive any scope here.
    static PoisoningAllocator* alloc = new PoisoningAllocator(c10::GetCPUAllocator());
    c10::SetCPUAllocator(alloc, /*priority=*/0);
    at::addGlobalCallback(at::RecordFunctionCallback(on_op_start, on_op_end).scopes({at::RecordScope::FUNCTION}));
  });
}

}  // namespace

bool poison_outputs_of(const char* ns) {
  install_once();
  std::lock_guard<std::mutex> lk(g_ns_mu);
  g_prefixes.push_back(std::string(ns) + "::");
  return true;
}

}  // namespace emu
}  // namespace ascood
