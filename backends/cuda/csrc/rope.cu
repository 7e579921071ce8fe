// rope: Hugging Face's apply_rotary_pos_emb with rotate_half, forward and backward, q and k in one launch.
//
// With R = 2 * half rotated features, x1 = x[:half], x2 = x[half:R] and cos/sin split the same way:
//   forward   y1 = x1 * c1 - x2 * s1,   y2 = x2 * c2 + x1 * s2
//   backward  y1 = x1 * c1 + x2 * s2,   y2 = x2 * c2 - x1 * s1   (the exact transpose, for any cos/sin)
// and features [R, D) pass through bit for bit. Math in fp32, outputs in q's dtype, written to fresh buffers.
//
// Layout: q, k and the outputs are addressed as (B, T, H, D) with element strides (b, t, h) and unit feature stride,
// so Hugging Face's transposed views are read and written where they lie. A block takes tz tokens; in it, threads
// along x own VEC-wide column vectors of the half (their cos/sin are loaded once, into registers) and threads along
// y walk the heads of q then k (GQA: any two head counts).
#include "common.cuh"

namespace liger_cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, typename C, int VEC>
__global__ void __launch_bounds__(kThreads)
    rope_kernel(RopeTensor q, RopeTensor k, const C* __restrict__ cos, const C* __restrict__ sin,
                int64_t cos_batch_stride, int64_t tokens, int64_t seq, int64_t head_dim, int64_t half, bool backward) {
  const int64_t token = static_cast<int64_t>(blockIdx.x) * blockDim.z + threadIdx.z;
  if (token >= tokens) return;  // no barrier in this kernel
  const int64_t b = token / seq, t = token - b * seq;
  const C* cos_row = cos + b * cos_batch_stride + t * 2 * half;
  const C* sin_row = sin + b * cos_batch_stride + t * 2 * half;
  const int64_t heads = q.heads + k.heads;
  const int64_t column_vectors = half / VEC;

  for (int64_t c = threadIdx.x; c < column_vectors; c += blockDim.x) {
    const int64_t col = c * VEC;
    float c1[VEC], c2[VEC], s1[VEC], s2[VEC];
    load_floats<VEC>(cos_row + col, c1);
    load_floats<VEC>(cos_row + half + col, c2);
    load_floats<VEC>(sin_row + col, s1);
    load_floats<VEC>(sin_row + half + col, s2);
    for (int64_t h = threadIdx.y; h < heads; h += blockDim.y) {
      const bool is_q = h < q.heads;
      const RopeTensor x = is_q ? q : k;
      const int64_t head = is_q ? h : h - q.heads;
      const T* in = static_cast<const T*>(x.in) + b * x.in_stride_b + t * x.in_stride_t + head * x.in_stride_h + col;
      T* out = static_cast<T*>(x.out) + b * x.out_stride_b + t * x.out_stride_t + head * x.out_stride_h + col;
      float x1[VEC], x2[VEC], y1[VEC], y2[VEC];
      load_floats<VEC>(in, x1);
      load_floats<VEC>(in + half, x2);
      if (backward) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          y1[j] = x1[j] * c1[j] + x2[j] * s2[j];
          y2[j] = x2[j] * c2[j] - x1[j] * s1[j];
        }
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          y1[j] = x1[j] * c1[j] - x2[j] * s1[j];
          y2[j] = x2[j] * c2[j] + x1[j] * s2[j];
        }
      }
      store_floats<VEC>(out, y1);
      store_floats<VEC>(out + half, y2);
    }
  }

  const int64_t rest = head_dim - 2 * half;
  if (rest > 0) {  // partial rotary: the remaining features are copied
    const int64_t lane = static_cast<int64_t>(threadIdx.y) * blockDim.x + threadIdx.x;
    const int64_t lanes = static_cast<int64_t>(blockDim.x) * blockDim.y;
    for (int64_t e = lane; e < heads * rest; e += lanes) {
      const int64_t h = e / rest, d = 2 * half + (e - h * rest);
      const bool is_q = h < q.heads;
      const RopeTensor x = is_q ? q : k;
      const int64_t head = is_q ? h : h - q.heads;
      const T* in = static_cast<const T*>(x.in) + b * x.in_stride_b + t * x.in_stride_t + head * x.in_stride_h;
      T* out = static_cast<T*>(x.out) + b * x.out_stride_b + t * x.out_stride_t + head * x.out_stride_h;
      out[d] = in[d];
    }
  }
}

template <typename T, typename C, int VEC>
Status rope_with(const RopeTensor& q, const RopeTensor& k, const void* cos, const void* sin, int64_t cos_batch_stride,
                 int64_t batch, int64_t seq, int64_t head_dim, int64_t half, bool backward, cudaStream_t stream) {
  const int64_t tokens = batch * seq;
  const int64_t heads = q.heads + k.heads;
  const int64_t column_vectors = std::max<int64_t>(half / VEC, 1);
  const int64_t tx = std::min<int64_t>(column_vectors, kThreads);
  // Heads spread evenly over as many y-threads as fit.
  const int64_t head_slots = std::max<int64_t>(kThreads / tx, 1);
  const int64_t per_thread = ceil_div(std::max<int64_t>(heads, 1), head_slots);
  const int64_t ty = ceil_div(std::max<int64_t>(heads, 1), per_thread);
  // Tokens per block fill it up; blockDim.z is at most 64.
  const int64_t tz = std::max<int64_t>(std::min<int64_t>({kThreads / (tx * ty), tokens, int64_t{64}}), 1);
  const dim3 block(static_cast<unsigned>(tx), static_cast<unsigned>(ty), static_cast<unsigned>(tz));
  const int64_t grid = ceil_div(tokens, tz);
  rope_kernel<T, C, VEC><<<static_cast<unsigned>(grid), block, 0, stream>>>(
      q, k, static_cast<const C*>(cos), static_cast<const C*>(sin), cos_batch_stride, tokens, seq, head_dim, half,
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
    if (can_vectorise<T>(q, k, cos, sin, half))
      return rope_with<T, C, vector_width<T>()>(q, k, cos, sin, cos_batch_stride, batch, seq, head_dim, half,
                                                backward, as_stream(stream));
    return rope_with<T, C, 1>(q, k, cos, sin, cos_batch_stride, batch, seq, head_dim, half, backward,
                              as_stream(stream));
  });
}

}  // namespace liger_cuda
