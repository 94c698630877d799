// Series bottleneck adapter with residual, forward and backward, on tensor cores (WMMA, sm_80+).
//
//   forward:  hidden = x @ w_down^T                       (M, b)   pre-activation, saved
//             out    = res + s * act(hidden) @ w_up^T     (M, d_out), res = residual or x
//   backward: G      = dout @ w_up                        (M, b)   fp32, on chip
//             dscaling = sum(act(hidden) * G)
//             dh     = s * G * act'(hidden)
//             dx     = dh @ w_down (+ dout when res is x)
//             dw_up  = s * dout^T @ act(hidden),  dw_down = dh^T @ x       (fp32)
//
// One CTA owns a block of kBM rows: it streams x (resp. dout) once, keeps the kBM x b
// intermediate in shared memory and writes out (resp. dx) once. The weight gradients reduce over
// M, so they run as a separate split-M GEMM kernel on the saved hidden and the dh this pass writes.
// bf16/fp16 operands, fp32 accumulation; each output is rounded once.
//
// No dropout here: the op layer routes dropout_p > 0 to the Triton/torch backends.

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../common.cuh"
#include "../host_utils.h"
#include "../ops.h"

namespace fastadapt {
namespace {

constexpr int kThreads = 256;      // 8 warps as a 2 (rows) x 4 (cols) grid
constexpr int kBM = 64;            // rows per CTA (32 per warp row)
constexpr int kBK = 32;            // reduction step per pipeline stage
constexpr int kPad = 8;            // 16-byte row pad: keeps WMMA's ld a multiple of 8 and spreads banks
constexpr int kLDK = kBK + kPad;   // leading dim of [rows][kBK] tiles
constexpr int kBN = 128;           // output columns per pass of the second GEMM (32 per warp)
constexpr int kLDS = kBN + 4;      // fp32 staging leading dim (multiple of 4 for WMMA stores)
constexpr int kMaxB = 1024;        // larger bottlenecks do not fit the on-chip intermediate

using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

constexpr size_t cmax(size_t a, size_t b) { return a > b ? a : b; }

// Dynamic shared memory: [act/dh intermediate kBM x (b_pad + kPad)] then a region reused by the
// phases (pipeline stages of GEMM 1, per-warp scratch, pipeline stages of GEMM 2, fp32 staging).
template <typename T, int NB1>
struct FwdSmem {
  static constexpr size_t p1 = size_t(2) * (kBM + NB1) * kLDK * sizeof(T);
  static constexpr size_t scratch = size_t(kThreads / 32) * 256 * sizeof(float);
  static constexpr size_t p2 = size_t(2) * kBN * kLDK * sizeof(T);
  static constexpr size_t stage = size_t(kBM) * kLDS * sizeof(float);
  static constexpr size_t region = cmax(cmax(p1, scratch), cmax(p2, stage));
  static __host__ __device__ size_t inter_bytes(int b_pad) {
    return align128(size_t(kBM) * (b_pad + kPad) * sizeof(T));
  }
  static size_t total(int b_pad) { return inter_bytes(b_pad) + region; }
};

template <typename T, int NB1>
struct BwdSmem {
  static constexpr size_t p1 = size_t(2) * (size_t(kBM) * kLDK + size_t(kBK) * (NB1 + kPad)) * sizeof(T);
  static constexpr size_t scratch = size_t(kThreads / 32) * 256 * sizeof(float);
  static constexpr size_t p2 = size_t(2) * kBK * (kBN + kPad) * sizeof(T);
  static constexpr size_t stage = size_t(kBM) * kLDS * sizeof(float);
  static constexpr size_t region = cmax(cmax(p1, scratch), cmax(p2, stage));
  static __host__ __device__ size_t inter_bytes(int b_pad) {
    return align128(size_t(kBM) * (b_pad + kPad) * sizeof(T));
  }
  static size_t total(int b_pad) { return inter_bytes(b_pad) + region; }
};

// ---------------------------------------------------------------------------------------------
// Forward. Grid: cdiv(M, kBM). NB1 = columns of hidden computed per pass (64 or 256): the whole
// bottleneck in one pass for b <= 256, so x is streamed once.
template <typename T, int NB1, bool VEC>
__global__ void __launch_bounds__(kThreads)
bottleneck_fwd_kernel(const T* __restrict__ x, const T* __restrict__ w_down, const T* __restrict__ w_up,
                      const float* __restrict__ scaling, const T* __restrict__ res, int64_t ld_res,
                      T* __restrict__ out, T* __restrict__ hidden, int64_t M, int d_in, int b, int d_out,
                      int b_pad, int act) {
  constexpr int FM = 2;                // 32 rows per warp
  constexpr int FN1 = NB1 / 4 / 16;    // NB1 / 4 hidden columns per warp
  constexpr int FN2 = kBN / 4 / 16;    // 32 output columns per warp
  static_assert(NB1 % (4 * 16) == 0 && NB1 % kBK == 0, "NB1 must split over 4 warps and kBK");

  extern __shared__ __align__(128) unsigned char smem[];
  const int lda = b_pad + kPad;
  T* s_act = reinterpret_cast<T*>(smem);                                   // [kBM][lda]
  unsigned char* region = smem + FwdSmem<T, NB1>::inter_bytes(b_pad);
  T* s_x = reinterpret_cast<T*>(region);                                   // [2][kBM][kLDK]
  T* s_w = s_x + 2 * kBM * kLDK;                                           // [2][NB1][kLDK]
  float* s_scr = reinterpret_cast<float*>(region);                         // [8][16 * 16]
  T* s_wu = reinterpret_cast<T*>(region);                                  // [2][kBN][kLDK]
  float* s_stage = reinterpret_cast<float*>(region);                       // [kBM][kLDS]

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int wm = warp >> 2;
  const int wn = warp & 3;
  const int64_t m0 = int64_t(blockIdx.x) * kBM;
  const float s = *scaling;

  // ---- GEMM 1: hidden = x @ w_down^T, then act -> s_act (bf16/fp16, zero beyond b) ----
  for (int nb0 = 0; nb0 < b; nb0 += NB1) {
    FragC acc[FM][FN1];
    zero_acc(acc);
    const int nk = int(cdiv(d_in, kBK));
    load_tile<T, kBM, kBK, kThreads, VEC>(s_x, kLDK, x, d_in, m0, 0, M, d_in, kActNone);
    load_tile<T, NB1, kBK, kThreads, VEC>(s_w, kLDK, w_down, d_in, nb0, 0, b, d_in, kActNone);
    cp_async_commit();
    for (int kt = 0; kt < nk; ++kt) {
      const int cur = kt & 1;
      if (kt + 1 < nk) {
        const int64_t k1 = int64_t(kt + 1) * kBK;
        load_tile<T, kBM, kBK, kThreads, VEC>(s_x + (cur ^ 1) * kBM * kLDK, kLDK, x, d_in, m0, k1, M, d_in,
                                              kActNone);
        load_tile<T, NB1, kBK, kThreads, VEC>(s_w + (cur ^ 1) * NB1 * kLDK, kLDK, w_down, d_in, nb0, k1, b,
                                              d_in, kActNone);
      }
      cp_async_commit();
      cp_async_wait<1>();  // stage kt has landed (only stage kt+1 may be in flight)
      __syncthreads();
      // w_down tile is [n][k]: as the K x N operand that is column-major.
      warp_mma<T, FM, FN1, kBK / 16, wmma::row_major, wmma::col_major>(
          acc, s_x + cur * kBM * kLDK + wm * 32 * kLDK, kLDK, s_w + cur * NB1 * kLDK + wn * (NB1 / 4) * kLDK,
          kLDK);
      __syncthreads();  // everyone is done reading stage cur before it is refilled
    }

    // Epilogue per warp through a private 16x16 scratch (the fragment layout is opaque).
    float* scr = s_scr + warp * 256;
#pragma unroll
    for (int i = 0; i < FM; ++i) {
#pragma unroll
      for (int j = 0; j < FN1; ++j) {
        wmma::store_matrix_sync(scr, acc[i][j], 16, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32) {
          const int lr = wm * 32 + i * 16 + (e >> 4);
          const int col = nb0 + wn * (NB1 / 4) + j * 16 + (e & 15);
          const int64_t gr = m0 + lr;
          // Round the pre-activation once, as saved for backward and as eager bf16 does.
          const T hq = from_float<T>(scr[e]);
          float a = 0.f;
          if (col < b) {
            if (gr < M) hidden[gr * b + col] = hq;
            a = act_fwd(to_float<T>(hq), act);
          }
          s_act[lr * lda + col] = from_float<T>(a);  // col < b_pad always
        }
        __syncwarp();
      }
    }
    __syncthreads();  // s_act complete; region free again
  }

  // ---- GEMM 2: out = res + s * act @ w_up^T, kBN columns at a time ----
  const int nk2 = int(cdiv(b, kBK));
  for (int64_t n0 = 0; n0 < d_out; n0 += kBN) {
    FragC acc[FM][FN2];
    zero_acc(acc);
    load_tile<T, kBN, kBK, kThreads, VEC>(s_wu, kLDK, w_up, b, n0, 0, d_out, b, kActNone);
    cp_async_commit();
    for (int kt = 0; kt < nk2; ++kt) {
      const int cur = kt & 1;
      if (kt + 1 < nk2) {
        load_tile<T, kBN, kBK, kThreads, VEC>(s_wu + (cur ^ 1) * kBN * kLDK, kLDK, w_up, b, n0,
                                              int64_t(kt + 1) * kBK, d_out, b, kActNone);
      }
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();
      warp_mma<T, FM, FN2, kBK / 16, wmma::row_major, wmma::col_major>(
          acc, s_act + wm * 32 * lda + kt * kBK, lda, s_wu + cur * kBN * kLDK + wn * 32 * kLDK, kLDK);
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN2; ++j)
        wmma::store_matrix_sync(s_stage + (wm * 32 + i * 16) * kLDS + wn * 32 + j * 16, acc[i][j], kLDS,
                                wmma::mem_row_major);
    __syncthreads();

    if constexpr (VEC) {
      constexpr int CH = kBN / 8;
      for (int i = tid; i < kBM * CH; i += kThreads) {
        const int r = i / CH;
        const int c = (i % CH) * 8;
        const int64_t gr = m0 + r;
        const int64_t gc = n0 + c;
        if (gr < M && gc < d_out) {  // d_out % 8 == 0: the chunk is wholly inside
          float v[8];
          Vec8<T>::load(res + gr * ld_res + gc, v);
          const float* st = s_stage + r * kLDS + c;
#pragma unroll
          for (int e = 0; e < 8; ++e) v[e] = fmaf(s, st[e], v[e]);
          Vec8<T>::store(out + gr * d_out + gc, v);
        }
      }
    } else {
      for (int i = tid; i < kBM * kBN; i += kThreads) {
        const int r = i / kBN;
        const int c = i % kBN;
        const int64_t gr = m0 + r;
        const int64_t gc = n0 + c;
        if (gr < M && gc < d_out) {
          out[gr * d_out + gc] = from_float<T>(fmaf(s, s_stage[r * kLDS + c], to_float<T>(res[gr * ld_res + gc])));
        }
      }
    }
    __syncthreads();  // staging aliases the next pass's pipeline buffers
  }
}

// ---------------------------------------------------------------------------------------------
// Backward over rows. Grid: cdiv(M, kBM). Writes dx, dh (M, b) and one dscaling partial per CTA.
template <typename T, int NB1, bool VEC>
__global__ void __launch_bounds__(kThreads)
bottleneck_bwd_rows_kernel(const T* __restrict__ dout, const T* __restrict__ hidden, const T* __restrict__ w_down,
                           const T* __restrict__ w_up, const float* __restrict__ scaling, T* __restrict__ dx,
                           T* __restrict__ dh, float* __restrict__ dscale_partial, int64_t M, int d_in, int b,
                           int d_out, int b_pad, int act, bool add_dout) {
  constexpr int FM = 2;
  constexpr int FN1 = NB1 / 4 / 16;
  constexpr int FN2 = kBN / 4 / 16;
  constexpr int LDB1 = NB1 + kPad;  // w_up tile [kBK][NB1]   (k = d_out index, n = b index)
  constexpr int LDB2 = kBN + kPad;  // w_down tile [kBK][kBN] (k = b index, n = d_in index)
  static_assert(NB1 % (4 * 16) == 0 && NB1 % kBK == 0, "NB1 must split over 4 warps and kBK");

  extern __shared__ __align__(128) unsigned char smem[];
  const int lda = b_pad + kPad;
  T* s_dh = reinterpret_cast<T*>(smem);                                    // [kBM][lda]
  unsigned char* region = smem + BwdSmem<T, NB1>::inter_bytes(b_pad);
  T* s_d = reinterpret_cast<T*>(region);                                   // [2][kBM][kLDK]
  T* s_b1 = s_d + 2 * kBM * kLDK;                                          // [2][kBK][LDB1]
  float* s_scr = reinterpret_cast<float*>(region);                         // [8][16 * 16]
  T* s_b2 = reinterpret_cast<T*>(region);                                  // [2][kBK][LDB2]
  float* s_stage = reinterpret_cast<float*>(region);                       // [kBM][kLDS]
  float* s_red = reinterpret_cast<float*>(region);                         // [8], at the very end

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int wm = warp >> 2;
  const int wn = warp & 3;
  const int64_t m0 = int64_t(blockIdx.x) * kBM;
  const float s = *scaling;
  float dsc = 0.f;  // this thread's share of sum(act(hidden) * G)

  // ---- GEMM A: G = dout @ w_up (fp32), then dh = s * G * act'(hidden) -> s_dh and global ----
  for (int nb0 = 0; nb0 < b; nb0 += NB1) {
    FragC acc[FM][FN1];
    zero_acc(acc);
    const int nk = int(cdiv(d_out, kBK));
    load_tile<T, kBM, kBK, kThreads, VEC>(s_d, kLDK, dout, d_out, m0, 0, M, d_out, kActNone);
    load_tile<T, kBK, NB1, kThreads, VEC>(s_b1, LDB1, w_up, b, 0, nb0, d_out, b, kActNone);
    cp_async_commit();
    for (int kt = 0; kt < nk; ++kt) {
      const int cur = kt & 1;
      if (kt + 1 < nk) {
        const int64_t k1 = int64_t(kt + 1) * kBK;
        load_tile<T, kBM, kBK, kThreads, VEC>(s_d + (cur ^ 1) * kBM * kLDK, kLDK, dout, d_out, m0, k1, M, d_out,
                                              kActNone);
        load_tile<T, kBK, NB1, kThreads, VEC>(s_b1 + (cur ^ 1) * kBK * LDB1, LDB1, w_up, b, k1, nb0, d_out, b,
                                              kActNone);
      }
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();
      warp_mma<T, FM, FN1, kBK / 16, wmma::row_major, wmma::row_major>(
          acc, s_d + cur * kBM * kLDK + wm * 32 * kLDK, kLDK, s_b1 + cur * kBK * LDB1 + wn * (NB1 / 4), LDB1);
      __syncthreads();
    }

    float* scr = s_scr + warp * 256;
#pragma unroll
    for (int i = 0; i < FM; ++i) {
#pragma unroll
      for (int j = 0; j < FN1; ++j) {
        wmma::store_matrix_sync(scr, acc[i][j], 16, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32) {
          const int lr = wm * 32 + i * 16 + (e >> 4);
          const int col = nb0 + wn * (NB1 / 4) + j * 16 + (e & 15);
          const int64_t gr = m0 + lr;
          T q = from_float<T>(0.f);
          if (col < b && gr < M) {
            const float g = scr[e];
            const float h = to_float<T>(hidden[gr * b + col]);
            dsc = fmaf(act_fwd(h, act), g, dsc);
            q = from_float<T>(s * g * act_grad(h, act));
            dh[gr * b + col] = q;
          }
          s_dh[lr * lda + col] = q;
        }
        __syncwarp();
      }
    }
    __syncthreads();
  }

  // ---- GEMM C: dx = dh @ w_down (+ dout) ----
  const int nk2 = int(cdiv(b, kBK));
  for (int64_t n0 = 0; n0 < d_in; n0 += kBN) {
    FragC acc[FM][FN2];
    zero_acc(acc);
    load_tile<T, kBK, kBN, kThreads, VEC>(s_b2, LDB2, w_down, d_in, 0, n0, b, d_in, kActNone);
    cp_async_commit();
    for (int kt = 0; kt < nk2; ++kt) {
      const int cur = kt & 1;
      if (kt + 1 < nk2) {
        load_tile<T, kBK, kBN, kThreads, VEC>(s_b2 + (cur ^ 1) * kBK * LDB2, LDB2, w_down, d_in,
                                              int64_t(kt + 1) * kBK, n0, b, d_in, kActNone);
      }
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();
      warp_mma<T, FM, FN2, kBK / 16, wmma::row_major, wmma::row_major>(
          acc, s_dh + wm * 32 * lda + kt * kBK, lda, s_b2 + cur * kBK * LDB2 + wn * 32, LDB2);
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN2; ++j)
        wmma::store_matrix_sync(s_stage + (wm * 32 + i * 16) * kLDS + wn * 32 + j * 16, acc[i][j], kLDS,
                                wmma::mem_row_major);
    __syncthreads();

    if constexpr (VEC) {
      constexpr int CH = kBN / 8;
      for (int i = tid; i < kBM * CH; i += kThreads) {
        const int r = i / CH;
        const int c = (i % CH) * 8;
        const int64_t gr = m0 + r;
        const int64_t gc = n0 + c;
        if (gr < M && gc < d_in) {
          float v[8];
          const float* st = s_stage + r * kLDS + c;
          if (add_dout) {
            Vec8<T>::load(dout + gr * d_out + gc, v);  // add_dout implies d_out == d_in
#pragma unroll
            for (int e = 0; e < 8; ++e) v[e] += st[e];
          } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) v[e] = st[e];
          }
          Vec8<T>::store(dx + gr * d_in + gc, v);
        }
      }
    } else {
      for (int i = tid; i < kBM * kBN; i += kThreads) {
        const int r = i / kBN;
        const int c = i % kBN;
        const int64_t gr = m0 + r;
        const int64_t gc = n0 + c;
        if (gr < M && gc < d_in) {
          float v = s_stage[r * kLDS + c];
          if (add_dout) v += to_float<T>(dout[gr * d_out + gc]);
          dx[gr * d_in + gc] = from_float<T>(v);
        }
      }
    }
    __syncthreads();
  }

  // ---- dscaling partial: fixed-order reduction, so repeated runs agree bit for bit ----
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) dsc += __shfl_xor_sync(0xffffffffu, dsc, off);
  if (lane == 0) s_red[warp] = dsc;
  __syncthreads();
  if (tid == 0) {
    float t = 0.f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) t += s_red[w];
    dscale_partial[blockIdx.x] = t;
  }
}

// ---------------------------------------------------------------------------------------------
// Weight gradient: C[i, j] = alpha * sum_{m in split} fP(P[m, i]) * fQ(Q[m, j]), fp32 out.
// P (M, NA) and Q (M, NB) row-major; f = act when act_* >= 0 (act(hidden) is recomputed on load
// instead of stored). Grid: (cdiv(NB, kWBN), cdiv(NA, kWBM), splits); split z writes C + z*NA*NB.
constexpr int kWBM = 64;
constexpr int kWBN = 128;
constexpr int kLDP = kWBM + kPad;
constexpr int kLDQ = kWBN + kPad;

template <typename T>
struct WgradSmem {
  static constexpr size_t pipe = size_t(2) * kBK * (kLDP + kLDQ) * sizeof(T);
  static constexpr size_t stage = size_t(kWBM) * kLDS * sizeof(float);
  static constexpr size_t total = cmax(pipe, stage);
};

template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads)
weight_grad_kernel(const T* __restrict__ P, int64_t ldp, int act_p, const T* __restrict__ Q, int64_t ldq,
                   int act_q, const float* __restrict__ alpha_ptr, float* __restrict__ C, int64_t M, int NA,
                   int NB, int64_t rows_per_split) {
  extern __shared__ __align__(128) unsigned char smem[];
  T* s_p = reinterpret_cast<T*>(smem);             // [2][kBK][kLDP]  (m, i): A column-major
  T* s_q = s_p + 2 * kBK * kLDP;                   // [2][kBK][kLDQ]  (m, j): B row-major
  float* s_stage = reinterpret_cast<float*>(smem); // [kWBM][kLDS]

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int wm = warp >> 2;
  const int wn = warp & 3;
  const int64_t j0 = int64_t(blockIdx.x) * kWBN;
  const int64_t i0 = int64_t(blockIdx.y) * kWBM;
  const int64_t mb = int64_t(blockIdx.z) * rows_per_split;
  const int64_t me = M < mb + rows_per_split ? M : mb + rows_per_split;
  C += int64_t(blockIdx.z) * NA * NB;
  const float alpha = alpha_ptr != nullptr ? *alpha_ptr : 1.f;

  FragC acc[2][2];
  zero_acc(acc);
  const int64_t nk = me > mb ? cdiv(me - mb, kBK) : 0;
  if (nk > 0) {
    load_tile<T, kBK, kWBM, kThreads, VEC>(s_p, kLDP, P, ldp, mb, i0, me, NA, act_p);
    load_tile<T, kBK, kWBN, kThreads, VEC>(s_q, kLDQ, Q, ldq, mb, j0, me, NB, act_q);
  }
  cp_async_commit();
  for (int64_t kt = 0; kt < nk; ++kt) {
    const int cur = int(kt & 1);
    if (kt + 1 < nk) {
      const int64_t r1 = mb + (kt + 1) * kBK;
      load_tile<T, kBK, kWBM, kThreads, VEC>(s_p + (cur ^ 1) * kBK * kLDP, kLDP, P, ldp, r1, i0, me, NA, act_p);
      load_tile<T, kBK, kWBN, kThreads, VEC>(s_q + (cur ^ 1) * kBK * kLDQ, kLDQ, Q, ldq, r1, j0, me, NB, act_q);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    warp_mma<T, 2, 2, kBK / 16, wmma::col_major, wmma::row_major>(
        acc, s_p + cur * kBK * kLDP + wm * 32, kLDP, s_q + cur * kBK * kLDQ + wn * 32, kLDQ);
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(s_stage + (wm * 32 + i * 16) * kLDS + wn * 32 + j * 16, acc[i][j], kLDS,
                              wmma::mem_row_major);
  __syncthreads();
  for (int e = tid; e < kWBM * kWBN; e += kThreads) {
    const int r = e / kWBN;
    const int c = e % kWBN;
    const int64_t gi = i0 + r;
    const int64_t gj = j0 + c;
    if (gi < NA && gj < NB) C[gi * NB + gj] = alpha * s_stage[r * kLDS + c];
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

template <typename T>
const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}
template <typename T>
T* mptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

template <typename Kernel>
void prepare_smem(Kernel kernel, size_t smem, int device, const char* what, int64_t b) {
  const DeviceLimits lim = device_limits(device);
  TORCH_CHECK(smem <= size_t(lim.max_smem_optin), what, ": bottleneck size b = ", b, " needs ", smem,
              " bytes of shared memory per block, the device allows ", lim.max_smem_optin,
              "; use the Triton or torch backend for this shape");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
}

template <typename T, int NB1, bool VEC>
void launch_fwd(const at::Tensor& x2, const at::Tensor& wd, const at::Tensor& wu, const at::Tensor& scaling,
                const at::Tensor& res2, const at::Tensor& out, const at::Tensor& hidden, int act, cudaStream_t stream) {
  const int64_t M = x2.size(0);
  const int d_in = int(x2.size(1));
  const int b = int(wd.size(0));
  const int d_out = int(wu.size(0));
  const int b_pad = int(round_up(b, NB1));
  const size_t smem = FwdSmem<T, NB1>::total(b_pad);
  auto kernel = bottleneck_fwd_kernel<T, NB1, VEC>;
  prepare_smem(kernel, smem, x2.get_device(), "bottleneck_adapter_fwd", b);
  const dim3 grid(unsigned(cdiv(M, kBM)));
  kernel<<<grid, kThreads, smem, stream>>>(cptr<T>(x2), cptr<T>(wd), cptr<T>(wu), scaling.data_ptr<float>(),
                                           cptr<T>(res2), res2.stride(0), mptr<T>(out), mptr<T>(hidden), M, d_in, b,
                                           d_out, b_pad, act);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int NB1, bool VEC>
void launch_bwd_rows(const at::Tensor& dout2, const at::Tensor& hidden, const at::Tensor& wd, const at::Tensor& wu,
                     const at::Tensor& scaling, const at::Tensor& dx, const at::Tensor& dh, const at::Tensor& partial,
                     int act, bool add_dout, cudaStream_t stream) {
  const int64_t M = dout2.size(0);
  const int d_in = int(wd.size(1));
  const int b = int(wd.size(0));
  const int d_out = int(wu.size(0));
  const int b_pad = int(round_up(b, NB1));
  const size_t smem = BwdSmem<T, NB1>::total(b_pad);
  auto kernel = bottleneck_bwd_rows_kernel<T, NB1, VEC>;
  prepare_smem(kernel, smem, dout2.get_device(), "bottleneck_adapter_bwd", b);
  const dim3 grid(unsigned(cdiv(M, kBM)));
  kernel<<<grid, kThreads, smem, stream>>>(cptr<T>(dout2), cptr<T>(hidden), cptr<T>(wd), cptr<T>(wu),
                                           scaling.data_ptr<float>(), mptr<T>(dx), mptr<T>(dh),
                                           partial.data_ptr<float>(), M, d_in, b, d_out, b_pad, act, add_dout);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// C (NA, NB) fp32 = alpha * f(P)^T @ f(Q) over all M rows, split over M for occupancy when the
// output has few tiles; partial sums go to a workspace reduced in a fixed order (deterministic).
template <typename T>
at::Tensor weight_grad(const at::Tensor& P, int act_p, const at::Tensor& Q, int act_q, const float* alpha,
                       cudaStream_t stream) {
  const int64_t M = P.size(0);
  const int NA = int(P.size(1));
  const int NB = int(Q.size(1));
  auto f32 = P.options().dtype(at::kFloat);
  if (M == 0) return at::zeros({NA, NB}, f32);
  const DeviceLimits lim = device_limits(P.get_device());
  const int64_t tiles = cdiv(NB, kWBN) * cdiv(NA, kWBM);
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>(cdiv(2 * lim.num_sms, tiles), cdiv(M, 256)));
  const int64_t ws_cap = std::max<int64_t>(1, (int64_t(1) << 29) / (int64_t(NA) * NB * 4));  // <= 512 MiB
  splits = std::min<int64_t>({splits, ws_cap, 65535});
  const int64_t rows_per_split = round_up(cdiv(M, splits), kBK);
  splits = cdiv(M, rows_per_split);
  at::Tensor target = splits == 1 ? at::empty({NA, NB}, f32) : at::empty({splits, NA, NB}, f32);

  const bool vec = NA % 8 == 0 && NB % 8 == 0 && aligned16(P.data_ptr()) && aligned16(Q.data_ptr());
  const size_t smem = WgradSmem<T>::total;
  const dim3 grid(unsigned(cdiv(NB, kWBN)), unsigned(cdiv(NA, kWBM)), unsigned(splits));
  TORCH_CHECK(grid.y <= 65535u, "bottleneck_adapter_bwd: dimension ", NA, " too large for the weight-gradient grid");
  if (vec) {
    auto kernel = weight_grad_kernel<T, true>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    kernel<<<grid, kThreads, smem, stream>>>(cptr<T>(P), P.stride(0), act_p, cptr<T>(Q), Q.stride(0), act_q, alpha,
                                             target.data_ptr<float>(), M, NA, NB, rows_per_split);
  } else {
    auto kernel = weight_grad_kernel<T, false>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    kernel<<<grid, kThreads, smem, stream>>>(cptr<T>(P), P.stride(0), act_p, cptr<T>(Q), Q.stride(0), act_q, alpha,
                                             target.data_ptr<float>(), M, NA, NB, rows_per_split);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return splits == 1 ? target : target.sum(0);
}

void check_half_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf, name,
              " must be bfloat16 or float16, got ", t.scalar_type());
}

void check_like(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  check_cuda_tensor(t, name);
  check_same_device(t, ref, name, ref_name);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
}

// The adapter weights may be the fp32 master copies: float, on x's device (cast to x's dtype below).
void check_weight(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  check_cuda_tensor(t, name);
  check_same_device(t, ref, name, "x");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating-point tensor, got ", t.scalar_type());
}

void check_scaling(const at::Tensor& scaling, const at::Tensor& ref) {
  check_cuda_tensor(scaling, "scaling");
  check_same_device(scaling, ref, "scaling", "x");
  TORCH_CHECK(scaling.scalar_type() == at::kFloat && scaling.numel() == 1,
              "scaling must be a 1-element float32 tensor, got dtype ", scaling.scalar_type(), " with ",
              scaling.numel(), " elements");
}

// Checks the weights, returns (d_in, b, d_out).
std::tuple<int64_t, int64_t, int64_t> check_weights(const at::Tensor& x, const at::Tensor& w_down,
                                                     const at::Tensor& w_up) {
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dimension, got a scalar");
  const int64_t d_in = x.size(-1);
  TORCH_CHECK(w_down.dim() == 2 && w_down.size(1) == d_in, "w_down must have shape (b, d_in) with d_in = ", d_in,
              ", got ", w_down.sizes());
  const int64_t b = w_down.size(0);
  TORCH_CHECK(w_up.dim() == 2 && w_up.size(1) == b, "w_up must have shape (d_out, b) with b = ", b, ", got ",
              w_up.sizes());
  const int64_t d_out = w_up.size(0);
  TORCH_CHECK(b >= 1 && b <= kMaxB, "bottleneck size b must be in [1, ", kMaxB, "] for the CUDA kernel, got ", b);
  TORCH_CHECK(d_in >= 1 && d_in < (int64_t(1) << 30), "x's last dimension must be in [1, 2^30), got ", d_in);
  TORCH_CHECK(d_out >= 1 && d_out < (int64_t(1) << 30), "w_up's first dimension (d_out) must be in [1, 2^30), got ",
              d_out);
  return {d_in, b, d_out};
}

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> v(sizes.begin(), sizes.end());
  v.back() = last;
  return v;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> bottleneck_adapter_fwd(const at::Tensor& x, const at::Tensor& w_down,
                                                          const at::Tensor& w_up, const at::Tensor& scaling,
                                                          const std::optional<at::Tensor>& residual,
                                                          c10::string_view activation) {
  check_cuda_tensor(x, "x");
  check_half_dtype(x, "x");
  check_weight(w_down, x, "w_down");
  check_weight(w_up, x, "w_up");
  check_scaling(scaling, x);
  const int act = parse_activation(activation);
  const auto [d_in, b, d_out] = check_weights(x, w_down, w_up);
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) {
    check_like(*residual, x, "residual", "x");
    const auto want = with_last(x.sizes(), d_out);
    TORCH_CHECK(residual->sizes().vec() == want, "residual must have shape ", at::IntArrayRef(want), ", got ",
                residual->sizes());
  } else {
    TORCH_CHECK(d_out == d_in, "without a residual the output adds x, so w_up must have shape (d_in, b) = (", d_in,
                ", ", b, "), got ", w_up.sizes());
  }

  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = x.reshape({-1, d_in}).contiguous();
  const int64_t M = x2.size(0);
  const at::Tensor wd = w_down.to(x.scalar_type()).contiguous();
  const at::Tensor wu = w_up.to(x.scalar_type()).contiguous();
  const at::Tensor res2 = has_res ? residual->reshape({-1, d_out}).contiguous() : x2;
  at::Tensor out = at::empty({M, d_out}, x.options());
  at::Tensor hidden = at::empty({M, b}, x.options());
  if (M > 0) {
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const bool vec = d_in % 8 == 0 && d_out % 8 == 0 && b % 8 == 0 && aligned16(x2.data_ptr()) &&
                     aligned16(wd.data_ptr()) && aligned16(wu.data_ptr()) && aligned16(res2.data_ptr()) &&
                     aligned16(out.data_ptr());
    const bool small = b <= 64;
#define FA_FWD(T)                                                                              \
  do {                                                                                         \
    if (small) {                                                                               \
      if (vec) launch_fwd<T, 64, true>(x2, wd, wu, scaling, res2, out, hidden, act, stream);   \
      else launch_fwd<T, 64, false>(x2, wd, wu, scaling, res2, out, hidden, act, stream);      \
    } else {                                                                                   \
      if (vec) launch_fwd<T, 256, true>(x2, wd, wu, scaling, res2, out, hidden, act, stream);  \
      else launch_fwd<T, 256, false>(x2, wd, wu, scaling, res2, out, hidden, act, stream);     \
    }                                                                                          \
  } while (0)
    if (x.scalar_type() == at::kBFloat16) FA_FWD(__nv_bfloat16);
    else FA_FWD(__half);
#undef FA_FWD
  }
  return {out.view(with_last(x.sizes(), d_out)), hidden};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bottleneck_adapter_bwd(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& hidden, const at::Tensor& w_down,
    const at::Tensor& w_up, const at::Tensor& scaling, c10::string_view activation, bool has_residual) {
  check_cuda_tensor(x, "x");
  check_half_dtype(x, "x");
  check_like(dout, x, "dout", "x");
  check_like(hidden, x, "hidden", "x");
  check_weight(w_down, x, "w_down");
  check_weight(w_up, x, "w_up");
  check_scaling(scaling, x);
  const int act = parse_activation(activation);
  const auto [d_in, b, d_out] = check_weights(x, w_down, w_up);
  const auto want = with_last(x.sizes(), d_out);
  TORCH_CHECK(dout.sizes().vec() == want, "dout must have shape ", at::IntArrayRef(want), ", got ", dout.sizes());
  const int64_t M = x.numel() / d_in;
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(0) == M && hidden.size(1) == b, "hidden must have shape (M, b) = (",
              M, ", ", b, "), got ", hidden.sizes());
  TORCH_CHECK(has_residual || d_out == d_in, "has_residual=False means out = x + ..., so d_out must equal d_in = ",
              d_in, ", got ", d_out);

  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = x.reshape({M, d_in}).contiguous();
  const at::Tensor dout2 = dout.reshape({M, d_out}).contiguous();
  const at::Tensor h2 = hidden.contiguous();
  const at::Tensor wd = w_down.to(x.scalar_type()).contiguous();
  const at::Tensor wu = w_up.to(x.scalar_type()).contiguous();
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dx = at::empty({M, d_in}, x.options());
  if (M == 0) {
    return {dx.view(x.sizes()), at::zeros({b, d_in}, f32), at::zeros({d_out, b}, f32),
            at::zeros(scaling.sizes(), f32)};
  }
  at::Tensor dh = at::empty({M, b}, x.options());
  at::Tensor partial = at::empty({cdiv(M, kBM)}, f32);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool vec = d_in % 8 == 0 && d_out % 8 == 0 && b % 8 == 0 && aligned16(x2.data_ptr()) &&
                   aligned16(dout2.data_ptr()) && aligned16(h2.data_ptr()) && aligned16(wd.data_ptr()) &&
                   aligned16(wu.data_ptr()) && aligned16(dx.data_ptr()) && aligned16(dh.data_ptr());
  const bool small = b <= 64;
  const bool add_dout = !has_residual;
  at::Tensor dw_up, dw_down;
  const float* s_ptr = scaling.data_ptr<float>();
#define FA_BWD(T)                                                                                               \
  do {                                                                                                          \
    if (small) {                                                                                                \
      if (vec) launch_bwd_rows<T, 64, true>(dout2, h2, wd, wu, scaling, dx, dh, partial, act, add_dout, stream); \
      else launch_bwd_rows<T, 64, false>(dout2, h2, wd, wu, scaling, dx, dh, partial, act, add_dout, stream);    \
    } else {                                                                                                    \
      if (vec) launch_bwd_rows<T, 256, true>(dout2, h2, wd, wu, scaling, dx, dh, partial, act, add_dout, stream); \
      else launch_bwd_rows<T, 256, false>(dout2, h2, wd, wu, scaling, dx, dh, partial, act, add_dout, stream);    \
    }                                                                                                           \
    dw_up = weight_grad<T>(dout2, kActNone, h2, act, s_ptr, stream);   /* s * dout^T @ act(hidden) */          \
    dw_down = weight_grad<T>(dh, kActNone, x2, kActNone, nullptr, stream); /* dh^T @ x */                      \
  } while (0)
  if (x.scalar_type() == at::kBFloat16) FA_BWD(__nv_bfloat16);
  else FA_BWD(__half);
#undef FA_BWD
  at::Tensor dscaling = partial.sum().reshape(scaling.sizes());
  return {dx.view(x.sizes()), dw_down, dw_up, dscaling};
}

}  // namespace fastadapt
