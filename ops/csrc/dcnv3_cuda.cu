// Thin torch binding of the CUDA kernels in dcnv3_cuda_kernels.cuh: checks, allocation, stream,
// dtype dispatch. The module is internimage.ops._cuda. Built as C++ with DCNV3_CUDA_EMULATION
// defined (tests/ops/test_cuda_emulated.py), the same binding runs the kernels on CPU tensors.
#include <ATen/Context.h>
#if !defined(DCNV3_CUDA_EMULATION)
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif
#include <torch/extension.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "dcnv3_cuda_kernels.cuh"
#include "dcnv3_torch_shape.h"

namespace dcnv3 {
namespace {

#if defined(DCNV3_CUDA_EMULATION)
constexpr const char* kKernelDevice = "CPU (CUDA emulation)";
bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }
struct DeviceGuard {
  explicit DeviceGuard(at::Device) {}
};
cudaStream_t current_stream() { return nullptr; }
#else
constexpr const char* kKernelDevice = "CUDA";
bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }
using DeviceGuard = c10::cuda::CUDAGuard;
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
#endif

template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename scalar_t>
const typename CudaType<scalar_t>::type* cuda_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename CudaType<scalar_t>::type*>(t.data_ptr<scalar_t>());
}
template <typename scalar_t>
typename CudaType<scalar_t>::type* cuda_mut_ptr(at::Tensor& t) {
  return reinterpret_cast<typename CudaType<scalar_t>::type*>(t.data_ptr<scalar_t>());
}

Shape checked_shape(const at::Tensor& value, const at::Tensor& offset_mask, int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                    int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t groups,
                    double offset_scale, bool remove_center, bool softmax_mask) {
  TORCH_CHECK(on_kernel_device(value), "dcnv3 CUDA kernel: value is on ", value.device(),
              "; move the inputs to one ", kKernelDevice, " device");
  const Shape s = make_shape(value, offset_mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                             dilation_h, dilation_w, groups, offset_scale, remove_center, softmax_mask);
  // Within one image the kernels index with 32-bit integers.
  TORCH_CHECK(s.height_in * s.width_in * s.channels() < std::numeric_limits<int>::max(),
              "dcnv3 CUDA kernel: one image of value has more than 2^31 elements");
  return s;
}

// Candidate names as ops/candidates.py spells them (the Python side picks one per call).
cuda::ForwardCandidate forward_candidate(const std::string& name) {
  if (name == "untiled") return cuda::ForwardCandidate::kUntiled;
  if (name == "tiled") return cuda::ForwardCandidate::kTiled;
  if (name == "points_split") return cuda::ForwardCandidate::kPointsSplit;
  TORCH_CHECK(false, "dcnv3 CUDA forward: unknown candidate '", name, "'; use untiled, tiled or points_split");
}

cuda::BackwardCandidate backward_candidate(const std::string& name) {
  if (name == "untiled") return cuda::BackwardCandidate::kUntiled;
  if (name == "tiled") return cuda::BackwardCandidate::kTiled;
  if (name == "chunk4") return cuda::BackwardCandidate::kChunk4;
  if (name == "split") return cuda::BackwardCandidate::kSplit;
  TORCH_CHECK(false, "dcnv3 CUDA backward: unknown candidate '", name, "'; use untiled, tiled, chunk4 or split");
}

void check_launch(cudaError_t error, const char* what) {
  TORCH_CHECK(error == cudaSuccess, "dcnv3 CUDA kernel: ", what, " failed: ", cudaGetErrorString(error));
}

at::Tensor forward(const at::Tensor& value, const at::Tensor& offset_mask, int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                   int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t groups,
                   double offset_scale, bool remove_center, bool softmax_mask, const std::string& candidate) {
  const cuda::ForwardCandidate kernels = forward_candidate(candidate);
  const Shape s = checked_shape(value, offset_mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                dilation_h, dilation_w, groups, offset_scale, remove_center, softmax_mask);
  const DeviceGuard guard(value.device());
  auto out = at::empty({s.batch, s.height_out, s.width_out, s.channels()}, value.options());
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, value.scalar_type(), "dcnv3_forward_cuda", [&] {
    check_launch(cuda::launch_forward(s, cuda_ptr<scalar_t>(value), cuda_ptr<scalar_t>(offset_mask),
                                      cuda_mut_ptr<scalar_t>(out), kernels, stream),
                 "forward");
  });
  return out;
}

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& value,
                                 const at::Tensor& offset_mask, int64_t kernel_h,
                                 int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                                 int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t groups,
                                 double offset_scale, bool remove_center, bool softmax_mask,
                                 const std::string& candidate) {
  const cuda::BackwardCandidate kernels = backward_candidate(candidate);
  const Shape s = checked_shape(value, offset_mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                dilation_h, dilation_w, groups, offset_scale, remove_center, softmax_mask);
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.scalar_type() == value.scalar_type() &&
                  grad_out.device() == value.device() &&
                  grad_out.sizes() == at::IntArrayRef({s.batch, s.height_out, s.width_out, s.channels()}),
              "dcnv3 backward: grad_out must be contiguous, on value's device, of value's dtype and of "
              "the output's shape");
  // The value gradient is scattered with atomics: its summation order varies between runs.
  at::globalContext().alertNotDeterministic(
      "internimage::dcnv3_core_backward on CUDA (atomic scatter into the value gradient); "
      "run the DCNv3 backward on the CPU for bitwise reproducibility");
  const DeviceGuard guard(value.device());
  const cudaStream_t stream = current_stream();
  const bool reduced = value.scalar_type() == at::kHalf || value.scalar_type() == at::kBFloat16;
  // The offset/mask gradient is written in full by the kernel; only the scattered one is zeroed.
  auto grad_value_acc = at::zeros(value.sizes(), value.options().dtype(reduced ? at::kFloat : value.scalar_type()));
  auto grad_offset_mask = at::empty_like(offset_mask, at::MemoryFormat::Contiguous);
  at::Tensor grad_value = reduced ? at::empty_like(value) : grad_value_acc;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, value.scalar_type(), "dcnv3_backward_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using acc_t = typename cuda::Accumulate<T>::type;
    auto* acc = reinterpret_cast<acc_t*>(grad_value_acc.data_ptr());
    check_launch(cuda::launch_backward(s, cuda_ptr<scalar_t>(grad_out), cuda_ptr<scalar_t>(value),
                                       cuda_ptr<scalar_t>(offset_mask), acc,
                                       cuda_mut_ptr<scalar_t>(grad_offset_mask), kernels, stream),
                 "backward");
    if (reduced)
      check_launch(cuda::launch_cast<T>(acc, cuda_mut_ptr<scalar_t>(grad_value), value.numel(), stream),
                   "gradient cast");
  });
  return {grad_value, grad_offset_mask};
}

}  // namespace
}  // namespace dcnv3

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused DCNv3 core, CUDA";
  m.def("forward", &dcnv3::forward, "DCNv3 core forward (CUDA); the last argument names the kernel candidate");
  m.def("backward", &dcnv3::backward,
        "DCNv3 core backward (CUDA): grad value, grad offset_mask; the last argument names the kernel candidate");
#if defined(DCNV3_CUDA_EMULATION)
  m.def("take_atomic_counts", [] {
    auto& b = cuda_emulation::block();
    const std::pair<uint64_t, uint64_t> counts{b.global_atomics, b.shared_atomics};
    b.global_atomics = b.shared_atomics = 0;
    return counts;
  }, "(global, shared) atomic instructions the emulated kernels issued since the last call");
#endif
}
