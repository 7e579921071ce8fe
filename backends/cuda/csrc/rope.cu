// rope: Hugging Face's apply_rotary_pos_emb with rotate_half, forward and backward, q then k.
//
// With R = 2 * half rotated features, x1 = x[:half], x2 = x[half:R] and cos/sin split the same way:
//   forward   y1 = x1 * c1 - x2 * s1,   y2 = x2 * c2 + x1 * s2
//   backward  y1 = x1 * c1 + x2 * s2,   y2 = x2 * c2 - x1 * s1   (the exact transpose, for any cos/sin)
// and features [R, D) pass through bit for bit. Math in fp32, outputs in q's dtype, written to fresh buffers.
//
// Layout: q, k and the outputs are addressed as (B, T, H, D) with element strides (b, t, h) and unit feature stride,
// so Hugging Face's transposed views are read and written where they lie. One launch per tensor, q then k (GQA:
// any two head counts). A block of 128 threads takes tz tokens; in it, threads along x own VEC-wide column vectors of
// the half and threads along y walk the heads, so neighbouring threads touch neighbouring heads.
//
// Measured on an H200 (GPU time of one forward, bf16 q (4, 32, 2048, 128) and k (4, 8, 2048, 128) as Hugging Face's
// transposed views; benchmarks/results/2026-11-29-h200-s9-cuda-rope.json): 50.6 us, 81 % of a copy of the same bytes
// and level with the Triton kernel. The first version (q and k in one launch, each thread choosing its tensor per
// head, blocks of 256 threads) took 91 us. Issuing the loads of 2-8 heads per thread before any store was tried too
// and was slower, 55.9-60.8 us: those builds need 96-165 registers a thread, so fewer threads fit on an SM.
#include "common.cuh"

namespace liger_cuda {
namespace {

constexpr int kThreads = 128;

template <typename T, typename C, int VEC>
__global__ void __launch_bounds__(kThreads)
    rope_kernel(RopeTensor x, const C* __restrict__ cos, const C* __restrict__ sin, int64_t cos_batch_stride,
                int64_t tokens, int64_t seq, int64_t head_dim, int64_t half, bool backward) {
  const int64_t token = static_cast<int64_t>(blockIdx.x) * blockDim.z + threadIdx.z;
  if (token >= tokens) return;  // no barrier in this kernel
  const int64_t b = token / seq, t = token - b * seq;
  const C* cos_row = cos + b * cos_batch_stride + t * 2 * half;
  const C* sin_row = sin + b * cos_batch_stride + t * 2 * half;
  const T* in_token = static_cast<const T*>(x.in) + b * x.in_stride_b + t * x.in_stride_t;
  T* out_token = static_cast<T*>(x.out) + b * x.out_stride_b + t * x.out_stride_t;

  for (int64_t h = threadIdx.y; h < x.heads; h += blockDim.y) {
    for (int64_t col = threadIdx.x * VEC; col < half; col += blockDim.x * VEC) {
      const T* in = in_token + h * x.in_stride_h + col;
      const Pack<T, VEC> x1 = load_pack<VEC>(in), x2 = load_pack<VEC>(in + half);
      const Pack<C, VEC> cos1 = load_pack<VEC>(cos_row + col), cos2 = load_pack<VEC>(cos_row + half + col);
      const Pack<C, VEC> sin1 = load_pack<VEC>(sin_row + col), sin2 = load_pack<VEC>(sin_row + half + col);
      float a1[VEC], a2[VEC], c1[VEC], c2[VEC], s1[VEC], s2[VEC], y1[VEC], y2[VEC];
      unpack(x1, a1);
      unpack(x2, a2);
      unpack(cos1, c1);
      unpack(cos2, c2);
      unpack(sin1, s1);
      unpack(sin2, s2);
      if (backward) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          y1[j] = a1[j] * c1[j] + a2[j] * s2[j];
          y2[j] = a2[j] * c2[j] - a1[j] * s1[j];
        }
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          y1[j] = a1[j] * c1[j] - a2[j] * s1[j];
          y2[j] = a2[j] * c2[j] + a1[j] * s2[j];
        }
      }
      T* out = out_token + h * x.out_stride_h + col;
      store_floats<VEC>(out, y1);
      store_floats<VEC>(out + half, y2);
    }
  }

  // Partial rotary: features [R, D) are copied, by the same threads (y over heads, x over features).
#pragma unroll 1
  for (int64_t h = threadIdx.y; h < x.heads && 2 * half < head_dim; h += blockDim.y) {
#pragma unroll 1
    for (int64_t d = 2 * half + threadIdx.x; d < head_dim; d += blockDim.x)
      out_token[h * x.out_stride_h + d] = in_token[h * x.in_stride_h + d];
  }
}

template <typename T, typename C, int VEC>
Status rope_with(const RopeTensor& x, const void* cos, const void* sin, int64_t cos_batch_stride, int64_t batch,
                 int64_t seq, int64_t head_dim, int64_t half, bool backward, cudaStream_t stream) {
  const int64_t tokens = batch * seq;
  if (x.heads == 0) return nullptr;
  const int64_t column_vectors = std::max<int64_t>(half / VEC, 1);
  const int64_t tx = std::min<int64_t>(column_vectors, kThreads);
  // One head per y-thread, as many as fit beside tx (more heads loop).
  const int64_t ty = std::max<int64_t>(std::min<int64_t>(x.heads, kThreads / tx), 1);
  // Tokens per block fill it up; blockDim.z is at most 64.
  const int64_t tz = std::max<int64_t>(std::min<int64_t>({kThreads / (tx * ty), tokens, int64_t{64}}), 1);
  const dim3 block(static_cast<unsigned>(tx), static_cast<unsigned>(ty), static_cast<unsigned>(tz));
  const int64_t grid = ceil_div(tokens, tz);
  rope_kernel<T, C, VEC><<<static_cast<unsigned>(grid), block, 0, stream>>>(
      x, static_cast<const C*>(cos), static_cast<const C*>(sin), cos_batch_stride, tokens, seq, head_dim, half,
      backward);
  return last_error();
}

template <typename T>
bool can_vectorise(const RopeTensor& q, const RopeTensor& k, const void* cos, const void* sin, int64_t half) {
  constexpr int kVec = vector_width<T>();
  if (half % kVec != 0) return false;
  for (const RopeTensor* x : {&q, &k}) {
    for (const int64_t s : {x->in_stride_b, x->in_stride_t, x->in_stride_h, x->out_stride_b, x->out_stride_t,
                            x->out_stride_h})
      if (s % kVec != 0) return false;
    if (!aligned16(x->in) || !aligned16(x->out)) return false;
  }
  return aligned16(cos) && aligned16(sin);
}

}  // namespace

Status rope(const RopeTensor& q, const RopeTensor& k, const void* cos, const void* sin, int64_t cos_batch_stride,
            int64_t batch, int64_t seq, int64_t head_dim, int64_t half, bool backward, int dtype, int cos_dtype,
            void* stream) {
  if (batch * seq == 0 || q.heads + k.heads == 0) return nullptr;
  return dispatch_dtype_and_param(dtype, cos_dtype, [&](auto t, auto c) -> Status {
    using T = decltype(t);
    using C = decltype(c);
    const bool vectorise = can_vectorise<T>(q, k, cos, sin, half);
    for (const RopeTensor* x : {&q, &k}) {
      const Status status =
          vectorise ? rope_with<T, C, vector_width<T>()>(*x, cos, sin, cos_batch_stride, batch, seq, head_dim, half,
                                                         backward, as_stream(stream))
                    : rope_with<T, C, 1>(*x, cos, sin, cos_batch_stride, batch, seq, head_dim, half, backward,
                                         as_stream(stream));
      if (status != nullptr) return status;
    }
    return nullptr;
  });
}

}  // namespace liger_cuda
