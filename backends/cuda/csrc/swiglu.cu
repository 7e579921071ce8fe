// swiglu: y = silu(a) * b, forward and backward (the shared kernels are in gated.cuh).
#include "gated.cuh"

namespace liger_cuda {

Status swiglu_forward(const void* a, const void* b, void* y, int64_t rows, int64_t cols, int64_t a_stride,
                      int64_t b_stride, int dtype, void* stream) {
  return gated::forward<kSilu>(a, b, y, rows, cols, a_stride, b_stride, dtype, stream);
}

Status swiglu_backward(const void* dy, const void* a, const void* b, void* da, void* db, int64_t rows, int64_t cols,
                       int64_t dy_stride, int64_t a_stride, int64_t b_stride, int dtype, void* stream) {
  return gated::backward<kSilu>(dy, a, b, da, db, rows, cols, dy_stride, a_stride, b_stride, dtype, stream);
}

}  // namespace liger_cuda
