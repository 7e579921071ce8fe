// The launchers of the CUDA kernels, as bindings.cpp calls them.
//
// Plain C++ only: raw pointers, sizes, element strides and the stream as a void* (a cudaStream_t). Neither this
// header nor bindings.cpp includes a CUDA header, so the binding compiles against any torch (even a CPU-only wheel,
// which lacks c10/cuda's generated headers), and each kernel file compiles with nvcc alone.
//
// Every launcher returns nullptr on success, else the message of the CUDA error its launches raised. Outputs are
// fresh, contiguous buffers the caller allocated; inputs are never written (except by `cross_entropy_scale_rows`,
// which scales the gradient buffer the forward allocated).
#pragma once

#include <cstdint>

namespace liger_cuda {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum Casting : int { kLlama = 0, kGemma = 1, kNone = 2 };
enum Activation : int { kSilu = 0, kGeluTanh = 1 };
enum Reduction : int { kMean = 0, kSum = 1, kReduceNone = 2 };

using Status = const char*;

// -- rms_norm -------------------------------------------------------------------------------------------------------
// x (rows, cols) with row stride x_stride and unit column stride; y (rows, cols) contiguous; rstd (rows,) fp32.
// weight (cols,) contiguous of weight_dtype, which is dtype or kFloat32; nullptr: no weight (weight_dtype ignored).
Status rms_norm_forward(const void* x, const void* weight, void* y, float* rstd, int64_t rows, int64_t cols,
                        int64_t x_stride, float eps, float offset, int casting, int dtype, int weight_dtype,
                        void* stream);

// Called with workspace == nullptr, stores in *workspace_floats how many fp32 the workspace needs and launches
// nothing. dx (rows, cols) contiguous; dweight (cols,) of weight_dtype (ignored without a weight).
Status rms_norm_backward(const void* dy, const void* x, const void* weight, const float* rstd, void* dx, void* dweight,
                         float* workspace, int64_t* workspace_floats, int64_t rows, int64_t cols, int64_t dy_stride,
                         int64_t x_stride, float offset, int casting, int dtype, int weight_dtype, void* stream);

// -- layer_norm -----------------------------------------------------------------------------------------------------
// weight and bias (cols,) contiguous, both of weight_dtype (dtype or kFloat32); bias may be nullptr.
Status layer_norm_forward(const void* x, const void* weight, const void* bias, void* y, float* mean, float* rstd,
                          int64_t rows, int64_t cols, int64_t x_stride, float eps, int dtype, int weight_dtype,
                          void* stream);

// dbias may be nullptr (no bias). Workspace protocol as rms_norm_backward.
Status layer_norm_backward(const void* dy, const void* x, const void* weight, const float* mean, const float* rstd,
                           void* dx, void* dweight, void* dbias, float* workspace, int64_t* workspace_floats,
                           int64_t rows, int64_t cols, int64_t dy_stride, int64_t x_stride, int dtype,
                           int weight_dtype, void* stream);

// -- rope -----------------------------------------------------------------------------------------------------------
// x and out seen as (B, T, H, D) with element strides (b, t, h) and unit feature stride; cos/sin contiguous
// (1 or B, T, R) of cos_dtype (dtype or kFloat32), cos_batch_stride 0 when shared. R = 2 * half.
struct RopeTensor {
  const void* in;
  void* out;
  int64_t heads;
  int64_t in_stride_b, in_stride_t, in_stride_h;
  int64_t out_stride_b, out_stride_t, out_stride_h;
};
Status rope(const RopeTensor& q, const RopeTensor& k, const void* cos, const void* sin, int64_t cos_batch_stride,
            int64_t batch, int64_t seq, int64_t head_dim, int64_t half, bool backward, int dtype, int cos_dtype,
            void* stream);

// -- swiglu / geglu -------------------------------------------------------------------------------------------------
// a, b (rows, cols) with row strides and unit column stride; y (rows, cols) contiguous. One row of rows * cols
// elements when every operand is contiguous.
Status swiglu_forward(const void* a, const void* b, void* y, int64_t rows, int64_t cols, int64_t a_stride,
                      int64_t b_stride, int dtype, void* stream);
Status swiglu_backward(const void* dy, const void* a, const void* b, void* da, void* db, int64_t rows, int64_t cols,
                       int64_t dy_stride, int64_t a_stride, int64_t b_stride, int dtype, void* stream);
Status geglu_forward(const void* a, const void* b, void* y, int64_t rows, int64_t cols, int64_t a_stride,
                     int64_t b_stride, int dtype, void* stream);
Status geglu_backward(const void* dy, const void* a, const void* b, void* da, void* db, int64_t rows, int64_t cols,
                      int64_t dy_stride, int64_t a_stride, int64_t b_stride, int dtype, void* stream);

// -- cross_entropy --------------------------------------------------------------------------------------------------
struct CrossEntropyArgs {
  const void* logits;  // (rows, vocab), row stride logits_stride, unit column stride
  const void* target;  // (rows,) int64 (target_is_int32 false) or int32
  const void* weight;  // (vocab,) of weight_dtype (dtype or kFloat32), or nullptr
  void* grad;          // (rows, vocab) contiguous, or nullptr: no gradient
  float* stats;        // 4 fp32: CE coefficient, z-loss coefficient, 1/count, sum of the class weights
  float* ce_rows;      // (rows,) fp32 per-row CE terms (reductions mean and sum)
  float* z_rows;       // (rows,) fp32 per-row z-loss terms
  int64_t* pred;       // (rows,) argmax, -1 where ignored; nullptr: not wanted
  void* loss;          // mean/sum: a scalar of dtype; none: (rows,) of dtype
  void* z_loss;        // as loss, or nullptr: not wanted
  float* accuracy;     // mean/sum: a scalar; none: (rows,); nullptr: not wanted
  int64_t rows, vocab, logits_stride, ignore_index;
  float smoothing, z_scale, softcap;  // softcap <= 0: none
  int reduction, dtype, weight_dtype;
  bool target_is_int32;
};
Status cross_entropy_forward(const CrossEntropyArgs& args, void* stream);

// grad (numel elements, contiguous, rows of vocab) *= upstream: a scalar (per_row false) or one value per row, of
// fp32 (never rounded to the gradient's dtype). Blocks whose factors are all exactly 1 are left untouched.
Status cross_entropy_scale_rows(void* grad, const float* upstream, int64_t numel, int64_t vocab, bool per_row,
                                int dtype, void* stream);

// -- embedding ------------------------------------------------------------------------------------------------------
// indices (tokens,) contiguous; weight (rows, cols) with row stride; y (tokens, cols) contiguous. pad < 0: none.
Status embedding_forward(const void* indices, const void* weight, void* y, int64_t tokens, int64_t rows, int64_t cols,
                         int64_t weight_stride, int64_t pad, bool indices_int32, int dtype, void* stream);
// keys (tokens,) int32: the index where kept, else `rows` (sorted past every real row); rows < 2^31 - 1.
Status embedding_keys(const void* indices, int32_t* keys, int64_t tokens, int64_t rows, int64_t pad,
                      bool indices_int32, void* stream);
// sorted_keys: keys sorted (stably); order (int64): the token of each sorted position. dweight (rows, cols)
// contiguous, zeroed here; each run of equal kept keys is summed in fp32, in token order, and written once.
Status embedding_backward(const int32_t* sorted_keys, const int64_t* order, const void* dy, void* dweight,
                          int64_t tokens, int64_t rows, int64_t cols, int64_t dy_stride, int dtype, void* stream);

}  // namespace liger_cuda
