// The CUDA binding and kernels, compiled as plain C++ whose kernels run on the CPU
// (ops/csrc/cuda_emulation.h). Built by internimage.ops.emulation (the emulated tests, the bench
// without a GPU).
#define DCNV3_CUDA_EMULATION
#include "dcnv3_cuda.cu"
