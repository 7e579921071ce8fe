// The Python bindings of the CUDA kernels: tensors in, fresh tensors out.
//
// This file includes no CUDA header (see liger_cuda.h): the current stream and the device guard come from c10's
// device-generic interfaces, and the kernels' launch errors come back as messages. It checks only what would
// otherwise make a kernel read out of bounds (device, dtype, rank, unit column stride); the Python side has already
// validated the call against the operator's contract and converted what needs converting.
#include <torch/extension.h>

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "liger_cuda.h"

namespace {

using at::Tensor;
using std::optional;

int dtype_code(at::ScalarType type, const char* what) {
  switch (type) {
    case at::kFloat:
      return liger_cuda::kFloat32;
    case at::kBFloat16:
      return liger_cuda::kBFloat16;
    case at::kHalf:
      return liger_cuda::kFloat16;
    default:
      TORCH_CHECK(false, "liger_cuda: ", what, " must be float32, bfloat16 or float16, got ", type);
  }
  return -1;
}

void* current_stream(const Tensor& t) {
  const c10::impl::DeviceGuardImplInterface* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return impl->getStream(t.device()).native_handle();
}

void check(liger_cuda::Status status, const char* what) {
  TORCH_CHECK(status == nullptr, "liger_cuda: launching the ", what, " kernels failed: ", status);
}

void check_cuda(const Tensor& t, const char* what) {
  TORCH_CHECK(t.is_cuda(), "liger_cuda: ", what, " must be a CUDA tensor, got one on ", t.device());
}

void check_rows(const Tensor& t, const char* what) {
  check_cuda(t, what);
  TORCH_CHECK(t.dim() == 2, "liger_cuda: ", what, " must be 2-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.stride(1) == 1 || t.size(1) <= 1, "liger_cuda: ", what, " must have unit column stride");
}

Tensor empty_like_dtype(const Tensor& t) { return at::empty({0}, t.options()); }

// t in `type`, contiguous: t itself when it already is (no dispatcher round trip on the hot path).
Tensor as_contiguous(const Tensor& t, at::ScalarType type) {
  return t.scalar_type() == type ? t.contiguous() : t.to(type).contiguous();
}

// -- rms_norm -------------------------------------------------------------------------------------------------------

// (weight as the kernel takes it: x's dtype or fp32, contiguous; the offset the kernel applies to it).
std::pair<optional<Tensor>, double> rms_norm_weight(const Tensor& x, const optional<Tensor>& weight, double offset,
                                                    int64_t casting) {
  if (!weight.has_value()) return {std::nullopt, offset};
  Tensor w = *weight;
  check_cuda(w, "weight");
  dtype_code(w.scalar_type(), "weight");
  if (w.scalar_type() != x.scalar_type() && w.scalar_type() != at::kFloat) {
    // A third dtype: give the kernel exactly what the reference computes, as fp32 or in x's dtype.
    if (casting == liger_cuda::kLlama) return {w.add(offset).to(at::kFloat).contiguous(), 0.0};
    if (casting == liger_cuda::kGemma) return {w.to(at::kFloat).contiguous(), offset};
    return {w.to(x.scalar_type()).contiguous(), offset};
  }
  return {w.contiguous(), offset};
}

std::tuple<Tensor, Tensor> rms_norm_forward(const Tensor& x, const optional<Tensor>& weight, double eps, double offset,
                                            int64_t casting) {
  check_rows(x, "x");
  const c10::DeviceGuard guard(x.device());
  const int64_t rows = x.size(0), cols = x.size(1);
  auto [w, w_offset] = rms_norm_weight(x, weight, offset, casting);
  Tensor y = at::empty({rows, cols}, x.options());
  Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  const int dtype = dtype_code(x.scalar_type(), "x");
  const int w_dtype = w.has_value() ? dtype_code(w->scalar_type(), "weight") : dtype;
  check(liger_cuda::rms_norm_forward(x.data_ptr(), w.has_value() ? w->data_ptr() : nullptr, y.data_ptr(),
                                     rstd.data_ptr<float>(), rows, cols, x.stride(0), static_cast<float>(eps),
                                     static_cast<float>(w_offset), static_cast<int>(casting), dtype, w_dtype,
                                     current_stream(x)),
        "rms_norm forward");
  return {y, rstd};
}

std::tuple<Tensor, Tensor> rms_norm_backward(const Tensor& dy, const Tensor& x, const optional<Tensor>& weight,
                                             const Tensor& rstd, double offset, int64_t casting) {
  check_rows(dy, "dy");
  check_rows(x, "x");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "liger_cuda: dy must match x");
  const c10::DeviceGuard guard(x.device());
  const int64_t rows = x.size(0), cols = x.size(1);
  auto [w, w_offset] = rms_norm_weight(x, weight, offset, casting);
  Tensor dx = at::empty({rows, cols}, x.options());
  if (!w.has_value() && rows == 0) return {dx, empty_like_dtype(x)};
  if (rows == 0) return {dx, at::zeros({cols}, weight->options())};
  Tensor dw = w.has_value() ? at::empty({cols}, w->options()) : empty_like_dtype(x);
  const int dtype = dtype_code(x.scalar_type(), "x");
  const int w_dtype = w.has_value() ? dtype_code(w->scalar_type(), "weight") : dtype;
  const void* w_ptr = w.has_value() ? w->data_ptr() : nullptr;
  void* dw_ptr = w.has_value() ? dw.data_ptr() : nullptr;
  void* stream = current_stream(x);
  int64_t floats = 0;
  const Tensor rstd_c = rstd.contiguous();
  check(liger_cuda::rms_norm_backward(dy.data_ptr(), x.data_ptr(), w_ptr, rstd_c.data_ptr<float>(), dx.data_ptr(),
                                      dw_ptr, nullptr, &floats, rows, cols, dy.stride(0), x.stride(0),
                                      static_cast<float>(w_offset), static_cast<int>(casting), dtype, w_dtype, stream),
        "rms_norm backward");
  // At least one float: a null workspace pointer is the size query, so an empty one would skip the launch.
  Tensor workspace = at::empty({std::max<int64_t>(floats, 1)}, x.options().dtype(at::kFloat));
  check(liger_cuda::rms_norm_backward(dy.data_ptr(), x.data_ptr(), w_ptr, rstd_c.data_ptr<float>(), dx.data_ptr(),
                                      dw_ptr, workspace.data_ptr<float>(), &floats, rows, cols, dy.stride(0),
                                      x.stride(0), static_cast<float>(w_offset), static_cast<int>(casting), dtype,
                                      w_dtype, stream),
        "rms_norm backward");
  if (w.has_value() && dw.scalar_type() != weight->scalar_type()) dw = dw.to(weight->scalar_type());
  return {dx, dw};
}

// -- layer_norm -----------------------------------------------------------------------------------------------------

// weight and bias in x's dtype when both already are, else both in fp32; contiguous.
std::pair<Tensor, optional<Tensor>> layer_norm_params(const Tensor& x, const Tensor& weight,
                                                      const optional<Tensor>& bias) {
  check_cuda(weight, "weight");
  dtype_code(weight.scalar_type(), "weight");
  if (bias.has_value()) {
    check_cuda(*bias, "bias");
    dtype_code(bias->scalar_type(), "bias");
  }
  const bool native =
      weight.scalar_type() == x.scalar_type() && (!bias.has_value() || bias->scalar_type() == x.scalar_type());
  const at::ScalarType type = native ? x.scalar_type() : at::kFloat;
  optional<Tensor> b = bias.has_value() ? optional<Tensor>(as_contiguous(*bias, type)) : std::nullopt;
  return {as_contiguous(weight, type), b};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_forward(const Tensor& x, const Tensor& weight,
                                                      const optional<Tensor>& bias, double eps) {
  check_rows(x, "x");
  const c10::DeviceGuard guard(x.device());
  const int64_t rows = x.size(0), cols = x.size(1);
  auto [w, b] = layer_norm_params(x, weight, bias);
  Tensor y = at::empty({rows, cols}, x.options());
  Tensor mean = at::empty({rows}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  check(liger_cuda::layer_norm_forward(x.data_ptr(), w.data_ptr(), b.has_value() ? b->data_ptr() : nullptr,
                                       y.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(), rows, cols,
                                       x.stride(0), static_cast<float>(eps), dtype_code(x.scalar_type(), "x"),
                                       dtype_code(w.scalar_type(), "weight"), current_stream(x)),
        "layer_norm forward");
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& weight,
                                                       const optional<Tensor>& bias, const Tensor& mean,
                                                       const Tensor& rstd) {
  check_rows(dy, "dy");
  check_rows(x, "x");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "liger_cuda: dy must match x");
  const c10::DeviceGuard guard(x.device());
  const int64_t rows = x.size(0), cols = x.size(1);
  auto [w, b] = layer_norm_params(x, weight, bias);
  Tensor dx = at::empty({rows, cols}, x.options());
  if (rows == 0) {
    return {dx, at::zeros({cols}, weight.options()),
            bias.has_value() ? at::zeros({cols}, bias->options()) : empty_like_dtype(x)};
  }
  Tensor dw = at::empty({cols}, w.options());
  Tensor db = b.has_value() ? at::empty({cols}, b->options()) : empty_like_dtype(x);
  void* db_ptr = b.has_value() ? db.data_ptr() : nullptr;
  const Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  const int dtype = dtype_code(x.scalar_type(), "x"), w_dtype = dtype_code(w.scalar_type(), "weight");
  void* stream = current_stream(x);
  int64_t floats = 0;
  check(liger_cuda::layer_norm_backward(dy.data_ptr(), x.data_ptr(), w.data_ptr(), mean_c.data_ptr<float>(),
                                        rstd_c.data_ptr<float>(), dx.data_ptr(), dw.data_ptr(), db_ptr, nullptr,
                                        &floats, rows, cols, dy.stride(0), x.stride(0), dtype, w_dtype, stream),
        "layer_norm backward");
  // At least one float: a null workspace pointer is the size query, so an empty one would skip the launch.
  Tensor workspace = at::empty({std::max<int64_t>(floats, 1)}, x.options().dtype(at::kFloat));
  check(liger_cuda::layer_norm_backward(dy.data_ptr(), x.data_ptr(), w.data_ptr(), mean_c.data_ptr<float>(),
                                        rstd_c.data_ptr<float>(), dx.data_ptr(), dw.data_ptr(), db_ptr,
                                        workspace.data_ptr<float>(), &floats, rows, cols, dy.stride(0), x.stride(0),
                                        dtype, w_dtype, stream),
        "layer_norm backward");
  if (dw.scalar_type() != weight.scalar_type()) dw = dw.to(weight.scalar_type());
  if (bias.has_value() && db.scalar_type() != bias->scalar_type()) db = db.to(bias->scalar_type());
  return {dx, dw, db};
}

// -- rope -----------------------------------------------------------------------------------------------------------

liger_cuda::RopeTensor rope_tensor(const Tensor& in, const Tensor& out) {
  // Both (B, T, H, D) views with unit feature stride.
  return {in.data_ptr(), out.data_ptr(), in.size(2),   in.stride(0),  in.stride(1),
          in.stride(2),  out.stride(0),  out.stride(1), out.stride(2)};
}

void run_rope(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin, const Tensor& q_out,
              const Tensor& k_out, int64_t unsqueeze_dim, int64_t rotary_dim, bool backward) {
  for (const Tensor* t : {&q, &k, &q_out, &k_out}) {
    check_cuda(*t, "q/k");
    TORCH_CHECK(t->dim() == 4 && (t->stride(3) == 1 || t->size(3) <= 1), "liger_cuda: rope takes 4-D q and k with "
                "unit feature stride");
  }
  TORCH_CHECK(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= q.size(3), "liger_cuda: bad rotary_dim");
  const c10::DeviceGuard guard(q.device());
  auto heads_last = [&](const Tensor& t) { return unsqueeze_dim == 1 ? t.transpose(1, 2) : t; };
  const Tensor q4 = heads_last(q), k4 = heads_last(k), qo4 = heads_last(q_out), ko4 = heads_last(k_out);
  const bool native = cos.scalar_type() == q.scalar_type() && sin.scalar_type() == q.scalar_type();
  const at::ScalarType table_type = native ? q.scalar_type() : at::kFloat;
  const Tensor c = as_contiguous(cos, table_type), s = as_contiguous(sin, table_type);
  const int64_t cos_batch_stride = c.size(0) == 1 ? 0 : c.stride(0);
  check(liger_cuda::rope(rope_tensor(q4, qo4), rope_tensor(k4, ko4), c.data_ptr(), s.data_ptr(), cos_batch_stride,
                         q4.size(0), q4.size(1), q4.size(3), rotary_dim / 2, backward,
                         dtype_code(q.scalar_type(), "q"), dtype_code(table_type, "cos"), current_stream(q)),
        "rope");
}

std::tuple<Tensor, Tensor> rope_forward(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                                        int64_t unsqueeze_dim, int64_t rotary_dim) {
  // empty_like keeps a dense input's strides: a transposed view gives a transposed-layout output.
  Tensor q_out = at::empty_like(q), k_out = at::empty_like(k);
  run_rope(q, k, cos, sin, q_out, k_out, unsqueeze_dim, rotary_dim, false);
  return {q_out, k_out};
}

std::tuple<Tensor, Tensor> rope_backward(const Tensor& dq_out, const Tensor& dk_out, const Tensor& cos,
                                         const Tensor& sin, std::vector<int64_t> q_stride,
                                         std::vector<int64_t> k_stride, int64_t unsqueeze_dim, int64_t rotary_dim) {
  Tensor dq = at::empty_strided(dq_out.sizes(), q_stride, dq_out.options());
  Tensor dk = at::empty_strided(dk_out.sizes(), k_stride, dk_out.options());
  run_rope(dq_out, dk_out, cos, sin, dq, dk, unsqueeze_dim, rotary_dim, true);
  return {dq, dk};
}

// -- swiglu / geglu -------------------------------------------------------------------------------------------------

// (rows, cols, stride of each operand) as the kernels see them: one long row when every operand is contiguous.
std::tuple<int64_t, int64_t, std::vector<int64_t>> gated_shape(std::initializer_list<const Tensor*> operands) {
  const Tensor& first = **operands.begin();
  const int64_t rows = first.size(0), cols = first.size(1);
  bool flat = rows == 1;
  if (!flat) {
    flat = true;
    for (const Tensor* t : operands) flat = flat && t->stride(0) == cols;
  }
  std::vector<int64_t> strides;
  for (const Tensor* t : operands) strides.push_back(flat ? rows * cols : t->stride(0));
  return {flat ? 1 : rows, flat ? rows * cols : cols, strides};
}

Tensor gated_forward(const Tensor& a, const Tensor& b, int64_t activation) {
  check_rows(a, "a");
  check_rows(b, "b");
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type(), "liger_cuda: b must match a");
  const c10::DeviceGuard guard(a.device());
  Tensor y = at::empty({a.size(0), a.size(1)}, a.options());
  auto [rows, cols, strides] = gated_shape({&a, &b});
  const int dtype = dtype_code(a.scalar_type(), "a");
  void* stream = current_stream(a);
  const auto launch = activation == liger_cuda::kSilu ? liger_cuda::swiglu_forward : liger_cuda::geglu_forward;
  check(launch(a.data_ptr(), b.data_ptr(), y.data_ptr(), rows, cols, strides[0], strides[1], dtype, stream),
        "gated forward");
  return y;
}

std::tuple<Tensor, Tensor> gated_backward(const Tensor& dy, const Tensor& a, const Tensor& b, int64_t activation) {
  check_rows(dy, "dy");
  check_rows(a, "a");
  check_rows(b, "b");
  TORCH_CHECK(a.sizes() == b.sizes() && a.sizes() == dy.sizes() && a.scalar_type() == b.scalar_type() &&
                  a.scalar_type() == dy.scalar_type(),
              "liger_cuda: dy and b must match a");
  const c10::DeviceGuard guard(a.device());
  Tensor da = at::empty({a.size(0), a.size(1)}, a.options());
  Tensor db = at::empty({a.size(0), a.size(1)}, b.options());
  auto [rows, cols, strides] = gated_shape({&dy, &a, &b});
  const int dtype = dtype_code(a.scalar_type(), "a");
  void* stream = current_stream(a);
  const auto launch = activation == liger_cuda::kSilu ? liger_cuda::swiglu_backward : liger_cuda::geglu_backward;
  check(launch(dy.data_ptr(), a.data_ptr(), b.data_ptr(), da.data_ptr(), db.data_ptr(), rows, cols, strides[0],
               strides[1], strides[2], dtype, stream),
        "gated backward");
  return {da, db};
}

// -- cross_entropy --------------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> cross_entropy_forward(
    const Tensor& logits, const Tensor& target, const optional<Tensor>& weight, int64_t ignore_index,
    double label_smoothing, double lse_square_scale, optional<double> softcap, int64_t reduction, bool return_z_loss,
    bool return_token_accuracy, bool return_predicted_tokens, bool compute_grad) {
  check_rows(logits, "input");
  check_cuda(target, "target");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), "liger_cuda: target must be (rows,)");
  TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt,
              "liger_cuda: target must be int64 or int32");
  TORCH_CHECK(logits.size(1) > 0, "liger_cuda: input must have at least one class");
  const c10::DeviceGuard guard(logits.device());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const int dtype = dtype_code(logits.scalar_type(), "input");
  const Tensor t = target.contiguous();
  optional<Tensor> w;
  if (weight.has_value()) {
    check_cuda(*weight, "weight");
    dtype_code(weight->scalar_type(), "weight");
    w = (weight->scalar_type() == logits.scalar_type() ? *weight : weight->to(at::kFloat)).contiguous();
  }
  const auto options = logits.options();
  const auto f32 = options.dtype(at::kFloat);
  const bool none = reduction == liger_cuda::kReduceNone;
  const bool argmax = return_token_accuracy || return_predicted_tokens;
  Tensor stats = at::empty({4}, f32);
  Tensor ce_rows = none ? at::empty({0}, f32) : at::empty({rows}, f32);
  Tensor z_rows = none ? at::empty({0}, f32) : at::empty({rows}, f32);
  Tensor pred = argmax ? at::empty({rows}, options.dtype(at::kLong)) : at::empty({0}, options.dtype(at::kLong));
  const std::vector<int64_t> out_shape = none ? std::vector<int64_t>{rows} : std::vector<int64_t>{};
  Tensor loss = at::empty(out_shape, options);
  Tensor z_loss = return_z_loss ? at::empty(out_shape, options) : at::empty({0}, options);
  Tensor accuracy = return_token_accuracy ? at::empty(out_shape, f32) : at::empty({0}, f32);
  Tensor grad = compute_grad ? at::empty({rows, vocab}, options) : at::empty({0}, options);

  liger_cuda::CrossEntropyArgs args{};
  args.logits = logits.data_ptr();
  args.target = t.data_ptr();
  args.weight = w.has_value() ? w->data_ptr() : nullptr;
  args.grad = compute_grad ? grad.data_ptr() : nullptr;
  args.stats = stats.data_ptr<float>();
  args.ce_rows = none ? nullptr : ce_rows.data_ptr<float>();
  args.z_rows = none ? nullptr : z_rows.data_ptr<float>();
  args.pred = argmax ? pred.data_ptr<int64_t>() : nullptr;
  args.loss = loss.data_ptr();
  args.z_loss = return_z_loss ? z_loss.data_ptr() : nullptr;
  args.accuracy = return_token_accuracy ? accuracy.data_ptr<float>() : nullptr;
  args.rows = rows;
  args.vocab = vocab;
  args.logits_stride = logits.stride(0);
  args.ignore_index = ignore_index;
  args.smoothing = static_cast<float>(label_smoothing);
  args.z_scale = static_cast<float>(lse_square_scale);
  args.softcap = softcap.has_value() ? static_cast<float>(*softcap) : 0.f;
  args.reduction = static_cast<int>(reduction);
  args.dtype = dtype;
  args.weight_dtype = w.has_value() ? dtype_code(w->scalar_type(), "weight") : dtype;
  args.target_is_int32 = t.scalar_type() == at::kInt;
  check(liger_cuda::cross_entropy_forward(args, current_stream(logits)), "cross_entropy forward");
  if (!return_predicted_tokens) pred = at::empty({0}, options.dtype(at::kLong));
  return {loss, z_loss, accuracy, pred, grad};
}

void cross_entropy_scale_(const Tensor& grad, const Tensor& upstream) {
  check_cuda(grad, "grad");
  TORCH_CHECK(grad.is_contiguous(), "liger_cuda: the gradient buffer must be contiguous");
  const c10::DeviceGuard guard(grad.device());
  const bool per_row = upstream.dim() > 0;
  // The factor stays fp32 (as the triton backend's): rounded to an fp16 gradient's dtype, a GradScaler scale of
  // 65536 would become inf, and in bf16 a factor near 1 would round to exactly 1 and be skipped.
  const Tensor u = upstream.to(at::kFloat).contiguous();
  const int64_t vocab = grad.dim() == 2 ? grad.size(1) : 1;
  TORCH_CHECK(!per_row || u.numel() * vocab == grad.numel(), "liger_cuda: one upstream value per row expected");
  check(liger_cuda::cross_entropy_scale_rows(grad.data_ptr(), u.data_ptr<float>(), grad.numel(), vocab, per_row,
                                             dtype_code(grad.scalar_type(), "grad"), current_stream(grad)),
        "cross_entropy backward");
}

// -- embedding ------------------------------------------------------------------------------------------------------

void check_indices(const Tensor& indices) {
  check_cuda(indices, "indices");
  TORCH_CHECK(indices.dim() == 1 && indices.is_contiguous(), "liger_cuda: indices must be flat and contiguous");
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
              "liger_cuda: indices must be int64 or int32");
}

Tensor embedding_forward(const Tensor& indices, const Tensor& weight, int64_t pad) {
  check_indices(indices);
  check_rows(weight, "weight");
  const c10::DeviceGuard guard(weight.device());
  const int64_t tokens = indices.size(0), rows = weight.size(0), cols = weight.size(1);
  Tensor y = at::empty({tokens, cols}, weight.options());
  check(liger_cuda::embedding_forward(indices.data_ptr(), weight.data_ptr(), y.data_ptr(), tokens, rows, cols,
                                      weight.stride(0), pad, indices.scalar_type() == at::kInt,
                                      dtype_code(weight.scalar_type(), "weight"), current_stream(weight)),
        "embedding forward");
  return y;
}

Tensor embedding_backward(const Tensor& dy, const Tensor& indices, int64_t rows, int64_t pad) {
  check_indices(indices);
  check_rows(dy, "dy");
  TORCH_CHECK(dy.size(0) == indices.size(0), "liger_cuda: dy must have one row per index");
  TORCH_CHECK(rows < std::numeric_limits<int32_t>::max(), "liger_cuda: embedding takes fewer than 2^31 - 1 rows");
  const c10::DeviceGuard guard(dy.device());
  const int64_t tokens = indices.size(0), cols = dy.size(1);
  Tensor dw = at::empty({rows, cols}, dy.options());  // zeroed by embedding_backward
  void* stream = current_stream(dy);
  Tensor sorted, order;
  if (tokens > 0 && cols > 0) {
    Tensor keys = at::empty({tokens}, indices.options().dtype(at::kInt));
    check(liger_cuda::embedding_keys(indices.data_ptr(), keys.data_ptr<int32_t>(), tokens, rows, pad,
                                     indices.scalar_type() == at::kInt, stream),
          "embedding backward");
    std::tie(sorted, order) = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    sorted = sorted.contiguous();
    order = order.contiguous();
  }
  check(liger_cuda::embedding_backward(sorted.defined() ? sorted.data_ptr<int32_t>() : nullptr,
                                       order.defined() ? order.data_ptr<int64_t>() : nullptr, dy.data_ptr(),
                                       dw.data_ptr(), sorted.defined() ? tokens : 0, rows, cols, dy.stride(0),
                                       dtype_code(dy.scalar_type(), "dy"), stream),
        "embedding backward");
  return dw;
}

// -- autograd: eager training without Python in the backward ---------------------------------------------------------
//
// The same kernels as above, wrapped in C++ autograd functions. Called eagerly (never under torch.compile, which takes
// the Python custom ops and liger_core's bridge), they put a C++ node in the graph, so the backward runs on autograd's
// device thread without taking the GIL. On an H200's host a small rms_norm forward+backward took 131 us this way
// against 340 us through the Python bridge, and the (8192, 4096) one became GPU-bound: 0.148 ms, the raw kernels'
// time, against 0.261 (benchmarks/results/2026-11-29-h200-s9-host-autograd.json). Inputs arrive as the Python side
// prepared them (rows with unit column stride); gradients come back in the same shapes. Arguments without a gradient
// get an undefined tensor.

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// An upstream gradient as the kernels read it: unit stride along its last dimension (autograd may hand over an
// expanded or a transposed one).
Tensor unit_feature_stride(const Tensor& t) { return t.stride(-1) == 1 || t.size(-1) <= 1 ? t : t.contiguous(); }

optional<Tensor> saved_optional(const Tensor& t) { return t.defined() ? optional<Tensor>(t) : std::nullopt; }

struct RmsNormFunction : public torch::autograd::Function<RmsNormFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const optional<Tensor>& weight, double eps,
                               double offset, int64_t casting) {
    auto [y, rstd] = rms_norm_forward(x, weight, eps, offset, casting);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, weight.value_or(Tensor()), rstd});
    ctx->saved_data["offset"] = offset;
    ctx->saved_data["casting"] = casting;
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    const variable_list saved = ctx->get_saved_variables();
    const optional<Tensor> weight = saved_optional(saved[1]);
    auto [dx, dw] = rms_norm_backward(unit_feature_stride(grads[0]), saved[0], weight, saved[2],
                                      ctx->saved_data["offset"].toDouble(), ctx->saved_data["casting"].toInt());
    return {dx, weight.has_value() ? dw : Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor rms_norm_autograd(const Tensor& x, const optional<Tensor>& weight, double eps, double offset,
                         int64_t casting) {
  return RmsNormFunction::apply(x, weight, eps, offset, casting)[0];
}

struct LayerNormFunction : public torch::autograd::Function<LayerNormFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                               const optional<Tensor>& bias, double eps) {
    auto [y, mean, rstd] = layer_norm_forward(x, weight, bias, eps);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, weight, bias.value_or(Tensor()), mean, rstd});
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {Tensor(), Tensor(), Tensor(), Tensor()};
    const variable_list saved = ctx->get_saved_variables();
    const optional<Tensor> bias = saved_optional(saved[2]);
    auto [dx, dw, db] =
        layer_norm_backward(unit_feature_stride(grads[0]), saved[0], saved[1], bias, saved[3], saved[4]);
    return {dx, dw, bias.has_value() ? db : Tensor(), Tensor()};
  }
};

Tensor layer_norm_autograd(const Tensor& x, const Tensor& weight, const optional<Tensor>& bias, double eps) {
  return LayerNormFunction::apply(x, weight, bias, eps)[0];
}

struct GatedFunction : public torch::autograd::Function<GatedFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& a, const Tensor& b, int64_t activation) {
    Tensor y = gated_forward(a, b, activation);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({a, b});
    ctx->saved_data["activation"] = activation;
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {Tensor(), Tensor(), Tensor()};
    const variable_list saved = ctx->get_saved_variables();
    auto [da, db] = gated_backward(unit_feature_stride(grads[0]), saved[0], saved[1],
                                   ctx->saved_data["activation"].toInt());
    return {da, db, Tensor()};
  }
};

Tensor gated_autograd(const Tensor& a, const Tensor& b, int64_t activation) {
  return GatedFunction::apply(a, b, activation)[0];
}

struct RopeFunction : public torch::autograd::Function<RopeFunction> {
  // q_grad / k_grad: whether q / k require a gradient (the other one's rotation is skipped in the backward).
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& cos,
                               const Tensor& sin, int64_t unsqueeze_dim, int64_t rotary_dim, bool q_grad, bool k_grad) {
    auto [q_out, k_out] = rope_forward(q, k, cos, sin, unsqueeze_dim, rotary_dim);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["q_stride"] = q_out.strides().vec();
    ctx->saved_data["k_stride"] = k_out.strides().vec();
    ctx->saved_data["unsqueeze_dim"] = unsqueeze_dim;
    ctx->saved_data["rotary_dim"] = rotary_dim;
    ctx->saved_data["q_grad"] = q_grad;
    ctx->saved_data["k_grad"] = k_grad;
    return {q_out, k_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const int64_t unsqueeze_dim = ctx->saved_data["unsqueeze_dim"].toInt();
    const Tensor dq_out = ctx->saved_data["q_grad"].toBool() && grads[0].defined() ? unit_feature_stride(grads[0])
                                                                                   : Tensor();
    const Tensor dk_out = ctx->saved_data["k_grad"].toBool() && grads[1].defined() ? unit_feature_stride(grads[1])
                                                                                   : Tensor();
    variable_list result(8);
    if (!dq_out.defined() && !dk_out.defined()) return result;
    // A missing side is a zero-head view of the other: the launch does no work for it.
    const Tensor dq_in = dq_out.defined() ? dq_out : dk_out.narrow(unsqueeze_dim, 0, 0);
    const Tensor dk_in = dk_out.defined() ? dk_out : dq_out.narrow(unsqueeze_dim, 0, 0);
    const std::vector<int64_t> q_stride =
        dq_out.defined() ? ctx->saved_data["q_stride"].toIntVector() : dq_in.strides().vec();
    const std::vector<int64_t> k_stride =
        dk_out.defined() ? ctx->saved_data["k_stride"].toIntVector() : dk_in.strides().vec();
    const variable_list saved = ctx->get_saved_variables();
    auto [dq, dk] = rope_backward(dq_in, dk_in, saved[0], saved[1], q_stride, k_stride, unsqueeze_dim,
                                  ctx->saved_data["rotary_dim"].toInt());
    if (dq_out.defined()) result[0] = dq;
    if (dk_out.defined()) result[1] = dk;
    return result;
  }
};

std::tuple<Tensor, Tensor> rope_autograd(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                                         int64_t unsqueeze_dim, int64_t rotary_dim, bool q_grad, bool k_grad) {
  const variable_list out = RopeFunction::apply(q, k, cos, sin, unsqueeze_dim, rotary_dim, q_grad, k_grad);
  return {out[0], out[1]};
}

struct EmbeddingFunction : public torch::autograd::Function<EmbeddingFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& indices, const Tensor& weight, int64_t pad) {
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({indices});
    ctx->saved_data["rows"] = weight.size(0);
    ctx->saved_data["pad"] = pad;
    return {embedding_forward(indices, weight, pad)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {Tensor(), Tensor(), Tensor()};
    const Tensor dw = embedding_backward(unit_feature_stride(grads[0]), ctx->get_saved_variables()[0],
                                         ctx->saved_data["rows"].toInt(), ctx->saved_data["pad"].toInt());
    return {Tensor(), dw, Tensor()};
  }
};

Tensor embedding_autograd(const Tensor& indices, const Tensor& weight, int64_t pad) {
  return EmbeddingFunction::apply(indices, weight, pad)[0];
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "liger_kernel's CUDA kernels (see backends/cuda)";
  m.def("rms_norm_forward", &rms_norm_forward);
  m.def("rms_norm_backward", &rms_norm_backward);
  m.def("layer_norm_forward", &layer_norm_forward);
  m.def("layer_norm_backward", &layer_norm_backward);
  m.def("rope_forward", &rope_forward);
  m.def("rope_backward", &rope_backward);
  m.def("gated_forward", &gated_forward);
  m.def("gated_backward", &gated_backward);
  m.def("cross_entropy_forward", &cross_entropy_forward);
  m.def("cross_entropy_scale_", &cross_entropy_scale_);
  m.def("embedding_forward", &embedding_forward);
  m.def("embedding_backward", &embedding_backward);
  m.def("rms_norm_autograd", &rms_norm_autograd);
  m.def("layer_norm_autograd", &layer_norm_autograd);
  m.def("gated_autograd", &gated_autograd);
  m.def("rope_autograd", &rope_autograd);
  m.def("embedding_autograd", &embedding_autograd);
}
