// cross_entropy: the loss and its gradient with respect to the logits, in one pass over each row plus one more for
// the gradient; all math in fp32.
//
// 1. stats (one block): the coefficients "mean" divides by (1 / the class-weight sum of the counted rows for the CE
//    term, 1 / their count for the z-loss), 1 / count for the token accuracy, and the sum of the class weights when
//    label smoothing meets class weights. Divisors that are 0 (every row ignored) count as 1: no NaN.
// 2. rows (one block per row): a sweep over the row keeps, per thread, an online maximum and sum of exponentials
//    (one rescale per vector), the label-smoothing sums and the first index of the maximum; the block combines them
//    in a fixed order. The target's logit is one scalar load. When a gradient is wanted, a second sweep (mostly from
//    L2) writes d loss / d logits, already multiplied by the reduction's coefficient, into a fresh buffer.
// 3. reduce (one block, "mean"/"sum"): the batch loss, z-loss and token accuracy from the per-row terms. For "none"
//    the row kernel writes the per-row outputs itself.
// The backward then only scales that buffer by the incoming gradient (`cross_entropy_scale_rows`), skipping blocks
// whose factors are exactly 1 (the common loss.backward()). No host synchronisation anywhere.
//
// A target outside [0, V) that is not ignore_index is never used as an address: its row's loss is NaN and its CE
// term sends no gradient, as in the reference backend. softcap c maps logits to c * tanh(x / c) first; its
// derivative 1 - (z / c)^2 multiplies the gradient.
#include <cmath>

#include "common.cuh"

namespace liger_cuda {
namespace {

constexpr int kStatsThreads = 1024;
constexpr int kRowMaxThreads = 1024;
constexpr int kScaleThreads = 256;

enum Slot { kCeCoefficient = 0, kZCoefficient = 1, kInverseCount = 2, kClassWeightTotal = 3 };

template <typename I>
__device__ __forceinline__ int64_t load_target(const I* target, int64_t row) {
  return static_cast<int64_t>(target[row]);
}

template <typename WT, typename I>
__global__ void __launch_bounds__(kStatsThreads)
    stats_kernel(const I* __restrict__ target, const WT* __restrict__ weight, float* __restrict__ stats,
                 int64_t rows, int64_t vocab, int64_t ignore_index, bool mean, bool class_total) {
  __shared__ float scratch[32];
  float count = 0.f, weight_sum = 0.f;
  for (int64_t row = threadIdx.x; row < rows; row += blockDim.x) {
    const int64_t t = load_target(target, row);
    if (t == ignore_index) continue;
    count += 1.f;
    if (weight != nullptr) {
      const int64_t safe = (t >= 0 && t < vocab) ? t : 0;  // an out-of-range class weighs like class 0
      weight_sum += to_float(weight[safe]);
    }
  }
  count = block_sum(count, scratch);
  weight_sum = weight != nullptr ? block_sum(weight_sum, scratch) : count;
  float total = 0.f;
  if (class_total) {
    for (int64_t c = threadIdx.x; c < vocab; c += blockDim.x) total += to_float(weight[c]);
    total = block_sum(total, scratch);
  }
  if (threadIdx.x == 0) {
    const float inverse_count = 1.f / (count > 0.f ? count : 1.f);
    stats[kCeCoefficient] = mean ? 1.f / (weight_sum > 0.f ? weight_sum : 1.f) : 1.f;
    stats[kZCoefficient] = mean ? inverse_count : 1.f;
    stats[kInverseCount] = inverse_count;
    stats[kClassWeightTotal] = total;
  }
}

struct Online {
  float max, sum;  // running maximum and sum of exp(z - max)
};

__device__ __forceinline__ Online combine(Online a, Online b) {
  const float m = fmaxf(a.max, b.max);
  if (m == -INFINITY) return {m, 0.f};
  return {m, a.sum * __expf(a.max - m) + b.sum * __expf(b.max - m)};
}

struct Best {
  float value;
  int64_t index;
};

// The larger value; the smaller index on a tie (torch.argmax's first maximum).
__device__ __forceinline__ Best better(Best a, Best b) {
  if (b.value > a.value || (b.value == a.value && b.index < a.index)) return b;
  return a;
}

__device__ __forceinline__ float softcapped(float x, float softcap) {
  return softcap > 0.f ? softcap * tanhf(x / softcap) : x;
}

template <typename T, typename WT, typename I, int VEC>
__global__ void __launch_bounds__(kRowMaxThreads) rows_kernel(CrossEntropyArgs args) {
  __shared__ float scratch_max[32], scratch_sum[32], scratch_best[32];
  __shared__ int64_t scratch_index[32];
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(args.logits) + row * args.logits_stride;
  const WT* weight = static_cast<const WT*>(args.weight);
  const int64_t vocab = args.vocab;
  const int64_t vectors = vocab / VEC;
  const float softcap = args.softcap;
  const bool smoothing = args.smoothing > 0.f;
  const bool argmax = args.pred != nullptr || args.accuracy != nullptr;

  // Sweep 1: online max / sum of exp, smoothing sum, argmax.
  Online online{-INFINITY, 0.f};
  Best best{-INFINITY, vocab};
  float smooth = 0.f;
  for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
    float z[VEC];
    load_floats<VEC>(x + v * VEC, z);
    float vector_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      z[j] = softcapped(z[j], softcap);
      vector_max = fmaxf(vector_max, z[j]);
    }
    if (smoothing) {
      if (weight != nullptr) {
        float w[VEC];
        load_floats<VEC>(weight + v * VEC, w);
#pragma unroll
        for (int j = 0; j < VEC; ++j) smooth += z[j] * w[j];
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) smooth += z[j];
      }
    }
    if (argmax && vector_max > best.value) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        if (z[j] > best.value) best = {z[j], v * VEC + j};  // increasing index: a tie keeps the first
      }
    }
    const float m = fmaxf(online.max, vector_max);
    if (m != -INFINITY) {
      float s = 0.f;
#pragma unroll
      for (int j = 0; j < VEC; ++j) s += __expf(z[j] - m);
      online.sum = online.sum * __expf(online.max - m) + s;
      online.max = m;
    }
  }

  // Combine over the block, in a fixed order: warps by shuffles, then warp 0's lanes over the warps.
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const Online other{__shfl_xor_sync(0xffffffffu, online.max, offset),
                       __shfl_xor_sync(0xffffffffu, online.sum, offset)};
    online = combine(online, other);
    if (argmax) {
      const Best other_best{__shfl_xor_sync(0xffffffffu, best.value, offset),
                            __shfl_xor_sync(0xffffffffu, best.index, offset)};
      best = better(best, other_best);
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if (lane == 0) {
    scratch_max[warp] = online.max;
    scratch_sum[warp] = online.sum;
    scratch_best[warp] = best.value;
    scratch_index[warp] = best.index;
  }
  __syncthreads();
  online = lane < warps ? Online{scratch_max[lane], scratch_sum[lane]} : Online{-INFINITY, 0.f};
  best = lane < warps ? Best{scratch_best[lane], scratch_index[lane]} : Best{-INFINITY, vocab};
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const Online other{__shfl_xor_sync(0xffffffffu, online.max, offset),
                       __shfl_xor_sync(0xffffffffu, online.sum, offset)};
    online = combine(online, other);
    if (argmax) {
      const Best other_best{__shfl_xor_sync(0xffffffffu, best.value, offset),
                            __shfl_xor_sync(0xffffffffu, best.index, offset)};
      best = better(best, other_best);
    }
  }
  if (smoothing) smooth = block_sum(smooth, scratch);
  const float lse = online.max + logf(online.sum);

  const int64_t target = args.target_is_int32 ? load_target(static_cast<const int32_t*>(args.target), row)
                                              : load_target(static_cast<const int64_t*>(args.target), row);
  const bool counted = target != args.ignore_index;
  const bool in_range = target >= 0 && target < vocab;
  const int64_t safe_target = in_range ? target : 0;
  const float z_target = softcapped(to_float(x[safe_target]), softcap);
  const float nll = lse - z_target;
  const float target_weight = weight != nullptr ? to_float(weight[safe_target]) : 1.f;
  const float class_total = args.stats[kClassWeightTotal];
  const float inv_vocab = 1.f / static_cast<float>(vocab);
  float ce = (1.f - args.smoothing) * target_weight * nll;
  if (smoothing) {
    const float classes = weight != nullptr ? class_total : static_cast<float>(vocab);
    ce += args.smoothing * inv_vocab * (lse * classes - smooth);
  }
  const bool has_z = args.z_scale > 0.f;

  if (threadIdx.x == 0) {
    const float ce_row = counted ? (in_range ? ce : NAN) : 0.f;
    const float z_row = counted ? args.z_scale * lse * lse : 0.f;
    const int64_t predicted = counted ? best.index : -1;
    if (args.reduction == kReduceNone) {
      static_cast<T*>(args.loss)[row] = from_float<T>(has_z ? ce_row + z_row : ce_row);
      if (args.z_loss != nullptr) static_cast<T*>(args.z_loss)[row] = from_float<T>(z_row);
      if (args.accuracy != nullptr) args.accuracy[row] = (counted && predicted == target) ? 1.f : 0.f;
    } else {
      args.ce_rows[row] = ce_row;
      args.z_rows[row] = z_row;
    }
    if (args.pred != nullptr) args.pred[row] = predicted;
  }

  if (args.grad == nullptr) return;
  // Sweep 2: grad = p * p_scale - onehot(target) * target_scale - class_scale * w (or a uniform term), times the
  // softcap's derivative.
  const float ce_scale = (counted && in_range) ? args.stats[kCeCoefficient] : 0.f;
  const float target_scale = (1.f - args.smoothing) * target_weight * ce_scale;
  float p_scale = target_scale;
  if (has_z && counted) p_scale += 2.f * args.z_scale * lse * args.stats[kZCoefficient];
  const float class_scale = args.smoothing * inv_vocab * ce_scale;
  if (smoothing) p_scale += weight != nullptr ? class_scale * class_total : args.smoothing * ce_scale;
  T* grad = static_cast<T*>(args.grad) + row * vocab;
  for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
    float z[VEC], w[VEC], out[VEC];
    load_floats<VEC>(x + v * VEC, z);
    if (smoothing && weight != nullptr) load_floats<VEC>(weight + v * VEC, w);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float zc = softcapped(z[j], softcap);
      float g = __expf(zc - lse) * p_scale;
      if (v * VEC + j == safe_target) g -= target_scale;
      if (smoothing) g -= weight != nullptr ? class_scale * w[j] : class_scale;
      if (softcap > 0.f) {
        const float capped = zc / softcap;
        g *= 1.f - capped * capped;
      }
      out[j] = g;
    }
    store_floats<VEC>(grad + v * VEC, out);
  }
}

template <typename T, typename I>
__global__ void __launch_bounds__(kStatsThreads) reduce_kernel(CrossEntropyArgs args) {
  __shared__ float scratch[32];
  float ce = 0.f, z = 0.f, correct = 0.f;
  const I* target = static_cast<const I*>(args.target);
  for (int64_t row = threadIdx.x; row < args.rows; row += blockDim.x) {
    ce += args.ce_rows[row];
    z += args.z_rows[row];
    if (args.accuracy != nullptr) {
      const int64_t t = load_target(target, row);
      correct += (t != args.ignore_index && args.pred[row] == t) ? 1.f : 0.f;
    }
  }
  ce = block_sum(ce, scratch);
  z = block_sum(z, scratch);
  if (args.accuracy != nullptr) correct = block_sum(correct, scratch);
  if (threadIdx.x == 0) {
    const float z_loss = z * args.stats[kZCoefficient];
    float loss = ce * args.stats[kCeCoefficient];
    if (args.z_scale > 0.f) loss += z_loss;
    *static_cast<T*>(args.loss) = from_float<T>(loss);
    if (args.z_loss != nullptr) *static_cast<T*>(args.z_loss) = from_float<T>(z_loss);
    if (args.accuracy != nullptr) *args.accuracy = correct * args.stats[kInverseCount];
  }
}

template <typename T>
__global__ void __launch_bounds__(kScaleThreads)
    scale_kernel(T* __restrict__ grad, const float* __restrict__ upstream, int64_t numel, int64_t vocab, bool per_row) {
  constexpr int kVec = vector_width<T>();  // numel is padded by nothing: the tail is handled element by element
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  if (!per_row) {
    const float g = upstream[0];  // fp32: an fp16 GradScaler factor of 65536 stays finite
    if (g == 1.f) return;  // the whole grid agrees: nothing to do
    if (first + kVec <= numel) {
      float v[kVec];
      load_floats<kVec>(grad + first, v);
#pragma unroll
      for (int j = 0; j < kVec; ++j) v[j] *= g;
      store_floats<kVec>(grad + first, v);
    } else {
      for (int64_t i = first; i < numel; ++i) grad[i] = from_float<T>(to_float(grad[i]) * g);
    }
    return;
  }
  for (int64_t i = first; i < first + kVec && i < numel; ++i) {
    const float g = upstream[i / vocab];
    if (g != 1.f) grad[i] = from_float<T>(to_float(grad[i]) * g);
  }
}

template <typename T, typename WT, typename I>
Status forward_with(const CrossEntropyArgs& args, cudaStream_t stream) {
  const bool mean = args.reduction == kMean;
  const bool class_total = args.weight != nullptr && args.smoothing > 0.f;
  stats_kernel<WT, I><<<1, kStatsThreads, 0, stream>>>(static_cast<const I*>(args.target),
                                                       static_cast<const WT*>(args.weight), args.stats, args.rows,
                                                       args.vocab, args.ignore_index, mean, class_total);
  if (args.rows > 0) {
    constexpr int kVec = vector_width<T>();
    const bool vectorise = args.vocab % kVec == 0 && args.logits_stride % kVec == 0 && aligned16(args.logits) &&
                           aligned16(args.grad) && aligned16(args.weight);
    const int64_t vectors = vectorise ? args.vocab / kVec : args.vocab;
    // About 8 vectors per thread, at least 4 warps.
    const int64_t wanted = ceil_div(ceil_div(vectors, 8), 32) * 32;
    const dim3 block(static_cast<unsigned>(std::min<int64_t>(kRowMaxThreads, std::max<int64_t>(128, wanted))));
    const dim3 grid(static_cast<unsigned>(args.rows));
    if (vectorise) {
      rows_kernel<T, WT, I, kVec><<<grid, block, 0, stream>>>(args);
    } else {
      rows_kernel<T, WT, I, 1><<<grid, block, 0, stream>>>(args);
    }
  }
  if (args.reduction != kReduceNone) reduce_kernel<T, I><<<1, kStatsThreads, 0, stream>>>(args);
  return last_error();
}

}  // namespace

Status cross_entropy_forward(const CrossEntropyArgs& args, void* stream) {
  return dispatch_dtype_and_param(args.dtype, args.weight_dtype, [&](auto t, auto w) -> Status {
    using T = decltype(t);
    using WT = decltype(w);
    if (args.target_is_int32) return forward_with<T, WT, int32_t>(args, as_stream(stream));
    return forward_with<T, WT, int64_t>(args, as_stream(stream));
  });
}

Status cross_entropy_scale_rows(void* grad, const float* upstream, int64_t numel, int64_t vocab, bool per_row,
                                int dtype, void* stream) {
  if (numel == 0) return nullptr;
  if (!aligned16(grad)) return "liger_cuda: the cross_entropy gradient buffer is not 16-byte aligned";
  return dispatch_dtype(dtype, [&](auto t) -> Status {
    using T = decltype(t);
    const int64_t threads_needed = ceil_div(numel, vector_width<T>());
    const unsigned grid = static_cast<unsigned>(ceil_div(threads_needed, kScaleThreads));
    scale_kernel<T><<<grid, kScaleThreads, 0, as_stream(stream)>>>(static_cast<T*>(grad),
                                                                    upstream, numel, vocab,
                                                                    per_row);
    return last_error();
  });
}

}  // namespace liger_cuda
