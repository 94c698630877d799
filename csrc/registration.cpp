// CUDA kernels of the fastadapt ops (namespace torch.ops.fastadapt).
//
// The schemas and fake (meta) implementations are declared in Python beside the op that calls
// each kernel (fastadapt/ops/_library.py: native_op), so torch.compile traces the ops whether or
// not this extension is built. This file only registers the CUDA implementations.
#include <Python.h>

#include <torch/library.h>

#include "ops.h"

// `import fastadapt._C` loads this shared object, which runs the static registrations below.
// The module itself is empty (the ops are reached through torch.ops.fastadapt).
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fastadapt CUDA kernels (torch.ops.fastadapt)",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY_IMPL(fastadapt, CUDA, m) {
  m.impl("bottleneck_adapter_cuda_fwd", &fastadapt::bottleneck_adapter_fwd);  // fastadapt/ops/bottleneck_adapter.py
  m.impl("bottleneck_adapter_cuda_bwd", &fastadapt::bottleneck_adapter_bwd);
  m.impl("lora_merge_cuda_", &fastadapt::lora_merge_);  // fastadapt/ops/lora_merge.py
}
