// torch bindings of the CUDA kernels: argument checks, output allocation, op registration.
// `import fastlm._C` registers the ops as torch.ops.fastlm_C.*; the Python layer wraps
// them in its own custom ops (with fake impls) and autograd.
//
// fastlm_C::norm_fwd(x, weight, bias, residual, eps, rms, out_dtype)
//     -> (y, residual_out, mean, rstd)
//   x (M, N) float32/float16/bfloat16, unit column stride, any row stride. residual: like x
//   (same dtype). weight, bias: (N,) contiguous, x's dtype or float32 (the same when both
//   given); bias must be None when rms. With a residual, s = round_to_x_dtype(x + residual)
//   is normalized and returned as residual_out (M, N), else residual_out is empty.
//   LayerNorm: y = (s - mean) * rstd * weight + bias with the biased variance;
//   RMSNorm: y = s * rstd * weight, rstd = 1 / sqrt(mean(s^2) + eps).
//   y (M, N) contiguous in out_dtype (x's dtype or float32); mean (M,) float32 (empty when
//   rms); rstd (M,) float32.
//
// fastlm_C::norm_bwd(dy, xs, weight, mean, rstd, dresidual_out, rms, has_bias, dx_dtype)
//     -> (dx, dweight, dbias)
//   dy (M, N) in the forward's out dtype; xs: the tensor that was normalized (x, or
//   residual_out); dresidual_out: None or the gradient of residual_out, added to dx.
//   dx (M, N) contiguous in dx_dtype (xs's dtype); dweight (N,) float32 when weight is
//   given, dbias (N,) float32 when has_bias, else empty. Deterministic (no atomics).
//
// fastlm_C::quant_gemv(x, qweight, scales, zeros, bits, group_size) -> y
//   Weight-only quantized linear for decoding: y (M, N) = x @ W^T in x's dtype, float32
//   accumulation. x (M, K) float16/bfloat16, contiguous, 1 <= M <= 8.
//   bits=8: qweight int8 (N, K); scales float32 (N,); zeros None; group_size ignored;
//     W[n, k] = qweight[n, k] * scales[n].
//   bits=4: qweight uint8 (N, K/2), byte (n, j) = q(n, 2j) | q(n, 2j + 1) << 4, q in [0, 15];
//     group_size G in {32, 64, 128} dividing K; scales float16 (N, K/G); zeros None
//     (symmetric, z = 8) or uint8 (N, K/G) with z in [0, 15];
//     W[n, k] = (q(n, k) - z[n, k/G]) * scales[n, k/G].
//   qweight, scales and zeros contiguous, on x's device.

#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <optional>
#include <tuple>

#include "norm.cuh"
#include "quant_gemv.cuh"

namespace {

using at::Tensor;

fastlm::DType to_dtype(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat:
      return fastlm::DType::kFloat32;
    case at::kHalf:
      return fastlm::DType::kFloat16;
    case at::kBFloat16:
      return fastlm::DType::kBFloat16;
    default:
      TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t);
  }
}

// The row stride the kernels use; a single row has none that matters.
int64_t row_stride(const Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

void check_device(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), ", got ",
              t.device());
}

// (M, N) like `like`, on its device, unit column stride; any row stride.
void check_rows(const Tensor& t, const char* name, const Tensor& like) {
  check_device(t, name, like);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == like.size(0) && t.size(1) == like.size(1), name,
              " must have shape ", like.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name,
              " must have unit stride along the hidden dimension, got strides ", t.strides());
}

// (N,) contiguous on x's device, in x's dtype or float32.
void check_vector(const Tensor& t, const char* name, const Tensor& x) {
  check_device(t, name, x);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), name, " must have shape (",
              x.size(1), ",), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, name,
              " must be ", x.scalar_type(), " or float32, got ", t.scalar_type());
}

// float32 (M,) statistics on x's device.
void check_stats(const Tensor& t, const char* name, const Tensor& x) {
  check_device(t, name, x);
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(0) && t.is_contiguous(), name,
              " must be a contiguous (", x.size(0), ",) tensor, got shape ", t.sizes());
}

void check_x(const Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), name, " must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, name, " must be 2-D (rows, hidden), got shape ", x.sizes());
  TORCH_CHECK(x.size(1) > 0 && x.size(1) <= INT_MAX, name,
              " must have a hidden size in [1, 2^31), got ", x.size(1));
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, name,
              " must have unit stride along the hidden dimension, got strides ", x.strides());
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, " failed: ", cudaGetErrorString(err));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd(const Tensor& x,
                                                    const std::optional<Tensor>& weight,
                                                    const std::optional<Tensor>& bias,
                                                    const std::optional<Tensor>& residual,
                                                    double eps, bool rms,
                                                    at::ScalarType out_dtype) {
  check_x(x, "x");
  const fastlm::DType x_dtype = to_dtype(x.scalar_type(), "x");
  TORCH_CHECK(out_dtype == x.scalar_type() || out_dtype == at::kFloat,
              "out_dtype must be x's dtype (", x.scalar_type(), ") or float32, got ", out_dtype);
  if (weight) check_vector(*weight, "weight", x);
  if (bias) {
    TORCH_CHECK(!rms, "bias must be None for RMSNorm (rms=True)");
    check_vector(*bias, "bias", x);
  }
  if (weight && bias) {
    TORCH_CHECK(weight->scalar_type() == bias->scalar_type(),
                "weight and bias must have the same dtype, got ", weight->scalar_type(), " and ",
                bias->scalar_type());
  }
  if (residual) {
    check_rows(*residual, "residual", x);
    TORCH_CHECK(residual->scalar_type() == x.scalar_type(), "residual must be ",
                x.scalar_type(), " like x, got ", residual->scalar_type());
  }

  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), cols = x.size(1);
  const auto stats = x.options().dtype(at::kFloat);
  Tensor y = at::empty({rows, cols}, x.options().dtype(out_dtype));
  Tensor residual_out = at::empty({residual ? rows : 0, residual ? cols : 0}, x.options());
  Tensor mean = at::empty({rms ? 0 : rows}, stats);
  Tensor rstd = at::empty({rows}, stats);

  fastlm::NormFwdParams p;
  p.x = x.data_ptr();
  p.residual = residual ? residual->data_ptr() : nullptr;
  p.weight = weight ? weight->data_ptr() : nullptr;
  p.bias = bias ? bias->data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.residual_out = residual ? residual_out.data_ptr() : nullptr;
  p.mean = rms ? nullptr : mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.rows = rows;
  p.cols = cols;
  p.x_row_stride = row_stride(x);
  p.residual_row_stride = residual ? row_stride(*residual) : 0;
  p.eps = static_cast<float>(eps);
  p.rms = rms;
  p.x_dtype = x_dtype;
  const Tensor* affine = weight ? &*weight : (bias ? &*bias : nullptr);
  p.w_dtype = affine ? to_dtype(affine->scalar_type(), "weight") : x_dtype;
  p.out_dtype = to_dtype(out_dtype, "out_dtype");
  check_launch(fastlm::norm_fwd(p, c10::cuda::getCurrentCUDAStream()), "fastlm_C::norm_fwd");
  return {y, residual_out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> norm_bwd(const Tensor& dy, const Tensor& xs,
                                            const std::optional<Tensor>& weight,
                                            const Tensor& mean, const Tensor& rstd,
                                            const std::optional<Tensor>& dresidual_out, bool rms,
                                            bool has_bias, at::ScalarType dx_dtype) {
  check_x(xs, "xs");
  const fastlm::DType x_dtype = to_dtype(xs.scalar_type(), "xs");
  check_rows(dy, "dy", xs);
  TORCH_CHECK(dy.scalar_type() == xs.scalar_type() || dy.scalar_type() == at::kFloat,
              "dy must be ", xs.scalar_type(), " (xs's dtype) or float32, got ",
              dy.scalar_type());
  TORCH_CHECK(dx_dtype == xs.scalar_type(), "dx_dtype must be xs's dtype (", xs.scalar_type(),
              "), got ", dx_dtype);
  if (weight) check_vector(*weight, "weight", xs);
  if (!rms) check_stats(mean, "mean", xs);
  check_stats(rstd, "rstd", xs);
  TORCH_CHECK(!(rms && has_bias), "has_bias must be False for RMSNorm (rms=True)");
  if (dresidual_out) {
    check_rows(*dresidual_out, "dresidual_out", xs);
    TORCH_CHECK(dresidual_out->scalar_type() == xs.scalar_type(), "dresidual_out must be ",
                xs.scalar_type(), " like xs, got ", dresidual_out->scalar_type());
  }

  const c10::cuda::CUDAGuard guard(xs.device());
  const int64_t rows = xs.size(0), cols = xs.size(1);
  const auto f32 = xs.options().dtype(at::kFloat);
  Tensor dx = at::empty({rows, cols}, xs.options());
  Tensor dweight = at::empty({weight ? cols : 0}, f32);
  Tensor dbias = at::empty({has_bias ? cols : 0}, f32);

  fastlm::NormBwdParams p;
  p.dy = dy.data_ptr();
  p.xs = xs.data_ptr();
  p.weight = weight ? weight->data_ptr() : nullptr;
  p.mean = rms ? nullptr : mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.dres = dresidual_out ? dresidual_out->data_ptr() : nullptr;
  p.dx = dx.data_ptr();
  p.dweight = weight ? dweight.data_ptr<float>() : nullptr;
  p.dbias = has_bias ? dbias.data_ptr<float>() : nullptr;
  p.rows = rows;
  p.cols = cols;
  p.dy_row_stride = row_stride(dy);
  p.xs_row_stride = row_stride(xs);
  p.dres_row_stride = dresidual_out ? row_stride(*dresidual_out) : 0;
  p.rms = rms;
  p.x_dtype = x_dtype;
  p.w_dtype = weight ? to_dtype(weight->scalar_type(), "weight") : x_dtype;
  p.dy_dtype = to_dtype(dy.scalar_type(), "dy");

  int64_t workspace_floats = 0;
  check_launch(fastlm::norm_bwd_workspace_size(p, &workspace_floats), "fastlm_C::norm_bwd");
  Tensor workspace = at::empty({workspace_floats}, f32);
  check_launch(fastlm::norm_bwd(p, workspace_floats ? workspace.data_ptr<float>() : nullptr,
                                c10::cuda::getCurrentCUDAStream()),
               "fastlm_C::norm_bwd");
  return {dx, dweight, dbias};
}

// qweight, scales or zeros of quant_gemv: dtype, shape, contiguous, on x's device.
void check_weight_part(const Tensor& t, const char* name, const Tensor& x, at::ScalarType dtype,
                       const char* dtype_name, at::IntArrayRef shape, int64_t bits) {
  check_device(t, name, x);
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype_name, " for bits=", bits,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, " for bits=", bits, ", got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous, got strides ", t.strides());
}

Tensor quant_gemv(const Tensor& x, const Tensor& qweight, const Tensor& scales,
                  const std::optional<Tensor>& zeros, int64_t bits, int64_t group_size) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "x must be float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, "x must be 2-D (M, K), got shape ", x.sizes());
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(m >= 1 && m <= fastlm::kQuantGemvMaxRows, "x must have 1 to ",
              fastlm::kQuantGemvMaxRows, " rows (M), got ", m);
  TORCH_CHECK(k >= 1 && k <= INT_MAX, "x must have K in [1, 2^31), got ", k);
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous, got strides ", x.strides());
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  TORCH_CHECK(qweight.dim() == 2, "qweight must be 2-D (N, K * bits / 8), got shape ",
              qweight.sizes());
  const int64_t n = qweight.size(0);
  Tensor qw = qweight;
  if (bits == 8) {
    check_weight_part(qweight, "qweight", x, at::kChar, "int8", {n, k}, bits);
    check_weight_part(scales, "scales", x, at::kFloat, "float32", {n}, bits);
    TORCH_CHECK(!zeros, "zeros must be None for bits=8 (int8 weights are symmetric)");
  } else {
    TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128,
                "group_size must be 32, 64 or 128 for bits=4, got ", group_size);
    TORCH_CHECK(k % group_size == 0, "K (x.size(1) = ", k, ") must be a multiple of group_size (",
                group_size, ") for bits=4");
    const int64_t groups = k / group_size;
    check_weight_part(qweight, "qweight", x, at::kByte, "uint8", {n, k / 2}, bits);
    check_weight_part(scales, "scales", x, at::kHalf, "float16", {n, groups}, bits);
    if (zeros) check_weight_part(*zeros, "zeros", x, at::kByte, "uint8", {n, groups}, bits);
    // The int4 kernel reads rows with 128-bit loads; a view that starts inside its storage
    // may be misaligned, and copying it is cheaper than a scalar kernel.
    if (reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 16 != 0) qw = qweight.clone();
  }

  const c10::cuda::CUDAGuard guard(x.device());
  Tensor y = at::empty({m, n}, x.options());
  fastlm::QuantGemvParams p;
  p.x = x.data_ptr();
  p.qweight = qw.data_ptr();
  p.scales = scales.data_ptr();
  p.zeros = zeros ? zeros->data_ptr<uint8_t>() : nullptr;
  p.y = y.data_ptr();
  p.m = m;
  p.n = n;
  p.k = k;
  p.bits = static_cast<int>(bits);
  p.group_size = static_cast<int>(group_size);
  p.x_dtype = to_dtype(x.scalar_type(), "x");

  int64_t workspace_floats = 0;
  check_launch(fastlm::quant_gemv_workspace_size(p, &workspace_floats), "fastlm_C::quant_gemv");
  Tensor workspace = at::empty({workspace_floats}, x.options().dtype(at::kFloat));
  check_launch(fastlm::quant_gemv(p, workspace_floats ? workspace.data_ptr<float>() : nullptr,
                                  c10::cuda::getCurrentCUDAStream()),
               "fastlm_C::quant_gemv");
  return y;
}

}  // namespace

TORCH_LIBRARY(fastlm_C, m) {
  m.def(
      "norm_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps, bool rms, "
      "ScalarType out_dtype) -> (Tensor y, Tensor residual_out, Tensor mean, Tensor rstd)");
  m.def(
      "norm_bwd(Tensor dy, Tensor xs, Tensor? weight, Tensor mean, Tensor rstd, "
      "Tensor? dresidual_out, bool rms, bool has_bias, ScalarType dx_dtype) "
      "-> (Tensor dx, Tensor dweight, Tensor dbias)");
  m.def(
      "quant_gemv(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, int bits, "
      "int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlm_C, CUDA, m) {
  m.impl("norm_fwd", &norm_fwd);
  m.impl("norm_bwd", &norm_bwd);
  m.impl("quant_gemv", &quant_gemv);
}

// The ops register when the library loads; the module itself is empty, so that
// `import fastlm._C` is all it takes.
PyMODINIT_FUNC PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "fastlm._C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
