// LayerNorm / RMSNorm kernels. Memory-bound, so the design follows Apex's fast layer norm:
//
// * A row of up to 16384 elements forward, 8192 backward (4096 on the unaligned scalar
//   path) is read once and kept in registers: a warp per row for small rows (several rows
//   per block), up to 16 warps per row for big ones. Longer rows are re-read (mostly from
//   L2) by a block per row.
// * Loads and stores are 128-bit when every pointer and row stride allows it, scalar
//   otherwise. Statistics and gradients accumulate in float32.
// * dweight / dbias are summed without atomics: each block writes its rows' sums to its own
//   row of a (blocks, N) workspace, and a second kernel adds those rows in a fixed order.

#include "norm.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

namespace fastlm {
namespace {

constexpr int kWarp = 32;
// 512 threads per block lets ptxas use up to 128 registers a thread, room for a cached row.
// Kernels declare a minimum of one resident block, or ptxas caps them at 64 registers
// (two blocks an SM) and spills.
constexpr int kMaxBlock = 512;
constexpr int kMaxWarps = kMaxBlock / kWarp;
// Block size when rows are small enough that several share a block.
constexpr int kRowBlock = 256;
// Row elements each thread caches in registers. The backward holds four such arrays
// (x, dy and the two gradient sums), the forward one. The scalar (unaligned) path caches
// fewer: each scalar element needs its own 64-bit address register.
constexpr int kFwdCache = 32;
constexpr int kBwdCache = 16;
constexpr int kScalarCache = 8;

// Vectors of VEC elements a thread caches, for a budget of `cache` elements.
__host__ __device__ constexpr int cached_vectors(int cache, int vec) {
  return vec == 1 ? kScalarCache : cache / vec;
}
// Rows the uncached backward sweeps together, so its workspace read-modify-write is paid
// once per kBwdGroup rows rather than per row.
constexpr int kBwdGroup = 8;
constexpr int64_t kMaxGrid = INT_MAX;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

// Element <-> 32-bit word packing for 128-bit loads and stores.
template <typename U>
struct Pack;

template <>
struct Pack<float> {
  static constexpr int kPerWord = 1;
  __device__ static float get(uint32_t w, int) { return __uint_as_float(w); }
  __device__ static uint32_t put(const float* v) { return __float_as_uint(v[0]); }
};

template <>
struct Pack<__half> {
  static constexpr int kPerWord = 2;
  __device__ static float get(uint32_t w, int i) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> (16 * i))));
  }
  __device__ static uint32_t put(const float* v) {
    return __half_as_ushort(__float2half_rn(v[0])) |
           (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(v[1]))) << 16);
  }
};

template <>
struct Pack<__nv_bfloat16> {
  static constexpr int kPerWord = 2;
  __device__ static float get(uint32_t w, int i) {
    return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(w >> (16 * i))));
  }
  __device__ static uint32_t put(const float* v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v[0])) |
           (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(v[1]))) << 16);
  }
};

// VEC consecutive elements at p, as float. For VEC > 1, p is 16-byte aligned and VEC
// elements of U are whole 16-byte chunks (U is never narrower than the row dtype).
template <int VEC, typename U>
__device__ __forceinline__ void load(const U* p, float (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = to_float(*p);
  } else {
    constexpr int kPer = 4 * Pack<U>::kPerWord;
    static_assert(VEC % kPer == 0, "a vector is whole 16-byte chunks");
#pragma unroll
    for (int c = 0; c < VEC / kPer; ++c) {
      const uint4 raw = reinterpret_cast<const uint4*>(p)[c];
      const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
#pragma unroll
        for (int i = 0; i < Pack<U>::kPerWord; ++i) {
          out[c * kPer + k * Pack<U>::kPerWord + i] = Pack<U>::get(words[k], i);
        }
      }
    }
  }
}

// A 128-bit global store. Written out because NVVM splits some uint4 stores (inside the
// uncached kernels' loops) into four 32-bit ones.
__device__ __forceinline__ void store_global_v4(void* p, uint32_t a, uint32_t b, uint32_t c,
                                                uint32_t d) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(a), "r"(b), "r"(c),
               "r"(d)
               : "memory");
}

// VEC elements to global memory at p (16-byte aligned for VEC > 1).
template <int VEC, typename U>
__device__ __forceinline__ void store(U* p, const float (&in)[VEC]) {
  if constexpr (VEC == 1) {
    *p = from_float<U>(in[0]);
  } else {
    constexpr int kPer = 4 * Pack<U>::kPerWord;
    static_assert(VEC % kPer == 0, "a vector is whole 16-byte chunks");
#pragma unroll
    for (int c = 0; c < VEC / kPer; ++c) {
      const float* v = in + c * kPer;
      constexpr int kW = Pack<U>::kPerWord;
      store_global_v4(reinterpret_cast<uint4*>(p) + c, Pack<U>::put(v), Pack<U>::put(v + kW),
                      Pack<U>::put(v + 2 * kW), Pack<U>::put(v + 3 * kW));
    }
  }
}

// Weight (or bias) vector, or `fill` when the tensor is absent.
template <int VEC, typename W>
__device__ __forceinline__ void load_or(const void* p, int offset, float fill,
                                        float (&out)[VEC]) {
  if (p != nullptr) {
    load<VEC>(static_cast<const W*>(p) + offset, out);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = fill;
  }
}

// Sums K values over the threads of one row (the blockDim.x threads sharing threadIdx.y).
// Every thread ends with the same bits: the xor butterfly adds the same pair on both lanes,
// and every thread adds the per-warp sums in the same order. smem: kMaxWarps * K floats.
template <int K>
__device__ __forceinline__ void row_sum(float (&v)[K], float* smem) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int m = kWarp / 2; m > 0; m /= 2) v[k] += __shfl_xor_sync(0xffffffffu, v[k], m);
  }
  const int warps = blockDim.x / kWarp;
  if (warps == 1) return;
  float* s = smem + threadIdx.y * warps * K;
  if (threadIdx.x % kWarp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) s[(threadIdx.x / kWarp) * K + k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    float t = 0.f;
    for (int i = 0; i < warps; ++i) t += s[i * K + k];
    v[k] = t;
  }
  __syncthreads();  // smem is reused by the next call
}

// Count, mean and sum of squared deviations of a set of values (Chan et al.).
struct Stats {
  float n;
  float mean;
  float m2;
};

// Bitwise symmetric in a and b (explicit roundings keep the compiler from fusing one side
// into an FMA), so a butterfly leaves every lane with the same result.
__device__ __forceinline__ Stats merge(Stats a, Stats b) {
  const float n = a.n + b.n;
  if (n == 0.f) return a;
  const float delta = b.mean - a.mean;
  const float mean = __fdiv_rn(__fadd_rn(__fmul_rn(a.n, a.mean), __fmul_rn(b.n, b.mean)), n);
  const float m2 = __fadd_rn(__fadd_rn(a.m2, b.m2),
                             __fmul_rn(__fmul_rn(delta, delta), __fdiv_rn(__fmul_rn(a.n, b.n), n)));
  return {n, mean, m2};
}

// Merges Stats over a 1-D block (one row per block). smem: kMaxWarps * 3 floats.
__device__ __forceinline__ Stats row_stats(Stats s, float* smem) {
#pragma unroll
  for (int m = kWarp / 2; m > 0; m /= 2) {
    const Stats o{__shfl_xor_sync(0xffffffffu, s.n, m), __shfl_xor_sync(0xffffffffu, s.mean, m),
                  __shfl_xor_sync(0xffffffffu, s.m2, m)};
    s = merge(s, o);
  }
  const int warps = blockDim.x / kWarp;
  if (warps == 1) return s;
  if (threadIdx.x % kWarp == 0) {
    const int w = threadIdx.x / kWarp;
    smem[w * 3] = s.n;
    smem[w * 3 + 1] = s.mean;
    smem[w * 3 + 2] = s.m2;
  }
  __syncthreads();
  Stats t{0.f, 0.f, 0.f};
  for (int i = 0; i < warps; ++i) {
    t = merge(t, Stats{smem[i * 3], smem[i * 3 + 1], smem[i * 3 + 2]});
  }
  __syncthreads();
  return t;
}

// ------------------------------------------------------------------------------------------
// Forward

// Block (tpr, rows_per_block): threadIdx.y picks the row, the tpr threads of a row each
// cache up to NV vectors of it; vector j of a thread is j * tpr + threadIdx.x (coalesced).
template <typename T, typename W, typename O, int VEC>
__global__ void __launch_bounds__(kMaxBlock, 1) norm_fwd_cached(const NormFwdParams p) {
  constexpr int NV = cached_vectors(kFwdCache, VEC);
  __shared__ float red[kMaxWarps];
  const int tpr = blockDim.x;
  const int nvec = static_cast<int>(p.cols / VEC);
  const float cols = static_cast<float>(p.cols);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  // The loop bound depends on the block only, so every thread meets the same barriers.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < p.rows;
       base += stride) {
    const int64_t row = base + threadIdx.y;
    const bool row_ok = row < p.rows;
    const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;

    float s[NV][VEC];
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int v = j * tpr + threadIdx.x;
      if (row_ok && v < nvec) {
        load<VEC>(x + v * VEC, s[j]);
        if (p.residual != nullptr) {
          float r[VEC];
          load<VEC>(static_cast<const T*>(p.residual) + row * p.residual_row_stride + v * VEC, r);
          // Normalize the rounded sum, as unfused `norm(x + residual)` in x's dtype does.
#pragma unroll
          for (int i = 0; i < VEC; ++i) s[j][i] = round_to<T>(s[j][i] + r[i]);
          store<VEC>(static_cast<T*>(p.residual_out) + row * p.cols + v * VEC, s[j]);
        }
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) s[j][i] = 0.f;
      }
    }

    float mean = 0.f;
    if (!p.rms) {
      float sum[1] = {0.f};
#pragma unroll
      for (int j = 0; j < NV; ++j) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) sum[0] += s[j][i];
      }
      row_sum(sum, red);
      mean = sum[0] / cols;
    }
    // Second pass over the cached row: sum((s - mean)^2) has no cancellation.
    float sq[1] = {0.f};
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      if (j * tpr + static_cast<int>(threadIdx.x) < nvec) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float d = s[j][i] - mean;
          sq[0] += d * d;
        }
      }
    }
    row_sum(sq, red);
    const float rstd = rsqrtf(sq[0] / cols + p.eps);

    if (row_ok) {
      if (threadIdx.x == 0) {
        if (p.mean != nullptr) p.mean[row] = mean;
        p.rstd[row] = rstd;
      }
      O* y = static_cast<O*>(p.y) + row * p.cols;
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int v = j * tpr + threadIdx.x;
        if (v < nvec) {
          float w[VEC], b[VEC], out[VEC];
          load_or<VEC, W>(p.weight, v * VEC, 1.f, w);
          load_or<VEC, W>(p.bias, v * VEC, 0.f, b);
#pragma unroll
          for (int i = 0; i < VEC; ++i) out[i] = (s[j][i] - mean) * rstd * w[i] + b[i];
          store<VEC>(y + v * VEC, out);
        }
      }
    }
  }
}

// One row per block iteration, for rows too long to cache: a Welford pass for the
// statistics, then a second read of the row (from L2 mostly) to normalize it.
template <typename T, typename W, typename O, int VEC>
__global__ void __launch_bounds__(kMaxBlock, 1) norm_fwd_uncached(const NormFwdParams p) {
  __shared__ float red[kMaxWarps * 3];
  const int nvec = static_cast<int>(p.cols / VEC);
  const float cols = static_cast<float>(p.cols);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
    // The row that is normalized: residual_out when a residual is fused, else x.
    T* res_out = p.residual != nullptr ? static_cast<T*>(p.residual_out) + row * p.cols : nullptr;
    const T* src = p.residual != nullptr ? res_out : x;

    Stats st{0.f, 0.f, 0.f};
    float sq = 0.f;
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
      float s[VEC];
      load<VEC>(x + v * VEC, s);
      if (p.residual != nullptr) {
        float r[VEC];
        load<VEC>(static_cast<const T*>(p.residual) + row * p.residual_row_stride + v * VEC, r);
#pragma unroll
        for (int i = 0; i < VEC; ++i) s[i] = round_to<T>(s[i] + r[i]);
        store<VEC>(res_out + v * VEC, s);
      }
      if (p.rms) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) sq += s[i] * s[i];
      } else {
        // Two-pass statistics of the vector, merged into the thread's running ones: one
        // division per vector instead of per element.
        float vmean = 0.f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) vmean += s[i];
        vmean *= 1.f / VEC;
        float vm2 = 0.f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) vm2 += (s[i] - vmean) * (s[i] - vmean);
        st = merge(st, Stats{static_cast<float>(VEC), vmean, vm2});
      }
    }
    float mean = 0.f;
    float var;
    if (p.rms) {
      float sum[1] = {sq};
      row_sum(sum, red);
      var = sum[0] / cols;
    } else {
      st = row_stats(st, red);
      mean = st.mean;
      var = st.m2 / cols;
    }
    const float rstd = rsqrtf(var + p.eps);
    if (threadIdx.x == 0) {
      if (p.mean != nullptr) p.mean[row] = mean;
      p.rstd[row] = rstd;
    }

    // Each thread re-reads the very elements it wrote to residual_out, so no barrier.
    O* y = static_cast<O*>(p.y) + row * p.cols;
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
      float s[VEC], w[VEC], b[VEC], out[VEC];
      load<VEC>(src + v * VEC, s);
      load_or<VEC, W>(p.weight, v * VEC, 1.f, w);
      load_or<VEC, W>(p.bias, v * VEC, 0.f, b);
#pragma unroll
      for (int i = 0; i < VEC; ++i) out[i] = (s[i] - mean) * rstd * w[i] + b[i];
      store<VEC>(y + v * VEC, out);
    }
  }
}

// ------------------------------------------------------------------------------------------
// Backward

// Sums a thread's cached gradient columns over the rows of its block and writes them to
// out (this block's workspace row). Rows of one block share columns (threadIdx.y slots),
// so with several slots their sums meet in shared memory and are added in slot order.
template <int NV, int VEC>
__device__ __forceinline__ void write_partial(const float (&acc)[NV][VEC], float* out,
                                              float* slots, int nvec) {
  const int tpr = blockDim.x;
  if (blockDim.y == 1) {
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int v = j * tpr + threadIdx.x;
      if (v < nvec) store<VEC>(out + v * VEC, acc[j]);
    }
    return;
  }
  const int cols = nvec * VEC;
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int v = j * tpr + threadIdx.x;
    if (v < nvec) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) slots[threadIdx.y * cols + v * VEC + i] = acc[j][i];
    }
  }
  __syncthreads();
  const int threads = blockDim.x * blockDim.y;
  for (int c = threadIdx.y * blockDim.x + threadIdx.x; c < cols; c += threads) {
    float t = 0.f;
    for (int r = 0; r < static_cast<int>(blockDim.y); ++r) t += slots[r * cols + c];
    out[c] = t;
  }
  __syncthreads();  // slots is reused for the next gradient
}

// Same layout as norm_fwd_cached. Each thread keeps its columns' dweight / dbias sums in
// registers across all the rows it visits; workspace rows [0, grid) get dweight partials,
// rows [grid, 2 * grid) dbias partials.
template <typename T, typename W, typename O, int VEC>
__global__ void __launch_bounds__(kMaxBlock, 1)
    norm_bwd_cached(const NormBwdParams p, float* workspace) {
  constexpr int NV = cached_vectors(kBwdCache, VEC);
  __shared__ float red[kMaxWarps * 2];
  extern __shared__ float slots[];
  const int tpr = blockDim.x;
  const int nvec = static_cast<int>(p.cols / VEC);
  const float cols = static_cast<float>(p.cols);
  float dw[NV][VEC], db[NV][VEC];
#pragma unroll
  for (int j = 0; j < NV; ++j) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) dw[j][i] = db[j][i] = 0.f;
  }

  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < p.rows;
       base += stride) {
    const int64_t row = base + threadIdx.y;
    const bool row_ok = row < p.rows;
    const T* xs = static_cast<const T*>(p.xs) + row * p.xs_row_stride;
    const O* dy = static_cast<const O*>(p.dy) + row * p.dy_row_stride;

    // Rows past the end cache zeros, so they add nothing to any sum.
    float xv[NV][VEC], dyv[NV][VEC];
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int v = j * tpr + threadIdx.x;
      if (row_ok && v < nvec) {
        load<VEC>(xs + v * VEC, xv[j]);
        load<VEC>(dy + v * VEC, dyv[j]);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) xv[j][i] = dyv[j][i] = 0.f;
      }
    }
    const float mean = (row_ok && !p.rms) ? p.mean[row] : 0.f;
    const float rstd = row_ok ? p.rstd[row] : 0.f;

    float sums[2] = {0.f, 0.f};  // sum(g * xhat), sum(g)
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int v = j * tpr + threadIdx.x;
      if (v < nvec) {
        float w[VEC];
        load_or<VEC, W>(p.weight, v * VEC, 1.f, w);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float g = dyv[j][i] * w[i];
          sums[0] += g * ((xv[j][i] - mean) * rstd);
          sums[1] += g;
        }
      }
    }
    row_sum(sums, red);
    const float c1 = sums[0] / cols;
    const float c2 = p.rms ? 0.f : sums[1] / cols;

    if (row_ok) {
      T* dx = static_cast<T*>(p.dx) + row * p.cols;
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int v = j * tpr + threadIdx.x;
        if (v < nvec) {
          float w[VEC], add[VEC], out[VEC];
          load_or<VEC, W>(p.weight, v * VEC, 1.f, w);
          if (p.dres != nullptr) {
            load<VEC>(static_cast<const T*>(p.dres) + row * p.dres_row_stride + v * VEC, add);
          } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i) add[i] = 0.f;
          }
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            const float xhat = (xv[j][i] - mean) * rstd;
            const float g = dyv[j][i] * w[i];
            out[i] = rstd * (g - xhat * c1 - c2) + add[i];
            dw[j][i] += dyv[j][i] * xhat;
            db[j][i] += dyv[j][i];
          }
          store<VEC>(dx + v * VEC, out);
        }
      }
    }
  }

  const int64_t grid = gridDim.x;
  if (p.dweight != nullptr) write_partial(dw, workspace + blockIdx.x * p.cols, slots, nvec);
  if (p.dbias != nullptr) {
    write_partial(db, workspace + (grid + blockIdx.x) * p.cols, slots, nvec);
  }
}

// For rows too long to cache: a 1-D block sweeps kBwdGroup rows at a time, first one row
// at a time for the row sums, then column by column through all rows of the group, so each
// workspace element is read and written once per group.
template <typename T, typename W, typename O, int VEC>
__global__ void __launch_bounds__(kMaxBlock, 1)
    norm_bwd_uncached(const NormBwdParams p, float* workspace) {
  __shared__ float red[kMaxWarps * 2];
  // Per row of the group: mean, rstd, c1, c2.
  __shared__ float info[kBwdGroup][4];
  const int nvec = static_cast<int>(p.cols / VEC);
  const float cols = static_cast<float>(p.cols);
  const int64_t grid = gridDim.x;
  float* dw_out = workspace + blockIdx.x * p.cols;
  float* db_out = workspace + (grid + blockIdx.x) * p.cols;

  // The launcher gives every block at least one group, so every workspace row is written.
  bool first = true;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kBwdGroup; base < p.rows;
       base += grid * kBwdGroup) {
    const int rows = p.rows - base < kBwdGroup ? static_cast<int>(p.rows - base) : kBwdGroup;
#pragma unroll 1
    for (int r = 0; r < rows; ++r) {
      const int64_t row = base + r;
      const T* xs = static_cast<const T*>(p.xs) + row * p.xs_row_stride;
      const O* dy = static_cast<const O*>(p.dy) + row * p.dy_row_stride;
      const float mean = p.rms ? 0.f : p.mean[row];
      const float rstd = p.rstd[row];
      float sums[2] = {0.f, 0.f};
      for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
        float xv[VEC], dyv[VEC], w[VEC];
        load<VEC>(xs + v * VEC, xv);
        load<VEC>(dy + v * VEC, dyv);
        load_or<VEC, W>(p.weight, v * VEC, 1.f, w);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float g = dyv[i] * w[i];
          sums[0] += g * ((xv[i] - mean) * rstd);
          sums[1] += g;
        }
      }
      row_sum(sums, red);
      if (threadIdx.x == 0) {
        info[r][0] = mean;
        info[r][1] = rstd;
        info[r][2] = sums[0] / cols;
        info[r][3] = p.rms ? 0.f : sums[1] / cols;
      }
    }
    __syncthreads();

    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
      float w[VEC], dw[VEC], db[VEC];
      load_or<VEC, W>(p.weight, v * VEC, 1.f, w);
#pragma unroll
      for (int i = 0; i < VEC; ++i) dw[i] = db[i] = 0.f;
#pragma unroll 1
      for (int r = 0; r < rows; ++r) {
        const int64_t row = base + r;
        const float mean = info[r][0], rstd = info[r][1], c1 = info[r][2], c2 = info[r][3];
        float xv[VEC], dyv[VEC], add[VEC], out[VEC];
        load<VEC>(static_cast<const T*>(p.xs) + row * p.xs_row_stride + v * VEC, xv);
        load<VEC>(static_cast<const O*>(p.dy) + row * p.dy_row_stride + v * VEC, dyv);
        if (p.dres != nullptr) {
          load<VEC>(static_cast<const T*>(p.dres) + row * p.dres_row_stride + v * VEC, add);
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) add[i] = 0.f;
        }
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float xhat = (xv[i] - mean) * rstd;
          const float g = dyv[i] * w[i];
          out[i] = rstd * (g - xhat * c1 - c2) + add[i];
          dw[i] += dyv[i] * xhat;
          db[i] += dyv[i];
        }
        store<VEC>(static_cast<T*>(p.dx) + row * p.cols + v * VEC, out);
      }
      if (!first) {
        float prev[VEC];
        if (p.dweight != nullptr) {
          load<VEC>(dw_out + v * VEC, prev);
#pragma unroll
          for (int i = 0; i < VEC; ++i) dw[i] += prev[i];
        }
        if (p.dbias != nullptr) {
          load<VEC>(db_out + v * VEC, prev);
#pragma unroll
          for (int i = 0; i < VEC; ++i) db[i] += prev[i];
        }
      }
      if (p.dweight != nullptr) store<VEC>(dw_out + v * VEC, dw);
      if (p.dbias != nullptr) store<VEC>(db_out + v * VEC, db);
    }
    first = false;
    __syncthreads();  // info is rewritten by the next group
  }
}

// out[c] = sum over parts of partial[part, c], in part order (deterministic). Block (32, 16):
// threadIdx.x picks the column, threadIdx.y a strided subset of parts. blockIdx.y 0 sums
// the dweight partials, 1 the dbias ones.
constexpr int kSumCols = 32;
constexpr int kSumSplit = 16;

__global__ void __launch_bounds__(kSumCols* kSumSplit)
    column_sum(const float* workspace, int64_t parts, int64_t cols, float* dweight,
               float* dbias) {
  __shared__ float part[kSumSplit][kSumCols + 1];
  float* out = blockIdx.y == 0 ? dweight : dbias;
  if (out == nullptr) return;
  const float* src = workspace + blockIdx.y * parts * cols;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kSumCols + threadIdx.x;
  float t = 0.f;
  if (c < cols) {
    for (int64_t r = threadIdx.y; r < parts; r += kSumSplit) t += src[r * cols + c];
  }
  part[threadIdx.y][threadIdx.x] = t;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < kSumSplit; ++k) s += part[k][threadIdx.x];
    out[c] = s;
  }
}

// ------------------------------------------------------------------------------------------
// Host side

template <typename T_, typename W_, typename O_>
struct Types {
  using T = T_;
  using W = W_;
  using O = O_;
};

template <typename T>
constexpr DType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return DType::kFloat32;
  if constexpr (std::is_same_v<T, __half>) return DType::kFloat16;
  return DType::kBFloat16;
}

// Calls f(Types<T, W, O>{}) for the row dtype T, weight dtype W and the other-side dtype
// O (forward output or backward dy). W and O are T or float32, as the contract allows.
template <typename T, typename F>
cudaError_t with_wo(DType w, DType o, F&& f) {
  constexpr DType t = dtype_of<T>();
  if ((w != t && w != DType::kFloat32) || (o != t && o != DType::kFloat32)) {
    return cudaErrorInvalidValue;
  }
  if constexpr (std::is_same_v<T, float>) {
    return f(Types<float, float, float>{});
  } else {
    if (w == DType::kFloat32) {
      return o == DType::kFloat32 ? f(Types<T, float, float>{}) : f(Types<T, float, T>{});
    }
    return o == DType::kFloat32 ? f(Types<T, T, float>{}) : f(Types<T, T, T>{});
  }
}

template <typename F>
cudaError_t with_types(DType x, DType w, DType o, F&& f) {
  switch (x) {
    case DType::kFloat32:
      return with_wo<float>(w, o, f);
    case DType::kFloat16:
      return with_wo<__half>(w, o, f);
    case DType::kBFloat16:
      return with_wo<__nv_bfloat16>(w, o, f);
  }
  return cudaErrorInvalidValue;
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Threads per row for a row of nvec vectors cached `per_thread` to a thread: a power of two
// from a warp up; above kMaxBlock the row is not cached.
int64_t threads_per_row(int64_t nvec, int per_thread) {
  const int64_t needed = ceil_div(nvec, per_thread);
  int64_t tpr = kWarp;
  while (tpr < needed) tpr *= 2;
  return tpr;
}

template <typename T, typename W, typename O, int VEC>
cudaError_t fwd_launch(const NormFwdParams& p, cudaStream_t stream) {
  const int64_t tpr = threads_per_row(p.cols / VEC, cached_vectors(kFwdCache, VEC));
  if (tpr <= kMaxBlock) {
    const int64_t rows_per_block = std::max<int64_t>(1, kRowBlock / tpr);
    const int64_t grid = std::min(ceil_div(p.rows, rows_per_block), kMaxGrid);
    norm_fwd_cached<T, W, O, VEC><<<static_cast<unsigned>(grid),
                                    dim3(static_cast<unsigned>(tpr),
                                         static_cast<unsigned>(rows_per_block)),
                                    0, stream>>>(p);
  } else {
    const int64_t grid = std::min(p.rows, kMaxGrid);
    norm_fwd_uncached<T, W, O, VEC><<<static_cast<unsigned>(grid), kMaxBlock, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

// How the backward runs for given types: shared by the workspace query and the launch so
// both agree on the grid (the number of workspace rows).
struct BwdPlan {
  bool cached = false;
  dim3 block;
  size_t smem = 0;
  int64_t grid = 0;
};

template <typename T, typename W, typename O, int VEC>
cudaError_t bwd_plan(const NormBwdParams& p, BwdPlan* plan) {
  int device = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  }
  if (err != cudaSuccess) return err;
  const int64_t tpr = threads_per_row(p.cols / VEC, cached_vectors(kBwdCache, VEC));
  int64_t groups;
  plan->cached = tpr <= kMaxBlock;
  if (plan->cached) {
    const int64_t rows_per_block = std::max<int64_t>(1, kRowBlock / tpr);
    plan->block = dim3(static_cast<unsigned>(tpr), static_cast<unsigned>(rows_per_block));
    plan->smem = rows_per_block > 1 ? rows_per_block * p.cols * sizeof(float) : 0;
    groups = ceil_div(p.rows, rows_per_block);
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &per_sm, norm_bwd_cached<T, W, O, VEC>, static_cast<int>(tpr * rows_per_block),
        plan->smem);
  } else {
    plan->block = dim3(kMaxBlock);
    plan->smem = 0;
    groups = ceil_div(p.rows, kBwdGroup);
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, norm_bwd_uncached<T, W, O, VEC>,
                                                        kMaxBlock, 0);
  }
  if (err != cudaSuccess) return err;
  // One resident wave: more blocks would only add workspace rows to sum.
  plan->grid = std::min({groups, static_cast<int64_t>(sms) * std::max(per_sm, 1), kMaxGrid});
  return cudaSuccess;
}

bool fwd_vectorizable(const NormFwdParams& p, int vec) {
  return p.cols % vec == 0 && p.x_row_stride % vec == 0 && p.residual_row_stride % vec == 0 &&
         aligned16(p.x) && aligned16(p.residual) && aligned16(p.residual_out) &&
         aligned16(p.weight) && aligned16(p.bias) && aligned16(p.y);
}

bool bwd_vectorizable(const NormBwdParams& p, int vec) {
  return p.cols % vec == 0 && p.dy_row_stride % vec == 0 && p.xs_row_stride % vec == 0 &&
         p.dres_row_stride % vec == 0 && aligned16(p.dy) && aligned16(p.xs) &&
         aligned16(p.dres) && aligned16(p.weight) && aligned16(p.dx);
}

// The weight dtype only matters when there is a weight (or bias); without one, W = T
// keeps the instantiation count down.
DType weight_dtype(DType w, DType x, bool has_weight) { return has_weight ? w : x; }

// Calls f(Types<...>{}, std::integral_constant<int, VEC>{}) for the backward's types and
// vector width.
template <typename F>
cudaError_t with_bwd(const NormBwdParams& p, F&& f) {
  const DType w = weight_dtype(p.w_dtype, p.x_dtype, p.weight != nullptr);
  return with_types(p.x_dtype, w, p.dy_dtype, [&](auto types) {
    using Ty = decltype(types);
    constexpr int kVec = 16 / sizeof(typename Ty::T);
    if (bwd_vectorizable(p, kVec)) return f(types, std::integral_constant<int, kVec>{});
    return f(types, std::integral_constant<int, 1>{});
  });
}

}  // namespace

cudaError_t norm_fwd(const NormFwdParams& p, cudaStream_t stream) {
  if (p.cols <= 0 || p.cols > INT_MAX || p.rows < 0) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  const bool has_weight = p.weight != nullptr || p.bias != nullptr;
  const DType w = weight_dtype(p.w_dtype, p.x_dtype, has_weight);
  return with_types(p.x_dtype, w, p.out_dtype, [&](auto types) {
    using Ty = decltype(types);
    using T = typename Ty::T;
    constexpr int kVec = 16 / sizeof(T);
    if (fwd_vectorizable(p, kVec)) {
      return fwd_launch<T, typename Ty::W, typename Ty::O, kVec>(p, stream);
    }
    return fwd_launch<T, typename Ty::W, typename Ty::O, 1>(p, stream);
  });
}

cudaError_t norm_bwd_workspace_size(const NormBwdParams& p, int64_t* num_floats) {
  *num_floats = 0;
  if (p.cols <= 0 || p.cols > INT_MAX || p.rows < 0) return cudaErrorInvalidValue;
  if (p.rows == 0 || (p.dweight == nullptr && p.dbias == nullptr)) return cudaSuccess;
  return with_bwd(p, [&](auto types, auto vec) {
    using Ty = decltype(types);
    BwdPlan plan;
    const cudaError_t err =
        bwd_plan<typename Ty::T, typename Ty::W, typename Ty::O, decltype(vec)::value>(p, &plan);
    *num_floats = 2 * plan.grid * p.cols;
    return err;
  });
}

cudaError_t norm_bwd(const NormBwdParams& p, float* workspace, cudaStream_t stream) {
  if (p.cols <= 0 || p.cols > INT_MAX || p.rows < 0) return cudaErrorInvalidValue;
  if (p.rows == 0) {
    // Empty sums: the gradients of weight and bias are zero.
    cudaError_t err = cudaSuccess;
    if (p.dweight != nullptr) err = cudaMemsetAsync(p.dweight, 0, p.cols * sizeof(float), stream);
    if (err == cudaSuccess && p.dbias != nullptr) {
      err = cudaMemsetAsync(p.dbias, 0, p.cols * sizeof(float), stream);
    }
    return err;
  }
  return with_bwd(p, [&](auto types, auto vec) {
    using Ty = decltype(types);
    using T = typename Ty::T;
    using W = typename Ty::W;
    using O = typename Ty::O;
    constexpr int kVec = decltype(vec)::value;
    BwdPlan plan;
    cudaError_t err = bwd_plan<T, W, O, kVec>(p, &plan);
    if (err != cudaSuccess) return err;
    const auto grid = static_cast<unsigned>(plan.grid);
    if (plan.cached) {
      norm_bwd_cached<T, W, O, kVec><<<grid, plan.block, plan.smem, stream>>>(p, workspace);
    } else {
      norm_bwd_uncached<T, W, O, kVec><<<grid, plan.block, 0, stream>>>(p, workspace);
    }
    err = cudaGetLastError();
    if (err != cudaSuccess || (p.dweight == nullptr && p.dbias == nullptr)) return err;
    const dim3 sum_grid(static_cast<unsigned>(ceil_div(p.cols, kSumCols)), 2);
    column_sum<<<sum_grid, dim3(kSumCols, kSumSplit), 0, stream>>>(workspace, plan.grid, p.cols,
                                                                  p.dweight, p.dbias);
    return cudaGetLastError();
  });
}

}  // namespace fastlm
