// Host entry points of the fastadapt CUDA kernels (registered in registration.cpp).
//
// Semantics and shapes are documented beside each implementation and with the schemas in
// fastadapt/ops/bottleneck_adapter.py and fastadapt/ops/lora_merge.py.
#pragma once

#include <optional>
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace fastadapt {

// out = (x if residual is None else residual) + s * up(act(down(x))); returns (out, hidden,
// w_down_lp, w_up_lp) with hidden (M, b) the pre-activation x @ w_down^T (rounded to x.dtype),
// saved for backward. The weights may be any float dtype (fp32 master copies): they are cast to
// x's dtype, and the copies returned for backward (empty when a weight already has x's dtype).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bottleneck_adapter_fwd(
    const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& w_up, const at::Tensor& scaling,
    const std::optional<at::Tensor>& residual, c10::string_view activation);

// Returns (dx, dw_down fp32, dw_up fp32, dscaling fp32 shaped like scaling).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bottleneck_adapter_bwd(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& hidden, const at::Tensor& w_down,
    const at::Tensor& w_up, const at::Tensor& scaling, c10::string_view activation, bool has_residual);

// In place: weight += sign * scaling * lora_b @ lora_a (weight^T when transposed). Returns an
// int32 (1,) device flag, 1 when any result is NaN/Inf. check_only computes the flag, writes nothing.
at::Tensor lora_merge_(at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling,
                       bool transposed, int64_t sign, bool check_only);

}  // namespace fastadapt
