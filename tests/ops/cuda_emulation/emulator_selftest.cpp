// Checks that the CUDA emulation (ops/csrc/cuda_emulation.h) exposes the kernel bugs it claims to:
// each case prints "<name> <result>" and tests/ops/test_cuda_emulated.py compares them.
#define DCNV3_CUDA_EMULATION
#include "cuda_emulation.h"

#include <cstdio>
#include <vector>

constexpr int kThreads = 128;

// Block sum through shared memory: each thread writes its value, then thread 0 adds them up.
template <bool kSynchronised>
__global__ void block_sum(const float* in, float* out) {
  DCNV3_DYNAMIC_SHARED(float, partial);
  partial[threadIdx.x] = in[blockIdx.x * blockDim.x + threadIdx.x];
  if (kSynchronised) __syncthreads();
  if (threadIdx.x == 0) {
    float sum = 0;
    for (unsigned t = 0; t < blockDim.x; ++t) sum += partial[t];
    out[blockIdx.x] = sum;
  }
}

__global__ void warp_sum(const float* in, float* out) {
  float x = in[threadIdx.x];
  for (int delta = 16; delta > 0; delta >>= 1) x += __shfl_xor_sync(0xffffffffu, x, delta);
  out[threadIdx.x] = x;
}

// A full-warp shuffle that only odd lanes reach: undefined on a GPU, a reported deadlock here.
__global__ void shuffle_in_divergent_branch(float* out) {
  float x = 1;
  if (threadIdx.x % 2) x = __shfl_xor_sync(0xffffffffu, x, 1);
  __syncthreads();
  out[threadIdx.x] = x;
}

// Lane 0 returns early, then the others shuffle with it.
__global__ void shuffle_with_exited_lane(float* out) {
  if (threadIdx.x == 0) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// Thread 0 writes one float past the end of 128 floats of dynamic shared memory.
__global__ void shared_overflow(float*) {
  DCNV3_DYNAMIC_SHARED(float, partial);
  if (threadIdx.x == 0) partial[kThreads] = 0;
}

__global__ void noop(float*) {}

static void report(const char* name, cudaError_t error) {
  std::printf("%s %s\n", name, error == cudaSuccess ? "ok" : cudaGetErrorString(error));
}

int main() {
  const int blocks = 3;
  std::vector<float> in(blocks * kThreads, 1.0f), out(blocks * kThreads, 0.0f);
  DCNV3_LAUNCH(blocks, kThreads, kThreads * sizeof(float), nullptr, block_sum<true>)(in.data(), out.data());
  report("launch_synchronised", cudaGetLastError());
  std::printf("sum_synchronised %g %g %g\n", out[0], out[1], out[2]);
  DCNV3_LAUNCH(blocks, kThreads, kThreads * sizeof(float), nullptr, block_sum<false>)(in.data(), out.data());
  std::printf("sum_unsynchronised %g %g %g\n", out[0], out[1], out[2]);

  for (int i = 0; i < 32; ++i) in[i] = float(i);
  DCNV3_LAUNCH(1, 32, 0, nullptr, warp_sum)(in.data(), out.data());
  report("launch_warp_sum", cudaGetLastError());
  std::printf("warp_sum %g %g\n", out[0], out[31]);

  DCNV3_LAUNCH(1, 64, 0, nullptr, shuffle_in_divergent_branch)(out.data());
  report("shuffle_in_divergent_branch", cudaGetLastError());
  DCNV3_LAUNCH(1, 32, 0, nullptr, shuffle_with_exited_lane)(out.data());
  report("shuffle_with_exited_lane", cudaGetLastError());
  DCNV3_LAUNCH(1, kThreads, kThreads * sizeof(float), nullptr, shared_overflow)(out.data());
  report("shared_overflow", cudaGetLastError());
  DCNV3_LAUNCH(1, 2048, 0, nullptr, noop)(out.data());
  report("too_many_threads", cudaGetLastError());
  DCNV3_LAUNCH(1, 32, 64 * 1024, nullptr, noop)(out.data());
  report("too_much_shared_memory", cudaGetLastError());
  return 0;
}
