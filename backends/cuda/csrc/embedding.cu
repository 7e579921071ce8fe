// embedding: y = weight[indices] forward; a dense weight gradient backward, deterministic.
//
// A dropped index (the padding row, or one outside [0, N)) gives a zero row and no gradient; its row address is
// never formed. Forward copies rows bit for bit, VEC elements per access, a few tokens per block when rows are short.
//
// Backward: `embedding_keys` maps each token to its index, or to N when dropped, as int32 keys (N < 2^31 - 1: half
// the radix passes of int64 keys); the binding sorts the keys stably (torch.sort: dropped tokens go last, equal
// indices keep token order); `embedding_backward` zeroes the weight gradient with a memset and then block (p, j) of
// its kernel, if sorted position p starts a run of equal kept keys, sums the run's gradient rows over column chunk j
// in fp32, in token order, and writes the weight-gradient row once, rounded once. No atomics: the same bits on every
// run, however often an index repeats.
#include "common.cuh"

namespace liger_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kCached = 4;  // vectors per thread of the backward's column chunk

template <typename I>
__device__ __forceinline__ bool kept(I index, int64_t rows, int64_t pad) {
  const int64_t i = static_cast<int64_t>(index);
  return i >= 0 && i < rows && i != pad;
}

template <typename T, typename I, int VEC>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const I* __restrict__ indices, const T* __restrict__ weight, T* __restrict__ y, int64_t tokens,
                   int64_t rows, int64_t cols, int64_t weight_stride, int64_t pad) {
  const int64_t token = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (token >= tokens) return;
  const int64_t index = static_cast<int64_t>(indices[token]);
  const bool keep = kept(indices[token], rows, pad);
  const int64_t vectors = cols / VEC;
  T* out = y + token * cols;
  if (keep) {
    const T* in = weight + index * weight_stride;
    for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x)
      *reinterpret_cast<Pack<T, VEC>*>(out + v * VEC) = load_pack<VEC>(in + v * VEC);
  } else {
    float zeros[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) zeros[j] = 0.f;
    for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) store_floats<VEC>(out + v * VEC, zeros);
  }
}

template <typename I>
__global__ void __launch_bounds__(kThreads)
    keys_kernel(const I* __restrict__ indices, int32_t* __restrict__ keys, int64_t tokens, int64_t rows,
                int64_t pad) {
  const int64_t token = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (token >= tokens) return;
  const I index = indices[token];
  keys[token] = static_cast<int32_t>(kept(index, rows, pad) ? static_cast<int64_t>(index) : rows);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const int32_t* __restrict__ sorted, const int64_t* __restrict__ order, const T* __restrict__ dy,
                    T* __restrict__ dweight, int64_t tokens, int64_t rows, int64_t cols, int64_t dy_stride) {
  const int64_t start = blockIdx.x;
  const int64_t key = static_cast<int64_t>(sorted[start]);
  if (key >= rows) return;                                                   // dropped tokens sort last
  if (start > 0 && static_cast<int64_t>(sorted[start - 1]) == key) return;  // not the start of a run
  const int64_t vectors = cols / VEC;
  const int64_t chunk_first = static_cast<int64_t>(blockIdx.y) * blockDim.x * kCached;
  float acc[kCached][VEC];
#pragma unroll
  for (int i = 0; i < kCached; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[i][j] = 0.f;
  for (int64_t p = start; p < tokens && static_cast<int64_t>(sorted[p]) == key; ++p) {
    const T* g = dy + order[p] * dy_stride;
#pragma unroll
    for (int i = 0; i < kCached; ++i) {
      const int64_t v = chunk_first + static_cast<int64_t>(i) * blockDim.x + threadIdx.x;
      if (v < vectors) {
        float f[VEC];
        load_floats<VEC>(g + v * VEC, f);
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[i][j] += f[j];
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kCached; ++i) {
    const int64_t v = chunk_first + static_cast<int64_t>(i) * blockDim.x + threadIdx.x;
    if (v < vectors) store_floats<VEC>(dweight + key * cols + v * VEC, acc[i]);
  }
}

template <typename T, typename I, int VEC>
Status forward_with(const void* indices, const void* weight, void* y, int64_t tokens, int64_t rows, int64_t cols,
                    int64_t weight_stride, int64_t pad, cudaStream_t stream) {
  const int64_t vectors = cols / VEC;
  const int64_t tx = std::min<int64_t>(kThreads, ceil_div(vectors, 32) * 32);
  const int64_t ty = std::max<int64_t>(1, std::min<int64_t>(kThreads / tx, tokens));
  const dim3 block(static_cast<unsigned>(tx), static_cast<unsigned>(ty));
  forward_kernel<T, I, VEC><<<static_cast<unsigned>(ceil_div(tokens, ty)), block, 0, stream>>>(
      static_cast<const I*>(indices), static_cast<const T*>(weight), static_cast<T*>(y), tokens, rows, cols,
      weight_stride, pad);
  return last_error();
}

template <typename T, int VEC>
Status backward_with(const int32_t* sorted, const int64_t* order, const void* dy, void* dweight, int64_t tokens,
                     int64_t rows, int64_t cols, int64_t dy_stride, cudaStream_t stream) {
  const int64_t vectors = cols / VEC;
  const int64_t tx = std::min<int64_t>(kThreads, ceil_div(ceil_div(vectors, kCached), 32) * 32);
  const int64_t chunks = ceil_div(vectors, tx * kCached);
  const dim3 grid(static_cast<unsigned>(tokens), static_cast<unsigned>(chunks));
  backward_kernel<T, VEC><<<grid, static_cast<unsigned>(tx), 0, stream>>>(
      sorted, order, static_cast<const T*>(dy), static_cast<T*>(dweight), tokens, rows, cols,
      dy_stride);
  return last_error();
}

template <typename Fn>
Status dispatch_index(bool int32, Fn&& fn) {
  return int32 ? fn(int32_t{}) : fn(int64_t{});
}

}  // namespace

Status embedding_forward(const void* indices, const void* weight, void* y, int64_t tokens, int64_t rows, int64_t cols,
                         int64_t weight_stride, int64_t pad, bool indices_int32, int dtype, void* stream) {
  if (tokens == 0 || cols == 0) return nullptr;
  return dispatch_dtype(dtype, [&](auto t) -> Status {
    using T = decltype(t);
    return dispatch_index(indices_int32, [&](auto i) -> Status {
      using I = decltype(i);
      constexpr int kVec = vector_width<T>();
      if (cols % kVec == 0 && weight_stride % kVec == 0 && aligned16(weight) && aligned16(y))
        return forward_with<T, I, kVec>(indices, weight, y, tokens, rows, cols, weight_stride, pad, as_stream(stream));
      return forward_with<T, I, 1>(indices, weight, y, tokens, rows, cols, weight_stride, pad, as_stream(stream));
    });
  });
}

Status embedding_keys(const void* indices, int32_t* keys, int64_t tokens, int64_t rows, int64_t pad,
                      bool indices_int32, void* stream) {
  if (tokens == 0) return nullptr;
  return dispatch_index(indices_int32, [&](auto i) -> Status {
    using I = decltype(i);
    keys_kernel<I><<<static_cast<unsigned>(ceil_div(tokens, kThreads)), kThreads, 0, as_stream(stream)>>>(
        static_cast<const I*>(indices), keys, tokens, rows, pad);
    return last_error();
  });
}

Status embedding_backward(const int32_t* sorted_keys, const int64_t* order, const void* dy, void* dweight,
                          int64_t tokens, int64_t rows, int64_t cols, int64_t dy_stride, int dtype, void* stream) {
  if (rows == 0 || cols == 0) return nullptr;
  return dispatch_dtype(dtype, [&](auto t) -> Status {
    using T = decltype(t);
    // Every row the kernel skips (no token) must read zero. For the 1 GB of a (128256, 4096) bf16 table on an H200
    // a memset takes 237 us, torch's fill kernel (at::zeros) 309 (benchmarks/results/2026-11-29-h200-s9-gpu-time-*).
    const cudaError_t zeroed =
        cudaMemsetAsync(dweight, 0, static_cast<size_t>(rows) * cols * sizeof(T), as_stream(stream));
    if (zeroed != cudaSuccess) return cudaGetErrorString(zeroed);
    if (tokens == 0) return nullptr;
    constexpr int kVec = vector_width<T>();
    if (cols % kVec == 0 && dy_stride % kVec == 0 && aligned16(dy) && aligned16(dweight))
      return backward_with<T, kVec>(sorted_keys, order, dy, dweight, tokens, rows, cols, dy_stride,
                                    as_stream(stream));
    return backward_with<T, 1>(sorted_keys, order, dy, dweight, tokens, rows, cols, dy_stride, as_stream(stream));
  });
}

}  // namespace liger_cuda
