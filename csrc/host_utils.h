// Host-side helpers shared by the op implementations: argument checks and cached device limits.
#pragma once

#include <mutex>
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include "common.cuh"

namespace fastadapt {

inline void check_cuda_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " must be a tensor, got None");
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

inline int parse_activation(c10::string_view activation) {
  const std::string a(activation.data(), activation.size());
  if (a == "tanh") return kActTanh;
  if (a == "relu") return kActRelu;
  if (a == "gelu") return kActGelu;
  if (a == "silu") return kActSilu;
  TORCH_CHECK(false, "activation must be one of 'tanh', 'relu', 'gelu', 'silu', got '", a, "'");
  return kActNone;
}

// Per-device limits, read once per device.
struct DeviceLimits {
  int max_smem_optin = 0;  // bytes of dynamic shared memory a block may opt in to
  int num_sms = 0;
};

inline DeviceLimits device_limits(int device) {
  constexpr int kMaxDevices = 64;
  static DeviceLimits cache[kMaxDevices];
  static std::once_flag once[kMaxDevices];
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "unsupported CUDA device index ", device);
  std::call_once(once[device], [device] {
    DeviceLimits d;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.num_sms, cudaDevAttrMultiProcessorCount, device));
    cache[device] = d;
  });
  return cache[device];
}

}  // namespace fastadapt
