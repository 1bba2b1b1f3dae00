// Fused DCNv3 core kernels for CUDA: plain CUDA (no torch), so `nvcc` alone compiles them.
//
// Work decomposition (forward and backward alike): one "item" is an (output pixel, group) pair.
// TPI threads (a power of two <= 32, so an item never straddles a warp) share an item, each owning
// chunks of VEC channels that it moves with one 16-byte (or narrower, when D or alignment forbids)
// load/store. Consecutive threads cover consecutive channels of one pixel, so a warp's accesses to a
// corner row are contiguous. Offsets and mask of an item are read once per point by its threads
// together (same address, one transaction). Accumulation is fp32 (fp64 for double).
//
// Backward: the offset/mask gradients of a (pixel, group, point) are sums over the group's D
// channels; each thread sums its chunks and the TPI threads combine with warp shuffles, then one
// thread writes, so those gradients need no atomics and no zero-fill. The value gradient is a
// scatter (arbitrary offsets), done with vector atomics (16 bytes per instruction on sm_90) into
// fp32 (fp64 for double); for fp16/bf16 into an fp32 workspace converted once at the end, because
// accumulating ~36 contributions per element in 8-bit mantissas loses too much.
#pragma once

#if defined(DCNV3_CUDA_EMULATION)  // a plain C++ build that runs the kernels on the CPU (tests)
#include "cuda_emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// kernel<<<grid, threads, shared_bytes, stream>>>, spelled so the emulation can replace it.
#define DCNV3_LAUNCH(grid, threads, shared_bytes, stream, ...) __VA_ARGS__<<<grid, threads, shared_bytes, stream>>>
#endif

#include <cstdint>

#include "dcnv3_geometry.h"

namespace dcnv3 {
namespace cuda {

constexpr int kBlockThreads = 256;

template <typename T>
struct Accumulate {
  using type = float;
};
template <>
struct Accumulate<double> {
  using type = double;
};

template <typename T>
__device__ __forceinline__ typename Accumulate<T>::type to_acc(T x) {
  return static_cast<typename Accumulate<T>::type>(x);
}
template <>
__device__ __forceinline__ float to_acc<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(typename Accumulate<T>::type x) {
  return static_cast<T>(x);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// VEC scalars moved by one memory instruction.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_acc(const T* ptr, typename Accumulate<T>::type (&out)[VEC]) {
  const Vec<T, VEC> raw = *reinterpret_cast<const Vec<T, VEC>*>(ptr);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = to_acc(raw.v[k]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_from_acc(T* ptr, const typename Accumulate<T>::type (&in)[VEC]) {
  Vec<T, VEC> raw;
#pragma unroll
  for (int k = 0; k < VEC; ++k) raw.v[k] = from_acc<T>(in[k]);
  *reinterpret_cast<Vec<T, VEC>*>(ptr) = raw;
}

// grad += weight * upstream, VEC elements from ptr on, as few atomic instructions as the
// architecture allows (vector float atomics exist from sm_90 on).
template <int VEC>
__device__ __forceinline__ void atomic_axpy(float* ptr, float weight, const float (&upstream)[VEC]) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900) || defined(DCNV3_CUDA_EMULATION)
  constexpr bool kVectorAtomics = true;
#else
  constexpr bool kVectorAtomics = false;
#endif
  if constexpr (kVectorAtomics && VEC % 4 == 0) {
#pragma unroll
    for (int k = 0; k < VEC; k += 4)
      atomicAdd(reinterpret_cast<float4*>(ptr + k),
                make_float4(weight * upstream[k], weight * upstream[k + 1], weight * upstream[k + 2],
                            weight * upstream[k + 3]));
  } else if constexpr (kVectorAtomics && VEC == 2) {
    atomicAdd(reinterpret_cast<float2*>(ptr), make_float2(weight * upstream[0], weight * upstream[1]));
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) atomicAdd(ptr + k, weight * upstream[k]);
  }
}

template <int VEC>
__device__ __forceinline__ void atomic_axpy(double* ptr, double weight, const double (&upstream)[VEC]) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) atomicAdd(ptr + k, weight * upstream[k]);
}

// Where an item's threads find their data.
struct ItemIndex {
  int item_valid;
  int lane;     // thread within the item, 0..TPI-1
  int64_t item; // (pixel, group) flattened, group fastest
  int group, h_out, w_out;
  int64_t batch;
};

__device__ __forceinline__ ItemIndex item_index(const Shape& s, int tpi_log2, int64_t items) {
  ItemIndex at;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  at.item = thread >> tpi_log2;
  at.lane = static_cast<int>(thread & ((1 << tpi_log2) - 1));
  at.item_valid = at.item < items;
  const int64_t item = at.item_valid ? at.item : 0;
  at.group = static_cast<int>(item % s.groups);
  const int64_t pixel = item / s.groups;
  at.w_out = static_cast<int>(pixel % s.width_out);
  const int64_t row = pixel / s.width_out;
  at.h_out = static_cast<int>(row % s.height_out);
  at.batch = row / s.height_out;
  return at;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kBlockThreads)
    forward_kernel(const Shape s, const T* __restrict__ value, const T* __restrict__ offset,
                   const T* __restrict__ mask, T* __restrict__ out, int tpi_log2, int64_t items) {
  using acc_t = typename Accumulate<T>::type;
  const ItemIndex at = item_index(s, tpi_log2, items);
  if (!at.item_valid) return;
  const int channels = static_cast<int>(s.channels()), depth = static_cast<int>(s.depth);
  const int points = static_cast<int>(s.points), chunks = depth / VEC;
  const int width_in = static_cast<int>(s.width_in);
  const T* image = value + at.batch * s.height_in * s.width_in * channels + at.group * depth;
  const T* item_offset = offset + at.item * points * 2;
  const T* item_mask = mask + at.item * points;
  for (int chunk = at.lane; chunk < chunks; chunk += 1 << tpi_log2) {
    const int channel = chunk * VEC;
    acc_t acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = acc_t(0);
    for (int p = 0; p < points; ++p) {
      const Vec<T, 2> dxy = *reinterpret_cast<const Vec<T, 2>*>(item_offset + 2 * p);
      const auto f = footprint<acc_t>(s, at.h_out, at.w_out, p, to_acc(dxy.v[0]), to_acc(dxy.v[1]));
      if (!f.contributes) continue;
      const acc_t m = to_acc(item_mask[p]);
      const T* corner = image + (f.y0 * width_in + f.x0) * channels + channel;
      acc_t v00[VEC], v01[VEC], v10[VEC], v11[VEC];
      // All four loads are issued before any use, to keep several in flight.
#pragma unroll
      for (int k = 0; k < VEC; ++k) v00[k] = v01[k] = v10[k] = v11[k] = acc_t(0);
      if (f.in_y0 && f.in_x0) load_acc<T, VEC>(corner, v00);
      if (f.in_y0 && f.in_x1) load_acc<T, VEC>(corner + channels, v01);
      if (f.in_y1 && f.in_x0) load_acc<T, VEC>(corner + width_in * channels, v10);
      if (f.in_y1 && f.in_x1) load_acc<T, VEC>(corner + (width_in + 1) * channels, v11);
      const acc_t w00 = m * f.w00(), w01 = m * f.w01(), w10 = m * f.w10(), w11 = m * f.w11();
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] += w00 * v00[k] + w01 * v01[k] + w10 * v10[k] + w11 * v11[k];
    }
    // item = pixel·G + group, so the item's output channels start at item·D.
    store_from_acc<T, VEC>(out + at.item * depth + channel, acc);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t segment_sum(acc_t x, int tpi_log2) {
  // Butterfly over the item's TPI lanes: offsets < TPI never leave the item's aligned segment.
  for (int delta = (1 << tpi_log2) >> 1; delta > 0; delta >>= 1) x += __shfl_xor_sync(0xffffffffu, x, delta);
  return x;
}

// grad_value_acc: fp32 (fp64 for double) gradient of value, zeroed by the caller; it may alias
// the final grad_value when T is the accumulation type.
template <typename T, int VEC>
__global__ void __launch_bounds__(kBlockThreads)
    backward_kernel(const Shape s, const T* __restrict__ grad_out, const T* __restrict__ value,
                    const T* __restrict__ offset, const T* __restrict__ mask,
                    typename Accumulate<T>::type* __restrict__ grad_value_acc, T* __restrict__ grad_offset,
                    T* __restrict__ grad_mask, int tpi_log2, int64_t items) {
  using acc_t = typename Accumulate<T>::type;
  // No early return: every lane of the warp must reach the shuffles.
  const ItemIndex at = item_index(s, tpi_log2, items);
  const int channels = static_cast<int>(s.channels()), depth = static_cast<int>(s.depth);
  const int points = static_cast<int>(s.points), chunks = depth / VEC;
  const int width_in = static_cast<int>(s.width_in);
  const int tpi = 1 << tpi_log2;
  const int64_t image_base = at.batch * s.height_in * s.width_in * channels + at.group * depth;
  const T* image = value + image_base;
  acc_t* grad_image = grad_value_acc + image_base;
  const int64_t item = at.item_valid ? at.item : 0;
  const T* upstream_row = grad_out + item * depth;
  const acc_t scale = static_cast<acc_t>(s.offset_scale);

  for (int p = 0; p < points; ++p) {
    const Vec<T, 2> dxy = *reinterpret_cast<const Vec<T, 2>*>(offset + (item * points + p) * 2);
    const auto f = footprint<acc_t>(s, at.h_out, at.w_out, p, to_acc(dxy.v[0]), to_acc(dxy.v[1]));
    const acc_t m = to_acc(mask[item * points + p]);
    acc_t grad_m = 0, grad_x = 0, grad_y = 0;
    for (int first = 0; first < chunks; first += tpi) {
      const int chunk = first + at.lane;
      if (!at.item_valid || chunk >= chunks || !f.contributes) continue;
      const int channel = chunk * VEC;
      acc_t up[VEC], v00[VEC], v01[VEC], v10[VEC], v11[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) v00[k] = v01[k] = v10[k] = v11[k] = acc_t(0);
      load_acc<T, VEC>(upstream_row + channel, up);
      const int corner = (f.y0 * width_in + f.x0) * channels + channel;
      const bool in00 = f.in_y0 && f.in_x0, in01 = f.in_y0 && f.in_x1;
      const bool in10 = f.in_y1 && f.in_x0, in11 = f.in_y1 && f.in_x1;
      if (in00) load_acc<T, VEC>(image + corner, v00);
      if (in01) load_acc<T, VEC>(image + corner + channels, v01);
      if (in10) load_acc<T, VEC>(image + corner + width_in * channels, v10);
      if (in11) load_acc<T, VEC>(image + corner + (width_in + 1) * channels, v11);
      acc_t d00 = 0, d01 = 0, d10 = 0, d11 = 0;  // upstream · corner value
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        d00 += up[k] * v00[k];
        d01 += up[k] * v01[k];
        d10 += up[k] * v10[k];
        d11 += up[k] * v11[k];
      }
      grad_m += f.w00() * d00 + f.w01() * d01 + f.w10() * d10 + f.w11() * d11;
      grad_x += (1 - f.ly) * (d01 - d00) + f.ly * (d11 - d10);
      grad_y += (1 - f.lx) * (d10 - d00) + f.lx * (d11 - d01);
      if (in00) atomic_axpy<VEC>(grad_image + corner, m * f.w00(), up);
      if (in01) atomic_axpy<VEC>(grad_image + corner + channels, m * f.w01(), up);
      if (in10) atomic_axpy<VEC>(grad_image + corner + width_in * channels, m * f.w10(), up);
      if (in11) atomic_axpy<VEC>(grad_image + corner + (width_in + 1) * channels, m * f.w11(), up);
    }
    grad_m = segment_sum(grad_m, tpi_log2);
    grad_x = segment_sum(grad_x, tpi_log2);
    grad_y = segment_sum(grad_y, tpi_log2);
    if (at.item_valid && at.lane == 0) {
      grad_mask[item * points + p] = from_acc<T>(grad_m);
      Vec<T, 2> g;
      g.v[0] = from_acc<T>(m * scale * grad_x);
      g.v[1] = from_acc<T>(m * scale * grad_y);
      *reinterpret_cast<Vec<T, 2>*>(grad_offset + (item * points + p) * 2) = g;
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kBlockThreads)
    cast_kernel(const typename Accumulate<T>::type* __restrict__ in, T* __restrict__ out, int64_t vectors) {
  using acc_t = typename Accumulate<T>::type;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < vectors;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t x[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) x[k] = in[i * VEC + k];
    store_from_acc<T, VEC>(out + i * VEC, x);
  }
}

// ---- host side: launch configuration ---------------------------------------------------------

// Threads per item: enough for one chunk each, rounded up to a power of two, at most a warp.
inline int threads_per_item_log2(int64_t chunks) {
  int log2 = 0;
  while ((int64_t{1} << log2) < chunks && log2 < 5) ++log2;
  return log2;
}

inline bool aligned(const void* ptr, int bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// Widest vector (<= 16 bytes) that divides D and that every channel-row pointer is aligned to.
template <typename T>
inline int vector_width(const Shape& s, const void* const* pointers, int count) {
  for (int width = 16 / static_cast<int>(sizeof(T)); width > 1; width /= 2) {
    if (s.depth % width) continue;
    bool ok = true;
    for (int i = 0; i < count; ++i) ok = ok && aligned(pointers[i], width * static_cast<int>(sizeof(T)));
    if (ok) return width;
  }
  return 1;
}

inline unsigned grid_for(int64_t threads) {
  return static_cast<unsigned>((threads + kBlockThreads - 1) / kBlockThreads);
}

template <typename T, int VEC>
cudaError_t launch_forward_vec(const Shape& s, const T* value, const T* offset, const T* mask, T* out,
                               cudaStream_t stream) {
  const int64_t items = s.pixels_out() * s.groups;
  const int tpi_log2 = threads_per_item_log2(s.depth / VEC);
  DCNV3_LAUNCH(grid_for(items << tpi_log2), kBlockThreads, 0, stream, forward_kernel<T, VEC>)(
      s, value, offset, mask, out, tpi_log2, items);
  return cudaGetLastError();
}

// out (N, H_out, W_out, G·D) = DCNv3 core of the contiguous channels-last inputs.
template <typename T>
cudaError_t launch_forward(const Shape& s, const T* value, const T* offset, const T* mask, T* out,
                           cudaStream_t stream) {
  if (s.pixels_out() == 0) return cudaSuccess;
  const void* pointers[] = {value, out};
  switch (vector_width<T>(s, pointers, 2)) {
    case 8: return launch_forward_vec<T, (sizeof(T) <= 2 ? 8 : 1)>(s, value, offset, mask, out, stream);
    case 4: return launch_forward_vec<T, (sizeof(T) <= 4 ? 4 : 1)>(s, value, offset, mask, out, stream);
    case 2: return launch_forward_vec<T, 2>(s, value, offset, mask, out, stream);
    default: return launch_forward_vec<T, 1>(s, value, offset, mask, out, stream);
  }
}

template <typename T, int VEC>
cudaError_t launch_backward_vec(const Shape& s, const T* grad_out, const T* value, const T* offset,
                                const T* mask, typename Accumulate<T>::type* grad_value_acc,
                                T* grad_offset, T* grad_mask, cudaStream_t stream) {
  const int64_t items = s.pixels_out() * s.groups;
  const int tpi_log2 = threads_per_item_log2(s.depth / VEC);
  DCNV3_LAUNCH(grid_for(items << tpi_log2), kBlockThreads, 0, stream, backward_kernel<T, VEC>)(
      s, grad_out, value, offset, mask, grad_value_acc, grad_offset, grad_mask, tpi_log2, items);
  return cudaGetLastError();
}

// Gradients of the DCNv3 core. grad_value_acc (value's shape, accumulation type) must be zeroed;
// grad_offset and grad_mask are fully written. When T differs from the accumulation type, call
// launch_cast afterwards to produce grad_value.
template <typename T>
cudaError_t launch_backward(const Shape& s, const T* grad_out, const T* value, const T* offset,
                            const T* mask, typename Accumulate<T>::type* grad_value_acc, T* grad_offset,
                            T* grad_mask, cudaStream_t stream) {
  if (s.pixels_out() == 0) return cudaSuccess;
  const void* pointers[] = {grad_out, value, grad_value_acc};
  const int width = vector_width<T>(s, pointers, 2);
  // The accumulation buffer is wider than T: check its alignment for the same element count.
  const int acc_width = aligned(grad_value_acc, width * static_cast<int>(sizeof(typename Accumulate<T>::type)))
                            ? width : 1;
  switch (acc_width) {
    case 8: return launch_backward_vec<T, (sizeof(T) <= 2 ? 8 : 1)>(s, grad_out, value, offset, mask, grad_value_acc, grad_offset, grad_mask, stream);
    case 4: return launch_backward_vec<T, (sizeof(T) <= 4 ? 4 : 1)>(s, grad_out, value, offset, mask, grad_value_acc, grad_offset, grad_mask, stream);
    case 2: return launch_backward_vec<T, 2>(s, grad_out, value, offset, mask, grad_value_acc, grad_offset, grad_mask, stream);
    default: return launch_backward_vec<T, 1>(s, grad_out, value, offset, mask, grad_value_acc, grad_offset, grad_mask, stream);
  }
}

// out[i] = T(in[i]) for `count` elements (the fp32 workspace to an fp16/bf16 grad_value).
template <typename T>
cudaError_t launch_cast(const typename Accumulate<T>::type* in, T* out, int64_t count, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  constexpr int kVec = 16 / sizeof(T) >= 4 ? 4 : 1;
  const bool vectorised = count % kVec == 0 && aligned(out, kVec * sizeof(T)) && aligned(in, kVec * sizeof(float));
  const int64_t threads = vectorised ? count / kVec : count;
  const unsigned blocks = static_cast<unsigned>(threads < 65536 * int64_t{kBlockThreads}
                                                   ? grid_for(threads) : 65536);
  if (vectorised)
    DCNV3_LAUNCH(blocks, kBlockThreads, 0, stream, cast_kernel<T, kVec>)(in, out, threads);
  else
    DCNV3_LAUNCH(blocks, kBlockThreads, 0, stream, cast_kernel<T, 1>)(in, out, threads);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dcnv3
