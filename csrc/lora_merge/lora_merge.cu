// In-place LoRA merge / unmerge:  W += sign * s * B @ A   (fp32 math, one rounding per element).
//
//   W (N, K) bf16/fp16/fp32, or (K, N) when transposed (GPT-2 Conv1D / fan_in_fan_out);
//   A = lora_a (r, K) fp32, B = lora_b (N, r) fp32.
//
// Memory-bound by design: each element of W is read once and written once; the small factors
// are staged through shared memory. Both layouts are one kernel over the stored matrix
// Wm (R x C) += alpha * L (R x r) @ Rt (r x C):
//   plain:      Wm = W,   L = B,   Rt = A
//   transposed: Wm = W^T, L = A^T, Rt = B^T   (strided views of the same fp32 factors)
// A device flag is set to 1 when any rounded result is NaN/Inf so the caller can refuse the
// merge; check_only computes the flag without writing W, so a refusal loses nothing.
//
// The inner product costs r FMAs per element on CUDA cores: memory-bound for the usual ranks
// (r <= 32 on H100); larger ranks become FMA-bound (no TF32 here: it would break fp32 weights).

#include <cmath>
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../common.cuh"
#include "../host_utils.h"
#include "../ops.h"

namespace fastadapt {
namespace {

constexpr int kThreads = 256;  // 8 warps; warp w owns rows w, w+8, ..., lane l owns 8 columns
constexpr int kRPT = 4;        // rows per thread: 4 x 8 outputs keep ~100 registers (2 CTAs / SM)
constexpr int kTR = 8 * kRPT;  // tile rows
constexpr int kTC = 256;       // tile columns (8 per thread, a warp covers 256 contiguous columns)
constexpr int kRC = 32;        // rank chunk staged per step

// Strided fp32 tile copy g[(b0 + i) * s0 + (b1 + j) * s1] -> s[i * lds + j], zero outside
// [lim0, lim1). The fastest thread index walks the unit-stride dimension (coalescing).
template <int N0, int N1>
__device__ __forceinline__ void load_factor(float* __restrict__ s, int lds, const float* __restrict__ g, int64_t s0,
                                            int64_t s1, int64_t b0, int64_t b1, int64_t lim0, int64_t lim1) {
  const bool dim0_fast = s0 == 1 && s1 != 1;
  for (int t = threadIdx.x; t < N0 * N1; t += kThreads) {
    const int i = dim0_fast ? t % N0 : t / N1;
    const int j = dim0_fast ? t / N0 : t % N1;
    const int64_t gi = b0 + i;
    const int64_t gj = b1 + j;
    s[i * lds + j] = (gi < lim0 && gj < lim1) ? g[gi * s0 + gj * s1] : 0.f;
  }
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads)
lora_merge_kernel(T* __restrict__ W, int64_t ldw, int64_t R, int64_t C, const float* __restrict__ L, int64_t l_s0,
                  int64_t l_s1, const float* __restrict__ Rt, int64_t r_s0, int64_t r_s1, int rank, float alpha,
                  int* __restrict__ flag, bool check_only) {
  __shared__ __align__(16) float s_l[kTR][kRC + 1];  // +1: rows read by a whole warp at once stay conflict-free
  __shared__ __align__(16) float s_r[kRC][kTC];

  const int tid = threadIdx.x;
  const int ty = tid >> 5;
  const int tx = tid & 31;
  const int64_t row0 = int64_t(blockIdx.x) * kTR;
  const int64_t col0 = int64_t(blockIdx.y) * kTC;
  const int64_t c = col0 + tx * 8;  // this thread's first column

  // Issue the W loads first so they are in flight while the product is computed.
  float w[kRPT][8];
#pragma unroll
  for (int i = 0; i < kRPT; ++i) {
    const int64_t row = row0 + ty + 8 * i;
    if constexpr (VEC) {
      if (row < R && c < C) {
        Vec8<T>::load(W + row * ldw + c, w[i]);  // C % 8 == 0: the chunk is wholly inside
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) w[i][e] = 0.f;
      }
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) w[i][e] = (row < R && c + e < C) ? to_float<T>(W[row * ldw + c + e]) : 0.f;
    }
  }

  float acc[kRPT][8];
#pragma unroll
  for (int i = 0; i < kRPT; ++i)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[i][e] = 0.f;

  for (int j0 = 0; j0 < rank; j0 += kRC) {
    __syncthreads();  // previous chunk fully consumed
    load_factor<kTR, kRC>(&s_l[0][0], kRC + 1, L, l_s0, l_s1, row0, j0, R, rank);
    load_factor<kRC, kTC>(&s_r[0][0], kTC, Rt, r_s0, r_s1, j0, col0, rank, C);
    __syncthreads();
#pragma unroll 4
    for (int j = 0; j < kRC; ++j) {  // zero-filled beyond rank
      const float4 ra = *reinterpret_cast<const float4*>(&s_r[j][tx * 8]);
      const float4 rb = *reinterpret_cast<const float4*>(&s_r[j][tx * 8 + 4]);
      const float rv[8] = {ra.x, ra.y, ra.z, ra.w, rb.x, rb.y, rb.z, rb.w};
#pragma unroll
      for (int i = 0; i < kRPT; ++i) {
        const float lv = s_l[ty + 8 * i][j];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[i][e] = fmaf(lv, rv[e], acc[i][e]);
      }
    }
  }

  bool bad = false;
#pragma unroll
  for (int i = 0; i < kRPT; ++i) {
    const int64_t row = row0 + ty + 8 * i;
    float v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      // Round once, then test the value that would be stored (fp32-finite can overflow bf16/fp16).
      const float q = to_float<T>(from_float<T>(fmaf(alpha, acc[i][e], w[i][e])));
      v[e] = q;
      const bool inside = row < R && c + e < C;
      bad |= inside && !isfinite(q);
    }
    if (!check_only && row < R) {
      if constexpr (VEC) {
        if (c < C) Vec8<T>::store(W + row * ldw + c, v);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e)
          if (c + e < C) W[row * ldw + c + e] = from_float<T>(v[e]);
      }
    }
  }
  if (__any_sync(0xffffffffu, bad) && tx == 0) atomicOr(flag, 1);
}

template <typename T>
void launch_merge(const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b, bool transposed, float alpha,
                  const at::Tensor& flag, bool check_only) {
  const int64_t rank = a.size(0);
  const int64_t K = a.size(1);
  const int64_t N = b.size(0);
  // Stored matrix Wm (R x C) and the strides of L (R x rank) and Rt (rank x C) in the factors.
  const int64_t R = transposed ? K : N;
  const int64_t C = transposed ? N : K;
  const int64_t l_s0 = transposed ? 1 : rank;  // plain: L = B (N, r);  transposed: L[k, j] = A[j, k]
  const int64_t l_s1 = transposed ? K : 1;
  const int64_t r_s0 = transposed ? 1 : K;     // plain: Rt = A (r, K); transposed: Rt[j, n] = B[n, j]
  const int64_t r_s1 = transposed ? rank : 1;
  const float* L = transposed ? a.data_ptr<float>() : b.data_ptr<float>();
  const float* Rt = transposed ? b.data_ptr<float>() : a.data_ptr<float>();
  const int64_t ldw = weight.size(0) > 1 ? weight.stride(0) : C;

  T* W = reinterpret_cast<T*>(weight.data_ptr());
  const bool vec = C % 8 == 0 && ldw % 8 == 0 && aligned16(W);
  const int64_t grid_y = cdiv(C, kTC);
  TORCH_CHECK(grid_y <= 65535, "lora_merge_: weight row length ", C, " is too large for the merge grid");
  const dim3 grid(unsigned(cdiv(R, kTR)), unsigned(grid_y));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (vec) {
    lora_merge_kernel<T, true><<<grid, kThreads, 0, stream>>>(W, ldw, R, C, L, l_s0, l_s1, Rt, r_s0, r_s1, int(rank),
                                                              alpha, flag.data_ptr<int>(), check_only);
  } else {
    lora_merge_kernel<T, false><<<grid, kThreads, 0, stream>>>(W, ldw, R, C, L, l_s0, l_s1, Rt, r_s0, r_s1,
                                                               int(rank), alpha, flag.data_ptr<int>(), check_only);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor lora_merge_(at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling,
                       bool transposed, int64_t sign, bool check_only) {
  check_cuda_tensor(weight, "weight");
  check_cuda_tensor(lora_a, "lora_a");
  check_cuda_tensor(lora_b, "lora_b");
  check_same_device(lora_a, weight, "lora_a", "weight");
  check_same_device(lora_b, weight, "lora_b", "weight");
  const auto wt = weight.scalar_type();
  TORCH_CHECK(wt == at::kBFloat16 || wt == at::kHalf || wt == at::kFloat,
              "weight must be bfloat16, float16 or float32, got ", wt);
  TORCH_CHECK(lora_a.scalar_type() == at::kFloat, "lora_a must be float32 (cast the r x K factor with .float()), got ",
              lora_a.scalar_type());
  TORCH_CHECK(lora_b.scalar_type() == at::kFloat, "lora_b must be float32 (cast the N x r factor with .float()), got ",
              lora_b.scalar_type());
  TORCH_CHECK(sign == 1 || sign == -1, "sign must be 1 (merge) or -1 (unmerge), got ", sign);
  TORCH_CHECK(std::isfinite(scaling), "scaling must be finite, got ", scaling);
  TORCH_CHECK(lora_a.dim() == 2, "lora_a must have shape (r, in_features), got ", lora_a.sizes());
  TORCH_CHECK(lora_b.dim() == 2, "lora_b must have shape (out_features, r), got ", lora_b.sizes());
  const int64_t rank = lora_a.size(0);
  const int64_t K = lora_a.size(1);
  const int64_t N = lora_b.size(0);
  TORCH_CHECK(rank >= 1 && rank < (int64_t(1) << 30), "rank (lora_a.size(0)) must be >= 1, got ", rank);
  TORCH_CHECK(lora_b.size(1) == rank, "lora_b must have shape (out_features, r) = (", N, ", ", rank, "), got ",
              lora_b.sizes());
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D, got shape ", weight.sizes());
  if (transposed) {
    TORCH_CHECK(weight.size(0) == K && weight.size(1) == N,
                "weight must have shape (in_features, out_features) = (", K, ", ", N,
                ") with transposed=True (fan_in_fan_out), got ", weight.sizes());
  } else {
    TORCH_CHECK(weight.size(0) == N && weight.size(1) == K, "weight must have shape (out_features, in_features) = (",
                N, ", ", K, "), got ", weight.sizes());
  }
  TORCH_CHECK((weight.size(1) <= 1 || weight.stride(1) == 1) &&
                  (weight.size(0) <= 1 || weight.stride(0) >= weight.size(1)),
              "weight must have unit stride along its last dimension and non-overlapping rows to be merged in "
              "place, got shape ", weight.sizes(), " and strides ", weight.strides());

  c10::cuda::CUDAGuard guard(weight.device());
  at::Tensor flag = at::zeros({1}, weight.options().dtype(at::kInt));
  if (weight.numel() == 0) return flag;
  const at::Tensor a = lora_a.contiguous();
  const at::Tensor b = lora_b.contiguous();
  const float alpha = float(double(sign) * scaling);
  switch (wt) {
    case at::kBFloat16: launch_merge<__nv_bfloat16>(weight, a, b, transposed, alpha, flag, check_only); break;
    case at::kHalf: launch_merge<__half>(weight, a, b, transposed, alpha, flag, check_only); break;
    default: launch_merge<float>(weight, a, b, transposed, alpha, flag, check_only); break;
  }
  return flag;
}

}  // namespace fastadapt
