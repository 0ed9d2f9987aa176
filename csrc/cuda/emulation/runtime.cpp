// Runtime of the CUDA emulation (cuda_emu.h): launches, block barriers, warp
// exchanges, per-block shared memory, failure reports. Test-only; see the header
// for the model and its limits.
#include "cuda_emu.h"

#include <linux/futex.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <semaphore>
#include <stdexcept>
#include <unordered_map>
#include <vector>

thread_local uint3 threadIdx{0, 0, 0};
uint3 blockIdx{0, 0, 0};
dim3 blockDim;
dim3 gridDim;

namespace ascood {
namespace emu {
namespace {

using Clock = std::chrono::steady_clock;

// Limits of compute capability >= 7.0 (CUDA C++ Programming Guide, "Features
// and Technical Specifications"); 48 KiB is what a launch may use without
// cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize).
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockDimXY = 1024;
constexpr unsigned kMaxBlockDimZ = 64;
constexpr uint64_t kMaxGridDimX = (uint64_t(1) << 31) - 1;
constexpr unsigned kMaxGridDimYZ = 65535;
constexpr std::size_t kMaxSharedBytes = 48 * 1024;
constexpr std::size_t kGuardBytes = 64;  // after the dynamic shared memory, to catch writes past it
constexpr unsigned char kGuardByte = 0x5a;

// ---------------------------------------------------------------------------
// Options. Tunables are the constants a test may lower (see common.cuh);
// deadlock_timeout_ms, poison and race_check are the emulator's own.
const char* const kOptionNames[] = {"num_sms",
                                     "cand_budget",
                                     "small_bytes",
                                     "zscore_max_blocks",
                                     "iodin_all_blocks_per_sm",
                                     "deadlock_timeout_ms",
                                     "poison",
                                     "race_check"};

std::mutex g_option_mu;
std::map<std::string, int64_t> g_options;

int64_t option(const char* name, int64_t default_value) {
  std::lock_guard<std::mutex> lk(g_option_mu);
  const auto it = g_options.find(name);
  return it == g_options.end() ? default_value : it->second;
}

// ---------------------------------------------------------------------------
// Launch counts: per kernel (its name without template arguments), the
// launches, and per ASCOOD_PATH the launches that reached it. The running
// kernel's name (for ASCOOD_PATH and the AddressSanitizer report).
std::mutex g_count_mu;
std::map<std::pair<std::string, std::string>, int64_t> g_counts;
std::vector<const char*> g_launch_paths;  // the paths the running launch reached (string literals)
std::atomic<const char*> g_running_kernel{nullptr};

std::string kernel_base_name(const char* kernel) {
  std::string s = kernel;
  s.erase(std::remove_if(s.begin(), s.end(), [](char c) { return c == '(' || c == ')' || c == ' '; }), s.end());
  return s.substr(0, s.find('<'));
}

void count_launch(const char* kernel) {
  const std::string name = kernel_base_name(kernel);
  std::lock_guard<std::mutex> lk(g_count_mu);
  ++g_counts[{name, "launches"}];
  for (const char* path : g_launch_paths) ++g_counts[{name, path}];
  g_launch_paths.clear();
}

// AddressSanitizer build (ASCOOD_EMU_FLAVOUR=asan): its report names the
// faulting frame; this adds the kernel launch it happened in, before it exits.
extern "C" void __sanitizer_set_death_callback(void (*callback)(void)) __attribute__((weak));

void report_kernel_on_asan_death() {
  const char* k = g_running_kernel.load();
  std::fprintf(stderr, "cuda-emulation: AddressSanitizer stopped the process in kernel %s (launched as %s)\n",
               k ? kernel_base_name(k).c_str() : "(none: outside a launch)", k ? k : "-");
}

[[maybe_unused]] const bool g_asan_hook = [] {
  if (__sanitizer_set_death_callback != nullptr) __sanitizer_set_death_callback(report_kernel_on_asan_death);
  return true;
}();

// ---------------------------------------------------------------------------
struct Abort {};  // unwinds an emulated thread once its block has failed

enum class State : int { kRunning, kBarrier, kWarp, kExited };

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kShfl: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kSyncWarp: return "__syncwarp";
  }
  return "?";
}

const char* base_name(const char* path) {
  if (path == nullptr) return "?";
  const char* slash = std::strrchr(path, '/');
  return slash ? slash + 1 : path;
}

std::string site(const char* file, unsigned line) { return std::string(base_name(file)) + ":" + std::to_string(line); }

std::string hex(unsigned v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

// What a thread is doing, for deadlock reports (written by the thread, read by
// whoever diagnoses).
struct Where {
  std::atomic<int> state{0};
  std::atomic<int> op{0};
  std::atomic<unsigned> mask{0};
  std::atomic<const char*> file{nullptr};
  std::atomic<unsigned> line{0};
};

struct Warp {
  // Guards the fields below. A mutex, not a spin lock: with hundreds of runnable threads on
  // two cores, spinners that yield starved a preempted holder (minutes for one launch).
  std::mutex mu;
  std::atomic<uint32_t> seq{0};    // bumped at every phase change; waiters sleep on it
  enum Phase { kIdle, kCollecting, kReading } phase = kIdle;
  WarpOp op = WarpOp::kSyncWarp;
  unsigned mask = 0, width = 32, arrived = 0;
  std::atomic<unsigned> to_read{0};  // lanes yet to take their result in the reading phase
  unsigned existing = 0;  // lanes that exist (a partial last warp has fewer than 32)
  unsigned exited = 0;    // lanes that have returned from the kernel
  std::atomic<uint32_t> syncs{0};  // full-mask __syncwarp completed (the race check's warp epoch)
  const char* file = nullptr;
  unsigned line = 0;
  uint64_t vals[32] = {};
  int args[32] = {};
  uint64_t results[32] = {};  // written by the last lane to arrive, read by each lane without the lock
};

struct Block {
  unsigned nthreads = 0, nwarps = 0;
  const char* kernel = "";
  uint64_t linear = 0;  // x + gridDim.x * (y + gridDim.y * z)
  // __syncthreads: lock-free (a mutex per arrival made barriers of 512 threads contend).
  std::atomic<unsigned> bar_arrived{0};
  std::atomic<uint32_t> bar_gen{0};   // completed barriers (the race check's block epoch); waiters sleep on it
  std::atomic<uint64_t> bar_key{0};   // call site of the barrier now filling (0: none yet)
  std::atomic<const char*> bar_file{nullptr};
  std::atomic<unsigned> bar_line{0};
  std::unique_ptr<Warp[]> warps;
  std::unique_ptr<Where[]> where;
  // failure and progress
  std::atomic<bool> failed{false};
  std::mutex err_mu;
  std::string error;
  std::atomic<uint64_t> progress{0};
  std::atomic<unsigned> waiting{0}, exited{0};
  int64_t deadlock_ms = 10000;
  // shared memory: variables are looked up without the lock (keys published with release)
  static constexpr int kMaxSharedVars = 64;
  std::atomic<const void*> sh_keys[kMaxSharedVars] = {};
  unsigned char* sh_ptrs[kMaxSharedVars] = {};
  std::atomic<int> sh_count{0};
  std::mutex sh_mu;  // guards allocation and the vectors below
  std::vector<std::pair<const void*, unsigned char*>> shared_vars;
  std::vector<std::pair<const char*, std::size_t>> shared_info;  // name and size of each, for race reports
  std::vector<std::unique_ptr<unsigned char[]>> storage;
  std::size_t static_bytes = 0, dynamic_bytes = 0;
  unsigned char* dynamic = nullptr;
  unsigned char poison = 0xff;
};

Block* g_block = nullptr;  // the block now running (launches are serialised)
thread_local unsigned t_tid = 0;
std::mutex g_launch_mu;

Block& cur() {
  if (g_block == nullptr) throw std::runtime_error("cuda-emulation: a device function was called outside a launch");
  return *g_block;
}

std::string who(unsigned tid) {
  const unsigned bx = blockDim.x, by = blockDim.y;
  return "thread (" + std::to_string(tid % bx) + "," + std::to_string(tid / bx % by) + "," +
         std::to_string(tid / (bx * by)) + ") (warp " + std::to_string(tid / 32) + ", lane " +
         std::to_string(tid % 32) + ")";
}

// Waiting: threads sleep on a 32-bit word (Linux futex) until it changes. One
// wake-up call then releases every waiter of a barrier, and no lock is taken
// on the way out (a mutex and condition variable made a 512-thread barrier
// several times slower on two cores). Sleeps are bounded so waiters also poll.
void futex_wait(std::atomic<uint32_t>& word, uint32_t old, int ms) {
  static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t), "futex word");
  timespec ts{ms / 1000, (ms % 1000) * 1000000L};
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAIT_PRIVATE, old, &ts, nullptr, 0);
}

void futex_wake_all(std::atomic<uint32_t>& word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
}

// Records the first failure of the block and wakes every waiter.
void fail(Block& b, const std::string& msg) {
  {
    std::lock_guard<std::mutex> lk(b.err_mu);
    if (b.failed.load()) return;
    b.error = msg;
    b.failed.store(true);
  }
  futex_wake_all(b.bar_gen);
  for (unsigned w = 0; w < b.nwarps; ++w) futex_wake_all(b.warps[w].seq);
}

[[noreturn]] void fail_now(Block& b, const std::string& msg) {
  fail(b, msg);
  throw Abort{};
}

void set_where(Block& b, unsigned tid, State s, WarpOp op = WarpOp::kSyncWarp, unsigned mask = 0,
               const char* file = nullptr, unsigned line = 0) {
  Where& w = b.where[tid];
  w.op.store(static_cast<int>(op));
  w.mask.store(mask);
  w.file.store(file);
  w.line.store(line);
  w.state.store(static_cast<int>(s));
}

std::string describe(Block& b, unsigned tid) {
  Where& w = b.where[tid];
  switch (static_cast<State>(w.state.load())) {
    case State::kRunning: return "running";
    case State::kExited: return "exited";
    case State::kBarrier: return "at __syncthreads " + site(w.file.load(), w.line.load());
    case State::kWarp:
      return std::string("at ") + op_name(static_cast<WarpOp>(w.op.load())) + "(mask " + hex(w.mask.load()) + ") " +
             site(w.file.load(), w.line.load());
  }
  return "?";
}

// "warp 0: lanes 0-15 at __shfl_sync(...) f.cu:12, lanes 16-31 at __syncthreads f.cu:20; warps 1-7: ..."
std::string diagnose(Block& b) {
  std::vector<std::string> per_warp(b.nwarps);
  for (unsigned w = 0; w < b.nwarps; ++w) {
    const unsigned lanes = std::min(32u, b.nthreads - w * 32);
    std::string text, last;
    unsigned start = 0;
    for (unsigned l = 0; l <= lanes; ++l) {
      const std::string d = l < lanes ? describe(b, w * 32 + l) : std::string();
      if (l == 0) {
        last = d;
        continue;
      }
      if (l == lanes || d != last) {
        if (!text.empty()) text += ", ";
        text += (start == 0 && l == lanes)
                    ? "all lanes " + last
                    : "lanes " + std::to_string(start) + "-" + std::to_string(l - 1) + " " + last;
        start = l;
        last = d;
      }
    }
    per_warp[w] = text;
  }
  std::string out;
  for (unsigned w = 0; w < b.nwarps;) {
    unsigned e = w + 1;
    while (e < b.nwarps && per_warp[e] == per_warp[w]) ++e;
    if (!out.empty()) out += "; ";
    out += (e - w == 1 ? "warp " + std::to_string(w) : "warps " + std::to_string(w) + "-" + std::to_string(e - 1)) +
           ": " + per_warp[w];
    w = e;
  }
  return out;
}

// Waits until `word` differs from `old`, failing the block when it is a
// deadlock: every thread that has not exited waits and nothing arrived anywhere
// in the block for deadlock_timeout_ms. Throws Abort once the block has failed.
void wait_change(Block& b, std::atomic<uint32_t>& word, uint32_t old) {
  if (word.load() != old) return;
  b.waiting.fetch_add(1);
  struct Leave {
    Block& b;
    ~Leave() { b.waiting.fetch_sub(1); }
  } leave{b};
  uint64_t seen = b.progress.load();
  auto since = Clock::now();
  while (word.load() == old) {
    if (b.failed.load()) throw Abort{};
    futex_wait(word, old, 100);
    if (word.load() != old) break;
    if (b.failed.load()) throw Abort{};
    const uint64_t p = b.progress.load();
    const auto now = Clock::now();
    if (p != seen) {
      seen = p;
      since = now;
      continue;
    }
    if (b.waiting.load() + b.exited.load() >= b.nthreads &&
        now - since > std::chrono::milliseconds(b.deadlock_ms)) {
      fail(b, "deadlock: no thread of the block can proceed (no progress for " + std::to_string(b.deadlock_ms) +
                  " ms; a GPU would hang here): " + diagnose(b));
      throw Abort{};
    }
  }
}

// ---------------------------------------------------------------------------
// Race check (option race_check=1). The kernel sources are compiled with GCC's
// -fsanitize=thread instrumentation, which calls the __tsan_* hooks at the end
// of this file for every load, store and atomic; this file is compiled without
// it and implements them (libtsan is not used). While a kernel runs, every
// byte a thread touches outside its own stack (shared and global memory) keeps
// its last write and a summary of the reads since. Two accesses by different
// threads, at least one a write and not both atomic, race unless ordered: by a
// kernel boundary, by a __syncthreads between them (same block), or by a
// full-mask __syncwarp between them (same warp). Blocks of one launch are never
// ordered: on a GPU they run concurrently. (Shuffles and ballots do not order
// memory, as in CUDA's memory model; partial-mask __syncwarp is not modelled.)
namespace race {

struct Access {
  uint64_t block = 0;
  uint32_t tid = 0, epoch = 0, sync = 0;
  bool atomic = false, valid = false;
};

struct Cell {
  Access w;                // last write
  bool has_r = false;      // reads since the last write:
  bool r_other_block = false;  // by two or more blocks
  bool r_all_atomic = true;
  uint64_t r_block = 0;    // the block of the first
  uint32_t r_epoch = 0;    // the latest block epoch with reads, and of its reads:
  uint32_t r_tid = 0;      // one reader,
  bool r_many = false;     // more than one thread,
  uint32_t r_warps = 0;    // their warps,
  uint32_t r_min_sync = 0;  // the smallest warp epoch
};

// Cells of one 64-byte line, found with one lookup and one lock per access.
struct Line {
  Cell cells[64];
};

constexpr int kShards = 64;
struct Shard {
  std::mutex mu;
  std::unordered_map<uintptr_t, std::unique_ptr<Line>> lines;
};
Shard g_shards[kShards];
std::atomic<bool> g_enabled{false};

thread_local bool t_check = false;  // this OS thread runs kernel code of a race-checked launch

// Turns the check off for this thread while the emulator itself runs on it.
// The kernels' translation units are instrumented, and the linker may pick
// their copy of a shared inline function (std::string, std::vector): without
// this, building a race report would check the report's own heap memory,
// re-enter access() and wait forever on the shard lock it holds (seen: one
// process in six running the emulator's tests hung), and the runtime's own
// bookkeeping under its mutexes could be reported as a race of the kernel.
struct Suspend {
  bool saved = t_check;
  Suspend() { t_check = false; }
  ~Suspend() { t_check = saved; }
  Suspend(const Suspend&) = delete;
  Suspend& operator=(const Suspend&) = delete;
};
thread_local uintptr_t t_stack_lo = 0, t_stack_hi = 0;

Shard& shard_of(uintptr_t line) { return g_shards[(line ^ (line >> 7)) % kShards]; }

void clear_all() {
  for (Shard& sh : g_shards) {
    std::lock_guard<std::mutex> lk(sh.mu);
    sh.lines.clear();
  }
}

// Forgets [p, p + n), a range of whole 64-byte lines (shared memory is allocated so).
void clear_range(const unsigned char* p, std::size_t n) {
  const uintptr_t lo = reinterpret_cast<uintptr_t>(p) >> 6, hi = (reinterpret_cast<uintptr_t>(p) + n + 63) >> 6;
  for (uintptr_t line = lo; line < hi; ++line) {
    Shard& sh = shard_of(line);
    std::lock_guard<std::mutex> lk(sh.mu);
    sh.lines.erase(line);
  }
}

// a happened before now (in emulation order): is it also ordered on a GPU?
bool ordered(const Access& a, const Access& now) {
  if (a.block == now.block && a.tid == now.tid) return true;
  if (a.block != now.block) return false;
  if (a.epoch < now.epoch) return true;
  return (a.tid >> 5) == (now.tid >> 5) && a.sync < now.sync;
}

std::string thread_name(uint64_t block, uint32_t tid) {
  const unsigned bx = blockDim.x, by = blockDim.y, gx = gridDim.x, gy = gridDim.y;
  return "thread (" + std::to_string(tid % bx) + "," + std::to_string(tid / bx % by) + "," +
         std::to_string(tid / (bx * by)) + ") of block (" + std::to_string(block % gx) + "," +
         std::to_string(block / gx % gy) + "," + std::to_string(block / (uint64_t(gx) * gy)) + ")";
}

std::string where_is(Block& b, uintptr_t a) {
  {
    std::lock_guard<std::mutex> lk(b.sh_mu);
    for (std::size_t i = 0; i < b.shared_vars.size(); ++i) {
      const uintptr_t lo = reinterpret_cast<uintptr_t>(b.shared_vars[i].second);
      if (a >= lo && a < lo + b.shared_info[i].second) {
        return std::string("__shared__ ") + b.shared_info[i].first + " (byte " + std::to_string(a - lo) + ")";
      }
    }
  }
  const uintptr_t dlo = reinterpret_cast<uintptr_t>(b.dynamic);
  if (a >= dlo && a < dlo + b.dynamic_bytes) return "dynamic shared memory (byte " + std::to_string(a - dlo) + ")";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%#zx", static_cast<std::size_t>(a));
  return std::string("global memory at ") + buf;
}

void access(const void* addr, std::size_t size, bool write, bool atomic) {
  const uintptr_t a0 = reinterpret_cast<uintptr_t>(addr);
  if (a0 >= t_stack_lo && a0 < t_stack_hi) return;  // the thread's own locals
  Block& b = *g_block;
  if (b.failed.load(std::memory_order_relaxed)) return;
  Access now;
  now.block = b.linear;
  now.tid = t_tid;
  now.epoch = static_cast<uint32_t>(b.bar_gen.load());
  now.sync = b.warps[t_tid >> 5].syncs.load();
  now.atomic = atomic;
  now.valid = true;
  std::string problem;
  Shard* sh = nullptr;
  Line* line = nullptr;
  uintptr_t line_no = ~uintptr_t(0);
  std::unique_lock<std::mutex> lk;
  for (std::size_t i = 0; i < size && problem.empty(); ++i) {
    const uintptr_t a = a0 + i;
    if ((a >> 6) != line_no) {
      line_no = a >> 6;
      if (lk.owns_lock()) lk.unlock();
      sh = &shard_of(line_no);
      lk = std::unique_lock<std::mutex>(sh->mu);
      auto& slot = sh->lines[line_no];
      if (!slot) slot = std::make_unique<Line>();
      line = slot.get();
    }
    Cell& c = line->cells[a & 63];
    if (c.w.valid && !ordered(c.w, now) && !(c.w.atomic && atomic)) {
      problem = std::string(write ? "written" : "read") + (atomic ? " atomically" : "") + " by " +
                thread_name(now.block, now.tid) + " and written" + (c.w.atomic ? " atomically" : "") + " by " +
                thread_name(c.w.block, c.w.tid);
    } else if (write) {
      if (c.has_r && !(c.r_all_atomic && atomic)) {
        bool racy = false;
        if (c.r_other_block || c.r_block != now.block) {
          racy = true;
        } else if (c.r_epoch == now.epoch && (c.r_many || c.r_tid != now.tid)) {
          const uint32_t warp_bit = 1u << (now.tid >> 5);
          racy = !(c.r_warps == warp_bit && c.r_min_sync < now.sync);
        }
        if (racy) {
          problem = std::string("written") + (atomic ? " atomically" : "") + " by " + thread_name(now.block, now.tid) +
                    " and read by " + (c.r_many ? "several threads, e.g. " : "") +
                    thread_name(c.r_other_block ? c.r_block : c.r_block, c.r_tid);
        }
      }
      c.w = now;
      c.has_r = false;
    } else if (!c.has_r) {
      c.has_r = true;
      c.r_other_block = false;
      c.r_all_atomic = atomic;
      c.r_block = now.block;
      c.r_epoch = now.epoch;
      c.r_tid = now.tid;
      c.r_many = false;
      c.r_warps = 1u << (now.tid >> 5);
      c.r_min_sync = now.sync;
    } else {
      c.r_all_atomic = c.r_all_atomic && atomic;
      if (now.block != c.r_block) {
        c.r_other_block = true;
      } else if (now.epoch > c.r_epoch) {
        c.r_epoch = now.epoch;
        c.r_tid = now.tid;
        c.r_many = false;
        c.r_warps = 1u << (now.tid >> 5);
        c.r_min_sync = now.sync;
      } else if (now.epoch == c.r_epoch) {
        c.r_many = c.r_many || now.tid != c.r_tid;
        c.r_warps |= 1u << (now.tid >> 5);
        c.r_min_sync = std::min(c.r_min_sync, now.sync);
      }
    }
  }
  if (lk.owns_lock()) lk.unlock();
  if (!problem.empty()) {
    fail(b, "data race on " + where_is(b, a0) + ": " + problem +
                ", not ordered by a __syncthreads (same block), a full-mask __syncwarp (same warp) or atomics (on a "
                "GPU the blocks of a launch run concurrently)");
  }
}

inline void check(const void* addr, std::size_t size, bool write, bool atomic) {
  if (t_check) {
    const Suspend checking_itself;
    access(addr, size, write, atomic);
  }
}

}  // namespace race

// ---------------------------------------------------------------------------
// The OS threads that run the threads of a block: created once, reused by
// every block (a block of n threads uses workers 0..n-1).
class Pool {
 public:
  void ensure(unsigned n) {
    while (workers_.size() < n) {
      auto w = std::make_unique<Worker>();
      w->pool = this;
      w->idx = static_cast<unsigned>(workers_.size());
      pthread_attr_t attr;
      pthread_attr_init(&attr);
      pthread_attr_setstacksize(&attr, 1 << 20);
      pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
      pthread_t th;
      const int rc = pthread_create(&th, &attr, &Pool::main, w.get());
      pthread_attr_destroy(&attr);
      if (rc != 0) {
        throw std::runtime_error("cuda-emulation: could not start thread " + std::to_string(w->idx) + " (error " +
                                 std::to_string(rc) + ")");
      }
      workers_.push_back(std::move(w));
    }
  }

  void run(unsigned n, const std::function<void(unsigned)>& job) {
    job_ = &job;
    remaining_.store(n);
    for (unsigned i = 0; i < n; ++i) workers_[i]->go.release();
    done_.acquire();
  }

 private:
  struct Worker {
    std::binary_semaphore go{0};
    Pool* pool = nullptr;
    unsigned idx = 0;
  };

  static void* main(void* arg) {
    Worker* w = static_cast<Worker*>(arg);
    pthread_attr_t attr;
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
      void* lo = nullptr;
      std::size_t size = 0;
      pthread_attr_getstack(&attr, &lo, &size);
      race::t_stack_lo = reinterpret_cast<uintptr_t>(lo);
      race::t_stack_hi = race::t_stack_lo + size;
      pthread_attr_destroy(&attr);
    }
    for (;;) {
      w->go.acquire();
      (*w->pool->job_)(w->idx);
      if (w->pool->remaining_.fetch_sub(1) == 1) w->pool->done_.release();
    }
    return nullptr;
  }

  std::vector<std::unique_ptr<Worker>> workers_;
  const std::function<void(unsigned)>* job_ = nullptr;
  std::atomic<unsigned> remaining_{0};
  std::binary_semaphore done_{0};
};

Pool& pool() {
  static Pool* p = new Pool;  // never destroyed: its detached workers sleep until the process ends
  return *p;
}

void thread_exit(Block& b, unsigned tid) {
  set_where(b, tid, State::kExited);
  std::string problem;
  // Pairs with block_barrier (seq_cst): an exit and an arrival see each other at least one way.
  b.exited.fetch_add(1);
  if (const unsigned waiting = b.bar_arrived.load(); waiting > 0) {
    problem = who(tid) + " returned while " + std::to_string(waiting) + " threads wait at __syncthreads " +
              site(b.bar_file.load(), b.bar_line.load()) +
              ": that barrier can never complete (a __syncthreads in divergent code)";
  }
  {
    Warp& w = b.warps[tid >> 5];
    const unsigned bit = 1u << (tid & 31);
    std::lock_guard<std::mutex> lk(w.mu);
    w.exited |= bit;
    if (problem.empty() && w.phase == Warp::kCollecting && (w.mask & bit) && !(w.arrived & bit)) {
      problem = who(tid) + " returned without reaching " + op_name(w.op) + "(mask " + hex(w.mask) + ") " +
                site(w.file, w.line) + ", where lanes " + hex(w.arrived) +
                " wait for it (a warp intrinsic in divergent code)";
    }
  }
  b.progress.fetch_add(1);
  if (!problem.empty()) fail(b, problem);
}

void thread_main(Block& b, unsigned tid, const std::function<void()>& body) {
  t_tid = tid;
  const unsigned bx = blockDim.x, by = blockDim.y;
  threadIdx = uint3{tid % bx, tid / bx % by, tid / (bx * by)};
  set_where(b, tid, State::kRunning);
  try {
    race::t_check = race::g_enabled.load();
    body();
    race::t_check = false;
  } catch (const Abort&) {
  } catch (const std::exception& e) {
    fail(b, who(tid) + ": " + e.what());
  } catch (...) {
    fail(b, who(tid) + ": unknown exception");
  }
  race::t_check = false;
  thread_exit(b, tid);
}

std::string dims(const dim3& d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

}  // namespace

// ---------------------------------------------------------------------------
int64_t tunable(const char* name, int64_t default_value) { return option(name, default_value); }

void count_path(const char* path) {
  std::lock_guard<std::mutex> lk(g_count_mu);
  if (std::find(g_launch_paths.begin(), g_launch_paths.end(), path) == g_launch_paths.end()) {
    g_launch_paths.push_back(path);
  }
}

int64_t set_option(const std::string& name, int64_t value) {
  if (std::find(std::begin(kOptionNames), std::end(kOptionNames), name) == std::end(kOptionNames)) {
    std::string known;
    for (const char* n : kOptionNames) known += std::string(known.empty() ? "" : ", ") + n;
    throw std::invalid_argument("cuda-emulation: unknown option '" + name + "' (known: " + known + ")");
  }
  std::lock_guard<std::mutex> lk(g_option_mu);
  const auto it = g_options.find(name);
  const int64_t old = it == g_options.end() ? -1 : it->second;
  if (value < 0) {
    g_options.erase(name);
  } else {
    g_options[name] = value;
  }
  return old;
}

void block_barrier(const std::source_location& loc) {
  Block& b = cur();
  const unsigned tid = t_tid;
  set_where(b, tid, State::kBarrier, WarpOp::kSyncWarp, 0, loc.file_name(), loc.line());
  if (b.failed.load()) throw Abort{};
  if (const unsigned gone = b.exited.load(); gone > 0) {
    fail_now(b, who(tid) + " reached __syncthreads " + site(loc.file_name(), loc.line()) + " after " +
                    std::to_string(gone) +
                    " threads of the block returned: the barrier can never complete (every thread of the block must "
                    "reach it)");
  }
  // The first thread to arrive records the call site; every other must come to the same one.
  uint64_t key = 1469598103934665603ull;
  for (const char* c = loc.file_name(); *c; ++c) key = (key ^ static_cast<unsigned char>(*c)) * 1099511628211ull;
  key ^= (uint64_t(loc.line()) << 40) ^ (uint64_t(loc.column()) << 20);
  key |= 1;
  uint64_t expected = 0;
  if (b.bar_key.compare_exchange_strong(expected, key)) {
    b.bar_file.store(loc.file_name());
    b.bar_line.store(loc.line());
  } else if (expected != key) {
    fail_now(b, who(tid) + " waits at __syncthreads " + site(loc.file_name(), loc.line()) + " while " +
                    std::to_string(b.bar_arrived.load()) + " threads wait at another __syncthreads" +
                    (b.bar_file.load() ? " (" + site(b.bar_file.load(), b.bar_line.load()) + ")" : std::string()) +
                    ": the threads of a block must reach the same barrier (a barrier in divergent code)");
  }
  b.progress.fetch_add(1);
  const uint32_t gen = b.bar_gen.load();  // stable: the barrier cannot complete without this thread
  if (b.bar_arrived.fetch_add(1) + 1 == b.nthreads) {
    b.bar_key.store(0);
    b.bar_arrived.store(0);
    b.bar_gen.fetch_add(1);
    futex_wake_all(b.bar_gen);
  } else {
    wait_change(b, b.bar_gen, gen);
  }
  set_where(b, tid, State::kRunning);
}

uint64_t warp_exchange(WarpOp op, unsigned mask, uint64_t bits, int arg, int width, const std::source_location& loc) {
  Block& b = cur();
  const unsigned tid = t_tid;
  const unsigned lane = tid & 31;
  const unsigned bit = 1u << lane;
  Warp& w = b.warps[tid >> 5];
  // Built only for error messages (a string per exchange was a measurable cost).
  const auto at = [&] {
    return std::string(op_name(op)) + "(mask " + hex(mask) + ") " + site(loc.file_name(), loc.line());
  };
  if (!(mask & bit)) fail_now(b, who(tid) + " calls " + at() + " with a mask that does not name its own lane");
  if (mask & ~w.existing) {
    fail_now(b, who(tid) + " calls " + at() + ": the mask names lanes " + hex(mask & ~w.existing) +
                    " that do not exist (the block has " + std::to_string(b.nthreads) + " threads)");
  }
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    fail_now(b, who(tid) + " calls " + at() + " with width " + std::to_string(width) +
                    " (must be a power of 2 in [1, 32])");
  }
  set_where(b, tid, State::kWarp, op, mask, loc.file_name(), loc.line());
  std::unique_lock<std::mutex> lk(w.mu);
  for (;;) {
    if (b.failed.load()) throw Abort{};
    if (w.phase == Warp::kIdle) {
      w.phase = Warp::kCollecting;
      w.op = op;
      w.mask = mask;
      w.width = static_cast<unsigned>(width);
      w.arrived = 0;
      w.file = loc.file_name();
      w.line = loc.line();
      break;
    }
    if (w.phase == Warp::kCollecting) {
      if (w.mask == mask && w.op == op && w.width == static_cast<unsigned>(width)) break;
      if (w.mask & mask) {
        const std::string other = std::string(op_name(w.op)) + "(mask " + hex(w.mask) + ", width " +
                                  std::to_string(w.width) + ") " + site(w.file, w.line);
        lk.unlock();
        fail_now(b, who(tid) + " calls " + at() + " (width " + std::to_string(width) + ") while lanes " +
                        hex(w.arrived) + " wait at " + other +
                        ": every lane named in a mask must execute the same intrinsic with the same mask");
      }
    }
    // A disjoint group of lanes is exchanging, or the last exchange is still being read.
    const uint32_t seq = w.seq.load();
    lk.unlock();
    wait_change(b, w.seq, seq);
    lk.lock();
  }
  if (mask & w.exited) {
    lk.unlock();
    fail_now(b, who(tid) + " calls " + at() + " but lanes " + hex(mask & w.exited) +
                    " named in the mask have returned from the kernel: they can never arrive");
  }
  w.vals[lane] = bits;
  w.args[lane] = arg;
  w.arrived |= bit;
  b.progress.fetch_add(1);
  const uint32_t seq = w.seq.load();
  if (w.arrived == w.mask) {
    // The last lane computes every lane's result (CUDA's definitions), then releases them all.
    std::string problem;
    for (unsigned l = 0; l < 32; ++l) {
      if (!(mask >> l & 1u)) continue;
      uint64_t result = 0;
      if (op == WarpOp::kBallot) {
        for (unsigned j = 0; j < 32; ++j) {
          if ((mask >> j & 1u) && w.vals[j] != 0) result |= uint64_t(1) << j;
        }
      } else if (op != WarpOp::kSyncWarp) {
        const unsigned wd = static_cast<unsigned>(width);
        const unsigned group = l & ~(wd - 1);
        const unsigned sub = l & (wd - 1);
        const unsigned a = static_cast<unsigned>(w.args[l]);
        unsigned src = l;
        switch (op) {
          case WarpOp::kShfl: src = group | (a & (wd - 1)); break;             // srcLane modulo width
          case WarpOp::kShflUp: src = sub >= a ? l - a : l; break;              // lower delta lanes unchanged
          case WarpOp::kShflDown: src = sub + a < wd ? l + a : l; break;        // upper delta lanes unchanged
          case WarpOp::kShflXor:                                                // later groups: own value
            src = l ^ a;
            if (src >= 32 || (src & ~(wd - 1)) > group) src = l;
            break;
          default: break;
        }
        if (!(mask >> src & 1u) && problem.empty()) {
          problem = who((tid & ~31u) | l) + " calls " + at() + " and reads lane " + std::to_string(src) +
                    ", which is not in the mask (its value is undefined)";
        }
        result = w.vals[src];
      }
      w.results[l] = result;
    }
    if (!problem.empty()) {
      lk.unlock();
      fail_now(b, problem);
    }
    if (op == WarpOp::kSyncWarp && mask == 0xffffffffu) w.syncs.fetch_add(1);
    w.phase = Warp::kReading;
    w.to_read.store(static_cast<unsigned>(std::popcount(mask)));
    w.seq.fetch_add(1);
    lk.unlock();
    futex_wake_all(w.seq);
  } else {
    // The next phase change is this exchange completing (or the block failing).
    lk.unlock();
    wait_change(b, w.seq, seq);
  }
  const uint64_t result = w.results[lane];
  if (w.to_read.fetch_sub(1) == 1) {  // the last to read frees the warp for its next exchange
    {
      std::lock_guard<std::mutex> relock(w.mu);
      w.phase = Warp::kIdle;
      w.seq.fetch_add(1);
    }
    futex_wake_all(w.seq);
  }
  set_where(b, tid, State::kRunning);
  return result;
}

void* block_shared(const void* key, const char* name, std::size_t bytes, std::size_t align) {
  const race::Suspend bookkeeping;  // the allocation below is the emulator's, not the kernel's
  Block& b = cur();
  const int seen = b.sh_count.load(std::memory_order_acquire);
  for (int i = 0; i < seen; ++i) {
    if (b.sh_keys[i].load(std::memory_order_acquire) == key) return b.sh_ptrs[i];
  }
  std::unique_lock<std::mutex> lk(b.sh_mu);
  const int count = b.sh_count.load(std::memory_order_acquire);
  for (int i = seen; i < count; ++i) {
    if (b.sh_keys[i].load(std::memory_order_acquire) == key) return b.sh_ptrs[i];
  }
  // Committed only when the variable fits: every thread that races here to the
  // same failing variable then reports the same total, whichever message wins.
  const std::size_t static_bytes = (b.static_bytes + align - 1) / align * align + bytes;
  if (static_bytes + b.dynamic_bytes > kMaxSharedBytes || count == Block::kMaxSharedVars) {
    const std::string msg = count == Block::kMaxSharedVars
                                ? std::string("more than 64 __shared__ variables in one kernel")
                                : std::string("__shared__ ") + name + " brings the block's shared memory to " +
                                      std::to_string(static_bytes) + " static + " + std::to_string(b.dynamic_bytes) +
                                      " dynamic bytes, over the 48 KiB a launch may use";
    lk.unlock();
    fail_now(b, msg);
  }
  b.static_bytes = static_bytes;
  // 64-byte aligned and padded: no other data shares its cache lines (the race check's granule).
  const std::size_t padded = (bytes + 63) / 64 * 64;
  const std::size_t a = std::max<std::size_t>(align, 64);
  auto buf = std::make_unique<unsigned char[]>(padded + a);
  unsigned char* p = buf.get();
  p += (a - reinterpret_cast<uintptr_t>(p) % a) % a;
  std::memset(p, b.poison, padded);
  b.storage.push_back(std::move(buf));
  b.shared_vars.emplace_back(key, p);
  b.shared_info.emplace_back(name, padded);
  b.sh_ptrs[count] = p;
  b.sh_keys[count].store(key, std::memory_order_release);
  b.sh_count.store(count + 1, std::memory_order_release);
  return p;
}

void* dynamic_shared() { return cur().dynamic; }

void device_assert_fail(const char* cond, const char* file, unsigned line) {
  const race::Suspend reporting;
  Block& b = cur();
  fail_now(b, who(t_tid) + ": device-side assert triggered: " + cond + " (" + site(file, line) + ")");
}

void run_grid(const char* kernel, dim3 grid, dim3 block, std::size_t smem, const std::function<void()>& body) {
  const std::string name = kernel;
  const std::string where = "cuda-emulation: kernel " + name + " <<<" + dims(grid) + ", " + dims(block) + ", " +
                            std::to_string(smem) + ">>>: ";
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || nthreads == 0) {
    throw std::runtime_error(where + "invalid configuration argument: an empty grid or block");
  }
  if (block.x > kMaxBlockDimXY || block.y > kMaxBlockDimXY || block.z > kMaxBlockDimZ ||
      nthreads > kMaxThreadsPerBlock) {
    throw std::runtime_error(where + "invalid configuration argument: at most 1024 threads per block (x, y <= 1024, "
                                     "z <= 64)");
  }
  if (grid.x > kMaxGridDimX || grid.y > kMaxGridDimYZ || grid.z > kMaxGridDimYZ) {
    throw std::runtime_error(where + "invalid configuration argument: grid dims are limited to (2^31-1, 65535, 65535)");
  }
  if (smem > kMaxSharedBytes) {
    throw std::runtime_error(where + "too much dynamic shared memory: " + std::to_string(smem) +
                             " bytes > 48 KiB (a GPU needs cudaFuncSetAttribute for that)");
  }
  std::lock_guard<std::mutex> launch_lock(g_launch_mu);
  {
    std::lock_guard<std::mutex> lk(g_count_mu);
    g_launch_paths.clear();
  }
  g_running_kernel.store(kernel);
  struct NotRunning {
    ~NotRunning() { g_running_kernel.store(nullptr); }
  } not_running;
  const unsigned n = static_cast<unsigned>(nthreads);
  pool().ensure(n);
  gridDim = grid;
  blockDim = block;
  const int64_t deadlock_ms = option("deadlock_timeout_ms", 10000);
  const unsigned char poison = static_cast<unsigned char>(option("poison", 0xff));
  // 64-byte aligned: the race check forgets whole lines of it after each block.
  std::vector<unsigned char> dyn_buf(smem + kGuardBytes + 64);
  unsigned char* dyn = dyn_buf.data();
  dyn += (64 - reinterpret_cast<uintptr_t>(dyn) % 64) % 64;
  // Kernel boundaries order everything: the race check starts afresh.
  const bool race_check = option("race_check", 0) != 0;
  race::g_enabled.store(race_check);
  struct RaceReset {
    bool on;
    ~RaceReset() {
      if (on) race::clear_all();
      race::g_enabled.store(false);
    }
  } race_reset{race_check};
  if (race_check) race::clear_all();
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        Block b;
        b.nthreads = n;
        b.nwarps = (n + 31) / 32;
        b.kernel = kernel;
        b.linear = x + uint64_t(grid.x) * (y + uint64_t(grid.y) * z);
        b.warps = std::make_unique<Warp[]>(b.nwarps);
        for (unsigned w = 0; w < b.nwarps; ++w) {
          const unsigned lanes = std::min(32u, n - w * 32);
          b.warps[w].existing = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
        }
        b.where = std::make_unique<Where[]>(n);
        b.deadlock_ms = deadlock_ms;
        b.poison = poison;
        b.dynamic_bytes = smem;
        b.dynamic = dyn;
        std::memset(dyn, poison, smem);
        std::memset(dyn + smem, kGuardByte, kGuardBytes);
        blockIdx = uint3{x, y, z};
        g_block = &b;
        const std::function<void(unsigned)> run_thread = [&b, &body](unsigned tid) { thread_main(b, tid, body); };
        pool().run(n, run_thread);
        g_block = nullptr;
        if (!b.failed.load()) {
          for (std::size_t i = 0; i < kGuardBytes; ++i) {
            if (dyn[smem + i] != kGuardByte) {
              fail(b, "a thread wrote past the " + std::to_string(smem) + " bytes of dynamic shared memory");
              break;
            }
          }
        }
        if (b.failed.load()) {
          throw std::runtime_error(where + "block " + dims(dim3(x, y, z)) + ": " + b.error);
        }
        if (race_check) {  // this block's shared memory is gone; the next block's may reuse the addresses
          race::clear_range(dyn, smem + kGuardBytes);
          for (std::size_t i = 0; i < b.shared_vars.size(); ++i) {
            race::clear_range(b.shared_vars[i].second, b.shared_info[i].second);
          }
        }
      }
    }
  }
  count_launch(kernel);  // completed launches only
}

}  // namespace emu
}  // namespace ascood

// ---------------------------------------------------------------------------
// The hooks GCC's -fsanitize=thread instrumentation calls (ABI of
// sanitizer/tsan_interface.h and tsan_interface_atomic.h). Plain accesses feed
// the race check; atomics perform the operation (sequentially consistent) and
// feed it as atomic accesses; the rest are no-ops. Only the emulated kernel
// sources are instrumented.
using ascood::emu::race::check;

extern "C" {

void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
void __tsan_read_range(void* p, unsigned long n) { check(p, n, false, false); }
void __tsan_write_range(void* p, unsigned long n) { check(p, n, true, false); }

#define ASCOOD_TSAN_PLAIN(N)                                                          \
  void __tsan_read##N(void* p) { check(p, N, false, false); }                         \
  void __tsan_write##N(void* p) { check(p, N, true, false); }                         \
  void __tsan_unaligned_read##N(const void* p) { check(p, N, false, false); }         \
  void __tsan_unaligned_write##N(void* p) { check(p, N, true, false); }               \
  void __tsan_volatile_read##N(void* p) { check(p, N, false, false); }                \
  void __tsan_volatile_write##N(void* p) { check(p, N, true, false); }                \
  void __tsan_unaligned_volatile_read##N(void* p) { check(p, N, false, false); }      \
  void __tsan_unaligned_volatile_write##N(void* p) { check(p, N, true, false); }
ASCOOD_TSAN_PLAIN(1)
ASCOOD_TSAN_PLAIN(2)
ASCOOD_TSAN_PLAIN(4)
ASCOOD_TSAN_PLAIN(8)
ASCOOD_TSAN_PLAIN(16)
#undef ASCOOD_TSAN_PLAIN

#define ASCOOD_TSAN_RMW(N, T, name, builtin)                                          \
  T __tsan_atomic##N##_##name(volatile T* a, T v, int) {                              \
    check(const_cast<T*>(a), sizeof(T), true, true);                                  \
    return builtin(a, v, __ATOMIC_SEQ_CST);                                           \
  }
#define ASCOOD_TSAN_ATOMICS(N, T)                                                     \
  T __tsan_atomic##N##_load(const volatile T* a, int) {                               \
    check(const_cast<T*>(a), sizeof(T), false, true);                                 \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                      \
  }                                                                                   \
  void __tsan_atomic##N##_store(volatile T* a, T v, int) {                            \
    check(const_cast<T*>(a), sizeof(T), true, true);                                  \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                         \
  }                                                                                   \
  ASCOOD_TSAN_RMW(N, T, exchange, __atomic_exchange_n)                                \
  ASCOOD_TSAN_RMW(N, T, fetch_add, __atomic_fetch_add)                                \
  ASCOOD_TSAN_RMW(N, T, fetch_sub, __atomic_fetch_sub)                                \
  ASCOOD_TSAN_RMW(N, T, fetch_and, __atomic_fetch_and)                                \
  ASCOOD_TSAN_RMW(N, T, fetch_or, __atomic_fetch_or)                                  \
  ASCOOD_TSAN_RMW(N, T, fetch_xor, __atomic_fetch_xor)                                \
  ASCOOD_TSAN_RMW(N, T, fetch_nand, __atomic_fetch_nand)                              \
  int __tsan_atomic##N##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) { \
    check(const_cast<T*>(a), sizeof(T), true, true);                                  \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
  }                                                                                   \
  int __tsan_atomic##N##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {  \
    check(const_cast<T*>(a), sizeof(T), true, true);                                  \
    return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
  }                                                                                   \
  T __tsan_atomic##N##_compare_exchange_val(volatile T* a, T c, T v, int, int) {      \
    check(const_cast<T*>(a), sizeof(T), true, true);                                  \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
    return c;                                                                         \
  }
ASCOOD_TSAN_ATOMICS(8, char)
ASCOOD_TSAN_ATOMICS(16, short)
ASCOOD_TSAN_ATOMICS(32, int)
ASCOOD_TSAN_ATOMICS(64, long)
#undef ASCOOD_TSAN_ATOMICS
#undef ASCOOD_TSAN_RMW

void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

}  // extern "C"

// Launch counts as text, one "kernel<TAB>path<TAB>count" line each (path
// "launches": all completed launches of the kernel); reset != 0 clears them.
// Read through ctypes (ascood_kernels.emulation.launch_counts), so the op
// registration stays as it is. The returned text lives until the next call.
extern "C" const char* ascood_emu_launch_counts(int reset) {
  static std::string text;
  std::lock_guard<std::mutex> lk(ascood::emu::g_count_mu);
  text.clear();
  for (const auto& [key, count] : ascood::emu::g_counts) {
    text += key.first + "\t" + key.second + "\t" + std::to_string(count) + "\n";
  }
  if (reset) ascood::emu::g_counts.clear();
  return text.c_str();
}
