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
// The backward then only scales that buffer by the incoming gradient (`cross_entropy_scale_rows`): one small launch
// that reads nothing more when the factor is exactly 1 (the common loss.backward()). No host synchronisation anywhere.
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
constexpr int kScaleBlocksPerSm = 8;

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

// The same on a vector, behind one branch taken by the whole block: the loops without a softcap carry none of
// tanh's (or a division's) instructions, which, mixed into each element's arithmetic, cost more than the memory.
template <int VEC>
__device__ __forceinline__ void softcap_vector(float (&z)[VEC], float softcap) {
  if (softcap > 0.f) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) z[j] = softcapped(z[j], softcap);
  }
}

// -- the pieces of the row kernel -----------------------------------------------------------------------------------

// One thread's running statistics over the columns it has seen.
struct RowStats {
  Online online{-INFINITY, 0.f};
  Best best;  // set by the caller: {-INFINITY, vocab}
  float smooth = 0.f;  // sum of z (times the class weight when weighted), for label smoothing
};

// Folds VEC consecutive logits starting at column `col` (raw values in z, softcapped here in place) into `stats`.
// OPTIONS false: no softcap, no label smoothing and no argmax, whatever the arguments say (see rows_kernel).
template <typename WT, int VEC, bool OPTIONS>
__device__ __forceinline__ void add_vector(float (&z)[VEC], int64_t col, const WT* weight, float softcap,
                                           bool smoothing, bool argmax, RowStats& stats) {
  if (OPTIONS) softcap_vector<VEC>(z, softcap);
  float vector_max = -INFINITY;
#pragma unroll
  for (int j = 0; j < VEC; ++j) vector_max = fmaxf(vector_max, z[j]);
  if (OPTIONS && smoothing) {
    if (weight != nullptr) {
      float w[VEC];
      load_floats<VEC>(weight + col, w);
#pragma unroll
      for (int j = 0; j < VEC; ++j) stats.smooth += z[j] * w[j];
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) stats.smooth += z[j];
    }
  }
  if (OPTIONS && argmax && vector_max > stats.best.value) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (z[j] > stats.best.value) stats.best = {z[j], col + j};  // increasing column: a tie keeps the first
    }
  }
  const float m = fmaxf(stats.online.max, vector_max);
  if (m != -INFINITY) {
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < VEC; ++j) s += __expf(z[j] - m);
    stats.online.sum = stats.online.sum * __expf(stats.online.max - m) + s;
    stats.online.max = m;
  }
}

// The block's combined statistics, in every thread, in a fixed order: warps by shuffles, then warp 0's lanes over
// the warps. Every thread of the block must call it.
// `vocab` is the index of no column (what a thread that saw no column holds).
__device__ RowStats combine_block(RowStats stats, int64_t vocab, bool smoothing, bool argmax) {
  __shared__ float scratch_max[32], scratch_sum[32], scratch_best[32];
  __shared__ int64_t scratch_index[32];
  __shared__ float scratch[32];
  for (int round = 0; round < 2; ++round) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const Online other{__shfl_xor_sync(0xffffffffu, stats.online.max, offset),
                         __shfl_xor_sync(0xffffffffu, stats.online.sum, offset)};
      stats.online = combine(stats.online, other);
      if (argmax) {
        const Best other_best{__shfl_xor_sync(0xffffffffu, stats.best.value, offset),
                              __shfl_xor_sync(0xffffffffu, stats.best.index, offset)};
        stats.best = better(stats.best, other_best);
      }
    }
    if (round == 1) break;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (lane == 0) {
      scratch_max[warp] = stats.online.max;
      scratch_sum[warp] = stats.online.sum;
      scratch_best[warp] = stats.best.value;
      scratch_index[warp] = stats.best.index;
    }
    __syncthreads();
    stats.online = lane < warps ? Online{scratch_max[lane], scratch_sum[lane]} : Online{-INFINITY, 0.f};
    stats.best = lane < warps ? Best{scratch_best[lane], scratch_index[lane]} : Best{-INFINITY, vocab};
  }
  if (smoothing) stats.smooth = block_sum(stats.smooth, scratch);
  return stats;
}

// What the gradient sweep needs of a row: grad = exp(z - lse) * p_scale - [col == target] * target_scale
// - class_scale * w (or a uniform class_scale), times the softcap's derivative.
struct GradTerms {
  float lse, p_scale, target_scale, class_scale;
  int64_t target;  // a column in [0, vocab): the target, or 0 when it is ignored or out of range
};

// A row's target, its logit and its class weight: loaded when the row kernel starts, so that the dependent loads'
// latency hides behind the sweep.
struct RowTarget {
  int64_t target, safe_target;  // safe_target: the target when in range, else 0 (never used as an address outside)
  bool counted, in_range;
  float z_target, weight;  // the softcapped target logit, the target's class weight (1 without weights)
};

template <typename T, typename WT>
__device__ RowTarget load_row_target(const CrossEntropyArgs& args, int64_t row, const T* x) {
  RowTarget t;
  t.target = args.target_is_int32 ? load_target(static_cast<const int32_t*>(args.target), row)
                                  : load_target(static_cast<const int64_t*>(args.target), row);
  t.counted = t.target != args.ignore_index;
  t.in_range = t.target >= 0 && t.target < args.vocab;
  t.safe_target = t.in_range ? t.target : 0;
  t.z_target = softcapped(to_float(x[t.safe_target]), args.softcap);
  t.weight = args.weight != nullptr ? to_float(static_cast<const WT*>(args.weight)[t.safe_target]) : 1.f;
  return t;
}

// The row's loss terms from its combined statistics: written (per-row outputs for "none", else the per-row terms
// the reduce kernel sums) by the one thread where `writer`; the gradient's terms returned to every thread.
template <typename T>
__device__ GradTerms finish_row(const CrossEntropyArgs& args, int64_t row, const RowTarget& t,
                                const RowStats& stats, bool writer) {
  const int64_t vocab = args.vocab;
  const float lse = stats.online.max + logf(stats.online.sum);
  const int64_t target = t.target, safe_target = t.safe_target;
  const bool counted = t.counted, in_range = t.in_range;
  const float nll = lse - t.z_target;
  const float target_weight = t.weight;
  const float class_total = args.stats[kClassWeightTotal];
  const float inv_vocab = 1.f / static_cast<float>(vocab);
  const bool smoothing = args.smoothing > 0.f;
  float ce = (1.f - args.smoothing) * target_weight * nll;
  if (smoothing) {
    const float classes = args.weight != nullptr ? class_total : static_cast<float>(vocab);
    ce += args.smoothing * inv_vocab * (lse * classes - stats.smooth);
  }
  const bool has_z = args.z_scale > 0.f;

  if (writer) {
    const float ce_row = counted ? (in_range ? ce : NAN) : 0.f;
    const float z_row = counted ? args.z_scale * lse * lse : 0.f;
    const int64_t predicted = counted ? stats.best.index : -1;
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

  GradTerms terms;
  terms.lse = lse;
  terms.target = safe_target;
  const float ce_scale = (counted && in_range) ? args.stats[kCeCoefficient] : 0.f;
  terms.target_scale = (1.f - args.smoothing) * target_weight * ce_scale;
  terms.p_scale = terms.target_scale;
  if (has_z && counted) terms.p_scale += 2.f * args.z_scale * lse * args.stats[kZCoefficient];
  terms.class_scale = args.smoothing * inv_vocab * ce_scale;
  if (smoothing) {
    terms.p_scale += args.weight != nullptr ? terms.class_scale * class_total : args.smoothing * ce_scale;
  }
  return terms;
}

// d loss / d logits of VEC consecutive columns starting at `col`, from their raw logits z. OPTIONS as add_vector.
template <typename WT, int VEC, bool OPTIONS>
__device__ __forceinline__ void grad_vector(const float (&z)[VEC], int64_t col, const WT* weight, float softcap,
                                            bool smoothing, const GradTerms& terms, float (&out)[VEC]) {
  float w[VEC], zc[VEC];
  if (OPTIONS && smoothing && weight != nullptr) load_floats<VEC>(weight + col, w);
#pragma unroll
  for (int j = 0; j < VEC; ++j) zc[j] = z[j];
  if (OPTIONS) softcap_vector<VEC>(zc, softcap);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    float g = __expf(zc[j] - terms.lse) * terms.p_scale;
    if (col + j == terms.target) g -= terms.target_scale;
    if (OPTIONS && smoothing) g -= weight != nullptr ? terms.class_scale * w[j] : terms.class_scale;
    out[j] = g;
  }
  if (OPTIONS && softcap > 0.f) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float capped = zc[j] / softcap;
      out[j] *= 1.f - capped * capped;
    }
  }
}

// -- the row kernel -------------------------------------------------------------------------------------------------

// One block per row, two sweeps over it from global memory (the second mostly from L2). Any vocabulary.
//
// OPTIONS: softcap, label smoothing or argmax may be asked for. The common call asks for none of them, and its
// instantiation carries none of their code. With that code compiled in (and the softcap's tanh and division mixed
// into every element), the forward at (8192, 128256) bf16 took 2.43 ms on an H200; lean, 1.62 ms (2.6 TB/s of reads
// and writes). Holding each row in the shared memory of a cluster of blocks, so that it crosses memory once, was
// measured too and dropped: 1.66 ms in bf16 (2.66 against 3.02 in fp32), for much more code
// (benchmarks/results/2026-11-29-h200-s8-cuda-cross-entropy.json).
template <typename T, typename WT, int VEC, bool OPTIONS>
__global__ void __launch_bounds__(kRowMaxThreads) rows_kernel(CrossEntropyArgs args) {
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(args.logits) + row * args.logits_stride;
  const WT* weight = static_cast<const WT*>(args.weight);
  const int64_t vectors = args.vocab / VEC;
  const bool smoothing = args.smoothing > 0.f;
  const bool argmax = args.pred != nullptr || args.accuracy != nullptr;

  const RowTarget target = load_row_target<T, WT>(args, row, x);
  RowStats stats;
  stats.best = {-INFINITY, args.vocab};
  for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
    float z[VEC];
    load_floats<VEC>(x + v * VEC, z);
    add_vector<WT, VEC, OPTIONS>(z, v * VEC, weight, args.softcap, smoothing, argmax, stats);
  }
  stats = combine_block(stats, args.vocab, smoothing, argmax);
  const GradTerms terms = finish_row<T>(args, row, target, stats, threadIdx.x == 0);

  if (args.grad == nullptr) return;
  T* grad = static_cast<T*>(args.grad) + row * args.vocab;
  for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
    float z[VEC], out[VEC];
    load_floats<VEC>(x + v * VEC, z);
    grad_vector<WT, VEC, OPTIONS>(z, v * VEC, weight, args.softcap, smoothing, terms, out);
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

// A grid of a few blocks per SM strides over the buffer: when the factor is exactly 1 the whole backward is then
// one small launch, not one block per few thousand elements that each read the factor and leave.
template <typename T>
__global__ void __launch_bounds__(kScaleThreads)
    scale_kernel(T* __restrict__ grad, const float* __restrict__ upstream, int64_t numel, int64_t vocab, bool per_row) {
  constexpr int kVec = vector_width<T>();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * kVec;
  const int64_t start = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  if (!per_row) {
    const float g = upstream[0];  // fp32: an fp16 GradScaler factor of 65536 stays finite
    if (g == 1.f) return;  // the whole grid agrees: nothing to do
    for (int64_t first = start; first < numel; first += stride) {
      if (first + kVec <= numel) {
        float v[kVec];
        load_floats<kVec>(grad + first, v);
#pragma unroll
        for (int j = 0; j < kVec; ++j) v[j] *= g;
        store_floats<kVec>(grad + first, v);
      } else {  // the tail (numel is padded by nothing)
        for (int64_t i = first; i < numel; ++i) grad[i] = from_float<T>(to_float(grad[i]) * g);
      }
    }
    return;
  }
  for (int64_t first = start; first < numel; first += stride) {
    for (int64_t i = first; i < first + kVec && i < numel; ++i) {
      const float g = upstream[i / vocab];
      if (g != 1.f) grad[i] = from_float<T>(to_float(grad[i]) * g);
    }
  }
}

template <typename T, typename WT, int VEC, bool OPTIONS>
void launch_rows(const CrossEntropyArgs& args, cudaStream_t stream) {
  const int64_t vectors = args.vocab / VEC;
  // About 8 vectors per thread, at least 4 warps.
  const int64_t wanted = ceil_div(ceil_div(vectors, 8), 32) * 32;
  const dim3 block(static_cast<unsigned>(std::min<int64_t>(kRowMaxThreads, std::max<int64_t>(128, wanted))));
  rows_kernel<T, WT, VEC, OPTIONS><<<static_cast<unsigned>(args.rows), block, 0, stream>>>(args);
}

template <typename T, typename WT, typename I>
Status forward_with(const CrossEntropyArgs& args, cudaStream_t stream) {
  const bool mean = args.reduction == kMean;
  const bool class_total = args.weight != nullptr && args.smoothing > 0.f;
  stats_kernel<WT, I><<<1, kStatsThreads, 0, stream>>>(static_cast<const I*>(args.target),
                                                       static_cast<const WT*>(args.weight), args.stats, args.rows,
                                                       args.vocab, args.ignore_index, mean, class_total);
  if (args.rows > 0) {
    // 16-byte vectors when every row and buffer allows them, else one element at a time.
    constexpr int kVec = vector_width<T>();
    const bool vectorised = args.vocab % kVec == 0 && args.logits_stride % kVec == 0 && aligned16(args.logits) &&
                            aligned16(args.grad) && aligned16(args.weight);
    const bool options = args.softcap > 0.f || args.smoothing > 0.f || args.pred != nullptr || args.accuracy != nullptr;
    if (vectorised) {
      options ? launch_rows<T, WT, kVec, true>(args, stream) : launch_rows<T, WT, kVec, false>(args, stream);
    } else {
      options ? launch_rows<T, WT, 1, true>(args, stream) : launch_rows<T, WT, 1, false>(args, stream);
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
    const unsigned grid = static_cast<unsigned>(
        std::min<int64_t>(ceil_div(threads_needed, kScaleThreads), kScaleBlocksPerSm * int64_t{sm_count()}));
    scale_kernel<T><<<grid, kScaleThreads, 0, as_stream(stream)>>>(static_cast<T*>(grad),
                                                                    upstream, numel, vocab,
                                                                    per_row);
    return last_error();
  });
}

}  // namespace liger_cuda
