// Fused DCNv3 core kernels for CUDA: plain CUDA (no torch), so `nvcc` alone compiles them.
//
// Work decomposition (forward and backward alike): one "item" is an (output pixel, group) pair.
// TPI threads (a power of two <= 32, so an item never straddles a warp) share an item, each owning
// chunks of VEC channels that it moves with one 16-byte (or narrower, when D or alignment forbids)
// load/store. Consecutive threads cover consecutive channels of one pixel, so a warp's accesses to a
// corner row are contiguous. Offsets and mask of an item are read once per point by its threads
// together (same address, one transaction). Accumulation is fp32 (fp64 for double).
//
// Backward: the offset/mask gradients of a (pixel, group, point) come from four sums over the group's
// D channels (upstream · each corner); each thread sums its chunks and the TPI threads combine with
// warp shuffles, then one thread writes, so those gradients need no atomics and no zero-fill.
//
// Non-finite inputs give what the reference gives (dcnv3_geometry.h: outside_sample,
// point_gradients_from_dots): a point with a NaN/inf location or mask that does not land on the image
// still turns its outputs and gradients NaN, instead of being skipped. The value gradient is a
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
// A kernel's dynamic shared memory as `type* name` (one untyped declaration serves every template).
#define DCNV3_DYNAMIC_SHARED(type, name) \
  extern __shared__ __align__(16) unsigned char dcnv3_dynamic_shared[]; \
  type* name = reinterpret_cast<type*>(dcnv3_dynamic_shared)
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>

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

// Every vector access goes through these two: a GPU faults on a misaligned one, and the emulation
// (where the CPU would not) checks the alignment here instead.
template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* ptr) {
#if defined(DCNV3_CUDA_EMULATION)
  cuda_emulation::check_aligned(ptr, sizeof(Vec<T, VEC>));
#endif
  return *reinterpret_cast<const Vec<T, VEC>*>(ptr);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* ptr, const Vec<T, VEC>& value) {
#if defined(DCNV3_CUDA_EMULATION)
  cuda_emulation::check_aligned(ptr, sizeof(Vec<T, VEC>));
#endif
  *reinterpret_cast<Vec<T, VEC>*>(ptr) = value;
}

// One point's (dx, dy) in offset_mask, as two scalar accesses: with P = 9 an item holds 27 entries,
// so every other item's pairs start on an odd element and cannot be one 2-element vector.
template <typename T>
__device__ __forceinline__ void load_pair(const T* ptr, T& x, T& y) {
  x = ptr[0];
  y = ptr[1];
}

template <typename T>
__device__ __forceinline__ void store_pair(T* ptr, T x, T y) {
  ptr[0] = x;
  ptr[1] = y;
}

template <typename T, int VEC>
__device__ __forceinline__ void load_acc(const T* ptr, typename Accumulate<T>::type (&out)[VEC]) {
  const Vec<T, VEC> raw = load_vec<T, VEC>(ptr);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = to_acc(raw.v[k]);
}

// acc += weight * ptr[0..VEC).
template <typename T, int VEC, typename acc_t>
__device__ __forceinline__ void add_scaled(acc_t (&acc)[VEC], acc_t weight, const T* ptr) {
  const Vec<T, VEC> raw = load_vec<T, VEC>(ptr);
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] += weight * to_acc(raw.v[k]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_from_acc(T* ptr, const typename Accumulate<T>::type (&in)[VEC]) {
  Vec<T, VEC> raw;
#pragma unroll
  for (int k = 0; k < VEC; ++k) raw.v[k] = from_acc<T>(in[k]);
  store_vec<T, VEC>(ptr, raw);
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
  bool item_valid;
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

// Calls visit(dy, dx, weight) for each corner of the footprint inside the image: (dy, dx) is its
// position relative to (y0, x0), weight its bilinear weight.
template <typename acc_t, typename Visit>
__device__ __forceinline__ void for_each_corner(const Footprint<acc_t>& f, Visit&& visit) {
  if (f.in_y0 && f.in_x0) visit(0, 0, f.w00());
  if (f.in_y0 && f.in_x1) visit(0, 1, f.w01());
  if (f.in_y1 && f.in_x0) visit(1, 0, f.w10());
  if (f.in_y1 && f.in_x1) visit(1, 1, f.w11());
}

// The four bilinear corners of a footprint, VEC channels each from `corner` (the top-left one's
// address) on; corners outside the image read 0. All loads are issued before any use.
template <typename T, int VEC, typename acc_t>
__device__ __forceinline__ void load_corners(const Footprint<acc_t>& f, const T* corner, int row_stride,
                                             int pixel_stride, acc_t (&v00)[VEC], acc_t (&v01)[VEC],
                                             acc_t (&v10)[VEC], acc_t (&v11)[VEC]) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) v00[k] = v01[k] = v10[k] = v11[k] = acc_t(0);
  if (f.in_y0 && f.in_x0) load_acc<T, VEC>(corner, v00);
  if (f.in_y0 && f.in_x1) load_acc<T, VEC>(corner + pixel_stride, v01);
  if (f.in_y1 && f.in_x0) load_acc<T, VEC>(corner + row_stride, v10);
  if (f.in_y1 && f.in_x1) load_acc<T, VEC>(corner + row_stride + pixel_stride, v11);
}

// Calls visit(footprint, mask weight) for each sampling point of an item that lands on the image,
// and outside(x) for each other point, x = outside_sample: 0, or NaN when its location or mask is
// not finite (its sample is NaN in the reference's arithmetic), for the caller to add to every
// channel.
// Points first, first + step, ... only, when several lanes share an item's points.
template <typename T, bool kSoftmax, typename acc_t = typename Accumulate<T>::type, typename Visit,
          typename Outside>
__device__ __forceinline__ void for_each_sample(const Shape& s, int h_out, int w_out, const T* item_offset,
                                                const T* item_mask, Visit&& visit, Outside&& outside,
                                                int first = 0, int step = 1) {
  const auto weights = point_weights<acc_t, kSoftmax>(s, [&](int q) { return to_acc(item_mask[q]); });
  for (int p = first; p < static_cast<int>(s.points); p += step) {
    T dx, dy;
    load_pair(item_offset + 2 * p, dx, dy);
    const auto f = footprint<acc_t>(s, h_out, w_out, p, to_acc(dx), to_acc(dy));
    if (f.contributes) {
      visit(f, weights(to_acc(item_mask[p])));
    } else {
      outside(outside_sample(f, weights(to_acc(item_mask[p]))));
    }
  }
}

template <int VEC, typename acc_t>
__device__ __forceinline__ void add_to_all(acc_t (&acc)[VEC], acc_t x) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] += x;
}

// acc += m · the bilinear sample at footprint f of VEC channels, corners read from `corner` on.
template <typename T, int VEC, typename acc_t>
__device__ __forceinline__ void add_sample(acc_t (&acc)[VEC], const Footprint<acc_t>& f, acc_t m, const T* corner,
                                           int row_stride, int pixel_stride) {
  acc_t v00[VEC], v01[VEC], v10[VEC], v11[VEC];
  load_corners<T, VEC>(f, corner, row_stride, pixel_stride, v00, v01, v10, v11);
  const acc_t w00 = m * f.w00(), w01 = m * f.w01(), w10 = m * f.w10(), w11 = m * f.w11();
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] += w00 * v00[k] + w01 * v01[k] + w10 * v10[k] + w11 * v11[k];
}

template <typename T, int VEC, bool kSoftmax>
__global__ void __launch_bounds__(kBlockThreads)
    forward_kernel(const Shape s, const T* __restrict__ value, const T* __restrict__ offset_mask,
                   T* __restrict__ out, int tpi_log2, int64_t items) {
  using acc_t = typename Accumulate<T>::type;
  const ItemIndex at = item_index(s, tpi_log2, items);
  if (!at.item_valid) return;
  const int channels = static_cast<int>(s.channels()), depth = static_cast<int>(s.depth);
  const int chunks = depth / VEC;
  const int width_in = static_cast<int>(s.width_in);
  const T* image = value + at.batch * s.height_in * s.width_in * channels + at.group * depth;
  const T* item_offset = offset_mask + s.offset_index(at.item);
  const T* item_mask = offset_mask + s.mask_index(at.item);
  for (int chunk = at.lane; chunk < chunks; chunk += 1 << tpi_log2) {
    const int channel = chunk * VEC;
    acc_t acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = acc_t(0);
    for_each_sample<T, kSoftmax>(s, at.h_out, at.w_out, item_offset, item_mask, [&](const Footprint<acc_t>& f, acc_t m) {
      add_sample<T, VEC>(acc, f, m, image + (f.y0 * width_in + f.x0) * channels + channel, width_in * channels,
                         channels);
    }, [&](acc_t nothing_or_nan) { add_to_all<VEC>(acc, nothing_or_nan); });
    // item = pixel·G + group, so the item's output channels start at item·D.
    store_from_acc<T, VEC>(out + at.item * depth + channel, acc);
  }
}

// Candidate "points_split" for small, latency-bound shapes (the late stages: 14x14, 7x7, where the
// untiled forward takes 57 us for 4 us of bytes): each item's points are shared by 2^split_log2
// groups of lanes, so a thread's chain of dependent loads is ~9 / 2^split_log2 points long instead
// of 9, and the partial sums meet through shuffles. Same bytes as the untiled kernel; 2^split_log2
// times the threads. Needs every chunk of an item in one pass (chunks <= its chunk lanes).
template <typename T, int VEC, bool kSoftmax>
__global__ void __launch_bounds__(kBlockThreads)
    forward_points_split_kernel(const Shape s, const T* __restrict__ value, const T* __restrict__ offset_mask,
                                T* __restrict__ out, int chunk_lanes_log2,
                                int split_log2, int64_t items) {
  using acc_t = typename Accumulate<T>::type;
  // No early return: every lane reaches the shuffles.
  const ItemIndex at = item_index(s, chunk_lanes_log2 + split_log2, items);
  const int channels = static_cast<int>(s.channels()), depth = static_cast<int>(s.depth);
  const int chunks = depth / VEC;
  const int width_in = static_cast<int>(s.width_in);
  const int chunk = at.lane & ((1 << chunk_lanes_log2) - 1), part = at.lane >> chunk_lanes_log2;
  const bool active = at.item_valid && chunk < chunks;
  const int channel = chunk * VEC;
  acc_t acc[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] = acc_t(0);
  if (active) {
    const T* image = value + at.batch * s.height_in * s.width_in * channels + at.group * depth;
    for_each_sample<T, kSoftmax>(s, at.h_out, at.w_out, offset_mask + s.offset_index(at.item),
                                 offset_mask + s.mask_index(at.item), [&](const Footprint<acc_t>& f, acc_t m) {
      add_sample<T, VEC>(acc, f, m, image + (f.y0 * width_in + f.x0) * channels + channel, width_in * channels,
                         channels);
    }, [&](acc_t nothing_or_nan) { add_to_all<VEC>(acc, nothing_or_nan); }, part, 1 << split_log2);
  }
  for (int delta = 1 << (chunk_lanes_log2 + split_log2 - 1); delta >= (1 << chunk_lanes_log2); delta >>= 1) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] += __shfl_xor_sync(0xffffffffu, acc[k], delta);
  }
  if (active && part == 0) store_from_acc<T, VEC>(out + at.item * depth + channel, acc);
}

// ---- tiled kernels: a block owns one group of a tile of output pixels --------------------------
//
// The tile's samples, at offsets up to `margin` pixels, fall in an input window small enough for
// shared memory. The forward stages the window's values there once, so the corner reads hit shared
// memory instead of L1/L2; the backward accumulates the window's value gradient there and adds it
// to global memory once, instead of one global atomic per sample and corner. Samples outside the
// window take the untiled path, so the margin decides speed only, never the result.

// Blocks of the tiled forward resident per SM: what four windows of at most 48 KB allow in an
// H100's 228 KB of shared memory. Telling ptxas (so at most 64 registers) happens to keep it from
// spilling in the fp32 instance, which it does when left to choose (measured with -Xptxas -v).
constexpr int kTiledBlocksPerSM = 4;

struct Tile {
  int tile_h, tile_w;      // output pixels
  int tiles_y, tiles_x;    // tiles per image
  int reach_h, reach_w;    // how far the kernel grid reaches from its centre, input pixels
  int margin;              // extra input pixels covered for the offsets
  int window_h, window_w;  // input pixels held in shared memory
};

// Where a thread of a tiled kernel works: TPI lanes per output pixel, as in the untiled kernels.
struct TileSlot {
  int group, lane, h_out, w_out;
  int64_t batch;
  int64_t item;       // (pixel, group) flattened like the untiled kernels' items; 0 when !pixel_valid
  bool pixel_valid;   // false past the output's edge (such threads still reach every barrier)
  int y_origin, x_origin;  // input pixel at the window's (0, 0)
};

__device__ __forceinline__ TileSlot tile_slot(const Shape& s, const Tile& tile, int tpi_log2) {
  TileSlot at;
  int64_t block = blockIdx.x;  // group fastest, then tile column, tile row, image
  at.group = static_cast<int>(block % s.groups);
  block /= s.groups;
  const int tile_x = static_cast<int>(block % tile.tiles_x);
  block /= tile.tiles_x;
  const int tile_y = static_cast<int>(block % tile.tiles_y);
  at.batch = block / tile.tiles_y;
  at.lane = static_cast<int>(threadIdx.x) & ((1 << tpi_log2) - 1);
  const int pixel = static_cast<int>(threadIdx.x) >> tpi_log2;
  at.h_out = tile_y * tile.tile_h + pixel / tile.tile_w;
  at.w_out = tile_x * tile.tile_w + pixel % tile.tile_w;
  at.pixel_valid = at.h_out < s.height_out && at.w_out < s.width_out;
  at.item = at.pixel_valid ? ((at.batch * s.height_out + at.h_out) * s.width_out + at.w_out) * s.groups + at.group : 0;
  at.y_origin = tile_y * tile.tile_h * static_cast<int>(s.stride_h) - static_cast<int>(s.pad_h) +
                static_cast<int>(s.dilation_h * (s.kernel_h - 1) / 2) - tile.reach_h - tile.margin;
  at.x_origin = tile_x * tile.tile_w * static_cast<int>(s.stride_w) - static_cast<int>(s.pad_w) +
                static_cast<int>(s.dilation_w * (s.kernel_w - 1) / 2) - tile.reach_w - tile.margin;
  return at;
}

template <typename T, int VEC, bool kSoftmax>
__global__ void __launch_bounds__(kBlockThreads, kTiledBlocksPerSM)
    forward_tiled_kernel(const Shape s, const Tile tile, const T* __restrict__ value,
                         const T* __restrict__ offset_mask, T* __restrict__ out, int tpi_log2) {
  using acc_t = typename Accumulate<T>::type;
  DCNV3_DYNAMIC_SHARED(T, window);
  const int channels = static_cast<int>(s.channels()), depth = static_cast<int>(s.depth);
  const int chunks = depth / VEC;
  const int height_in = static_cast<int>(s.height_in), width_in = static_cast<int>(s.width_in);
  const TileSlot at = tile_slot(s, tile, tpi_log2);
  const T* image = value + at.batch * s.height_in * s.width_in * channels + at.group * depth;

  // Stage the window; pixels outside the image hold zeros, which is what sampling reads there.
  for (int i = threadIdx.x; i < tile.window_h * tile.window_w * chunks; i += blockDim.x) {
    const int cell = i / chunks, chunk_channel = (i % chunks) * VEC;
    const int y = at.y_origin + cell / tile.window_w, x = at.x_origin + cell % tile.window_w;
    Vec<T, VEC> chunk;
#pragma unroll
    for (int k = 0; k < VEC; ++k) chunk.v[k] = from_acc<T>(acc_t(0));
    if (y >= 0 && y < height_in && x >= 0 && x < width_in)
      chunk = load_vec<T, VEC>(image + (y * width_in + x) * channels + chunk_channel);
    store_vec<T, VEC>(window + cell * depth + chunk_channel, chunk);
  }
  __syncthreads();
  if (!at.pixel_valid || at.lane >= chunks) return;  // no barrier or shuffle follows

  const int channel = at.lane * VEC;
  const T* item_offset = offset_mask + s.offset_index(at.item);
  const T* item_mask = offset_mask + s.mask_index(at.item);
  acc_t acc[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] = acc_t(0);
  for_each_sample<T, kSoftmax>(s, at.h_out, at.w_out, item_offset, item_mask, [&](const Footprint<acc_t>& f, acc_t m) {
    const int wy = f.y0 - at.y_origin, wx = f.x0 - at.x_origin;
    if (wy >= 0 && wy + 1 < tile.window_h && wx >= 0 && wx + 1 < tile.window_w) {
      // Shared memory is close: one corner at a time keeps registers free (no spills at VEC 8).
      // Window cells outside the image hold zeros, so no corner needs an in-image test.
      const T* corner = window + (wy * tile.window_w + wx) * depth + channel;
      add_scaled<T, VEC>(acc, m * f.w00(), corner);
      add_scaled<T, VEC>(acc, m * f.w01(), corner + depth);
      add_scaled<T, VEC>(acc, m * f.w10(), corner + tile.window_w * depth);
      add_scaled<T, VEC>(acc, m * f.w11(), corner + (tile.window_w + 1) * depth);
    } else {  // rare: one corner at a time here too keeps the registers of the common path
      const T* corner = image + (f.y0 * width_in + f.x0) * channels + channel;
      for_each_corner(f, [&](int dy, int dx, acc_t weight) {
        add_scaled<T, VEC>(acc, m * weight, corner + (dy * width_in + dx) * channels);
      });
    }
  }, [&](acc_t nothing_or_nan) { add_to_all<VEC>(acc, nothing_or_nan); });
  store_from_acc<T, VEC>(out + at.item * depth + channel, acc);
}

template <typename acc_t>
__device__ __forceinline__ acc_t segment_sum(acc_t x, int tpi_log2) {
  // Butterfly over the item's TPI lanes: offsets < TPI never leave the item's aligned segment.
  for (int delta = (1 << tpi_log2) >> 1; delta > 0; delta >>= 1) x += __shfl_xor_sync(0xffffffffu, x, delta);
  return x;
}

// Upstream · corner value products of one sampling point, d_c for its four corners, summed over the
// item's channels: each lane adds its chunks of VEC channels here, write_point_gradients sums the
// lanes. Corners outside the image read 0 (and a point that does not contribute keeps all zeros).
template <typename acc_t>
struct CornerDots {
  acc_t d00 = 0, d01 = 0, d10 = 0, d11 = 0;
};

// Loads the corners inside the image of one chunk of VEC channels and adds upstream·corner to dots.
template <typename T, int VEC, typename acc_t>
__device__ __forceinline__ void add_corner_dots(const Footprint<acc_t>& f, const T* corner, int row_stride,
                                                int pixel_stride, const acc_t (&up)[VEC], CornerDots<acc_t>& dots) {
  acc_t v00[VEC], v01[VEC], v10[VEC], v11[VEC];
  load_corners<T, VEC>(f, corner, row_stride, pixel_stride, v00, v01, v10, v11);
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    dots.d00 += up[k] * v00[k];
    dots.d01 += up[k] * v01[k];
    dots.d10 += up[k] * v10[k];
    dots.d11 += up[k] * v11[k];
  }
}

// Sums one point's corner dots over the item's lanes; lane 0 writes its mask and offset gradients
// (point_gradients_from_dots: the reference's arithmetic, also for points that do not contribute).
template <typename T, typename acc_t>
__device__ __forceinline__ void write_point_gradients(const Shape& s, int p, bool writer, const Footprint<acc_t>& f,
                                                      acc_t m, CornerDots<acc_t> dots, int tpi_log2,
                                                      T* item_grad_offset, T* item_grad_mask) {
  dots.d00 = segment_sum(dots.d00, tpi_log2);
  dots.d01 = segment_sum(dots.d01, tpi_log2);
  dots.d10 = segment_sum(dots.d10, tpi_log2);
  dots.d11 = segment_sum(dots.d11, tpi_log2);
  if (!writer) return;
  const auto g = point_gradients_from_dots(f, m, static_cast<acc_t>(s.offset_scale), dots.d00, dots.d01,
                                           dots.d10, dots.d11);
  item_grad_mask[p] = from_acc<T>(g.mask);
  store_pair(item_grad_offset + 2 * p, from_acc<T>(g.dx), from_acc<T>(g.dy));
}

// Which gradients a backward_kernel instance computes: all (candidate "untiled"), or, for
// candidate "split", the mask/offset gradients (a pure gather: no atomics) and the value gradient
// (a pure scatter: no value reads, no shuffles) in two launches, each with one access pattern and
// fewer registers, so more warps keep atomics in flight.
enum class BackwardParts { kAll, kPointGradients, kValueGradient };

// With logits for a mask, the writer lane turns the weight gradients g_p it wrote for the item's
// points into logit gradients s_p · (g_p − Σ s_q g_q). It reads back its own writes (nothing stays
// in registers across the point loop), so for fp16/bf16 g_p comes back rounded to T: fine within
// half-precision tolerance.
template <typename T, typename acc_t, bool kSoftmax>
__device__ __forceinline__ void finish_mask_gradients(const Shape& s, bool writer,
                                                      const PointWeights<acc_t, kSoftmax>& weights, const T* item_mask,
                                                      T* item_grad_mask) {
  if constexpr (kSoftmax) {
    if (!writer) return;
    T* row = item_grad_mask;
    acc_t weighted_sum = 0;
    for (int p = 0; p < static_cast<int>(s.points); ++p) weighted_sum += weights(to_acc(item_mask[p])) * to_acc(row[p]);
    for (int p = 0; p < static_cast<int>(s.points); ++p)
      row[p] = from_acc<T>(softmax_gradient(weights(to_acc(item_mask[p])), to_acc(row[p]), weighted_sum));
  }
}

// grad_value_acc: fp32 (fp64 for double) gradient of value, zeroed by the caller; it may alias
// the final grad_value when T is the accumulation type.
template <typename T, int VEC, bool kSoftmax, BackwardParts kParts = BackwardParts::kAll>
__global__ void __launch_bounds__(kBlockThreads)
    backward_kernel(const Shape s, const T* __restrict__ grad_out, const T* __restrict__ value,
                    const T* __restrict__ offset_mask, typename Accumulate<T>::type* __restrict__ grad_value_acc,
                    T* __restrict__ grad_offset_mask, int tpi_log2, int64_t items) {
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
  const T* item_mask = offset_mask + s.mask_index(item);
  const auto weights = point_weights<acc_t, kSoftmax>(s, [&](int q) { return to_acc(item_mask[q]); });

  for (int p = 0; p < points; ++p) {
    T dx, dy;
    load_pair(offset_mask + s.offset_index(item) + 2 * p, dx, dy);
    const auto f = footprint<acc_t>(s, at.h_out, at.w_out, p, to_acc(dx), to_acc(dy));
    const acc_t m = weights(to_acc(item_mask[p]));
    CornerDots<acc_t> dots;
    for (int first = 0; first < chunks; first += tpi) {
      const int chunk = first + at.lane;
      if (!at.item_valid || chunk >= chunks || !f.contributes) continue;
      const int channel = chunk * VEC;
      acc_t up[VEC];
      load_acc<T, VEC>(upstream_row + channel, up);
      const int corner = (f.y0 * width_in + f.x0) * channels + channel;
      if constexpr (kParts != BackwardParts::kValueGradient)
        add_corner_dots<T, VEC>(f, image + corner, width_in * channels, channels, up, dots);
      if constexpr (kParts != BackwardParts::kPointGradients) {
        for_each_corner(f, [&](int dy, int dx, acc_t weight) {
          atomic_axpy<VEC>(grad_image + corner + (dy * width_in + dx) * channels, m * weight, up);
        });
      }
    }
    if constexpr (kParts != BackwardParts::kValueGradient)
      write_point_gradients<T>(s, p, at.item_valid && at.lane == 0, f, m, dots, tpi_log2,
                               grad_offset_mask + s.offset_index(item), grad_offset_mask + s.mask_index(item));
  }
  if constexpr (kParts != BackwardParts::kValueGradient)
    finish_mask_gradients<T>(s, at.item_valid && at.lane == 0, weights, item_mask,
                             grad_offset_mask + s.mask_index(item));
}

// The window is zeroed and flushed in pieces of up to 16 bytes: vector shared-memory accesses.
template <typename acc_t, int VEC>
constexpr int kWindowPiece = VEC * sizeof(acc_t) >= 16 ? static_cast<int>(16 / sizeof(acc_t)) : VEC;

template <typename acc_t, int VEC>
__device__ __forceinline__ void zero_window(acc_t* window, int elements) {
  constexpr int kPiece = kWindowPiece<acc_t, VEC>;
  Vec<acc_t, kPiece> zeros;
#pragma unroll
  for (int k = 0; k < kPiece; ++k) zeros.v[k] = acc_t(0);
  for (int i = threadIdx.x; i < elements / kPiece; i += blockDim.x) store_vec<acc_t, kPiece>(window + i * kPiece, zeros);
}

// Adds the window to the global gradient. Neighbouring tiles' windows overlap, hence atomics;
// chunks no sample reached (all zero) are skipped.
template <typename acc_t, int VEC>
__device__ __forceinline__ void flush_window(const Shape& s, const Tile& tile, const TileSlot& at,
                                             const acc_t* window, acc_t* grad_image) {
  constexpr int kPiece = kWindowPiece<acc_t, VEC>;
  const int depth = static_cast<int>(s.depth), chunks = depth / VEC, channels = static_cast<int>(s.channels());
  const int height_in = static_cast<int>(s.height_in), width_in = static_cast<int>(s.width_in);
  for (int i = threadIdx.x; i < tile.window_h * tile.window_w * chunks; i += blockDim.x) {
    const int cell = i / chunks, channel = (i % chunks) * VEC;
    const int y = at.y_origin + cell / tile.window_w, x = at.x_origin + cell % tile.window_w;
    if (y < 0 || y >= height_in || x < 0 || x >= width_in) continue;
    acc_t sum[VEC];
    bool touched = false;
#pragma unroll
    for (int first = 0; first < VEC; first += kPiece) {
      const Vec<acc_t, kPiece> piece = load_vec<acc_t, kPiece>(window + cell * depth + channel + first);
#pragma unroll
      for (int k = 0; k < kPiece; ++k) {
        sum[first + k] = piece.v[k];
        touched = touched || piece.v[k] != acc_t(0);
      }
    }
    if (touched) atomic_axpy<VEC>(grad_image + (y * width_in + x) * channels + channel, acc_t(1), sum);
  }
}

template <typename T, int VEC, bool kSoftmax>
__global__ void __launch_bounds__(kBlockThreads)
    backward_tiled_kernel(const Shape s, const Tile tile, const T* __restrict__ grad_out,
                          const T* __restrict__ value, const T* __restrict__ offset_mask,
                          typename Accumulate<T>::type* __restrict__ grad_value_acc,
                          T* __restrict__ grad_offset_mask, int tpi_log2) {
  using acc_t = typename Accumulate<T>::type;
  DCNV3_DYNAMIC_SHARED(acc_t, window);
  const int channels = static_cast<int>(s.channels()), depth = static_cast<int>(s.depth);
  const int points = static_cast<int>(s.points), chunks = depth / VEC;
  const int width_in = static_cast<int>(s.width_in);
  const TileSlot at = tile_slot(s, tile, tpi_log2);
  // No early return: every thread must reach the barriers and shuffles.
  const bool valid = at.pixel_valid && at.lane < chunks;
  zero_window<acc_t, VEC>(window, tile.window_h * tile.window_w * depth);
  __syncthreads();

  const int64_t image_base = at.batch * s.height_in * s.width_in * channels + at.group * depth;
  const T* image = value + image_base;
  acc_t* grad_image = grad_value_acc + image_base;
  const int channel = at.lane * VEC;
  const T* item_mask = offset_mask + s.mask_index(at.item);
  const auto weights = point_weights<acc_t, kSoftmax>(s, [&](int q) { return to_acc(item_mask[q]); });
  for (int p = 0; p < points; ++p) {
    T dx, dy;
    load_pair(offset_mask + s.offset_index(at.item) + 2 * p, dx, dy);
    const auto f = footprint<acc_t>(s, at.h_out, at.w_out, p, to_acc(dx), to_acc(dy));
    const acc_t m = weights(to_acc(item_mask[p]));
    CornerDots<acc_t> dots;
    if (valid && f.contributes) {
      // Re-read per point (an L1 hit) rather than held across the loop: registers for the dots.
      acc_t up[VEC];
      load_acc<T, VEC>(grad_out + at.item * depth + channel, up);
      add_corner_dots<T, VEC>(f, image + (f.y0 * width_in + f.x0) * channels + channel, width_in * channels,
                              channels, up, dots);
      for_each_corner(f, [&](int dy, int dx, acc_t weight) {
        const int y = f.y0 + dy, x = f.x0 + dx, wy = y - at.y_origin, wx = x - at.x_origin;
        if (wy >= 0 && wy < tile.window_h && wx >= 0 && wx < tile.window_w) {
          acc_t* cell = window + (wy * tile.window_w + wx) * depth + channel;
#pragma unroll
          for (int k = 0; k < VEC; ++k) atomicAdd(cell + k, m * weight * up[k]);
        } else {
          atomic_axpy<VEC>(grad_image + (y * width_in + x) * channels + channel, m * weight, up);
        }
      });
    }
    write_point_gradients<T>(s, p, at.pixel_valid && at.lane == 0, f, m, dots, tpi_log2,
                             grad_offset_mask + s.offset_index(at.item), grad_offset_mask + s.mask_index(at.item));
  }
  finish_mask_gradients<T>(s, at.pixel_valid && at.lane == 0, weights, item_mask,
                           grad_offset_mask + s.mask_index(at.item));
  __syncthreads();
  flush_window<acc_t, VEC>(s, tile, at, window, grad_image);
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

// The kernel designs each direction can run ("candidates"; ops/candidates.py picks one per shape
// class, dtype and direction, and ops/bench_results/NOTES.md lists each one's expected bytes,
// atomics and occupancy). All compute the same result; where a candidate cannot run a shape (no
// window fits, too many chunks) it runs the untiled kernel.
//   forward:  kUntiled (measured on an H100, the default), kTiled (forward_tiled_kernel),
//             kPointsSplit (forward_points_split_kernel);
//   backward: kUntiled (the default), kTiled (backward_tiled_kernel), kChunk4 (the untiled kernel
//             with chunks of at most 4 channels: fp32's layout for fp16/bf16), kSplit (two
//             backward_kernel launches, see BackwardParts).
enum class ForwardCandidate { kUntiled, kTiled, kPointsSplit };
enum class BackwardCandidate { kUntiled, kTiled, kChunk4, kSplit };

constexpr int kTileMargin = 3;                   // input pixels beyond the kernel's reach, when they fit
constexpr size_t kTileSharedBytes = 48 * 1024;   // the most a kernel gets without an opt-in attribute

inline size_t window_bytes(const Shape& s, const Tile& tile, size_t element_bytes) {
  return static_cast<size_t>(tile.window_h) * tile.window_w * s.depth * element_bytes;
}

// A tiled kernel's geometry for `chunks` chunks per item and a window of `element_bytes` per
// channel; none when it cannot run (more chunks than a warp has lanes, a kernel grid reaching
// far or a stride so large that no window fits in shared memory, more blocks than a grid holds).
inline std::optional<Tile> plan_tile(const Shape& s, int chunks, int tpi_log2, size_t element_bytes) {
  const auto reach = [&](int64_t kernel, int64_t dilation) {
    const int64_t centre = dilation * (kernel - 1) / 2;
    return std::ceil(std::fabs(s.offset_scale) * static_cast<double>(std::max(centre, dilation * (kernel - 1) - centre)));
  };
  const double reach_h = reach(s.kernel_h, s.dilation_h), reach_w = reach(s.kernel_w, s.dilation_w);
  // Written so that a NaN reach (the binding refuses a non-finite offset_scale) also bails out.
  if (chunks > 32 || !(reach_h <= 64 && reach_w <= 64) || s.stride_h > 64 || s.stride_w > 64) return std::nullopt;
  Tile t{};
  const int pixels = kBlockThreads >> tpi_log2;
  int pixels_log2 = 0;
  while ((1 << pixels_log2) < pixels) ++pixels_log2;
  t.tile_w = 1 << ((pixels_log2 + 1) / 2);  // square, or twice as wide as high
  t.tile_h = pixels / t.tile_w;
  t.tiles_y = static_cast<int>((s.height_out + t.tile_h - 1) / t.tile_h);
  t.tiles_x = static_cast<int>((s.width_out + t.tile_w - 1) / t.tile_w);
  if (s.batch * t.tiles_y * t.tiles_x * s.groups >= (int64_t{1} << 31)) return std::nullopt;
  t.reach_h = static_cast<int>(reach_h);
  t.reach_w = static_cast<int>(reach_w);
  for (t.margin = kTileMargin; t.margin >= 0; --t.margin) {
    // Rows from the first location's floor to the last one's floor + 1.
    t.window_h = (t.tile_h - 1) * static_cast<int>(s.stride_h) + 2 * (t.reach_h + t.margin) + 2;
    t.window_w = (t.tile_w - 1) * static_cast<int>(s.stride_w) + 2 * (t.reach_w + t.margin) + 2;
    if (window_bytes(s, t, element_bytes) <= kTileSharedBytes) return t;
  }
  return std::nullopt;
}

inline unsigned tile_blocks(const Shape& s, const Tile& tile) {
  return static_cast<unsigned>(s.batch * tile.tiles_y * tile.tiles_x * s.groups);
}

// Point groups per item for forward_points_split_kernel: up to 4, within one warp; 0 when the
// item's chunks need more than one pass.
inline int points_split_log2(int64_t chunks, int tpi_log2) {
  if (chunks > (int64_t{1} << tpi_log2)) return 0;
  return std::min(2, 5 - tpi_log2);
}

template <typename T, int VEC, bool kSoftmax>
cudaError_t launch_forward_kernels(const Shape& s, const T* value, const T* offset_mask, T* out,
                               ForwardCandidate candidate, cudaStream_t stream) {
  const int64_t items = s.pixels_out() * s.groups;
  const int tpi_log2 = threads_per_item_log2(s.depth / VEC);
  if (candidate == ForwardCandidate::kPointsSplit) {
    if (const int split_log2 = points_split_log2(s.depth / VEC, tpi_log2); split_log2 > 0) {
      DCNV3_LAUNCH(grid_for(items << (tpi_log2 + split_log2)), kBlockThreads, 0, stream,
                   forward_points_split_kernel<T, VEC, kSoftmax>)(s, value, offset_mask, out, tpi_log2, split_log2, items);
      return cudaGetLastError();
    }
  }
  if (candidate == ForwardCandidate::kTiled) {
    if (const auto tile = plan_tile(s, static_cast<int>(s.depth / VEC), tpi_log2, sizeof(T))) {
      DCNV3_LAUNCH(tile_blocks(s, *tile), kBlockThreads, window_bytes(s, *tile, sizeof(T)), stream,
                   forward_tiled_kernel<T, VEC, kSoftmax>)(s, *tile, value, offset_mask, out, tpi_log2);
      return cudaGetLastError();
    }
  }
  DCNV3_LAUNCH(grid_for(items << tpi_log2), kBlockThreads, 0, stream, forward_kernel<T, VEC, kSoftmax>)(
      s, value, offset_mask, out, tpi_log2, items);
  return cudaGetLastError();
}

// Kernels with the mask softmax compiled in only when the call needs it.
template <typename T, int VEC>
cudaError_t launch_forward_vec(const Shape& s, const T* value, const T* offset_mask, T* out,
                               ForwardCandidate candidate, cudaStream_t stream) {
  return s.softmax_mask ? launch_forward_kernels<T, VEC, true>(s, value, offset_mask, out, candidate, stream)
                        : launch_forward_kernels<T, VEC, false>(s, value, offset_mask, out, candidate, stream);
}

// out (N, H_out, W_out, G·D) = DCNv3 core of the contiguous channels-last inputs.
template <typename T>
cudaError_t launch_forward(const Shape& s, const T* value, const T* offset_mask, T* out,
                           ForwardCandidate candidate, cudaStream_t stream) {
  if (s.pixels_out() == 0) return cudaSuccess;
  const void* pointers[] = {value, out};
  switch (vector_width<T>(s, pointers, 2)) {
    case 8: return launch_forward_vec<T, (sizeof(T) <= 2 ? 8 : 1)>(s, value, offset_mask, out, candidate, stream);
    case 4: return launch_forward_vec<T, (sizeof(T) <= 4 ? 4 : 1)>(s, value, offset_mask, out, candidate, stream);
    case 2: return launch_forward_vec<T, 2>(s, value, offset_mask, out, candidate, stream);
    default: return launch_forward_vec<T, 1>(s, value, offset_mask, out, candidate, stream);
  }
}

template <typename T, int VEC, bool kSoftmax>
cudaError_t launch_backward_kernels(const Shape& s, const T* grad_out, const T* value, const T* offset_mask,
                                typename Accumulate<T>::type* grad_value_acc, T* grad_offset_mask,
                                BackwardCandidate candidate, cudaStream_t stream) {
  using acc_t = typename Accumulate<T>::type;
  const int64_t items = s.pixels_out() * s.groups;
  const int tpi_log2 = threads_per_item_log2(s.depth / VEC);
  if (candidate == BackwardCandidate::kSplit) {
    const unsigned blocks = grid_for(items << tpi_log2);
    DCNV3_LAUNCH(blocks, kBlockThreads, 0, stream, backward_kernel<T, VEC, kSoftmax, BackwardParts::kPointGradients>)(
        s, grad_out, value, offset_mask, grad_value_acc, grad_offset_mask, tpi_log2, items);
    DCNV3_LAUNCH(blocks, kBlockThreads, 0, stream, backward_kernel<T, VEC, kSoftmax, BackwardParts::kValueGradient>)(
        s, grad_out, value, offset_mask, grad_value_acc, grad_offset_mask, tpi_log2, items);
    return cudaGetLastError();
  }
  // With the mask softmax the tiled backward is built for 4- and 8-channel chunks only (InternImage's
  // D = 16, 32; narrower ones run untiled): at 2 fp32 channels ptxas spills it.
  if constexpr (!kSoftmax || VEC >= 4) {
    if (candidate == BackwardCandidate::kTiled) {
      if (const auto tile = plan_tile(s, static_cast<int>(s.depth / VEC), tpi_log2, sizeof(acc_t))) {
        DCNV3_LAUNCH(tile_blocks(s, *tile), kBlockThreads, window_bytes(s, *tile, sizeof(acc_t)), stream,
                     backward_tiled_kernel<T, VEC, kSoftmax>)(s, *tile, grad_out, value, offset_mask,
                                                              grad_value_acc, grad_offset_mask, tpi_log2);
        return cudaGetLastError();
      }
    }
  }
  DCNV3_LAUNCH(grid_for(items << tpi_log2), kBlockThreads, 0, stream, backward_kernel<T, VEC, kSoftmax>)(
      s, grad_out, value, offset_mask, grad_value_acc, grad_offset_mask, tpi_log2, items);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t launch_backward_vec(const Shape& s, const T* grad_out, const T* value, const T* offset_mask,
                                typename Accumulate<T>::type* grad_value_acc, T* grad_offset_mask,
                                BackwardCandidate candidate, cudaStream_t stream) {
  return s.softmax_mask
             ? launch_backward_kernels<T, VEC, true>(s, grad_out, value, offset_mask, grad_value_acc, grad_offset_mask, candidate, stream)
             : launch_backward_kernels<T, VEC, false>(s, grad_out, value, offset_mask, grad_value_acc, grad_offset_mask, candidate, stream);
}

// Gradients of the DCNv3 core. grad_value_acc (value's shape, accumulation type) must be zeroed;
// grad_offset_mask is fully written. When T differs from the accumulation type, call
// launch_cast afterwards to produce grad_value.
template <typename T>
cudaError_t launch_backward(const Shape& s, const T* grad_out, const T* value, const T* offset_mask,
                            typename Accumulate<T>::type* grad_value_acc, T* grad_offset_mask,
                            BackwardCandidate candidate, cudaStream_t stream) {
  if (s.pixels_out() == 0) return cudaSuccess;
  const void* pointers[] = {grad_out, value};
  const int widest = vector_width<T>(s, pointers, 2);
  const int width = candidate == BackwardCandidate::kChunk4 ? std::min(widest, 4) : widest;
  // The accumulation buffer is wider than T: check its alignment for the same element count.
  const int acc_width = aligned(grad_value_acc, width * static_cast<int>(sizeof(typename Accumulate<T>::type)))
                            ? width : 1;
  switch (acc_width) {
    case 8: return launch_backward_vec<T, (sizeof(T) <= 2 ? 8 : 1)>(s, grad_out, value, offset_mask, grad_value_acc, grad_offset_mask, candidate, stream);
    case 4: return launch_backward_vec<T, (sizeof(T) <= 4 ? 4 : 1)>(s, grad_out, value, offset_mask, grad_value_acc, grad_offset_mask, candidate, stream);
    case 2: return launch_backward_vec<T, 2>(s, grad_out, value, offset_mask, grad_value_acc, grad_offset_mask, candidate, stream);
    default: return launch_backward_vec<T, 1>(s, grad_out, value, offset_mask, grad_value_acc, grad_offset_mask, candidate, stream);
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
