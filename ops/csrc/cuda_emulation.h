// CUDA emulated on the CPU, so the CUDA kernels' logic is tested on every machine, GPU or not.
//
// dcnv3_cuda_kernels.cuh compiled by a plain C++ compiler with DCNV3_CUDA_EMULATION defined
// includes this header instead of CUDA's: kernels become ordinary functions, and a launch runs
// every block in turn (in a shuffled order) and every thread of a block as a fiber of one OS
// thread. A fiber runs until it reaches a barrier (__syncthreads, or a warp shuffle); the barrier
// opens when every live thread of its block (or warp) waits there. Threads resume in a shuffled
// order each round, so a missing barrier shows up as wrong results; a barrier that some threads
// can never reach is reported as a launch error, as are launch configurations CUDA would refuse.
// Dynamic shared memory starts as NaN bytes each block, so reading what no thread wrote shows, and
// a NaN guard zone after it catches writes past its end.
//
// What it cannot show: timing, the memory model of concurrent blocks (blocks run one after
// another), or bugs that only a particular warp interleaving exposes.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline float __half2float(__half x) { return static_cast<float>(x); }
inline float __bfloat162float(__nv_bfloat16 x) { return static_cast<float>(x); }
inline __half __float2half_rn(float x) { return __half(x); }  // c10 rounds to nearest even
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return __nv_bfloat16(x); }

struct float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9, cudaErrorLaunchFailure = 719 };

namespace cuda_emulation {

constexpr unsigned kWarpSize = 32;
constexpr unsigned kMaxBlockThreads = 1024;
constexpr size_t kMaxDynamicSharedBytes = 48 * 1024;  // above this CUDA needs an opt-in attribute
constexpr size_t kFiberStackBytes = 64 * 1024;

enum class State { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kExited };

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  State state = State::kRunnable;
  // Values deposited by this thread's shuffles, double-buffered so one barrier per shuffle
  // suffices: a thread cannot deposit twice more before its partner read the first. The lane
  // mask tells shuffles apart, so lanes in different shuffle calls are caught.
  uint64_t shuffle_slot[2] = {0, 0};
  int shuffle_lane_mask[2] = {0, 0};
  uint64_t shuffles = 0;
};

// The block being run; kernels reach it through the free functions below.
struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  unsigned current = 0;
  const std::function<void()>* body = nullptr;
  std::vector<unsigned char> dynamic_shared;
  std::string failure;  // set by a failing thread; the launch then stops
  uint64_t global_atomics = 0, shared_atomics = 0;  // atomic instructions issued, all launches
  cudaError_t last_error = cudaSuccess;
  std::string last_message;
  uint64_t rng = 0x9E3779B97F4A7C15ull;
};

inline Block& block() {
  static Block instance;
  return instance;
}

inline uint64_t next_random() {
  uint64_t& x = block().rng;  // xorshift64
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return x;
}

inline void shuffled(std::vector<unsigned>& order) {
  for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[next_random() % i]);
}

inline void yield(State state) {
  Block& b = block();
  b.fibers[b.current].state = state;
  swapcontext(&b.fibers[b.current].context, &b.scheduler);
}

// Stops the launch from inside a kernel: the calling thread is never resumed.
[[noreturn]] inline void fail(const std::string& message) {
  Block& b = block();
  if (b.failure.empty()) b.failure = message + " (thread " + std::to_string(b.current) + " of block " +
                                     std::to_string(blockIdx.x) + ")";
  for (;;) yield(State::kExited);
}

inline void fiber_entry() {
  (*block().body)();
  Block& b = block();
  b.fibers[b.current].state = State::kExited;
  swapcontext(&b.fibers[b.current].context, &b.scheduler);
}

// Opens whichever barrier every live participant has reached; false when none can open.
inline bool open_barriers() {
  Block& b = block();
  const unsigned threads = static_cast<unsigned>(b.fibers.size());
  bool all_at_block = true, any_live = false;
  for (const Fiber& f : b.fibers) {
    if (f.state == State::kExited) continue;
    any_live = true;
    all_at_block = all_at_block && f.state == State::kAtBlockBarrier;
  }
  if (!any_live) return false;
  if (all_at_block) {
    for (Fiber& f : b.fibers)
      if (f.state == State::kAtBlockBarrier) f.state = State::kRunnable;
    return true;
  }
  bool opened = false;
  for (unsigned first = 0; first < threads; first += kWarpSize) {
    const unsigned last = std::min(threads, first + kWarpSize);
    bool all_at_warp = true, live = false;
    for (unsigned t = first; t < last; ++t) {
      if (b.fibers[t].state == State::kExited) continue;
      live = true;
      all_at_warp = all_at_warp && b.fibers[t].state == State::kAtWarpBarrier;
    }
    if (!live || !all_at_warp) continue;
    for (unsigned t = first; t < last; ++t)
      if (b.fibers[t].state == State::kAtWarpBarrier) b.fibers[t].state = State::kRunnable;
    opened = true;
  }
  return opened;
}

// Bytes past the end of dynamic shared memory that must stay NaN: reads there give NaN results,
// writes there are reported.
constexpr size_t kSharedGuardBytes = 4096;

inline bool guard_intact(const Block& b, size_t shared_bytes) {
  for (size_t i = shared_bytes; i < b.dynamic_shared.size(); ++i)
    if (b.dynamic_shared[i] != 0xFF) return false;
  return true;
}

inline void run_block(unsigned threads, size_t shared_bytes) {
  Block& b = block();
  b.fibers.resize(threads);
  b.dynamic_shared.assign(shared_bytes + kSharedGuardBytes, 0xFF);  // NaN in every float type
  for (Fiber& f : b.fibers) {
    f.stack.resize(kFiberStackBytes);
    f.state = State::kRunnable;
    f.shuffles = 0;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.data();
    f.context.uc_stack.ss_size = f.stack.size();
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_entry, 0);
  }
  std::vector<unsigned> order(threads);
  for (unsigned t = 0; t < threads; ++t) order[t] = t;
  for (;;) {
    shuffled(order);
    for (unsigned t : order) {
      if (b.fibers[t].state != State::kRunnable) continue;
      b.current = t;
      threadIdx = dim3(t);
      swapcontext(&b.scheduler, &b.fibers[t].context);
      if (!b.failure.empty()) return;
    }
    if (open_barriers()) continue;
    for (const Fiber& f : b.fibers)
      if (f.state != State::kExited) {
        b.failure = "deadlock: threads of block " + std::to_string(blockIdx.x) +
                    " wait at barriers that cannot open (a __syncthreads or shuffle not every thread reaches)";
        return;
      }
    if (!guard_intact(b, shared_bytes))
      b.failure = "a thread of block " + std::to_string(blockIdx.x) + " wrote past the end of dynamic shared memory";
    return;
  }
}

inline void set_error(cudaError_t error, const std::string& message) {
  block().last_error = error;
  block().last_message = message;
}

inline void run_grid(dim3 grid, dim3 threads, size_t shared_bytes, const std::function<void()>& body) {
  const uint64_t block_threads = uint64_t{threads.x} * threads.y * threads.z;
  if (threads.y != 1 || threads.z != 1 || grid.y != 1 || grid.z != 1)
    return set_error(cudaErrorInvalidConfiguration, "emulation supports 1-D grids and blocks only");
  if (block_threads == 0 || block_threads > kMaxBlockThreads || grid.x == 0 || grid.x > 0x7FFFFFFFu)
    return set_error(cudaErrorInvalidConfiguration,
                     "invalid configuration: " + std::to_string(grid.x) + " blocks of " +
                         std::to_string(block_threads) + " threads");
  if (shared_bytes > kMaxDynamicSharedBytes)
    return set_error(cudaErrorInvalidConfiguration,
                     std::to_string(shared_bytes) + " bytes of dynamic shared memory need an opt-in attribute");
  Block& b = block();
  b.body = &body;
  b.failure.clear();
  gridDim = grid;
  blockDim = threads;
  std::vector<unsigned> order(grid.x);
  for (unsigned i = 0; i < grid.x; ++i) order[i] = i;
  shuffled(order);
  for (unsigned index : order) {
    blockIdx = dim3(index);
    run_block(threads.x, shared_bytes);
    if (!b.failure.empty()) return set_error(cudaErrorLaunchFailure, b.failure);
  }
}

// DCNV3_LAUNCH(grid, block, shared, stream, kernel)(args...): the emulated <<<...>>>.
struct Launch {
  dim3 grid, threads;
  size_t shared_bytes;
  template <typename Kernel>
  auto kernel(Kernel* function) const {
    return [config = *this, function](auto... args) {
      const std::function<void()> body = [&] { function(args...); };
      run_grid(config.grid, config.threads, config.shared_bytes, body);
    };
  }
};

inline unsigned char* dynamic_shared() { return block().dynamic_shared.data(); }

inline bool in_shared_memory(const void* address) {
  const Block& b = block();
  const auto* byte = static_cast<const unsigned char*>(address);
  return !b.dynamic_shared.empty() && byte >= b.dynamic_shared.data() &&
         byte < b.dynamic_shared.data() + b.dynamic_shared.size();
}

// A GPU faults on a vector access that is not aligned to its size; the CPU would not.
inline void check_aligned(const void* address, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(address) % bytes != 0)
    fail("misaligned " + std::to_string(bytes) + "-byte vector access");
}

inline void count_atomic(const void* address) {
  Block& b = block();
  ++(in_shared_memory(address) ? b.shared_atomics : b.global_atomics);
}

// Vector atomics (sm_90) exist for global memory only, aligned to their size.
inline void check_vector_atomic(const void* address, size_t bytes) {
  if (in_shared_memory(address)) fail("vector atomicAdd on shared memory (global memory only)");
  check_aligned(address, bytes);
  count_atomic(address);
}

}  // namespace cuda_emulation

// One OS thread runs everything, so plain read-modify-writes are atomic.
template <typename T>
inline T atomicAdd(T* address, T value) {
  cuda_emulation::check_aligned(address, sizeof(T));
  cuda_emulation::count_atomic(address);
  const T old = *address;
  *address = old + value;
  return old;
}
inline void atomicAdd(float2* address, float2 value) {
  cuda_emulation::check_vector_atomic(address, sizeof(float2));
  address->x += value.x;
  address->y += value.y;
}
inline void atomicAdd(float4* address, float4 value) {
  cuda_emulation::check_vector_atomic(address, sizeof(float4));
  address->x += value.x;
  address->y += value.y;
  address->z += value.z;
  address->w += value.w;
}

#define DCNV3_LAUNCH(grid, threads, shared_bytes, stream, ...) \
  ::cuda_emulation::Launch{dim3(grid), dim3(threads), static_cast<size_t>(shared_bytes)}.kernel(&__VA_ARGS__)
#define DCNV3_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(::cuda_emulation::dynamic_shared())

inline void __syncthreads() { cuda_emulation::yield(cuda_emulation::State::kAtBlockBarrier); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  using namespace cuda_emulation;
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 8 bytes");
  if (mask != 0xffffffffu) fail("emulation supports full-warp shuffles only");
  Block& b = block();
  const unsigned me = b.current;
  Fiber& self = b.fibers[me];
  const uint64_t count = ++self.shuffles;
  std::memcpy(&self.shuffle_slot[count & 1], &value, sizeof(T));
  self.shuffle_lane_mask[count & 1] = lane_mask;
  yield(State::kAtWarpBarrier);
  const unsigned partner = (me & ~(kWarpSize - 1)) | ((me & (kWarpSize - 1)) ^ static_cast<unsigned>(lane_mask));
  if (partner >= b.fibers.size() || b.fibers[partner].shuffles < count)
    fail("shuffle reads lane " + std::to_string(partner) + ", which exited or does not exist");
  if (b.fibers[partner].shuffle_lane_mask[count & 1] != lane_mask)
    fail("lanes " + std::to_string(me) + " and " + std::to_string(partner) + " are in different shuffles");
  T out;
  std::memcpy(&out, &b.fibers[partner].shuffle_slot[count & 1], sizeof(T));
  return out;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t error = cuda_emulation::block().last_error;
  cuda_emulation::block().last_error = cudaSuccess;
  return error;
}
inline const char* cudaGetErrorString(cudaError_t) { return cuda_emulation::block().last_message.c_str(); }
