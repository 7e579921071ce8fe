// What rms_norm.cu and layer_norm.cu share: how a row is spread over a block's threads, and the row groups of the
// fused backward.
//
// A row is handled by a warp (short rows; a block then holds kWarpRows rows) or by a whole block. Each thread takes
// the vectors tid, tid + threads, ... of its row (coalesced 16-byte accesses) and keeps `cached` of them in
// registers: kCached in the forward.
//
// Fused backward: each row group (a warp, or the block) walks a contiguous range of rows, keeps its dW (and dB) partial
// sums in registers and writes them once to its own row of an fp32 workspace. A group walks its rows one after
// another, each a full trip to memory, so the memory system is kept busy by many threads a row with 8 elements each
// (one 16-byte vector of bf16, two of fp32), as the Triton backward does, rather than by many vectors a thread. There
// are enough groups to fill the GPU at kBackwardThreadsPerSm resident threads per SM, each at least kBackwardMinRows
// rows long while that still leaves a group per SM, so that the partial rows stay small next to dx.
//
// GPU time of the backward on an H200 (benchmarks/results/2026-11-29-h200-s10-norm-backward-variants.md): with
// 4 vectors a thread, rms_norm's took 96.6 µs at 8192 x 4096 bf16 and 56.0 at 8192 x 2048, layer_norm's 157.0 and
// 94.1; one vector a thread takes 79.6, 41.4, 78.9 and 42.9. In fp32 two vectors a thread took 117.4 µs (rms_norm)
// and 120.3 (layer_norm) at 8192 x 4096 against 135.8 and 141.7 for one; in bf16 two were slower. 2048 resident
// threads per SM or 32 rows a group were no faster. At least 4 rows a group rather than 16 tie at the large shapes
// and save 2-14 µs at 1024 x 1024, 4096 x 1023 and 8192 x 768. Unvectorised rows (an odd hidden size) keep at most
// 256 threads: a 4095-wide bf16 row took 118 µs fused on 1024 threads against 87 (layer_norm) and 77 (rms_norm)
// through the chunked path.
#pragma once

#include "common.cuh"

namespace liger_cuda {
namespace norm_rows {

constexpr int kCached = 4;    // forward: vectors of a row a thread keeps in registers
constexpr int kWarpRows = 4;  // rows per block when a warp holds a row
constexpr int kBackwardElements = 8;
constexpr int kBackwardMaxThreads = 1024;
constexpr int kUnvectorisedBackwardMaxThreads = 256;
constexpr int kBackwardThreadsPerSm = 1024;
constexpr int kBackwardMinRows = 4;

// Vectors of VEC elements a thread keeps of each row in the fused backward.
template <int VEC>
constexpr int backward_cached() {
  // At most 4: unvectorised rows (VEC == 1) would spill registers with 8.
  return kBackwardElements / VEC > 4 ? 4 : (kBackwardElements / VEC > 1 ? kBackwardElements / VEC : 1);
}

// The most threads a block of the fused backward takes for rows of VEC-element vectors.
template <int VEC>
constexpr int backward_max_threads() {
  return VEC == 1 ? kUnvectorisedBackwardMaxThreads : kBackwardMaxThreads;
}

// Elements of T per vector access for rows of `cols` elements: 16 bytes' worth when the row length, every row stride
// and every pointer allow it, else 1.
template <typename T>
int vector_for(int64_t cols, std::initializer_list<int64_t> strides, std::initializer_list<const void*> pointers) {
  constexpr int kVec = vector_width<T>();
  if (cols % kVec != 0) return 1;
  for (const int64_t s : strides)
    if (s % kVec != 0) return 1;
  for (const void* p : pointers)
    if (!aligned16(p)) return 1;
  return kVec;
}

// (threads per row, rows per block) for rows of `vectors` vectors, `cached` vectors a thread.
inline dim3 row_block(int64_t vectors, int max_threads, int cached = kCached) {
  int64_t threads = ceil_div(ceil_div(vectors, cached), 32) * 32;
  threads = threads < 32 ? 32 : (threads > max_threads ? max_threads : threads);
  return dim3(static_cast<unsigned>(threads), threads == 32 ? kWarpRows : 1);
}

// The fused backward's grid for blocks of `block` (block.y groups each): group g walks rows
// [g * rows_per_group, ...) and writes partial row g, so there are `groups` partial rows.
struct RowGroups {
  int64_t blocks, rows_per_group, groups;
};

inline RowGroups row_groups(int64_t rows, dim3 block, int64_t min_rows) {
  const int64_t sms = sm_count();
  const int64_t per_block = block.y;
  const int64_t threads = static_cast<int64_t>(block.x) * per_block;
  const int64_t blocks_per_sm = std::max<int64_t>(1, kBackwardThreadsPerSm / threads);
  const int64_t groups_target = sms * blocks_per_sm * per_block;
  const int64_t floor_rows = std::min<int64_t>(min_rows, ceil_div(rows, sms * per_block));
  const int64_t rows_per_group = std::max<int64_t>(std::max(ceil_div(rows, groups_target), floor_rows), 1);
  const int64_t blocks = ceil_div(ceil_div(rows, rows_per_group), per_block);
  return {blocks, rows_per_group, blocks * per_block};
}

}  // namespace norm_rows
}  // namespace liger_cuda
