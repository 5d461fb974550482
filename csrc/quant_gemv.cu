// Weight-only quantized GEMV for decoding (M <= 8 rows of x). Memory-bound at small M: the
// weight bytes dominate, so each weight row is streamed once with 128-bit loads and no
// dequantized weight is ever written back to memory.
//
// * A block is kWarps = 8 warps; each warp owns kCols = 2 consecutive output columns n (rows
//   of W). Its lanes sweep the block's K range 16 weight bytes (one uint4: 32 int4 or 16
//   int8 weights) at a time, lane l taking vectors l, l + 32, ...: a warp reads 512
//   contiguous bytes of each of its rows per step, and loads the next step's vectors before
//   working on the current ones, so two loads per row are in flight.
// * x is staged in shared memory once per block and K tile (the tile shrinks as M grows, so
//   the block stays within kSmemBytes at any K), converted to float as it is read and
//   reused for both columns of the warp. Its 16-byte pieces are XOR-swizzled so the lanes of
//   a quarter-warp (which read pieces 64 or 32 bytes apart) hit distinct banks.
// * Weights are unpacked in registers with exact magic-number conversions (no I2F, which
//   runs at a quarter of the FMA rate): nibbles become half2 (1024 + q) - (1024 + z), bytes
//   float (2^23 + 128 + q) - (2^23 + 128). Products accumulate in float32, M per column.
//   int4 group scales multiply each 8-weight partial sum (a 32-weight vector never straddles
//   a group, as G >= 32); the int8 row scale multiplies the final sum.
// * Lanes are summed with shuffles. When N is too small to give every SM a block, K is also
//   split across blocks (grid.y); the splits write float32 partials to a workspace that a
//   second kernel adds in a fixed order (deterministic, no atomics).
// * int8 weights whose rows are not all 16-byte aligned (K % 16 != 0, or a misaligned view)
//   take a scalar path: one byte a lane per step, x staged unswizzled.
//
// Cost (inner loop SASS, sm_90a): 5.3 instructions a weight at M = 1, 7.0 at M = 2 and 17.5 at
// M = 8 for int4 (int8: 5.0, 6.7, 16.6). An SM issues 128 lane-instructions a clock while an
// H100's HBM feeds it about 13 bytes a clock, so int8 stays memory-bound up to M = 4 but int4
// only at M = 1; beyond that issue rate bounds the kernel, and a tensor-core (mma.sync)
// variant would be the next step.

#include "quant_gemv.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fastlm {
namespace {

constexpr int kWarp = 32;
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarp;
// Output columns per warp. More columns would reuse each x value read from shared memory
// more often, but each costs registers (two vectors in flight, 8 decoded weights and M
// accumulators): with 4, ptxas spills the int4 kernels from M = 2 on.
constexpr int kCols = 2;
constexpr int kBlockCols = kWarps * kCols;
// x tile budget per block: two resident blocks fit the smallest shared memory we build for
// (sm_80) with room to spare.
constexpr int kSmemBytes = 32 * 1024;

// Magic numbers for exact integer-to-float conversion.
constexpr uint32_t kHalf1024x2 = 0x64006400u;  // half2(1024, 1024)
constexpr uint32_t kFloat2p23 = 0x4B000000u;   // 2^23
constexpr float kInt8Bias = 8388608.f + 128.f;

// How a path walks K: k values per lane-vector (one uint4 of weights, or one byte on the
// scalar path), and 16-byte x pieces per vector.
template <int BITS, bool SCALAR>
struct Walk {
  static constexpr int kVecK = SCALAR ? 1 : (BITS == 4 ? 32 : 16);
  static constexpr int kPieces = SCALAR ? 0 : kVecK / 8;
};

// The launch plan shared by the workspace query and the launch.
struct Plan {
  int64_t k_split = 0;  // k values per split (a multiple of the warp step unless 1 split)
  int splits = 1;
  int tile_k = 0;       // k values per shared-memory tile of x
  int64_t blocks_n = 0;
  size_t smem = 0;
};

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Eight x values (one 16-byte piece) as float.
template <typename T>
__device__ __forceinline__ void unpack_x(const uint4& raw, float (&out)[8]) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same_v<T, __half>) {
      __half2 h;
      static_assert(sizeof(h) == sizeof(words[i]), "half2 is one word");
      memcpy(&h, &words[i], sizeof(h));
      const float2 f = __half22float2(h);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    } else {
      // bfloat16 is the top half of a float32.
      out[2 * i] = __uint_as_float(words[i] << 16);
      out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
  }
}

// Word j of v; j is a constant wherever it is called (unrolled loops), so this folds away.
__device__ __forceinline__ uint32_t word(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

// (a & b) | c in one LOP3: ptxas does not fuse the two when b and c are both immediates.
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// Eight int4 weights q(8j + e) - z, e = 0..7, of word j (nibble e in bits 4e..4e+3), exact.
// zz is half2(1024 + z, 1024 + z).
__device__ __forceinline__ void unpack_int4(uint32_t w, uint32_t zz, float (&out)[8]) {
  __half2 z2;
  memcpy(&z2, &zz, sizeof(z2));
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    // Nibbles s and s + 4 land in the mantissas of half2(1024, 1024): 1024 + q.
    const uint32_t t = and_or(w >> (4 * s), 0x000f000fu, kHalf1024x2);
    __half2 h;
    memcpy(&h, &t, sizeof(h));
    const float2 f = __half22float2(__hsub2(h, z2));
    out[s] = f.x;
    out[s + 4] = f.y;
  }
}

// Four int8 weights of word w (byte e is k = 4j + e), exact.
__device__ __forceinline__ void unpack_int8(uint32_t w, float* out) {
  const uint32_t u = w ^ 0x80808080u;  // q + 128, unsigned
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    // Bytes (u.e, 0, 0, 0x4B): the float 2^23 + q + 128.
    const uint32_t f = __byte_perm(u, kFloat2p23, 0x7540u | e);
    out[e] = __uint_as_float(f) - kInt8Bias;
  }
}

// Physical slot of x piece i within a row of the tile. Lane l reads piece (v * P + p) of
// vector v = base + l; swapping the low bits by (i / 8) spreads a quarter-warp's eight
// reads over the eight 16-byte bank groups (P = 4: stride 64 bytes, P = 2: 32 bytes).
template <int P>
__device__ __forceinline__ int swizzle(int i) {
  return i ^ ((i >> 3) & (P - 1));
}

// Weights (and int4 group scale and zero) of one lane-vector for each of the warp's columns.
struct Fetch {
  uint4 w[kCols];
  uint32_t sz[kCols];  // int4: scale bits | zero << 16; unused for int8
};

// The warp's columns from the start of the current tile: column c is row `first + delta[c]`
// of W (past N, deltas repeat the last row). 32-bit deltas keep register use down.
struct Rows {
  const uint4* w;               // the first row's weights, as 16-byte vectors
  const unsigned short* scale;  // int4: the first row's group scales
  const uint8_t* zero;          // int4: the first row's zeros; null when symmetric
  int delta[kCols];
  int row_vecs;     // weight vectors per row
  int groups;       // int4: groups per row
  int group_shift;  // int4: log2(vectors per group)
};

template <int BITS>
__device__ __forceinline__ void fetch(const Rows& r, int v, Fetch& f) {
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    f.w[c] = __ldg(r.w + r.delta[c] * r.row_vecs + v);
    if constexpr (BITS == 4) {
      // Tiles start on a group boundary and a vector never straddles one.
      const int g = r.delta[c] * r.groups + (v >> r.group_shift);
      const uint32_t z = r.zero != nullptr ? __ldg(r.zero + g) : 8u;
      f.sz[c] = static_cast<uint32_t>(__ldg(r.scale + g)) | (z << 16);
    }
  }
}

// acc[c][m] += sum over the vector's k of x[m, k] * W[n_c, k] (int4: scaled; int8: not yet).
// xs: the tile's x pieces, row m at m * row_pieces.
template <typename T, int M, int BITS>
__device__ __forceinline__ void dot_vector(const Fetch& f, const uint4* xs, int row_pieces,
                                           int v, float (&acc)[kCols][M]) {
  constexpr int P = Walk<BITS, false>::kPieces;
  float scale[kCols];
  uint32_t zz[kCols];
  if constexpr (BITS == 4) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      scale[c] = __half2float(__ushort_as_half(static_cast<unsigned short>(f.sz[c] & 0xffffu)));
      // half(1024 + z) = 0x6400 + z for z in [0, 15].
      zz[c] = (0x6400u + (f.sz[c] >> 16)) * 0x10001u;
    }
  }
#pragma unroll
  for (int p = 0; p < P; ++p) {
    // The 8 weights of x piece p, per column.
    float wf[kCols][8];
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      if constexpr (BITS == 4) {
        unpack_int4(word(f.w[c], p), zz[c], wf[c]);
      } else {
        unpack_int8(word(f.w[c], 2 * p), wf[c]);
        unpack_int8(word(f.w[c], 2 * p + 1), wf[c] + 4);
      }
    }
    const int slot = swizzle<P>(v * P + p);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float xf[8];
      unpack_x<T>(xs[m * row_pieces + slot], xf);
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        if constexpr (BITS == 4) {
          float part = xf[0] * wf[c][0];
#pragma unroll
          for (int e = 1; e < 8; ++e) part = fmaf(xf[e], wf[c][e], part);
          acc[c][m] = fmaf(scale[c], part, acc[c][m]);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[c][m] = fmaf(xf[e], wf[c][e], acc[c][m]);
        }
      }
    }
  }
}

// Copies x[:, k0 : k0 + tk] into shared memory: 16-byte pieces, swizzled (vector paths), or
// elements in order (scalar path).
template <typename T, int M, int P>
__device__ __forceinline__ void stage_x(const T* x, int64_t k, int64_t k0, int tk, bool aligned,
                                        void* smem) {
  if constexpr (P == 0) {
    T* xs = static_cast<T*>(smem);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      for (int i = threadIdx.x; i < tk; i += kThreads) xs[m * tk + i] = x[m * k + k0 + i];
    }
  } else {
    uint4* xs = static_cast<uint4*>(smem);
    const int pieces = tk / 8;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const T* row = x + m * k + k0;
      for (int i = threadIdx.x; i < pieces; i += kThreads) {
        uint4 piece;
        if (aligned) {
          piece = __ldg(reinterpret_cast<const uint4*>(row) + i);
        } else {
          T e[8];
#pragma unroll
          for (int j = 0; j < 8; ++j) e[j] = row[8 * i + j];
          memcpy(&piece, e, sizeof(piece));
        }
        xs[m * pieces + swizzle<P>(i)] = piece;
      }
    }
  }
}

template <typename T, int M, int BITS, bool SCALAR>
__global__ void __launch_bounds__(kThreads, 2)
    quant_gemv_kernel(const QuantGemvParams p, const Plan plan, float* workspace) {
  using W = Walk<BITS, SCALAR>;
  extern __shared__ uint4 smem[];
  const int lane = threadIdx.x % kWarp;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarp) * kCols;
  const bool active = n0 < p.n;
  const int64_t k_begin = blockIdx.y * plan.k_split;
  const int64_t k_end = min64(p.k, k_begin + plan.k_split);
  const T* x = static_cast<const T*>(p.x);
  const bool x_aligned = reinterpret_cast<uintptr_t>(x) % 16 == 0 && p.k % 8 == 0;
  const int64_t row_bytes = p.k * BITS / 8;
  const int64_t groups = BITS == 4 ? p.k / p.group_size : 0;

  float acc[kCols][M];
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
#pragma unroll
    for (int m = 0; m < M; ++m) acc[c][m] = 0.f;
  }

  for (int64_t k0 = k_begin; k0 < k_end; k0 += plan.tile_k) {
    const int tk = static_cast<int>(min64(plan.tile_k, k_end - k0));
    stage_x<T, M, W::kPieces>(x, p.k, k0, tk, x_aligned, smem);
    __syncthreads();
    if (active) {
      // Columns past N re-read row N - 1; their sums are never written.
      int64_t rows[kCols];
#pragma unroll
      for (int c = 0; c < kCols; ++c) rows[c] = min64(n0 + c, p.n - 1);
      if constexpr (SCALAR) {
        const T* xs = reinterpret_cast<const T*>(smem);
        const int8_t* qw = static_cast<const int8_t*>(p.qweight) + k0;
        for (int i = lane; i < tk; i += kWarp) {
          float wf[kCols];
#pragma unroll
          for (int c = 0; c < kCols; ++c) wf[c] = __ldg(qw + rows[c] * p.k + i);
#pragma unroll
          for (int m = 0; m < M; ++m) {
            const float xv = to_float(xs[m * tk + i]);
#pragma unroll
            for (int c = 0; c < kCols; ++c) acc[c][m] = fmaf(xv, wf[c], acc[c][m]);
          }
        }
      } else {
        Rows r;
        const int64_t first = rows[0];
        r.row_vecs = static_cast<int>(row_bytes / 16);
        r.w = reinterpret_cast<const uint4*>(p.qweight) + first * r.row_vecs + k0 / W::kVecK;
#pragma unroll
        for (int c = 0; c < kCols; ++c) r.delta[c] = static_cast<int>(rows[c] - first);
        if constexpr (BITS == 4) {
          r.groups = static_cast<int>(groups);
          r.group_shift = __ffs(p.group_size / W::kVecK) - 1;
          const int64_t g0 = first * groups + k0 / p.group_size;
          r.scale = static_cast<const unsigned short*>(p.scales) + g0;
          r.zero = p.zeros != nullptr ? p.zeros + g0 : nullptr;
        }
        const int nvec = tk / W::kVecK;
        const int row_pieces = tk / 8;
        Fetch cur, next;
        if (lane < nvec) fetch<BITS>(r, lane, cur);
        for (int v = lane; v < nvec; v += kWarp) {
          if (v + kWarp < nvec) fetch<BITS>(r, v + kWarp, next);
          dot_vector<T, M, BITS>(cur, smem, row_pieces, v, acc);
          cur = next;
        }
      }
    }
    __syncthreads();  // smem is restaged for the next tile
  }
  if (!active) return;

#pragma unroll
  for (int c = 0; c < kCols; ++c) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
#pragma unroll
      for (int off = kWarp / 2; off > 0; off /= 2) {
        acc[c][m] += __shfl_xor_sync(0xffffffffu, acc[c][m], off);
      }
    }
  }
  // Every lane holds every sum; lane c * M + m writes (m, n0 + c).
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    const int64_t n = n0 + c;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      if (lane != c * M + m || n >= p.n) continue;
      if (plan.splits > 1) {
        workspace[(blockIdx.y * p.m + m) * p.n + n] = acc[c][m];
      } else {
        const float s = BITS == 8 ? static_cast<const float*>(p.scales)[n] : 1.f;
        static_cast<T*>(p.y)[m * p.n + n] = from_float<T>(acc[c][m] * s);
      }
    }
  }
}

// y = sum over splits of the partials (in split order), times the int8 row scale.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    quant_gemv_split_sum(const float* workspace, int splits, int64_t m, int64_t n,
                         const float* row_scale, T* y) {
  const int64_t total = m * n;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    float s = 0.f;
    for (int j = 0; j < splits; ++j) s += workspace[j * total + i];
    if (row_scale != nullptr) s *= row_scale[i % n];
    y[i] = from_float<T>(s);
  }
}

// ------------------------------------------------------------------------------------------
// Host side

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

bool valid(const QuantGemvParams& p) {
  if (p.m < 1 || p.m > kQuantGemvMaxRows || p.n < 0 || p.k < 1 || p.k > INT_MAX) return false;
  if (p.x_dtype != DType::kFloat16 && p.x_dtype != DType::kBFloat16) return false;
  if (p.bits == 8) return p.zeros == nullptr;
  if (p.bits != 4) return false;
  const int g = p.group_size;
  return (g == 32 || g == 64 || g == 128) && p.k % g == 0 && aligned16(p.qweight);
}

// int8 rows take 128-bit loads when every row starts 16-byte aligned.
bool scalar_path(const QuantGemvParams& p) {
  return p.bits == 8 && (p.k % 16 != 0 || !aligned16(p.qweight));
}

cudaError_t make_plan(const QuantGemvParams& p, Plan* plan) {
  const bool scalar = scalar_path(p);
  const int vec_k = scalar ? 1 : (p.bits == 4 ? 32 : 16);
  const int64_t warp_k = static_cast<int64_t>(kWarp) * vec_k;
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  }
  if (err != cudaSuccess) return err;

  plan->blocks_n = ceil_div(p.n, kBlockCols);
  // Split K when the columns alone leave SMs idle: about two blocks an SM, each split at
  // least one warp step long.
  int64_t want = 1;
  if (plan->blocks_n < sms) want = ceil_div(2 * static_cast<int64_t>(sms), plan->blocks_n);
  want = std::min(want, ceil_div(p.k, warp_k));
  plan->k_split = p.k;
  if (want > 1) plan->k_split = ceil_div(ceil_div(p.k, want), warp_k) * warp_k;
  plan->splits = static_cast<int>(ceil_div(p.k, plan->k_split));
  if (plan->splits == 1) plan->k_split = p.k;

  // Whole warp steps per tile, as many as kSmemBytes holds for M rows. Tiles (and splits)
  // then start on a group boundary, which the int4 scale indexing relies on.
  const int64_t fit = std::max<int64_t>(kSmemBytes / (2 * p.m) / warp_k * warp_k, warp_k);
  plan->tile_k = static_cast<int>(std::min(fit, plan->k_split));
  plan->smem = static_cast<size_t>(p.m) * plan->tile_k * 2;
  return cudaSuccess;
}

template <int M, typename F>
cudaError_t with_rows_from(int64_t m, F&& f) {
  if constexpr (M > kQuantGemvMaxRows) {
    return cudaErrorInvalidValue;
  } else {
    if (m == M) return f(std::integral_constant<int, M>{});
    return with_rows_from<M + 1>(m, f);
  }
}

template <typename T, int M, int BITS, bool SCALAR>
cudaError_t launch(const QuantGemvParams& p, const Plan& plan, float* workspace,
                   cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(plan.blocks_n), static_cast<unsigned>(plan.splits));
  quant_gemv_kernel<T, M, BITS, SCALAR><<<grid, kThreads, plan.smem, stream>>>(p, plan, workspace);
  return cudaGetLastError();
}

template <typename T>
cudaError_t run(const QuantGemvParams& p, const Plan& plan, float* workspace,
                cudaStream_t stream) {
  const bool scalar = scalar_path(p);
  cudaError_t err = with_rows_from<1>(p.m, [&](auto rows) {
    constexpr int M = decltype(rows)::value;
    if (p.bits == 4) return launch<T, M, 4, false>(p, plan, workspace, stream);
    if (scalar) return launch<T, M, 8, true>(p, plan, workspace, stream);
    return launch<T, M, 8, false>(p, plan, workspace, stream);
  });
  if (err != cudaSuccess || plan.splits == 1) return err;
  const int64_t total = p.m * p.n;
  const int64_t grid = std::min<int64_t>(ceil_div(total, kThreads), 65535);
  const float* row_scale = p.bits == 8 ? static_cast<const float*>(p.scales) : nullptr;
  quant_gemv_split_sum<T><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
      workspace, plan.splits, p.m, p.n, row_scale, static_cast<T*>(p.y));
  return cudaGetLastError();
}

}  // namespace

cudaError_t quant_gemv_workspace_size(const QuantGemvParams& p, int64_t* num_floats) {
  *num_floats = 0;
  if (!valid(p)) return cudaErrorInvalidValue;
  if (p.n == 0) return cudaSuccess;
  Plan plan;
  const cudaError_t err = make_plan(p, &plan);
  if (err == cudaSuccess && plan.splits > 1) *num_floats = plan.splits * p.m * p.n;
  return err;
}

cudaError_t quant_gemv(const QuantGemvParams& p, float* workspace, cudaStream_t stream) {
  if (!valid(p)) return cudaErrorInvalidValue;
  if (p.n == 0) return cudaSuccess;
  Plan plan;
  const cudaError_t err = make_plan(p, &plan);
  if (err != cudaSuccess) return err;
  if (plan.splits > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  if (p.x_dtype == DType::kFloat16) return run<__half>(p, plan, workspace, stream);
  return run<__nv_bfloat16>(p, plan, workspace, stream);
}

}  // namespace fastlm
