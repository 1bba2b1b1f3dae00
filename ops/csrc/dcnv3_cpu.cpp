// Fused DCNv3 core on the CPU: forward and backward with at::parallel_for.
//
// Tensors are channels-last, so the D channels of one group at one pixel are contiguous; every
// inner loop runs over those channels (the compiler vectorises them), while the bilinear footprint
// of each (pixel, group, point) is computed once outside it.
//
// The backward splits work by (batch, group): each task owns a disjoint slice of grad_value, so it
// needs no atomics and its summation order is fixed (deterministic under
// torch.use_deterministic_algorithms). The slice accumulates in a task-local buffer of the
// accumulation type (fp32 for bf16/fp16), which is also what lets reduced precision keep fp32 sums.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <type_traits>
#include <vector>

#include "dcnv3_geometry.h"
#include "dcnv3_torch_shape.h"

namespace dcnv3 {
namespace {

template <typename scalar_t, typename acc_t>
inline void axpy(acc_t* __restrict__ acc, const scalar_t* __restrict__ row, acc_t weight, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) acc[d] += weight * static_cast<acc_t>(row[d]);
}

template <typename scalar_t, typename acc_t>
inline acc_t dot(const acc_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t n) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < n; ++d) sum += a[d] * static_cast<acc_t>(b[d]);
  return sum;
}

// The kernel-grid part of every sampling location, hoisted out of the pixel loops: per point
// (i·dil_w − c_w, j·dil_h − c_h), and per output pixel its grid origin.
template <typename acc_t>
struct PointGrid {
  std::vector<acc_t> x, y;
  acc_t scale;
  int64_t origin_x, origin_y;  // w_out·stride_w − pad_w + c_w at w_out = 0, likewise for h

  explicit PointGrid(const Shape& s) : scale(static_cast<acc_t>(s.offset_scale)) {
    const int64_t centre_w = s.dilation_w * (s.kernel_w - 1) / 2, centre_h = s.dilation_h * (s.kernel_h - 1) / 2;
    for (int p = 0; p < s.points; ++p) {
      int i, j;
      kernel_point(s, p, &i, &j);
      x.push_back(static_cast<acc_t>(i * s.dilation_w - centre_w));
      y.push_back(static_cast<acc_t>(j * s.dilation_h - centre_h));
    }
    origin_x = centre_w - s.pad_w;
    origin_y = centre_h - s.pad_h;
  }
  acc_t base_x(const Shape& s, int64_t w_out) const { return static_cast<acc_t>(w_out * s.stride_w + origin_x); }
  acc_t base_y(const Shape& s, int64_t h_out) const { return static_cast<acc_t>(h_out * s.stride_h + origin_y); }
  Footprint<acc_t> at(const Shape& s, acc_t base_x, acc_t base_y, int p, acc_t dx, acc_t dy) const {
    return footprint_at<acc_t>(s, base_x + (x[p] + dx) * scale, base_y + (y[p] + dy) * scale);
  }
};

// kDepth > 0 fixes D at compile time (InternImage uses 16 and 32), so the channel loops unroll.
template <typename scalar_t, int kDepth>
void forward_kernel(const Shape& s, const scalar_t* value, const scalar_t* offset_mask, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = s.channels(), depth = kDepth > 0 ? kDepth : s.depth, points = s.points;
  const PointGrid<acc_t> grid(s);
  const int64_t plane_out = s.height_out * s.width_out;
  const int64_t plane_in = s.height_in * s.width_in;
  // A few pixels per task keep the scheduling cost small next to 9·4·D multiply-adds per group.
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, s.groups * points * depth));
  at::parallel_for(0, s.pixels_out(), grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(depth);
    for (int64_t pixel = begin; pixel < end; ++pixel) {
      const int64_t n = pixel / plane_out;
      const int64_t h_out = (pixel % plane_out) / s.width_out;
      const int64_t w_out = pixel % s.width_out;
      const acc_t base_x = grid.base_x(s, w_out), base_y = grid.base_y(s, h_out);
      for (int64_t g = 0; g < s.groups; ++g) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        const scalar_t* off = offset_mask + s.offset_index(pixel * s.groups + g);
        const scalar_t* weight = offset_mask + s.mask_index(pixel * s.groups + g);
        const auto weights = point_weights<acc_t>(s, [&](int q) { return static_cast<acc_t>(weight[q]); });
        const scalar_t* image = value + n * plane_in * channels + g * depth;
        for (int p = 0; p < points; ++p) {
          const auto f = grid.at(s, base_x, base_y, p, static_cast<acc_t>(off[2 * p]),
                                 static_cast<acc_t>(off[2 * p + 1]));
          const acc_t m = weights(static_cast<acc_t>(weight[p]));
          if (!f.contributes) {
            const acc_t nothing_or_nan = outside_sample(f, m);
            if (nothing_or_nan != nothing_or_nan) std::fill(acc.begin(), acc.end(), nothing_or_nan);
            continue;
          }
          const auto at = [&](int64_t y, int64_t x) { return image + (y * s.width_in + x) * channels; };
          if (f.in_y0 && f.in_x0) axpy(acc.data(), at(f.y0, f.x0), m * f.w00(), depth);
          if (f.in_y0 && f.in_x1) axpy(acc.data(), at(f.y0, f.x0 + 1), m * f.w01(), depth);
          if (f.in_y1 && f.in_x0) axpy(acc.data(), at(f.y0 + 1, f.x0), m * f.w10(), depth);
          if (f.in_y1 && f.in_x1) axpy(acc.data(), at(f.y0 + 1, f.x0 + 1), m * f.w11(), depth);
        }
        scalar_t* dst = out + pixel * channels + g * depth;
        for (int64_t d = 0; d < depth; ++d) dst[d] = static_cast<scalar_t>(acc[d]);
      }
    }
  });
}

// grad_mask of one (pixel, group) from the gradients of its point weights: those themselves, or
// through the softmax when the mask holds logits.
template <typename scalar_t, typename acc_t>
void write_mask_gradients(const Shape& s, const PointWeights<acc_t>& weights, const scalar_t* mask_row,
                          const acc_t* grad_weight, scalar_t* grad_mask_row) {
  if (!s.softmax_mask) {
    for (int p = 0; p < s.points; ++p) grad_mask_row[p] = static_cast<scalar_t>(grad_weight[p]);
    return;
  }
  acc_t weighted_sum = 0;
  for (int p = 0; p < s.points; ++p) weighted_sum += weights(static_cast<acc_t>(mask_row[p])) * grad_weight[p];
  for (int p = 0; p < s.points; ++p)
    grad_mask_row[p] = static_cast<scalar_t>(
        softmax_gradient(weights(static_cast<acc_t>(mask_row[p])), grad_weight[p], weighted_sum));
}

template <typename scalar_t, int kDepth>
void backward_kernel(const Shape& s, const scalar_t* grad_out, const scalar_t* value,
                     const scalar_t* offset_mask, scalar_t* grad_value, scalar_t* grad_offset_mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = s.channels(), depth = kDepth > 0 ? kDepth : s.depth, points = s.points;
  const PointGrid<acc_t> grid(s);
  const int64_t plane_out = s.height_out * s.width_out;
  const int64_t plane_in = s.height_in * s.width_in;
  at::parallel_for(0, s.batch * s.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> slice(plane_in * depth);  // this task's grad_value slice, D-contiguous
    std::vector<acc_t> upstream(depth);
    std::vector<acc_t> grad_weight(points);  // of each point's weight (the mask, or its softmax)
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / s.groups, g = task % s.groups;
      std::fill(slice.begin(), slice.end(), acc_t(0));
      const scalar_t* image = value + n * plane_in * channels + g * depth;
      for (int64_t hw = 0; hw < plane_out; ++hw) {
        const int64_t pixel = n * plane_out + hw;
        const int64_t h_out = hw / s.width_out, w_out = hw % s.width_out;
        const acc_t base_x = grid.base_x(s, w_out), base_y = grid.base_y(s, h_out);
        const scalar_t* go = grad_out + pixel * channels + g * depth;
        for (int64_t d = 0; d < depth; ++d) upstream[d] = static_cast<acc_t>(go[d]);
        const int64_t item = pixel * s.groups + g;
        const scalar_t* off = offset_mask + s.offset_index(item);
        const scalar_t* weight = offset_mask + s.mask_index(item);
        scalar_t* g_off = grad_offset_mask + s.offset_index(item);
        scalar_t* g_mask = grad_offset_mask + s.mask_index(item);
        const auto weights = point_weights<acc_t>(s, [&](int q) { return static_cast<acc_t>(weight[q]); });
        for (int p = 0; p < points; ++p) {
          const auto f = grid.at(s, base_x, base_y, p, static_cast<acc_t>(off[2 * p]),
                                 static_cast<acc_t>(off[2 * p + 1]));
          const acc_t m = weights(static_cast<acc_t>(weight[p]));
          if (!f.contributes) {  // zeros, or NaN for a non-finite location or mask
            const auto g = point_gradients_from_dots<acc_t>(f, m, grid.scale, 0, 0, 0, 0);
            grad_weight[p] = g.mask;
            g_off[2 * p] = static_cast<scalar_t>(g.dx);
            g_off[2 * p + 1] = static_cast<scalar_t>(g.dy);
            continue;
          }
          // Each corner: its upstream·value product (for the mask and offset gradients) and its
          // scatter of m·w·upstream into grad_value.
          const auto corner = [&](bool inside, int64_t y, int64_t x, acc_t w) -> acc_t {
            if (!inside) return acc_t(0);
            const int64_t pos = y * s.width_in + x;
            axpy(slice.data() + pos * depth, upstream.data(), m * w, depth);
            return dot(upstream.data(), image + pos * channels, depth);
          };
          const acc_t v00 = corner(f.in_y0 && f.in_x0, f.y0, f.x0, f.w00());
          const acc_t v01 = corner(f.in_y0 && f.in_x1, f.y0, f.x0 + 1, f.w01());
          const acc_t v10 = corner(f.in_y1 && f.in_x0, f.y0 + 1, f.x0, f.w10());
          const acc_t v11 = corner(f.in_y1 && f.in_x1, f.y0 + 1, f.x0 + 1, f.w11());
          const auto g = point_gradients_from_dots(f, m, grid.scale, v00, v01, v10, v11);
          grad_weight[p] = g.mask;
          g_off[2 * p] = static_cast<scalar_t>(g.dx);
          g_off[2 * p + 1] = static_cast<scalar_t>(g.dy);
        }
        write_mask_gradients(s, weights, weight, grad_weight.data(), g_mask);
      }
      scalar_t* dst = grad_value + n * plane_in * channels + g * depth;
      for (int64_t pos = 0; pos < plane_in; ++pos)
        for (int64_t d = 0; d < depth; ++d)
          dst[pos * channels + d] = static_cast<scalar_t>(slice[pos * depth + d]);
    }
  });
}

// Calls fn with std::integral_constant<int, D> for InternImage's channels per group, else with 0
// (D read at run time).
template <typename Fn>
void with_depth(int64_t depth, const Fn& fn) {
  switch (depth) {
    case 16: fn(std::integral_constant<int, 16>{}); break;
    case 32: fn(std::integral_constant<int, 32>{}); break;
    default: fn(std::integral_constant<int, 0>{}); break;
  }
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "dcnv3 CPU kernel: ", name, " is on ", t.device(),
              "; move it to the CPU or use the CUDA kernel");
}

at::Tensor forward(const at::Tensor& value, const at::Tensor& offset_mask, int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                   int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t groups,
                   double offset_scale, bool remove_center, bool softmax_mask) {
  check_cpu(value, "value");
  const Shape s = make_shape(value, offset_mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                             dilation_h, dilation_w, groups, offset_scale, remove_center, softmax_mask);
  auto out = at::empty({s.batch, s.height_out, s.width_out, s.channels()}, value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, value.scalar_type(), "dcnv3_forward_cpu", [&] {
    with_depth(s.depth, [&](auto depth) {
      forward_kernel<scalar_t, decltype(depth)::value>(s, value.data_ptr<scalar_t>(),
                                                       offset_mask.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
    });
  });
  return out;
}

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& value,
                                 const at::Tensor& offset_mask, int64_t kernel_h,
                                 int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                                 int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t groups,
                                 double offset_scale, bool remove_center, bool softmax_mask) {
  check_cpu(value, "value");
  const Shape s = make_shape(value, offset_mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                             dilation_h, dilation_w, groups, offset_scale, remove_center, softmax_mask);
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.scalar_type() == value.scalar_type() &&
                  grad_out.sizes() == at::IntArrayRef({s.batch, s.height_out, s.width_out, s.channels()}),
              "dcnv3 backward: grad_out must be contiguous, of value's dtype and of the output's shape");
  // Every element of both gradients is written by the kernel, so no zero-fill is needed.
  auto grad_value = at::empty_like(value);
  auto grad_offset_mask = at::empty_like(offset_mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, value.scalar_type(), "dcnv3_backward_cpu", [&] {
    with_depth(s.depth, [&](auto depth) {
      backward_kernel<scalar_t, decltype(depth)::value>(
          s, grad_out.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), offset_mask.data_ptr<scalar_t>(),
          grad_value.data_ptr<scalar_t>(), grad_offset_mask.data_ptr<scalar_t>());
    });
  });
  return {grad_value, grad_offset_mask};
}

}  // namespace
}  // namespace dcnv3

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused DCNv3 core, CPU (at::parallel_for)";
  m.def("forward", &dcnv3::forward, "DCNv3 core forward (CPU)");
  m.def("backward", &dcnv3::backward, "DCNv3 core backward (CPU): grad value, grad offset_mask");
}
