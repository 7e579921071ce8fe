// What swiglu.cu and geglu.cu share: y = act(a) * b elementwise, forward and backward, fp32 math.
//
// The backward recomputes the activation (nothing but a and b is saved): da = dy * b * act'(a), db = dy * act(a),
// read and written in one pass. Operands are (rows, cols) with their own row strides (a and b may be the two halves
// of one fused gate_up projection) and unit column stride; outputs are contiguous. When every operand is contiguous
// the launcher passes one row of rows * cols elements.
//
// Grid-stride loop over VEC-wide vectors, kUnroll vectors per thread per step so that their loads are in flight
// together.
#pragma once

#include "common.cuh"

namespace liger_cuda {
namespace gated {

constexpr int kThreads = 256;
constexpr int kUnroll = 2;

template <int ACT>
struct Gate;

// silu(a) = a * sigmoid(a); silu'(a) = s * (1 + a * (1 - s)). The fast exponential and division (a few ulps, as
// Triton's exp and division): with expf and an IEEE division, the slow paths' instructions made the backward at
// (8192, 8192) bf16 take 234 µs on an H200 instead of the 152 µs its bytes need. __fdividef returns 0 when the
// divisor passes 2^126 (a below -87), where sigmoid(a) is below 1e-37 anyway.
template <>
struct Gate<kSilu> {
  __device__ __forceinline__ static float sigmoid(float a) { return __fdividef(1.f, 1.f + __expf(-a)); }
  __device__ __forceinline__ static float value(float a) { return a * sigmoid(a); }
  __device__ __forceinline__ static float value_and_grad(float a, float& grad) {
    const float s = sigmoid(a);
    grad = s * (1.f + a * (1.f - s));
    return a * s;
  }
};

// gelu_tanh(a) = a/2 * (1 + tanh(k * (a + c * a^3))), k = sqrt(2 / pi), c = 0.044715, as torch's
// F.gelu(approximate="tanh").
template <>
struct Gate<kGeluTanh> {
  static constexpr float kK = 0.7978845608028654f;
  static constexpr float kC = 0.044715f;
  __device__ __forceinline__ static float value(float a) {
    const float t = tanhf(kK * (a + kC * a * a * a));
    return 0.5f * a * (1.f + t);
  }
  __device__ __forceinline__ static float value_and_grad(float a, float& grad) {
    const float a2 = a * a;
    const float t = tanhf(kK * (a + kC * a2 * a));
    grad = 0.5f * (1.f + t) + 0.5f * a * (1.f - t * t) * kK * (1.f + 3.f * kC * a2);
    return 0.5f * a * (1.f + t);
  }
};

// (row, first column) of vector v.
__device__ __forceinline__ void locate(int64_t v, int64_t rows, int64_t row_vectors, int vec, int64_t& row,
                                       int64_t& col) {
  row = rows == 1 ? 0 : v / row_vectors;
  col = (v - row * row_vectors) * vec;
}

template <typename T, int ACT, int VEC>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y, int64_t rows, int64_t cols,
                   int64_t a_stride, int64_t b_stride) {
  const int64_t row_vectors = cols / VEC;
  const int64_t total = rows * row_vectors;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; base < total;
       base += step * kUnroll) {
    float av[kUnroll][VEC], bv[kUnroll][VEC];
    int64_t rows_of[kUnroll], cols_of[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = base + u * step;
      if (v < total) {
        locate(v, rows, row_vectors, VEC, rows_of[u], cols_of[u]);
        load_floats<VEC>(a + rows_of[u] * a_stride + cols_of[u], av[u]);
        load_floats<VEC>(b + rows_of[u] * b_stride + cols_of[u], bv[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u * step < total) {
        float out[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) out[j] = Gate<ACT>::value(av[u][j]) * bv[u][j];
        store_floats<VEC>(y + rows_of[u] * cols + cols_of[u], out);
      }
    }
  }
}

template <typename T, int ACT, int VEC>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* __restrict__ dy, const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ da,
                    T* __restrict__ db, int64_t rows, int64_t cols, int64_t dy_stride, int64_t a_stride,
                    int64_t b_stride) {
  const int64_t row_vectors = cols / VEC;
  const int64_t total = rows * row_vectors;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; base < total;
       base += step * kUnroll) {
    float gv[kUnroll][VEC], av[kUnroll][VEC], bv[kUnroll][VEC];
    int64_t rows_of[kUnroll], cols_of[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = base + u * step;
      if (v < total) {
        locate(v, rows, row_vectors, VEC, rows_of[u], cols_of[u]);
        load_floats<VEC>(dy + rows_of[u] * dy_stride + cols_of[u], gv[u]);
        load_floats<VEC>(a + rows_of[u] * a_stride + cols_of[u], av[u]);
        load_floats<VEC>(b + rows_of[u] * b_stride + cols_of[u], bv[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u * step < total) {
        float da_out[VEC], db_out[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          float grad;
          const float act = Gate<ACT>::value_and_grad(av[u][j], grad);
          da_out[j] = gv[u][j] * bv[u][j] * grad;
          db_out[j] = gv[u][j] * act;
        }
        const int64_t offset = rows_of[u] * cols + cols_of[u];
        store_floats<VEC>(da + offset, da_out);
        store_floats<VEC>(db + offset, db_out);
      }
    }
  }
}

template <typename T>
bool can_vectorise(int64_t cols, std::initializer_list<int64_t> strides, std::initializer_list<const void*> pointers) {
  constexpr int kVec = vector_width<T>();
  if (cols % kVec != 0) return false;
  for (const int64_t s : strides)
    if (s % kVec != 0) return false;
  for (const void* p : pointers)
    if (!aligned16(p)) return false;
  return true;
}

inline unsigned grid_for(int64_t vectors) {
  const int64_t most = static_cast<int64_t>(sm_count()) * (2048 / kThreads) * 4;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(ceil_div(vectors, kThreads * kUnroll), most)));
}

template <int ACT>
Status forward(const void* a, const void* b, void* y, int64_t rows, int64_t cols, int64_t a_stride, int64_t b_stride,
               int dtype, void* stream) {
  if (rows * cols == 0) return nullptr;
  return dispatch_dtype(dtype, [&](auto t) -> Status {
    using T = decltype(t);
    constexpr int kVec = vector_width<T>();
    const T* a_t = static_cast<const T*>(a);
    const T* b_t = static_cast<const T*>(b);
    T* y_t = static_cast<T*>(y);
    if (can_vectorise<T>(cols, {a_stride, b_stride}, {a, b, y})) {
      forward_kernel<T, ACT, kVec><<<grid_for(rows * cols / kVec), kThreads, 0, as_stream(stream)>>>(
          a_t, b_t, y_t, rows, cols, a_stride, b_stride);
    } else {
      forward_kernel<T, ACT, 1><<<grid_for(rows * cols), kThreads, 0, as_stream(stream)>>>(a_t, b_t, y_t, rows, cols,
                                                                                            a_stride, b_stride);
    }
    return last_error();
  });
}

template <int ACT>
Status backward(const void* dy, const void* a, const void* b, void* da, void* db, int64_t rows, int64_t cols,
                int64_t dy_stride, int64_t a_stride, int64_t b_stride, int dtype, void* stream) {
  if (rows * cols == 0) return nullptr;
  return dispatch_dtype(dtype, [&](auto t) -> Status {
    using T = decltype(t);
    constexpr int kVec = vector_width<T>();
    const T* dy_t = static_cast<const T*>(dy);
    const T* a_t = static_cast<const T*>(a);
    const T* b_t = static_cast<const T*>(b);
    T* da_t = static_cast<T*>(da);
    T* db_t = static_cast<T*>(db);
    if (can_vectorise<T>(cols, {dy_stride, a_stride, b_stride}, {dy, a, b, da, db})) {
      backward_kernel<T, ACT, kVec><<<grid_for(rows * cols / kVec), kThreads, 0, as_stream(stream)>>>(
          dy_t, a_t, b_t, da_t, db_t, rows, cols, dy_stride, a_stride, b_stride);
    } else {
      backward_kernel<T, ACT, 1><<<grid_for(rows * cols), kThreads, 0, as_stream(stream)>>>(
          dy_t, a_t, b_t, da_t, db_t, rows, cols, dy_stride, a_stride, b_stride);
    }
    return last_error();
  });
}

}  // namespace gated
}  // namespace liger_cuda
