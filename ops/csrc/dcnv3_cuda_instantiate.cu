// Instantiates every kernel for every dtype with nvcc alone (no torch): the compile check that
// tests/ops runs where nvcc exists, and the file to read register/spill reports from:
//   nvcc -c -std=c++17 -gencode arch=compute_90,code=sm_90 -Xptxas -v dcnv3_cuda_instantiate.cu
#include "dcnv3_cuda_kernels.cuh"

namespace dcnv3 {
namespace cuda {

template <typename T>
cudaError_t instantiate_all(const Shape& s, const T* a, T* b, typename Accumulate<T>::type* acc,
                            cudaStream_t stream) {
  cudaError_t error = cudaSuccess;
  for (const auto candidate : {ForwardCandidate::kUntiled, ForwardCandidate::kTiled, ForwardCandidate::kPointsSplit})
    if (error == cudaSuccess) error = launch_forward<T>(s, a, a, b, candidate, stream);
  for (const auto candidate : {BackwardCandidate::kUntiled, BackwardCandidate::kTiled, BackwardCandidate::kChunk4,
                               BackwardCandidate::kSplit})
    if (error == cudaSuccess) error = launch_backward<T>(s, a, a, a, acc, b, candidate, stream);
  if (error == cudaSuccess) error = launch_cast<T>(acc, b, 0, stream);
  return error;
}

template cudaError_t instantiate_all<float>(const Shape&, const float*, float*, float*, cudaStream_t);
template cudaError_t instantiate_all<double>(const Shape&, const double*, double*, double*, cudaStream_t);
template cudaError_t instantiate_all<__half>(const Shape&, const __half*, __half*, float*, cudaStream_t);
template cudaError_t instantiate_all<__nv_bfloat16>(const Shape&, const __nv_bfloat16*, __nv_bfloat16*,
                                                    float*, cudaStream_t);

}  // namespace cuda
}  // namespace dcnv3
