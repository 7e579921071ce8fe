// layer_norm: y = (x - mean) * rstd * w + b over each row, forward and backward, fp32 math.
//
// Rows are laid over threads as norm_rows.cuh describes (a warp or a block per row, up to kCached vectors per thread in
// registers). A cached
// row's variance is a true two-pass one; a longer row uses sums shifted by its first element, which keeps the
// cancellation of sum(x^2) - sum(x)^2 harmless for rows whose mean is large next to their spread.
//
// Backward, with n = (x - mean) * rstd and dn = dy * w: dx = rstd * (dn - mean(dn) - n * mean(dn * n)),
// dw = sum over rows of dy * n, db = sum over rows of dy. Fused and chunked paths and the deterministic dw/db
// partial rows are as in rms_norm.cu; the fused backward's layout is norm_rows.cuh's.
#include "norm_rows.cuh"

namespace liger_cuda {
namespace {

using namespace norm_rows;

constexpr int kForwardMaxThreads = 1024;
constexpr int kRowThreads = 512;
constexpr int kChunkThreads = 256;

template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(kForwardMaxThreads)
    layer_norm_forward_kernel(const T* __restrict__ x, const W* __restrict__ weight, const W* __restrict__ bias,
                              T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                              int64_t rows, int64_t cols, int64_t x_stride, float eps) {
  __shared__ float scratch[32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < rows;
  const int tid = threadIdx.x, threads = blockDim.x;
  const int64_t vectors = cols / VEC;
  const T* x_row = x + (valid ? row : 0) * x_stride;
  T* y_row = y + (valid ? row : 0) * cols;
  const bool cached = vectors <= static_cast<int64_t>(threads) * kCached;
  const float inv_cols = 1.f / static_cast<float>(cols);

  Pack<T, VEC> xs[kCached];
  float mean, var;
  if (cached) {
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kCached; ++i) {
      const int64_t v = static_cast<int64_t>(i) * threads + tid;
      if (valid && v < vectors) {
        xs[i] = load_pack<VEC>(x_row + v * VEC);
#pragma unroll
        for (int j = 0; j < VEC; ++j) sum += to_float(xs[i].v[j]);
      }
    }
    mean = row_sum(sum, scratch) * inv_cols;
    float squares = 0.f;
#pragma unroll
    for (int i = 0; i < kCached; ++i) {
      const int64_t v = static_cast<int64_t>(i) * threads + tid;
      if (valid && v < vectors) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = to_float(xs[i].v[j]) - mean;
          squares += d * d;
        }
      }
    }
    var = row_sum(squares, scratch) * inv_cols;
  } else {
    const float shift = valid ? to_float(x_row[0]) : 0.f;
    float sum = 0.f, squares = 0.f;
    if (valid) {
      for (int64_t v = tid; v < vectors; v += threads) {
        float f[VEC];
        load_floats<VEC>(x_row + v * VEC, f);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = f[j] - shift;
          sum += d;
          squares += d * d;
        }
      }
    }
    const float shifted_mean = row_sum(sum, scratch) * inv_cols;
    var = fmaxf(row_sum(squares, scratch) * inv_cols - shifted_mean * shifted_mean, 0.f);
    mean = shift + shifted_mean;
  }
  const float rstd = rsqrtf(var + eps);
  if (!valid) return;  // nothing collective follows
  if (tid == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
  auto write = [&](int64_t v, const float(&f)[VEC]) {
    float w[VEC], b[VEC], out[VEC];
    load_floats<VEC>(weight + v * VEC, w);
    if (bias != nullptr) {
      load_floats<VEC>(bias + v * VEC, b);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) b[j] = 0.f;
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = (f[j] - mean) * rstd * w[j] + b[j];
    store_floats<VEC>(y_row + v * VEC, out);
  };
  if (cached) {
#pragma unroll
    for (int i = 0; i < kCached; ++i) {
      const int64_t v = static_cast<int64_t>(i) * threads + tid;
      if (v < vectors) {
        float f[VEC];
        unpack(xs[i], f);
        write(v, f);
      }
    }
  } else {
    for (int64_t v = tid; v < vectors; v += threads) {
      float f[VEC];
      load_floats<VEC>(x_row + v * VEC, f);
      write(v, f);
    }
  }
}

// Fused backward: row group g walks rows [g * rows_per_group, ...), CACHED vectors of each row per thread; its dw
// (and db) partial sums go to row g of dw_partial (and db_partial, nullptr without a bias).
template <typename T, typename W, int VEC, int CACHED>
__global__ void __launch_bounds__(kBackwardMaxThreads)
    layer_norm_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, const W* __restrict__ weight,
                               const float* __restrict__ mean, const float* __restrict__ rstd, T* __restrict__ dx,
                               float* __restrict__ dw_partial, float* __restrict__ db_partial, int64_t rows,
                               int64_t cols, int64_t dy_stride, int64_t x_stride, int64_t rows_per_group) {
  __shared__ float2 scratch[32];
  const int tid = threadIdx.x, threads = blockDim.x;
  const int64_t vectors = cols / VEC;
  const int64_t group = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t first = group * rows_per_group;
  const int64_t last = first + rows_per_group < rows ? first + rows_per_group : rows;
  const float inv_cols = 1.f / static_cast<float>(cols);
  float acc_w[CACHED][VEC], acc_b[CACHED][VEC];
#pragma unroll
  for (int i = 0; i < CACHED; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc_w[i][j] = acc_b[i][j] = 0.f;

  for (int64_t row = first; row < last; ++row) {
    const float mu = mean[row], r = rstd[row];
    Pack<T, VEC> xs[CACHED], dys[CACHED];
    float sum_dn = 0.f, sum_dn_n = 0.f;
#pragma unroll
    for (int i = 0; i < CACHED; ++i) {
      const int64_t v = static_cast<int64_t>(i) * threads + tid;
      if (v < vectors) {
        xs[i] = load_pack<VEC>(x + row * x_stride + v * VEC);
        dys[i] = load_pack<VEC>(dy + row * dy_stride + v * VEC);
        float w[VEC];
        load_floats<VEC>(weight + v * VEC, w);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float dn = to_float(dys[i].v[j]) * w[j];
          sum_dn += dn;
          sum_dn_n += dn * (to_float(xs[i].v[j]) - mu) * r;
        }
      }
    }
    const float2 sums = row_sum2(sum_dn, sum_dn_n, scratch);
    const float mean_dn = sums.x * inv_cols, mean_dn_n = sums.y * inv_cols;
#pragma unroll
    for (int i = 0; i < CACHED; ++i) {
      const int64_t v = static_cast<int64_t>(i) * threads + tid;
      if (v < vectors) {
        float w[VEC], out[VEC];
        load_floats<VEC>(weight + v * VEC, w);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float g = to_float(dys[i].v[j]);
          const float n = (to_float(xs[i].v[j]) - mu) * r;
          out[j] = r * (g * w[j] - mean_dn - n * mean_dn_n);
          acc_w[i][j] += g * n;
          acc_b[i][j] += g;
        }
        store_floats<VEC>(dx + row * cols + v * VEC, out);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < CACHED; ++i) {
    const int64_t v = static_cast<int64_t>(i) * threads + tid;
    if (v < vectors) {
      store_floats<VEC>(dw_partial + group * cols + v * VEC, acc_w[i]);
      if (db_partial != nullptr) store_floats<VEC>(db_partial + group * cols + v * VEC, acc_b[i]);
    }
  }
}

// Chunked backward, first pass: row_means[2 * row] = mean(dn), row_means[2 * row + 1] = mean(dn * n).
template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(kRowThreads)
    layer_norm_row_means_kernel(const T* __restrict__ dy, const T* __restrict__ x, const W* __restrict__ weight,
                                const float* __restrict__ mean, const float* __restrict__ rstd,
                                float* __restrict__ row_means, int64_t cols, int64_t dy_stride, int64_t x_stride) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int64_t vectors = cols / VEC;
  const float mu = mean[row], r = rstd[row];
  float sum_dn = 0.f, sum_dn_n = 0.f;
  for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
    float xf[VEC], g[VEC], w[VEC];
    load_floats<VEC>(x + row * x_stride + v * VEC, xf);
    load_floats<VEC>(dy + row * dy_stride + v * VEC, g);
    load_floats<VEC>(weight + v * VEC, w);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float dn = g[j] * w[j];
      sum_dn += dn;
      sum_dn_n += dn * (xf[j] - mu) * r;
    }
  }
  sum_dn = block_sum(sum_dn, scratch);
  sum_dn_n = block_sum(sum_dn_n, scratch);
  if (threadIdx.x == 0) {
    row_means[2 * row] = sum_dn / static_cast<float>(cols);
    row_means[2 * row + 1] = sum_dn_n / static_cast<float>(cols);
  }
}

// Chunked backward, second pass: block (i, j) takes rows [i * rows_per_block, ...) of column chunk j.
template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(kChunkThreads)
    layer_norm_backward_chunk_kernel(const T* __restrict__ dy, const T* __restrict__ x, const W* __restrict__ weight,
                                     const float* __restrict__ mean, const float* __restrict__ rstd,
                                     const float* __restrict__ row_means, T* __restrict__ dx,
                                     float* __restrict__ dw_partial, float* __restrict__ db_partial, int64_t rows,
                                     int64_t cols, int64_t dy_stride, int64_t x_stride, int64_t rows_per_block) {
  const int64_t vectors = cols / VEC;
  const int64_t chunk_first = static_cast<int64_t>(blockIdx.y) * kChunkThreads * kCached;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t last = first + rows_per_block < rows ? first + rows_per_block : rows;
  float w[kCached][VEC], acc_w[kCached][VEC], acc_b[kCached][VEC];
#pragma unroll
  for (int i = 0; i < kCached; ++i) {
    const int64_t v = chunk_first + static_cast<int64_t>(i) * kChunkThreads + threadIdx.x;
    if (v < vectors) load_floats<VEC>(weight + v * VEC, w[i]);
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc_w[i][j] = acc_b[i][j] = 0.f;
  }
  for (int64_t row = first; row < last; ++row) {
    const float mu = mean[row], r = rstd[row];
    const float mean_dn = row_means[2 * row], mean_dn_n = row_means[2 * row + 1];
#pragma unroll
    for (int i = 0; i < kCached; ++i) {
      const int64_t v = chunk_first + static_cast<int64_t>(i) * kChunkThreads + threadIdx.x;
      if (v < vectors) {
        float xf[VEC], g[VEC], out[VEC];
        load_floats<VEC>(x + row * x_stride + v * VEC, xf);
        load_floats<VEC>(dy + row * dy_stride + v * VEC, g);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float n = (xf[j] - mu) * r;
          out[j] = r * (g[j] * w[i][j] - mean_dn - n * mean_dn_n);
          acc_w[i][j] += g[j] * n;
          acc_b[i][j] += g[j];
        }
        store_floats<VEC>(dx + row * cols + v * VEC, out);
      }
    }
  }
  const int64_t partial_row = blockIdx.x;
#pragma unroll
  for (int i = 0; i < kCached; ++i) {
    const int64_t v = chunk_first + static_cast<int64_t>(i) * kChunkThreads + threadIdx.x;
    if (v < vectors) {
      store_floats<VEC>(dw_partial + partial_row * cols + v * VEC, acc_w[i]);
      if (db_partial != nullptr) store_floats<VEC>(db_partial + partial_row * cols + v * VEC, acc_b[i]);
    }
  }
}

// -- launchers ------------------------------------------------------------------------------------------------------

template <typename T, typename W, int VEC>
Status forward_with(const void* x, const void* weight, const void* bias, void* y, float* mean, float* rstd,
                    int64_t rows, int64_t cols, int64_t x_stride, float eps, cudaStream_t stream) {
  const dim3 block = row_block(cols / VEC, kForwardMaxThreads);
  const int64_t grid = ceil_div(rows, block.y);
  layer_norm_forward_kernel<T, W, VEC><<<static_cast<unsigned>(grid), block, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const W*>(weight), static_cast<const W*>(bias), static_cast<T*>(y), mean,
      rstd, rows, cols, x_stride, eps);
  return last_error();
}

struct BackwardPlan {
  bool fused;
  dim3 block;
  int64_t grid_x, grid_y, rows_per_group, partial_rows;
};

inline BackwardPlan plan_backward(int64_t rows, int64_t vectors, int cached, int max_threads) {
  BackwardPlan plan{};
  if (vectors <= static_cast<int64_t>(max_threads) * cached) {
    plan.fused = true;
    plan.block = row_block(vectors, max_threads, cached);
    const RowGroups groups = row_groups(rows, plan.block, kBackwardMinRows);
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
Status backward_with(const void* dy, const void* x, const void* weight, const float* mean, const float* rstd, void* dx,
                     void* dweight, void* dbias, float* workspace, int64_t* workspace_floats, int64_t rows,
                     int64_t cols, int64_t dy_stride, int64_t x_stride, cudaStream_t stream) {
  constexpr int kFusedCached = backward_cached<VEC>();
  const BackwardPlan plan = plan_backward_for<VEC>(rows, cols);
  const bool has_bias = dbias != nullptr;
  const int64_t partial_floats = plan.partial_rows * cols;
  if (workspace == nullptr) {
    *workspace_floats = partial_floats * (has_bias ? 2 : 1) + (plan.fused ? 0 : 2 * rows);
    return nullptr;
  }
  float* dw_partial = workspace;
  float* db_partial = has_bias ? workspace + partial_floats : nullptr;
  const T* dy_t = static_cast<const T*>(dy);
  const T* x_t = static_cast<const T*>(x);
  const W* w_t = static_cast<const W*>(weight);
  if (plan.fused) {
    layer_norm_backward_kernel<T, W, VEC, kFusedCached>
        <<<static_cast<unsigned>(plan.grid_x), plan.block, 0, stream>>>(dy_t, x_t, w_t, mean, rstd,
                                                                         static_cast<T*>(dx), dw_partial, db_partial,
                                                                         rows, cols, dy_stride, x_stride,
                                                                         plan.rows_per_group);
  } else {
    float* row_means = workspace + partial_floats * (has_bias ? 2 : 1);
    layer_norm_row_means_kernel<T, W, VEC><<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(
        dy_t, x_t, w_t, mean, rstd, row_means, cols, dy_stride, x_stride);
    const dim3 grid(static_cast<unsigned>(plan.grid_x), static_cast<unsigned>(plan.grid_y));
    layer_norm_backward_chunk_kernel<T, W, VEC><<<grid, plan.block, 0, stream>>>(
        dy_t, x_t, w_t, mean, rstd, row_means, static_cast<T*>(dx), dw_partial, db_partial, rows, cols, dy_stride,
        x_stride, plan.rows_per_group);
  }
  // db_partial follows dw_partial in the workspace: one launch sums both.
  launch_sum_partial_rows<W>(dw_partial, plan.partial_rows, cols, static_cast<W*>(dweight), stream,
                             has_bias ? static_cast<W*>(dbias) : nullptr);
  return last_error();
}

}  // namespace

Status layer_norm_forward(const void* x, const void* weight, const void* bias, void* y, float* mean, float* rstd,
                          int64_t rows, int64_t cols, int64_t x_stride, float eps, int dtype, int weight_dtype,
                          void* stream) {
  if (rows == 0) return nullptr;
  return dispatch_dtype_and_param(dtype, weight_dtype, [&](auto t, auto w) -> Status {
    using T = decltype(t);
    using W = decltype(w);
    if (vector_for<T>(cols, {x_stride}, {x, y, weight, bias}) > 1)
      return forward_with<T, W, vector_width<T>()>(x, weight, bias, y, mean, rstd, rows, cols, x_stride, eps,
                                                   as_stream(stream));
    return forward_with<T, W, 1>(x, weight, bias, y, mean, rstd, rows, cols, x_stride, eps, as_stream(stream));
  });
}

Status layer_norm_backward(const void* dy, const void* x, const void* weight, const float* mean, const float* rstd,
                           void* dx, void* dweight, void* dbias, float* workspace, int64_t* workspace_floats,
                           int64_t rows, int64_t cols, int64_t dy_stride, int64_t x_stride, int dtype,
                           int weight_dtype, void* stream) {
  if (rows == 0) {
    if (workspace == nullptr) *workspace_floats = 0;
    return nullptr;
  }
  return dispatch_dtype_and_param(dtype, weight_dtype, [&](auto t, auto w) -> Status {
    using T = decltype(t);
    using W = decltype(w);
    if (vector_for<T>(cols, {x_stride, dy_stride}, {dy, x, dx, weight}) > 1)
      return backward_with<T, W, vector_width<T>()>(dy, x, weight, mean, rstd, dx, dweight, dbias, workspace,
                                                    workspace_floats, rows, cols, dy_stride, x_stride,
                                                    as_stream(stream));
    return backward_with<T, W, 1>(dy, x, weight, mean, rstd, dx, dweight, dbias, workspace, workspace_floats, rows,
                                  cols, dy_stride, x_stride, as_stream(stream));
  });
}

}  // namespace liger_cuda
