// Weight-only quantized GEMV / skinny GEMM launcher (torch-free: see bindings.cpp).
//
// y (M, N) = x (M, K) @ W^T for M <= 8 (decoding), W (N, K) stored quantized. The contract
// is the one documented on the fastlm_C::quant_gemv op in bindings.cpp:
//   bits 8: qweight int8 (N, K); scales float32 (N,); W[n, k] = q[n, k] * scales[n].
//   bits 4: qweight uint8 (N, K / 2), q(n, 2j) in bits 0-3 and q(n, 2j + 1) in bits 4-7 of
//           byte (n, j); scales float16 (N, K / G); zeros uint8 (N, K / G) or null (z = 8);
//           W[n, k] = (q(n, k) - z[n, k / G]) * scales[n, k / G], G in {32, 64, 128}.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "norm.cuh"  // DType

namespace fastlm {

constexpr int kQuantGemvMaxRows = 8;

struct QuantGemvParams {
  const void* x;          // (M, K) x_dtype, contiguous
  const void* qweight;    // int8 (N, K) or uint8 (N, K / 2), contiguous (int4: 16-byte aligned)
  const void* scales;     // float32 (N,) for 8 bits; float16 (N, K / G) for 4 bits
  const uint8_t* zeros;   // (N, K / G) for 4 bits, or null (symmetric); null for 8 bits
  void* y;                // (M, N) x_dtype, contiguous
  int64_t m = 0;          // 1 .. kQuantGemvMaxRows
  int64_t n = 0;
  int64_t k = 0;
  int bits = 0;           // 4 or 8
  int group_size = 0;     // G for 4 bits; ignored for 8 bits
  DType x_dtype = DType::kFloat16;  // kFloat16 or kBFloat16
};

// Float32 elements of scratch memory quant_gemv needs for `p` on the current device: the
// per-split partial sums when K is split across blocks (small N), else 0.
cudaError_t quant_gemv_workspace_size(const QuantGemvParams& p, int64_t* num_floats);

// Enqueues y = x @ W^T on `stream`; `workspace` holds quant_gemv_workspace_size(p) floats.
// Returns cudaErrorInvalidValue for arguments outside the contract (including a qweight of
// 4 bits that is not 16-byte aligned), else the launch error.
cudaError_t quant_gemv(const QuantGemvParams& p, float* workspace, cudaStream_t stream);

}  // namespace fastlm
