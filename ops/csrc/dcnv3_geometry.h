// DCNv3 sampling geometry (docs/model.md §4), shared by the CPU and CUDA kernels.
//
// Plain C++ that also compiles under nvcc: no torch headers here, so the CUDA kernels stay
// buildable with nvcc alone.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DCNV3_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DCNV3_HOST_DEVICE inline
#endif

namespace dcnv3 {

// Every size the kernels need; built once per call from the validated tensors.
struct Shape {
  int64_t batch;
  int64_t height_in, width_in;
  int64_t height_out, width_out;
  int64_t groups;
  int64_t depth;   // channels per group (D)
  int64_t points;  // sampling points per group (P)
  int64_t kernel_h, kernel_w;
  int64_t stride_h, stride_w;
  int64_t pad_h, pad_w;
  int64_t dilation_h, dilation_w;
  double offset_scale;
  bool remove_center;
  bool softmax_mask;  // mask holds logits: the point weights are their softmax over each group's points
  DCNV3_HOST_DEVICE int64_t channels() const { return groups * depth; }
  DCNV3_HOST_DEVICE int64_t pixels_out() const { return batch * height_out * width_out; }

  // Offsets and mask share one tensor, `offset_mask` (N, H_out, W_out, G·P·3). Per item (output
  // pixel, group), in item order, its P (dx, dy) pairs and then its P mask entries: the output of
  // one linear layer on the offset and mask weights stacked group by group (model/dcnv3.py), which
  // the kernels read and write without a copy.
  DCNV3_HOST_DEVICE int64_t offset_mask_channels() const { return groups * points * 3; }
  // Index in offset_mask of the dx of point 0 of item (pixel·G + group), and of its first mask entry:
  // 3·P·item (+ 2·P), spelled 2·item·P + item·P. Spelled item·P·3, ptxas gives the bf16 untiled
  // backward with the mask softmax 80 registers instead of 64 (3 blocks of 256 threads per SM, not 4).
  DCNV3_HOST_DEVICE int64_t offset_index(int64_t item) const { return (item << 1) * points + item * points; }
  DCNV3_HOST_DEVICE int64_t mask_index(int64_t item) const { return offset_index(item) + (points << 1); }
};

// The point weights of one (pixel, group) from its P mask entries: the entries themselves, or, when
// the op received logits (Shape::softmax_mask), their softmax over the points, max subtracted first
// as torch.softmax does (non-finite logits give NaN weights there and here). Computed from the
// logits in the accumulation type, so no normalised mask tensor is ever written or read.
// kMaySoftmax = false compiles the softmax away (the CUDA kernels are instantiated both ways, so
// kernels without it keep their registers).
template <typename acc_t, bool kMaySoftmax = true>
struct PointWeights {
  bool softmax;
  acc_t max, inv_sum;  // of the logits; 1 / Σ exp(logit − max) (a multiply per point, not a division)

  DCNV3_HOST_DEVICE acc_t operator()(acc_t entry) const {
    using std::exp;  // host: std::exp; device: CUDA's float/double overloads
    if constexpr (!kMaySoftmax) return entry;
    return softmax ? exp(entry - max) * inv_sum : entry;
  }
};

// entry(p) reads the mask entry of point p in the accumulation type.
template <typename acc_t, bool kMaySoftmax = true, typename Entry>
DCNV3_HOST_DEVICE PointWeights<acc_t, kMaySoftmax> point_weights(const Shape& s, Entry&& entry) {
  PointWeights<acc_t, kMaySoftmax> w{kMaySoftmax && s.softmax_mask, acc_t(0), acc_t(1)};
  if (!w.softmax) return w;
  using std::exp;
  const int points = static_cast<int>(s.points);
  w.max = entry(0);
  for (int p = 1; p < points; ++p) {
    const acc_t x = entry(p);
    w.max = x > w.max ? x : w.max;
  }
  acc_t sum = 0;
  for (int p = 0; p < points; ++p) sum += exp(entry(p) - w.max);
  w.inv_sum = acc_t(1) / sum;
  return w;
}

// Softmax backward for one (pixel, group): the logit gradient of point p from the gradient g_p with
// respect to its weight s_p, given Σ_q s_q·g_q: s_p·(g_p − Σ_q s_q·g_q), torch's formula.
template <typename acc_t>
DCNV3_HOST_DEVICE acc_t softmax_gradient(acc_t weight, acc_t grad_weight, acc_t weighted_sum) {
  return weight * (grad_weight - weighted_sum);
}

// Kernel-grid position of point p: the width index i runs outer, the height index j inner, and
// remove_center skips the centre (i = kw/2, j = kh/2), so later points shift up by one.
DCNV3_HOST_DEVICE void kernel_point(const Shape& s, int p, int* i, int* j) {
  const int kernel_h = static_cast<int>(s.kernel_h), kernel_w = static_cast<int>(s.kernel_w);
  if (s.remove_center && p >= (kernel_w / 2) * kernel_h + kernel_h / 2) ++p;
  *i = p / kernel_h;
  *j = p % kernel_h;
}

// Bilinear footprint of one sampling location: the top-left corner, the fractional position and
// which of the four corners lie inside the image (outside corners read 0).
template <typename acc_t>
struct Footprint {
  int y0, x0;  // int: image sides fit easily, and 32-bit index math is cheaper on GPUs
  acc_t ly, lx;  // fractional parts: weight of the lower / right neighbour
  bool in_y0, in_y1, in_x0, in_x1;
  bool contributes;  // false when loc <= -1 or loc >= size on either axis, or loc is not finite

  DCNV3_HOST_DEVICE acc_t w00() const { return (1 - ly) * (1 - lx); }
  DCNV3_HOST_DEVICE acc_t w01() const { return (1 - ly) * lx; }
  DCNV3_HOST_DEVICE acc_t w10() const { return ly * (1 - lx); }
  DCNV3_HOST_DEVICE acc_t w11() const { return ly * lx; }
};

// Floor of a location in (-1, size), as an index. (Truncating loc + 1 instead is not exact: just
// below an integer n, loc + 1 can round up to n + 1 and put the corner one pixel past the image.)
template <typename acc_t>
DCNV3_HOST_DEVICE int floor_to_int(acc_t v) {
  using std::floor;  // host: std::floor; device: CUDA's float/double overloads (one instruction)
  return static_cast<int>(floor(v));
}

// Footprint of a location already computed (kernels that hoist the location arithmetic).
template <typename acc_t>
DCNV3_HOST_DEVICE Footprint<acc_t> footprint_at(const Shape& s, acc_t loc_x, acc_t loc_y) {
  Footprint<acc_t> f;
  f.contributes = loc_x > acc_t(-1) && loc_y > acc_t(-1) &&
                  loc_x < static_cast<acc_t>(s.width_in) && loc_y < static_cast<acc_t>(s.height_in);
  if (!f.contributes) {
    // No corner is read, but the fractions stay what the reference computes (NaN for a
    // non-finite location): outside_sample and point_gradients_from_dots need them.
    using std::floor;
    f.y0 = f.x0 = 0;
    f.ly = loc_y - floor(loc_y);
    f.lx = loc_x - floor(loc_x);
    f.in_y0 = f.in_y1 = f.in_x0 = f.in_x1 = false;
    return f;
  }
  f.y0 = floor_to_int(loc_y);
  f.x0 = floor_to_int(loc_x);
  f.ly = loc_y - static_cast<acc_t>(f.y0);
  f.lx = loc_x - static_cast<acc_t>(f.x0);
  f.in_y0 = f.y0 >= 0;
  f.in_y1 = f.y0 + 1 < s.height_in;
  f.in_x0 = f.x0 >= 0;
  f.in_x1 = f.x0 + 1 < s.width_in;
  return f;
}

// A point that does not contribute still goes through the reference's arithmetic: its corner
// weights (from ly, lx) times its mask times corner values of exactly 0. That is +0 while location
// and mask are finite, and NaN when either is not, so a diverged offset or mask turns the output
// NaN instead of vanishing. The kernels add this to every channel of such a point (a rare path).
template <typename acc_t>
DCNV3_HOST_DEVICE acc_t outside_sample(const Footprint<acc_t>& f, acc_t m) {
  return acc_t(0) * m * f.ly * f.lx;
}

// Mask and offset gradients of one sampling point from d_c = upstream · value at corner c (summed
// over the group's channels; 0 for a corner outside the image, and for all four corners of a point
// that does not contribute). The offset terms multiply the mask into each corner's product before
// combining them, the reference's order, so an infinite mask or value meets the same products here
// as there (for instance NaN from inf − inf) and both show NaN or ±inf at the same places. A point
// that does not contribute gets 0, or NaN where its location (through ly, lx) or mask is not finite.
template <typename acc_t>
struct PointGradients {
  acc_t mask, dx, dy;
};
template <typename acc_t>
DCNV3_HOST_DEVICE PointGradients<acc_t> point_gradients_from_dots(const Footprint<acc_t>& f, acc_t m, acc_t scale,
                                                                  acc_t d00, acc_t d01, acc_t d10, acc_t d11) {
  const acc_t m00 = m * d00, m01 = m * d01, m10 = m * d10, m11 = m * d11;
  return {f.w00() * d00 + f.w01() * d01 + f.w10() * d10 + f.w11() * d11,
          scale * ((1 - f.ly) * (m01 - m00) + f.ly * (m11 - m10)),
          scale * ((1 - f.lx) * (m10 - m00) + f.lx * (m11 - m01))};
}

// Location (in pixels of the unpadded input) of point p of output pixel (h_out, w_out) moved by
// (dx, dy), as docs/model.md §4 writes it; offset_scale scales the kernel grid together with the offset.
// 32-bit index math throughout: these are small numbers, and 64-bit division is slow on GPUs.
template <typename acc_t>
DCNV3_HOST_DEVICE Footprint<acc_t> footprint(const Shape& s, int h_out, int w_out, int p, acc_t dx,
                                             acc_t dy) {
  int i, j;
  kernel_point(s, p, &i, &j);
  const int dil_w = static_cast<int>(s.dilation_w), dil_h = static_cast<int>(s.dilation_h);
  const int centre_w = dil_w * (static_cast<int>(s.kernel_w) - 1) / 2;
  const int centre_h = dil_h * (static_cast<int>(s.kernel_h) - 1) / 2;
  const acc_t scale = static_cast<acc_t>(s.offset_scale);
  const acc_t loc_x =
      static_cast<acc_t>(w_out * static_cast<int>(s.stride_w) - static_cast<int>(s.pad_w) + centre_w) +
      (static_cast<acc_t>(i * dil_w - centre_w) + dx) * scale;
  const acc_t loc_y =
      static_cast<acc_t>(h_out * static_cast<int>(s.stride_h) - static_cast<int>(s.pad_h) + centre_h) +
      (static_cast<acc_t>(j * dil_h - centre_h) + dy) * scale;
  return footprint_at<acc_t>(s, loc_x, loc_y);
}

}  // namespace dcnv3
