// rms_norm: y = x * rsqrt(mean(x^2) + eps) * (offset + weight) over each row, forward and backward, fp32 math.
//
// Layout (norm_rows.cuh). A row is handled by a warp (rows of at most 32 * kCached vectors; a block then holds several
// rows) or by a whole block (up to kForwardMaxThreads threads, partial sums combined through shared memory). Each
// thread takes the vectors tid, tid + threads, ... of its row (coalesced 16-byte accesses) and keeps up to kCached of
// them in registers; a longer forward row is read twice (the second pass mostly from L2).
//
// Backward. dx = rstd * (dn - n * mean(dn * n)) with n = x * rstd and dn = dy * (offset + w); dw = sum over rows of
// dy * n. Fused path (rows of at most kWideBackwardMaxThreads * kWideBackwardCached vectors): each row group walks
// a contiguous range of rows, keeps its dw partial sums in registers and writes them once to its own row of an fp32
// workspace (norm_rows.cuh says how its layout was chosen). Chunked path (longer rows): a first kernel computes mean(dn * n) per row, then a 2-D grid (row blocks x
// column chunks) writes dx and one dw partial row per row block. Either way a second small kernel sums the partial
// rows in a fixed order: no atomics, the same bits on every run.
//
// Casting modes, as the reference backend: "llama" rounds the normalised x to x's dtype before the weight multiply
// and takes offset + w in w's dtype; "gemma" stays in fp32; "none" rounds like "llama", with w cast to x's dtype.
#include "norm_rows.cuh"

namespace liger_cuda {
namespace {

using namespace norm_rows;

constexpr int kForwardMaxThreads = 1024;
// The fused backward of rows wider than its narrow blocks hold (norm_rows.cuh): 4 vectors a thread on 512 threads, in
// groups of at least 16 rows (which saved 6 µs against 4 at 2048 x 16384 bf16).
constexpr int kWideBackwardCached = 4;
constexpr int kWideBackwardMaxThreads = 512;
constexpr int kWideBackwardMinRows = 16;
constexpr int kRowDotThreads = 512;
constexpr int kChunkThreads = 256;

template <typename T, typename W>
__device__ __forceinline__ float effective_weight(float w, float offset, int casting) {
  if (casting == kLlama) return round_to<W>(w + offset);  // torch adds in the weight's dtype
  if (casting == kGemma) return w + offset;
  return round_to<T>(round_to<T>(w) + offset);  // none: the weight cast to x's dtype, the sum in it
}

// The effective weights of vector v (1 without a weight).
template <typename T, typename W, int VEC>
__device__ __forceinline__ void load_weights(const W* weight, int64_t v, float offset, int casting, float (&w)[VEC]) {
  if (weight == nullptr) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) w[j] = 1.f;
    return;
  }
  load_floats<VEC>(weight + v * VEC, w);
#pragma unroll
  for (int j = 0; j < VEC; ++j) w[j] = effective_weight<T, W>(w[j], offset, casting);
}

template <typename T, typename W, int VEC>
__device__ __forceinline__ void normalise_vector(const W* weight, int64_t v, const float (&xf)[VEC], float rstd,
                                                 float offset, int casting, T* y_row) {
  float w[VEC], out[VEC];
  load_weights<T, W, VEC>(weight, v, offset, casting, w);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    float n = xf[j] * rstd;
    if (casting != kGemma) n = round_to<T>(n);
    out[j] = weight == nullptr ? n : n * w[j];
  }
  store_floats<VEC>(y_row + v * VEC, out);
}

template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(kForwardMaxThreads)
    rms_norm_forward_kernel(const T* __restrict__ x, const W* __restrict__ weight, T* __restrict__ y,
                            float* __restrict__ rstd_out, int64_t rows, int64_t cols, int64_t x_stride, float eps,
                            float offset, int casting) {
  __shared__ float scratch[32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < rows;
  const int tid = threadIdx.x, threads = blockDim.x;
  const int64_t vectors = cols / VEC;
  const T* x_row = x + (valid ? row : 0) * x_stride;
  T* y_row = y + (valid ? row : 0) * cols;
  const bool cached = vectors <= static_cast<int64_t>(threads) * kCached;

  Pack<T, VEC> xs[kCached];
  float squares = 0.f;
  if (valid) {
    if (cached) {
#pragma unroll
      for (int i = 0; i < kCached; ++i) {
        const int64_t v = static_cast<int64_t>(i) * threads + tid;
        if (v < vectors) {
          xs[i] = load_pack<VEC>(x_row + v * VEC);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const float f = to_float(xs[i].v[j]);
            squares += f * f;
          }
        }
      }
    } else {
      for (int64_t v = tid; v < vectors; v += threads) {
        float f[VEC];
        load_floats<VEC>(x_row + v * VEC, f);
#pragma unroll
        for (int j = 0; j < VEC; ++j) squares += f[j] * f[j];
      }
    }
  }
  const float rstd = rsqrtf(row_sum(squares, scratch) / static_cast<float>(cols) + eps);
  if (!valid) return;  // nothing collective follows
  if (tid == 0) rstd_out[row] = rstd;
  if (cached) {
#pragma unroll
    for (int i = 0; i < kCached; ++i) {
      const int64_t v = static_cast<int64_t>(i) * threads + tid;
      if (v < vectors) {
        float f[VEC];
        unpack(xs[i], f);
        normalise_vector<T, W, VEC>(weight, v, f, rstd, offset, casting, y_row);
      }
    }
  } else {
    for (int64_t v = tid; v < vectors; v += threads) {
      float f[VEC];
      load_floats<VEC>(x_row + v * VEC, f);
      normalise_vector<T, W, VEC>(weight, v, f, rstd, offset, casting, y_row);
    }
  }
}

// Fused backward: row group g (a warp, or the block) walks rows [g * rows_per_group, ...), CACHED vectors of each row
// per thread, and writes its dw partial sums to row g of dw_partial (nullptr without a weight).
template <typename T, typename W, int VEC, int CACHED, int MAX_THREADS>
__global__ void __launch_bounds__(MAX_THREADS)
    rms_norm_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, const W* __restrict__ weight,
                             const float* __restrict__ rstd, T* __restrict__ dx, float* __restrict__ dw_partial,
                             int64_t rows, int64_t cols, int64_t dy_stride, int64_t x_stride, int64_t rows_per_group,
                             float offset, int casting) {
  __shared__ float scratch[32];
  const int tid = threadIdx.x, threads = blockDim.x;
  const int64_t vectors = cols / VEC;
  const int64_t group = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t first = group * rows_per_group;
  const int64_t last = first + rows_per_group < rows ? first + rows_per_group : rows;
  float acc[CACHED][VEC];
#pragma unroll
  for (int i = 0; i < CACHED; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[i][j] = 0.f;

  // In block mode (blockDim.y == 1) every thread of the block walks the same rows, as row_sum requires.
  for (int64_t row = first; row < last; ++row) {
    const float r = rstd[row];
    Pack<T, VEC> xs[CACHED], dys[CACHED];
    float dot = 0.f;  // sum of dn * x
#pragma unroll
    for (int i = 0; i < CACHED; ++i) {
      const int64_t v = static_cast<int64_t>(i) * threads + tid;
      if (v < vectors) {
        xs[i] = load_pack<VEC>(x + row * x_stride + v * VEC);
        dys[i] = load_pack<VEC>(dy + row * dy_stride + v * VEC);
        float w[VEC];
        load_weights<T, W, VEC>(weight, v, offset, casting, w);
#pragma unroll
        for (int j = 0; j < VEC; ++j) dot += to_float(dys[i].v[j]) * w[j] * to_float(xs[i].v[j]);
      }
    }
    const float mean_dn_n = row_sum(dot, scratch) * r / static_cast<float>(cols);
#pragma unroll
    for (int i = 0; i < CACHED; ++i) {
      const int64_t v = static_cast<int64_t>(i) * threads + tid;
      if (v < vectors) {
        float w[VEC], out[VEC];
        load_weights<T, W, VEC>(weight, v, offset, casting, w);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float g = to_float(dys[i].v[j]);
          const float n = to_float(xs[i].v[j]) * r;
          out[j] = r * (g * w[j] - n * mean_dn_n);
          acc[i][j] += g * n;
        }
        store_floats<VEC>(dx + row * cols + v * VEC, out);
      }
    }
  }
  if (dw_partial == nullptr) return;
#pragma unroll
  for (int i = 0; i < CACHED; ++i) {
    const int64_t v = static_cast<int64_t>(i) * threads + tid;
    if (v < vectors) store_floats<VEC>(dw_partial + group * cols + v * VEC, acc[i]);
  }
}

// Chunked backward, first pass: mean_dn_n[row] = mean(dn * n) of each row (one block per row).
template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(kRowDotThreads)
    rms_norm_row_dot_kernel(const T* __restrict__ dy, const T* __restrict__ x, const W* __restrict__ weight,
                            const float* __restrict__ rstd, float* __restrict__ mean_dn_n, int64_t cols,
                            int64_t dy_stride, int64_t x_stride, float offset, int casting) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int64_t vectors = cols / VEC;
  float dot = 0.f;
  for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
    float xf[VEC], g[VEC], w[VEC];
    load_floats<VEC>(x + row * x_stride + v * VEC, xf);
    load_floats<VEC>(dy + row * dy_stride + v * VEC, g);
    load_weights<T, W, VEC>(weight, v, offset, casting, w);
#pragma unroll
    for (int j = 0; j < VEC; ++j) dot += g[j] * w[j] * xf[j];
  }
  dot = block_sum(dot, scratch);
  if (threadIdx.x == 0) mean_dn_n[row] = dot * rstd[row] / static_cast<float>(cols);
}

// Chunked backward, second pass: block (i, j) takes rows [i * rows_per_block, ...) of column chunk j.
template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(kChunkThreads)
    rms_norm_backward_chunk_kernel(const T* __restrict__ dy, const T* __restrict__ x, const W* __restrict__ weight,
                                   const float* __restrict__ rstd, const float* __restrict__ mean_dn_n,
                                   T* __restrict__ dx, float* __restrict__ dw_partial, int64_t rows, int64_t cols,
                                   int64_t dy_stride, int64_t x_stride, int64_t rows_per_block, float offset,
                                   int casting) {
  const int64_t vectors = cols / VEC;
  const int64_t chunk_first = static_cast<int64_t>(blockIdx.y) * kChunkThreads * kCached;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t last = first + rows_per_block < rows ? first + rows_per_block : rows;
  float w[kCached][VEC], acc[kCached][VEC];
#pragma unroll
  for (int i = 0; i < kCached; ++i) {
    const int64_t v = chunk_first + static_cast<int64_t>(i) * kChunkThreads + threadIdx.x;
    if (v < vectors) load_weights<T, W, VEC>(weight, v, offset, casting, w[i]);
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[i][j] = 0.f;
  }
  for (int64_t row = first; row < last; ++row) {
    const float r = rstd[row];
    const float c = mean_dn_n[row];
#pragma unroll
    for (int i = 0; i < kCached; ++i) {
      const int64_t v = chunk_first + static_cast<int64_t>(i) * kChunkThreads + threadIdx.x;
      if (v < vectors) {
        float xf[VEC], g[VEC], out[VEC];
        load_floats<VEC>(x + row * x_stride + v * VEC, xf);
        load_floats<VEC>(dy + row * dy_stride + v * VEC, g);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float n = xf[j] * r;
          out[j] = r * (g[j] * w[i][j] - n * c);
          acc[i][j] += g[j] * n;
        }
        store_floats<VEC>(dx + row * cols + v * VEC, out);
      }
    }
  }
  if (dw_partial == nullptr) return;
#pragma unroll
  for (int i = 0; i < kCached; ++i) {
    const int64_t v = chunk_first + static_cast<int64_t>(i) * kChunkThreads + threadIdx.x;
    if (v < vectors) store_floats<VEC>(dw_partial + static_cast<int64_t>(blockIdx.x) * cols + v * VEC, acc[i]);
  }
}

// -- launchers ------------------------------------------------------------------------------------------------------

template <typename T, typename W, int VEC>
Status forward_with(const void* x, const void* weight, void* y, float* rstd, int64_t rows, int64_t cols,
                    int64_t x_stride, float eps, float offset, int casting, cudaStream_t stream) {
  const dim3 block = row_block(cols / VEC, kForwardMaxThreads);
  const int64_t grid = ceil_div(rows, block.y);
  rms_norm_forward_kernel<T, W, VEC><<<static_cast<unsigned>(grid), block, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const W*>(weight), static_cast<T*>(y), rstd, rows, cols, x_stride, eps,
      offset, casting);
  return last_error();
}

struct BackwardPlan {
  bool fused;
  bool wide;   // the fused kernel for rows wider than kBackwardMaxThreads threads
  int cached;  // the fused kernel's vectors per thread
  dim3 block;
  int64_t grid_x, grid_y, rows_per_group, partial_rows;
};

inline BackwardPlan plan_backward(int64_t rows, int64_t vectors, int cached, int max_threads) {
  BackwardPlan plan{};
  const bool narrow = vectors <= static_cast<int64_t>(max_threads) * cached;
  if (narrow || vectors <= static_cast<int64_t>(kWideBackwardMaxThreads) * kWideBackwardCached) {
    plan.fused = true;
    plan.wide = !narrow;
    plan.cached = narrow ? cached : kWideBackwardCached;
    plan.block = row_block(vectors, narrow ? max_threads : kWideBackwardMaxThreads, plan.cached);
    const RowGroups groups = row_groups(rows, plan.block, narrow ? kBackwardMinRows : kWideBackwardMinRows);
    plan.grid_x = groups.blocks;
    plan.grid_y = 1;
    plan.rows_per_group = groups.rows_per_group;
    plan.partial_rows = groups.groups;
  } else {
    const int64_t sms = sm_count();
    plan.fused = false;
    plan.block = dim3(kChunkThreads);
    plan.grid_y = ceil_div(vectors, static_cast<int64_t>(kChunkThreads) * kCached);
    const int64_t row_blocks = std::min<int64_t>(std::max<int64_t>(ceil_div(4 * sms, plan.grid_y), 1), rows);
    plan.rows_per_group = ceil_div(rows, row_blocks);
    plan.grid_x = ceil_div(rows, plan.rows_per_group);
    plan.partial_rows = plan.grid_x;
  }
  return plan;
}

// The backward's plan for (rows, cols) read in vectors of VEC elements (tests/cuda/test_cuda_plans.py checks it).
template <int VEC>
BackwardPlan plan_backward_for(int64_t rows, int64_t cols) {
  return plan_backward(rows, cols / VEC, backward_cached<VEC>(), backward_max_threads<VEC>());
}

template <typename T, typename W, int VEC>
Status backward_with(const void* dy, const void* x, const void* weight, const float* rstd, void* dx, void* dweight,
                     float* workspace, int64_t* workspace_floats, int64_t rows, int64_t cols, int64_t dy_stride,
                     int64_t x_stride, float offset, int casting, cudaStream_t stream) {
  constexpr int kFusedCached = backward_cached<VEC>();
  const BackwardPlan plan = plan_backward_for<VEC>(rows, cols);
  const bool has_weight = weight != nullptr;
  const int64_t partial_floats = has_weight ? plan.partial_rows * cols : 0;
  if (workspace == nullptr) {
    *workspace_floats = partial_floats + (plan.fused ? 0 : rows);
    return nullptr;
  }
  float* dw_partial = has_weight ? workspace : nullptr;
  const T* dy_t = static_cast<const T*>(dy);
  const T* x_t = static_cast<const T*>(x);
  const W* w_t = static_cast<const W*>(weight);
  if (plan.fused) {
    auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(plan.grid_x), plan.block, 0, stream>>>(
          dy_t, x_t, w_t, rstd, static_cast<T*>(dx), dw_partial, rows, cols, dy_stride, x_stride, plan.rows_per_group,
          offset, casting);
    };
    if (!plan.wide) {
      launch(rms_norm_backward_kernel<T, W, VEC, kFusedCached, kBackwardMaxThreads>);
    } else {
      launch(rms_norm_backward_kernel<T, W, VEC, kWideBackwardCached, kWideBackwardMaxThreads>);
    }
  } else {
    float* mean_dn_n = workspace + partial_floats;
    rms_norm_row_dot_kernel<T, W, VEC><<<static_cast<unsigned>(rows), kRowDotThreads, 0, stream>>>(
        dy_t, x_t, w_t, rstd, mean_dn_n, cols, dy_stride, x_stride, offset, casting);
    const dim3 grid(static_cast<unsigned>(plan.grid_x), static_cast<unsigned>(plan.grid_y));
    rms_norm_backward_chunk_kernel<T, W, VEC><<<grid, plan.block, 0, stream>>>(
        dy_t, x_t, w_t, rstd, mean_dn_n, static_cast<T*>(dx), dw_partial, rows, cols, dy_stride, x_stride,
        plan.rows_per_group, offset, casting);
  }
  if (has_weight) launch_sum_partial_rows<W>(dw_partial, plan.partial_rows, cols, static_cast<W*>(dweight), stream);
  return last_error();
}

}  // namespace

Status rms_norm_forward(const void* x, const void* weight, void* y, float* rstd, int64_t rows, int64_t cols,
                        int64_t x_stride, float eps, float offset, int casting, int dtype, int weight_dtype,
                        void* stream) {
  if (rows == 0) return nullptr;
  return dispatch_dtype_and_param(dtype, weight_dtype, [&](auto t, auto w) -> Status {
    using T = decltype(t);
    using W = decltype(w);
    const int vec = vector_for<T>(cols, {x_stride}, {x, y, weight});
    if (vec > 1)
      return forward_with<T, W, vector_width<T>()>(x, weight, y, rstd, rows, cols, x_stride, eps, offset, casting,
                                                   as_stream(stream));
    return forward_with<T, W, 1>(x, weight, y, rstd, rows, cols, x_stride, eps, offset, casting, as_stream(stream));
  });
}

Status rms_norm_backward(const void* dy, const void* x, const void* weight, const float* rstd, void* dx, void* dweight,
                         float* workspace, int64_t* workspace_floats, int64_t rows, int64_t cols, int64_t dy_stride,
                         int64_t x_stride, float offset, int casting, int dtype, int weight_dtype, void* stream) {
  if (rows == 0) {
    if (workspace == nullptr) *workspace_floats = 0;
    return nullptr;
  }
  return dispatch_dtype_and_param(dtype, weight_dtype, [&](auto t, auto w) -> Status {
    using T = decltype(t);
    using W = decltype(w);
    const int vec = vector_for<T>(cols, {x_stride, dy_stride}, {dy, x, dx, weight});
    if (vec > 1)
      return backward_with<T, W, vector_width<T>()>(dy, x, weight, rstd, dx, dweight, workspace, workspace_floats,
                                                    rows, cols, dy_stride, x_stride, offset, casting,
                                                    as_stream(stream));
    return backward_with<T, W, 1>(dy, x, weight, rstd, dx, dweight, workspace, workspace_floats, rows, cols,
                                  dy_stride, x_stride, offset, casting, as_stream(stream));
  });
}

}  // namespace liger_cuda
