// Builds a dcnv3::Shape from torch tensors, re-checking what the Python wrapper already checked,
// so a direct call into the extension with bad input raises instead of reading out of bounds.
#pragma once

#include <torch/extension.h>

#include <cmath>

#include "dcnv3_geometry.h"

namespace dcnv3 {

inline Shape make_shape(const at::Tensor& value, const at::Tensor& offset_mask,
                        int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w,
                        int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w,
                        int64_t groups, double offset_scale, bool remove_center, bool softmax_mask) {
  TORCH_CHECK(value.dim() == 4 && offset_mask.dim() == 4,
              "dcnv3: value and offset_mask must be 4-D channels-last (N, H, W, C)");
  TORCH_CHECK(value.is_contiguous() && offset_mask.is_contiguous(),
              "dcnv3: the extension needs contiguous tensors; call internimage.ops.dcnv3_core");
  TORCH_CHECK(value.scalar_type() == offset_mask.scalar_type(), "dcnv3: value and offset_mask must share a dtype");
  TORCH_CHECK(value.device() == offset_mask.device(), "dcnv3: value and offset_mask must be on one device");
  TORCH_CHECK(kernel_h >= 1 && kernel_w >= 1 && stride_h >= 1 && stride_w >= 1 && dilation_h >= 1 &&
                  dilation_w >= 1 && pad_h >= 0 && pad_w >= 0,
              "dcnv3: kernel, stride and dilation must be >= 1 and pad >= 0");
  TORCH_CHECK(groups >= 1 && value.size(3) % groups == 0, "dcnv3: channels ", value.size(3),
              " not divisible by groups=", groups);
  TORCH_CHECK(!remove_center || (kernel_h == kernel_w && kernel_h % 2 == 1),
              "dcnv3: remove_center needs a square odd kernel");
  TORCH_CHECK(std::isfinite(offset_scale), "dcnv3: offset_scale must be a finite number, got ", offset_scale);
  Shape s;
  s.batch = value.size(0);
  s.height_in = value.size(1);
  s.width_in = value.size(2);
  s.height_out = (s.height_in + 2 * pad_h - (dilation_h * (kernel_h - 1) + 1)) / stride_h + 1;
  s.width_out = (s.width_in + 2 * pad_w - (dilation_w * (kernel_w - 1) + 1)) / stride_w + 1;
  s.groups = groups;
  s.depth = value.size(3) / groups;
  s.points = kernel_h * kernel_w - (remove_center ? 1 : 0);
  s.kernel_h = kernel_h;
  s.kernel_w = kernel_w;
  s.stride_h = stride_h;
  s.stride_w = stride_w;
  s.pad_h = pad_h;
  s.pad_w = pad_w;
  s.dilation_h = dilation_h;
  s.dilation_w = dilation_w;
  s.offset_scale = offset_scale;
  s.remove_center = remove_center;
  s.softmax_mask = softmax_mask;
  TORCH_CHECK(s.height_out >= 1 && s.width_out >= 1, "dcnv3: input too small for the kernel");
  TORCH_CHECK(offset_mask.size(0) == s.batch && offset_mask.size(1) == s.height_out &&
                  offset_mask.size(2) == s.width_out && offset_mask.size(3) == s.offset_mask_channels(),
              "dcnv3: offset_mask must have shape (", s.batch, ", ", s.height_out, ", ", s.width_out, ", ",
              s.offset_mask_channels(), ") (groups·points·3: per group its offsets, then its mask), got ",
              offset_mask.sizes());
  return s;
}

}  // namespace dcnv3
