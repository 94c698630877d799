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
// Design: every product is one launch of a single tiled GEMM (tile_gemm_kernel: a 64 x BN output
// tile per CTA, 4 warps, a 3-stage cp.async pipeline) with one of four epilogues; the M x b
// intermediates (hidden, dh) go through memory (4 MiB at M = 8192, b = 256; mostly L2):
//
//   forward   hidden = x @ w_down^T      64 x 64 tiles   (M/64 x b/64 CTAs)
//             out = res + s * act(hidden) @ w_up^T        64 x 128 tiles  (M/64 x d_out/128 CTAs)
//   backward  dh = s * (dout @ w_up) * act'(hidden), ds partials   64 x 64 tiles
//             dx = dh @ w_down (+ dout)                  64 x 128 tiles
//             dw_up, dw_down: weight_grad_kernel (split over M only while its tiles are under a wave)
// fp32 master weights are cast to x's dtype once, in the forward, which returns the copies for the
// backward.
//
// Why not one fused kernel per row block (the first design): its grid is M/64 CTAs (128 at
// M = 8192: one per SM, nothing to hide latency with; 32 at M = 2048: a quarter of an H100), each
// running both GEMMs serially. The split design reads x (forward) and dout (backward) once more but
// launches 4-32x the CTAs, several per SM, at every M from 2048 up; the intermediates cost 2 x 4 MiB.
// bf16/fp16 operands, fp32 accumulation; each output is rounded once, and act() is applied to the
// rounded hidden, as eager bf16 and the Triton kernels do.
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

constexpr int kBK = 32;            // reduction step per pipeline stage
constexpr int kPad = 8;            // 16-byte row pad: keeps WMMA's ld a multiple of 8 and spreads banks
constexpr int kLDK = kBK + kPad;   // leading dim of [rows][kBK] tiles

using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

constexpr size_t cmax(size_t a, size_t b) { return a > b ? a : b; }

// ---------------------------------------------------------------------------------------------
// The tiled GEMM: C (M, N) = f(A) (M, K) @ B, one 64 x BN tile of C per CTA, then an epilogue.
// A is row-major (leading dim lda; f = act on load when act_a >= 0). B is addressed through its
// storage: KN = false: B[k][n] = W[n][k] (a weight whose rows are output columns: w_down in the
// forward's first GEMM, w_up in its second); KN = true: B[k][n] = W[k][n] (w_up for dout @ w_up,
// w_down for dh @ w_down). 1-D grid: CTA t takes row block t / n_tiles, column block t % n_tiles —
// the column blocks of one row block run together, so that A row block is read from L2.
constexpr int kTM = 64;          // rows per tile
constexpr int kTileThreads = 128;  // 4 warps as 2 (rows) x 2 (cols)
constexpr int kStages = 3;

enum Epilogue : int {
  kEpiHidden = 0,  // out = round(acc)                                       (hidden)
  kEpiResidual = 1,  // out = round(aux + s * acc)                           (out; aux = residual or x)
  kEpiDh = 2,      // out = round(s * acc * act'(aux)), partial += sum act(aux) * acc   (dh; aux = hidden)
  kEpiDx = 3,      // out = round(acc (+ aux))                               (dx; aux = dout or nullptr)
};

template <typename T>
struct EpiArgs {
  T* out;
  int64_t ld_out;
  const T* aux;        // see Epilogue; nullptr when unused
  int64_t ld_aux;
  const float* scaling;  // kEpiResidual, kEpiDh
  float* partial;      // kEpiDh: one fp32 per CTA (dscaling), or nullptr
  int act;             // kEpiDh
};

template <typename T, int BN, bool KN>
struct TileSmem {
  static constexpr int ldb = KN ? BN + kPad : kLDK;
  static constexpr size_t a_stage = size_t(kTM) * kLDK;
  static constexpr size_t b_stage = KN ? size_t(kBK) * ldb : size_t(BN) * kLDK;
  static constexpr size_t pipe = kStages * (a_stage + b_stage) * sizeof(T);
  static constexpr int lds = BN + 4;  // fp32 staging leading dim (a multiple of 4 for WMMA stores)
  static constexpr size_t stage = size_t(kTM) * lds * sizeof(float);
  static constexpr size_t total = cmax(pipe, stage);
  static_assert(total <= 48 * 1024, "tile_gemm_kernel must fit the default 48 KiB of shared memory");
};

template <typename T, int BN, bool KN, bool VEC>
__device__ __forceinline__ void load_stage(T* s_a, T* s_b, const T* __restrict__ A, int64_t lda, int act_a,
                                           const T* __restrict__ B, int64_t ldb, int64_t m0, int64_t n0,
                                           int64_t k0, int64_t M, int64_t N, int64_t K) {
  load_tile<T, kTM, kBK, kTileThreads, VEC>(s_a, kLDK, A, lda, m0, k0, M, K, act_a);
  if constexpr (KN) {
    load_tile<T, kBK, BN, kTileThreads, VEC>(s_b, TileSmem<T, BN, KN>::ldb, B, ldb, k0, n0, K, N, kActNone);
  } else {
    load_tile<T, BN, kBK, kTileThreads, VEC>(s_b, kLDK, B, ldb, n0, k0, N, K, kActNone);
  }
}

// One output element of the epilogue (fp32 in, rounded once); dsc accumulates dscaling's terms.
template <typename T, int EPI>
__device__ __forceinline__ float epilogue_value(float v, float aux, float s, int act, float& dsc) {
  if constexpr (EPI == kEpiResidual) return fmaf(s, v, aux);
  if constexpr (EPI == kEpiDh) {
    dsc = fmaf(act_fwd(aux, act), v, dsc);
    return s * v * act_grad(aux, act);
  }
  if constexpr (EPI == kEpiDx) return v + aux;
  return v;
}

template <typename T, int BN, bool KN, int EPI, bool VEC>
__global__ void __launch_bounds__(kTileThreads)
tile_gemm_kernel(const T* __restrict__ A, int64_t lda, int act_a, const T* __restrict__ B, int64_t ldb, int64_t M,
                 int64_t N, int64_t K, EpiArgs<T> epi) {
  using Smem = TileSmem<T, BN, KN>;
  using BLayout = std::conditional_t<KN, wmma::row_major, wmma::col_major>;
  constexpr int FM = 2;             // 32 rows per warp
  constexpr int FN = BN / 2 / 16;   // BN / 2 columns per warp
  static_assert(BN % 32 == 0, "BN must split over 2 warps of 16-column fragments");

  extern __shared__ __align__(128) unsigned char smem[];
  T* s_a = reinterpret_cast<T*>(smem);                      // [kStages][kTM][kLDK]
  T* s_b = s_a + kStages * Smem::a_stage;                   // [kStages][B tile]
  float* s_stage = reinterpret_cast<float*>(smem);          // [kTM][lds], after the main loop

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int wm = warp >> 1;
  const int wn = warp & 1;
  const int64_t n_tiles = cdiv(N, BN);
  const int64_t m0 = int64_t(blockIdx.x) / n_tiles * kTM;
  const int64_t n0 = int64_t(blockIdx.x) % n_tiles * BN;
  const int64_t nk = cdiv(K, kBK);

  FragC acc[FM][FN];
  zero_acc(acc);
  // Pipeline: stages 0 .. kStages-2 in flight before the loop; iteration kt waits for stage kt,
  // then refills the buffer iteration kt-1 read (every warp is past the barrier, so done with it).
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < nk) {
      load_stage<T, BN, KN, VEC>(s_a + st * Smem::a_stage, s_b + st * Smem::b_stage, A, lda, act_a, B, ldb, m0, n0,
                                 int64_t(st) * kBK, M, N, K);
    }
    cp_async_commit();
  }
  for (int64_t kt = 0; kt < nk; ++kt) {
    cp_async_wait<kStages - 2>();  // all but the newest group landed: stage kt is in
    __syncthreads();
    const int64_t pf = kt + kStages - 1;
    if (pf < nk) {
      const int buf = int(pf % kStages);
      load_stage<T, BN, KN, VEC>(s_a + buf * Smem::a_stage, s_b + buf * Smem::b_stage, A, lda, act_a, B, ldb, m0,
                                 n0, pf * kBK, M, N, K);
    }
    cp_async_commit();
    const int cur = int(kt % kStages);
    const T* sb = s_b + cur * Smem::b_stage + (KN ? wn * (BN / 2) : wn * (BN / 2) * kLDK);
    warp_mma<T, FM, FN, kBK / 16, wmma::row_major, BLayout>(acc, s_a + cur * Smem::a_stage + wm * 32 * kLDK, kLDK,
                                                           sb, Smem::ldb);
  }
  cp_async_wait<0>();
  __syncthreads();  // the staging buffer aliases the pipeline buffers

#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j)
      wmma::store_matrix_sync(s_stage + (wm * 32 + i * 16) * Smem::lds + wn * (BN / 2) + j * 16, acc[i][j], Smem::lds,
                              wmma::mem_row_major);
  __syncthreads();

  const float s = (EPI == kEpiResidual || EPI == kEpiDh) ? *epi.scaling : 1.f;
  float dsc = 0.f;  // this thread's share of dscaling (kEpiDh)
  if constexpr (VEC) {
    // N, the leading dims and the pointers are multiples of 8 elements / 16 bytes: every 8-wide chunk
    // is wholly inside or outside C.
    constexpr int CH = BN / 8;
    for (int i = tid; i < kTM * CH; i += kTileThreads) {
      const int r = i / CH;
      const int c = (i % CH) * 8;
      const int64_t gr = m0 + r;
      const int64_t gc = n0 + c;
      if (gr < M && gc < N) {
        float aux[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        if (epi.aux != nullptr) Vec8<T>::load(epi.aux + gr * epi.ld_aux + gc, aux);
        float v[8];
        const float* st = s_stage + r * Smem::lds + c;
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = epilogue_value<T, EPI>(st[e], aux[e], s, epi.act, dsc);
        Vec8<T>::store(epi.out + gr * epi.ld_out + gc, v);
      }
    }
  } else {
    for (int i = tid; i < kTM * BN; i += kTileThreads) {
      const int r = i / BN;
      const int c = i % BN;
      const int64_t gr = m0 + r;
      const int64_t gc = n0 + c;
      if (gr < M && gc < N) {
        const float aux = epi.aux != nullptr ? to_float<T>(epi.aux[gr * epi.ld_aux + gc]) : 0.f;
        const float v = epilogue_value<T, EPI>(s_stage[r * Smem::lds + c], aux, s, epi.act, dsc);
        epi.out[gr * epi.ld_out + gc] = from_float<T>(v);
      }
    }
  }

  if constexpr (EPI == kEpiDh) {
    // dscaling partial of this CTA: fixed-order reduction, so repeated runs agree bit for bit
    __shared__ float s_red[kTileThreads / 32];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) dsc += __shfl_xor_sync(0xffffffffu, dsc, off);
    if (lane == 0) s_red[warp] = dsc;
    __syncthreads();
    if (tid == 0 && epi.partial != nullptr) {
      float t = 0.f;
#pragma unroll
      for (int w = 0; w < kTileThreads / 32; ++w) t += s_red[w];
      epi.partial[blockIdx.x] = t;
    }
  }
}

// ---------------------------------------------------------------------------------------------
constexpr int kThreads = 256;      // weight_grad_kernel: 8 warps as a 2 (rows) x 4 (cols) grid
// Weight gradient: C[i, j] = alpha * sum_{m in split} fP(P[m, i]) * fQ(Q[m, j]), fp32 out.
// P (M, NA) and Q (M, NB) row-major; f = act when act_* >= 0 (act(hidden) is recomputed on load
// instead of stored). Grid: (cdiv(NB, kWBN), cdiv(NA, kWBM), splits); split z writes C + z*NA*NB.
constexpr int kWBM = 64;
constexpr int kWBN = 128;
constexpr int kLDP = kWBM + kPad;
constexpr int kLDQ = kWBN + kPad;
constexpr int kLDS = kWBN + 4;  // fp32 staging leading dim (a multiple of 4 for WMMA stores)

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

bool ld_ok(int64_t ld) { return ld % 8 == 0; }

// One tile_gemm_kernel launch: C (M, N) = f(A) @ B, then the epilogue (see tile_gemm_kernel). The
// 16-byte paths are taken when every pointer, leading dimension and N/K allow them.
template <typename T, int BN, bool KN, int EPI>
void launch_tile(const T* A, int64_t lda, int act_a, const T* B, int64_t ldb, int64_t M, int64_t N, int64_t K,
                 const EpiArgs<T>& epi, cudaStream_t stream) {
  if (M == 0) return;
  const bool vec = N % 8 == 0 && K % 8 == 0 && ld_ok(lda) && ld_ok(ldb) && ld_ok(epi.ld_out) &&
                   (epi.aux == nullptr || (ld_ok(epi.ld_aux) && aligned16(epi.aux))) && aligned16(A) &&
                   aligned16(B) && aligned16(epi.out);
  const int64_t ctas = cdiv(M, kTM) * cdiv(N, BN);
  TORCH_CHECK(ctas < (int64_t(1) << 31), "bottleneck_adapter: ", M, " rows need too many CTAs for one launch");
  const size_t smem = TileSmem<T, BN, KN>::total;
  if (vec) {
    tile_gemm_kernel<T, BN, KN, EPI, true><<<unsigned(ctas), kTileThreads, smem, stream>>>(A, lda, act_a, B, ldb, M, N,
                                                                                          K, epi);
  } else {
    tile_gemm_kernel<T, BN, KN, EPI, false><<<unsigned(ctas), kTileThreads, smem, stream>>>(A, lda, act_a, B, ldb, M,
                                                                                           N, K, epi);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Tile widths: 64 over the bottleneck (b = 256 -> 4 column blocks: 128 CTAs at M = 2048), 128 over d.
constexpr int kNarrowBN = 64;
constexpr int kWideBN = 128;

template <typename T>
void run_fwd(const at::Tensor& x2, const at::Tensor& wd, const at::Tensor& wu, const at::Tensor& scaling,
             const at::Tensor& res2, const at::Tensor& out, const at::Tensor& hidden, int act, cudaStream_t stream) {
  const int64_t M = x2.size(0), d_in = x2.size(1), b = wd.size(0), d_out = wu.size(0);
  // hidden = x @ w_down^T
  launch_tile<T, kNarrowBN, false, kEpiHidden>(cptr<T>(x2), d_in, kActNone, cptr<T>(wd), d_in, M, b, d_in,
                                               {mptr<T>(hidden), b, nullptr, 0, nullptr, nullptr, kActNone}, stream);
  // out = res + s * act(hidden) @ w_up^T
  launch_tile<T, kWideBN, false, kEpiResidual>(
      cptr<T>(hidden), b, act, cptr<T>(wu), b, M, d_out, b,
      {mptr<T>(out), d_out, cptr<T>(res2), res2.stride(0), scaling.data_ptr<float>(), nullptr, kActNone}, stream);
}

template <typename T>
void run_bwd_rows(const at::Tensor& dout2, const at::Tensor& h2, const at::Tensor& wd, const at::Tensor& wu,
                  const at::Tensor& scaling, const at::Tensor& dx, const at::Tensor& dh, const at::Tensor& partial,
                  int act, bool add_dout, cudaStream_t stream) {
  const int64_t M = dout2.size(0), d_out = dout2.size(1), b = wd.size(0), d_in = wd.size(1);
  // dh = s * (dout @ w_up) * act'(hidden), and the dscaling partials
  launch_tile<T, kNarrowBN, true, kEpiDh>(
      cptr<T>(dout2), d_out, kActNone, cptr<T>(wu), b, M, b, d_out,
      {mptr<T>(dh), b, cptr<T>(h2), b, scaling.data_ptr<float>(), partial.data_ptr<float>(), act}, stream);
  // dx = dh @ w_down (+ dout)
  launch_tile<T, kWideBN, true, kEpiDx>(
      cptr<T>(dh), b, kActNone, cptr<T>(wd), d_in, M, d_in, b,
      {mptr<T>(dx), d_in, add_dout ? cptr<T>(dout2) : nullptr, d_out, nullptr, nullptr, kActNone}, stream);
}

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
  // Split M only while the tiles are fewer than a wave: a full wave of tiles gains nothing from a
  // split but its fp32 workspace and the sum over it (dw_down and dw_up at d = 4096, b = 256: 128 tiles).
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>(cdiv(2 * lim.num_sms, tiles), cdiv(M, 256)));
  if (tiles * 16 >= int64_t(15) * lim.num_sms) splits = 1;
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
  TORCH_CHECK(b >= 1 && b < (int64_t(1) << 30), "bottleneck size b must be in [1, 2^30), got ", b);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bottleneck_adapter_fwd(
    const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& w_up, const at::Tensor& scaling,
    const std::optional<at::Tensor>& residual, c10::string_view activation) {
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
    if (x.scalar_type() == at::kBFloat16) {
      run_fwd<__nv_bfloat16>(x2, wd, wu, scaling, res2, out, hidden, act, stream);
    } else {
      run_fwd<__half>(x2, wd, wu, scaling, res2, out, hidden, act, stream);
    }
  }
  // The weights in x's dtype, for backward (so it does not cast them again); empty when they already
  // had x's dtype (backward then takes the weights themselves).
  const auto copy_or_empty = [&](const at::Tensor& w, const at::Tensor& lp) {
    return w.scalar_type() == x.scalar_type() ? at::empty({0}, x.options()) : lp;
  };
  return {out.view(with_last(x.sizes(), d_out)), hidden, copy_or_empty(w_down, wd), copy_or_empty(w_up, wu)};
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
  at::Tensor partial = at::empty({cdiv(M, kTM) * cdiv(b, kNarrowBN)}, f32);  // one per dh tile
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool add_dout = !has_residual;
  at::Tensor dw_up, dw_down;
  const float* s_ptr = scaling.data_ptr<float>();
  if (x.scalar_type() == at::kBFloat16) {
    run_bwd_rows<__nv_bfloat16>(dout2, h2, wd, wu, scaling, dx, dh, partial, act, add_dout, stream);
    dw_up = weight_grad<__nv_bfloat16>(dout2, kActNone, h2, act, s_ptr, stream);  // s * dout^T @ act(hidden)
    dw_down = weight_grad<__nv_bfloat16>(dh, kActNone, x2, kActNone, nullptr, stream);  // dh^T @ x
  } else {
    run_bwd_rows<__half>(dout2, h2, wd, wu, scaling, dx, dh, partial, act, add_dout, stream);
    dw_up = weight_grad<__half>(dout2, kActNone, h2, act, s_ptr, stream);
    dw_down = weight_grad<__half>(dh, kActNone, x2, kActNone, nullptr, stream);
  }
  at::Tensor dscaling = partial.sum().reshape(scaling.sizes());
  return {dx.view(x.sizes()), dw_down, dw_up, dscaling};
}

}  // namespace fastadapt
