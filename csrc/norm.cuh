// LayerNorm / RMSNorm forward and backward launchers (torch-free: see bindings.cpp).
//
// Shapes are (rows, cols) = (M, N) with unit column stride and any row stride (in elements).
// Statistics are float32. The contract these implement is the one documented on the
// fastlm_C::norm_fwd / norm_bwd ops in bindings.cpp; the Triton backend implements the same.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fastlm {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct NormFwdParams {
  const void* x;         // (M, N) x_dtype, row stride x_row_stride
  const void* residual;  // (M, N) x_dtype, row stride residual_row_stride; or null
  const void* weight;    // (N,) w_dtype; or null
  const void* bias;      // (N,) w_dtype; or null (always null when rms)
  void* y;               // (M, N) out_dtype, contiguous
  void* residual_out;    // (M, N) x_dtype, contiguous: round(x + residual); null iff !residual
  float* mean;           // (M,); null when rms
  float* rstd;           // (M,)
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t x_row_stride = 0;
  int64_t residual_row_stride = 0;
  float eps = 0.f;
  bool rms = false;
  DType x_dtype = DType::kFloat32;
  DType w_dtype = DType::kFloat32;    // x_dtype or kFloat32; ignored without weight and bias
  DType out_dtype = DType::kFloat32;  // x_dtype or kFloat32
};

struct NormBwdParams {
  const void* dy;        // (M, N) dy_dtype, row stride dy_row_stride
  const void* xs;        // (M, N) x_dtype: the normalized input, row stride xs_row_stride
  const void* weight;    // (N,) w_dtype; or null
  const float* mean;     // (M,); unused when rms
  const float* rstd;     // (M,)
  const void* dres;      // (M, N) x_dtype, row stride dres_row_stride, added to dx; or null
  void* dx;              // (M, N) x_dtype, contiguous
  float* dweight;        // (N,); null when there is no weight
  float* dbias;          // (N,); null when there is no bias
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t dy_row_stride = 0;
  int64_t xs_row_stride = 0;
  int64_t dres_row_stride = 0;
  bool rms = false;
  DType x_dtype = DType::kFloat32;
  DType w_dtype = DType::kFloat32;   // x_dtype or kFloat32; ignored without weight
  DType dy_dtype = DType::kFloat32;  // x_dtype or kFloat32
};

// Enqueues the forward on `stream`. Returns cudaErrorInvalidValue for a dtype combination
// outside the contract, else the launch error.
cudaError_t norm_fwd(const NormFwdParams& p, cudaStream_t stream);

// Float32 elements of scratch memory norm_bwd needs for `p` on the current device (the
// per-block partial sums of dweight and dbias that keep the reduction deterministic).
cudaError_t norm_bwd_workspace_size(const NormBwdParams& p, int64_t* num_floats);

// Enqueues the backward on `stream`; `workspace` holds norm_bwd_workspace_size(p) floats.
cudaError_t norm_bwd(const NormBwdParams& p, float* workspace, cudaStream_t stream);

}  // namespace fastlm
