// Shared device helpers for the fastadapt CUDA kernels: type conversion, activations,
// cp.async wrappers, the zero-filling tile loader and the warp-level WMMA step.
//
// Kept free of torch headers so every kernel translation unit stays cheap to compile.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

namespace fastadapt {

// ---------------------------------------------------------------------------------------------
// Activation codes (host and device). Names as in transformers' ACT2FN; "gelu" is the erf form.
enum Act : int { kActNone = -1, kActTanh = 0, kActRelu = 1, kActGelu = 2, kActSilu = 3 };

__device__ __forceinline__ float act_fwd(float h, int act) {
  switch (act) {
    case kActTanh: return tanhf(h);
    case kActRelu: return h > 0.f ? h : 0.f;
    case kActGelu: return 0.5f * h * (1.f + erff(h * 0.70710678118654752f));
    case kActSilu: return h / (1.f + expf(-h));
    default: return h;
  }
}

// d act / d h, written in the forms that stay finite for large |h|.
__device__ __forceinline__ float act_grad(float h, int act) {
  switch (act) {
    case kActTanh: {
      const float t = tanhf(h);
      return 1.f - t * t;
    }
    case kActRelu: return h > 0.f ? 1.f : 0.f;
    case kActGelu:
      // Phi(h) + h * phi(h)
      return 0.5f * (1.f + erff(h * 0.70710678118654752f)) +
             h * 0.39894228040143268f * expf(-0.5f * h * h);
    case kActSilu: {
      const float sg = 1.f / (1.f + expf(-h));
      return sg * (1.f + h * (1.f - sg));
    }
    default: return 1.f;
  }
}

// ---------------------------------------------------------------------------------------------
// Conversions. from_float rounds to nearest even: the single rounding of every output.
template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Eight consecutive elements <-> float[8]. The caller guarantees 16-byte alignment of p
// (32-byte for float, which is loaded as two 16-byte halves).
template <typename T> struct Vec8;

template <> struct Vec8<float> {
  static __device__ __forceinline__ void load(const float* p, float (&v)[8]) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  }
  static __device__ __forceinline__ void store(float* p, const float (&v)[8]) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
};

template <> struct Vec8<__half> {
  static __device__ __forceinline__ void load(const __half* p, float (&v)[8]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(h[i]);
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  }
  static __device__ __forceinline__ void store(__half* p, const float (&v)[8]) {
    uint4 raw;
    __half2* h = reinterpret_cast<__half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = raw;
  }
};

template <> struct Vec8<__nv_bfloat16> {
  static __device__ __forceinline__ void load(const __nv_bfloat16* p, float (&v)[8]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, const float (&v)[8]) {
    uint4 raw;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = raw;
  }
};

// ---------------------------------------------------------------------------------------------
// cp.async (sm_80+). With pred false the 16 destination bytes are zero-filled and nothing is
// read; src must still be a valid address, so callers pass the matrix base then.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Loads the ROWS x COLS block at (r0, c0) of a row-major global matrix g (leading dimension ldg;
// only rows < nrows and cols < ncols exist) into shared memory s (leading dimension lds),
// zero-filling everything outside, and applies `act` to each loaded element when act >= 0.
// All activations map 0 to 0, so the zero fill stays zero.
//
// VEC (16-byte path) requires: g 16-byte aligned, ldg % 8 == 0, ncols % 8 == 0, c0 % 8 == 0,
// COLS % 8 == 0, lds % 8 == 0 -- then every 8-element chunk is entirely inside or outside.
// Without an activation the VEC path is asynchronous (cp.async): the caller commits and waits.
template <typename T, int ROWS, int COLS, int NTHREADS, bool VEC>
__device__ __forceinline__ void load_tile(T* __restrict__ s, int lds, const T* __restrict__ g,
                                          int64_t ldg, int64_t r0, int64_t c0, int64_t nrows,
                                          int64_t ncols, int act) {
  if constexpr (VEC) {
    static_assert(COLS % 8 == 0, "VEC tiles load 8-element chunks");
    constexpr int CH = COLS / 8;
    for (int i = threadIdx.x; i < ROWS * CH; i += NTHREADS) {
      const int r = i / CH;
      const int c = (i % CH) * 8;
      const int64_t gr = r0 + r;
      const int64_t gc = c0 + c;
      const bool pred = gr < nrows && gc < ncols;
      const T* src = pred ? g + gr * ldg + gc : g;
      T* dst = s + r * lds + c;
      if (act < 0) {
        cp_async16(dst, src, pred);
      } else {
        float v[8];
        if (pred) {
          Vec8<T>::load(src, v);
#pragma unroll
          for (int e = 0; e < 8; ++e) v[e] = act_fwd(v[e], act);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) v[e] = 0.f;
        }
        Vec8<T>::store(dst, v);
      }
    }
  } else {
    for (int i = threadIdx.x; i < ROWS * COLS; i += NTHREADS) {
      const int r = i / COLS;
      const int c = i % COLS;
      const int64_t gr = r0 + r;
      const int64_t gc = c0 + c;
      float v = 0.f;
      if (gr < nrows && gc < ncols) {
        v = to_float<T>(g[gr * ldg + gc]);
        if (act >= 0) v = act_fwd(v, act);
      }
      s[r * lds + c] = from_float<T>(v);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core step: acc[FM][FN] (16x16 fp32 tiles) += A(FM*16 x KSTEPS*16) @ B(KSTEPS*16 x FN*16),
// both operands in shared memory. Layout row_major / col_major says how element (row, col) of
// the logical operand sits in memory: row_major -> p[row * ld + col], col_major -> p[col * ld + row].
// Pointers must be 32-byte aligned and ld a multiple of 8 elements (WMMA requirements).
namespace wmma = nvcuda::wmma;

template <typename Layout>
__device__ __forceinline__ int lay_off(int row, int col, int ld) {
  if constexpr (std::is_same<Layout, wmma::row_major>::value) {
    return row * ld + col;
  } else {
    return col * ld + row;
  }
}

template <typename T, int FM, int FN, int KSTEPS, typename ALayout, typename BLayout>
__device__ __forceinline__ void warp_mma(
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> (&acc)[FM][FN], const T* sA, int lda,
    const T* sB, int ldb) {
#pragma unroll
  for (int kk = 0; kk < KSTEPS; ++kk) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> a[FM];
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> b[FN];
#pragma unroll
    for (int i = 0; i < FM; ++i) wmma::load_matrix_sync(a[i], sA + lay_off<ALayout>(i * 16, kk * 16, lda), lda);
#pragma unroll
    for (int j = 0; j < FN; ++j) wmma::load_matrix_sync(b[j], sB + lay_off<BLayout>(kk * 16, j * 16, ldb), ldb);
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
  }
}

template <int FM, int FN>
__device__ __forceinline__ void zero_acc(wmma::fragment<wmma::accumulator, 16, 16, 16, float> (&acc)[FM][FN]) {
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.f);
}

__host__ __device__ constexpr int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int64_t round_up(int64_t a, int64_t b) { return cdiv(a, b) * b; }
__host__ __device__ constexpr size_t align128(size_t n) { return (n + 127) / 128 * 128; }

__host__ __device__ inline bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

}  // namespace fastadapt
