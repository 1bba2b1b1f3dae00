// The CUDA binding and kernels, compiled as plain C++ whose kernels run on the CPU
// (ops/csrc/cuda_emulation.h). Built by tests/ops/test_cuda_emulated.py.
#define DCNV3_CUDA_EMULATION
#include "dcnv3_cuda.cu"
