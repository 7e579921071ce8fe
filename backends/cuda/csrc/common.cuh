// What every kernel file shares: fp32 <-> storage conversions, 16-byte vector loads and stores, deterministic warp
// and block reductions, launch helpers. Conversions go through the explicit intrinsics (torch builds with
// __CUDA_NO_HALF_CONVERSIONS__ and friends), always rounding to nearest even.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "liger_cuda.h"

namespace liger_cuda {

using bf16 = __nv_bfloat16;
using fp16 = __half;

// -- conversions ----------------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(fp16 v) { return __half2float(v); }
__device__ __forceinline__ float to_float(bf16 v) { return __bfloat162float(v); }

template <typename T>
struct FromFloat;
template <>
struct FromFloat<float> {
  __device__ __forceinline__ static float convert(float v) { return v; }
};
template <>
struct FromFloat<fp16> {
  __device__ __forceinline__ static fp16 convert(float v) { return __float2half_rn(v); }
};
template <>
struct FromFloat<bf16> {
  __device__ __forceinline__ static bf16 convert(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return FromFloat<T>::convert(v);
}

// v rounded to T's precision, as fp32.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

// -- vectors --------------------------------------------------------------------------------------------------------

// N elements moved as one access (16 bytes at most per instruction; a 32-byte pack of fp32 is two).
template <typename T, int N>
struct alignas(sizeof(T) * N >= 16 ? 16 : sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void unpack(const Pack<T, N>& pack, float (&out)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(pack.v[i]);
}

template <int N, typename T>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[N]) {
  unpack(load_pack<N>(p), out);
}

template <int N, typename T>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int i = 0; i < N; ++i) pack.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

// Elements of T in one 16-byte access.
template <typename T>
constexpr int vector_width() {
  return static_cast<int>(16 / sizeof(T));
}

inline bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// -- reductions (fixed order: the same inputs give the same bits) --------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Sum over the threads of one row: the warp when blockDim.x == 32 (then each warp of the block has its own row),
// else the whole block (then blockDim.y == 1 and blockDim.x is a multiple of 32). `scratch`: 32 floats of shared
// memory. Every thread of the row gets the result. All threads of the row must call it.
__device__ __forceinline__ float row_sum(float v, float* scratch) {
  v = warp_sum(v);
  if (blockDim.x == 32) return v;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();  // a previous call's readers are done with scratch
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp_sum(lane < warps ? scratch[lane] : 0.f);
}

// Two sums over the threads of one row at once: one pair of barriers where two row_sum calls take two. Same contract
// as row_sum, with 32 float2 of shared memory.
__device__ __forceinline__ float2 row_sum2(float a, float b, float2* scratch) {
  a = warp_sum(a);
  b = warp_sum(b);
  if (blockDim.x == 32) return make_float2(a, b);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = make_float2(a, b);
  __syncthreads();
  const float2 mine = lane < warps ? scratch[lane] : make_float2(0.f, 0.f);
  return make_float2(warp_sum(mine.x), warp_sum(mine.y));
}

// Sum over the whole block (any multiple of 32 threads, 1-D). Same contract as row_sum.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp_sum(lane < warps ? scratch[lane] : 0.f);
}

// -- deterministic column sums of fp32 partial rows -----------------------------------------------------------------

constexpr int kSumColumns = 32;
constexpr int kSumSlices = 16;

// out[c] = sum over p of partial[p * cols + c], in a fixed order. Block (kSumColumns, kSumSlices). With blockIdx.y
// == 1, the (partial_rows, cols) block that follows in `partial` is summed into second_out: layer_norm's dW and dB in
// one launch.
template <typename W>
__global__ void sum_partial_rows_kernel(const float* __restrict__ partial, int64_t partial_rows, int64_t cols,
                                        W* __restrict__ out, W* __restrict__ second_out) {
  __shared__ float tile[kSumSlices][kSumColumns + 1];
  if (blockIdx.y == 1) {
    partial += partial_rows * cols;
    out = second_out;
  }
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kSumColumns + threadIdx.x;
  float sum = 0.f;
  if (col < cols) {
    for (int64_t p = threadIdx.y; p < partial_rows; p += kSumSlices) sum += partial[p * cols + col];
  }
  tile[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float total = 0.f;
#pragma unroll
    for (int s = 0; s < kSumSlices; ++s) total += tile[s][threadIdx.x];
    out[col] = from_float<W>(total);
  }
}

// second_out: nullptr, or where the sums of the next partial_rows rows of `partial` go.
template <typename W>
inline void launch_sum_partial_rows(const float* partial, int64_t partial_rows, int64_t cols, W* out,
                                    cudaStream_t stream, W* second_out = nullptr) {
  const dim3 block(kSumColumns, kSumSlices);
  const dim3 grid(static_cast<unsigned>((cols + kSumColumns - 1) / kSumColumns), second_out != nullptr ? 2 : 1);
  sum_partial_rows_kernel<W><<<grid, block, 0, stream>>>(partial, partial_rows, cols, out, second_out);
}

// -- launch helpers -------------------------------------------------------------------------------------------------

inline Status last_error() {
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Streaming multiprocessors of the current device (cached per device).
inline int sm_count() {
  static int cache[256] = {0};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 256) return 108;
  if (cache[device] == 0) {
    int count = 0;
    cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
    cache[device] = count > 0 ? count : 1;
  }
  return cache[device];
}

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

}  // namespace liger_cuda

namespace liger_cuda {

// Calls fn(T{}) with T the storage type of `dtype`.
template <typename Fn>
inline Status dispatch_dtype(int dtype, Fn&& fn) {
  switch (dtype) {
    case kFloat32:
      return fn(float{});
    case kBFloat16:
      return fn(bf16{});
    case kFloat16:
      return fn(fp16{});
    default:
      return "liger_cuda: unsupported dtype code";
  }
}

// Calls fn(T{}, W{}): T the storage type of `dtype`, W that of the parameters, which is T or fp32.
template <typename Fn>
inline Status dispatch_dtype_and_param(int dtype, int param_dtype, Fn&& fn) {
  switch (dtype) {
    case kFloat32:
      return fn(float{}, float{});
    case kBFloat16:
      return param_dtype == kFloat32 ? fn(bf16{}, float{}) : fn(bf16{}, bf16{});
    case kFloat16:
      return param_dtype == kFloat32 ? fn(fp16{}, float{}) : fn(fp16{}, fp16{});
    default:
      return "liger_cuda: unsupported dtype code";
  }
}

}  // namespace liger_cuda
