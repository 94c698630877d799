// Schemas and CUDA registrations of the fastadapt CUDA ops (namespace torch.ops.fastadapt_cuda).
//
// The fake (meta) implementations that let torch.compile trace these ops live in Python:
// fastadapt/_native.py registers them right after this library is loaded.
#include <Python.h>

#include <torch/library.h>

#include "ops.h"

// `import fastadapt._C` loads this shared object, which runs the static registrations below.
// The module itself is empty (the ops are reached through torch.ops.fastadapt_cuda).
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fastadapt CUDA ops (see torch.ops.fastadapt_cuda)",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastadapt_cuda, m) {
  m.def(
      "bottleneck_adapter_fwd(Tensor x, Tensor w_down, Tensor w_up, Tensor scaling, Tensor? residual, "
      "str activation) -> (Tensor, Tensor)");
  m.def(
      "bottleneck_adapter_bwd(Tensor dout, Tensor x, Tensor hidden, Tensor w_down, Tensor w_up, Tensor scaling, "
      "str activation, bool has_residual) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "lora_merge_(Tensor(a!) weight, Tensor lora_a, Tensor lora_b, float scaling, bool transposed=False, "
      "int sign=1, bool check_only=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastadapt_cuda, CUDA, m) {
  m.impl("bottleneck_adapter_fwd", &fastadapt::bottleneck_adapter_fwd);
  m.impl("bottleneck_adapter_bwd", &fastadapt::bottleneck_adapter_bwd);
  m.impl("lora_merge_", &fastadapt::lora_merge_);
}
