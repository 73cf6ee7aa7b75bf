// SPDX-License-Identifier: Apache-2.0
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(_speech_C, m) {
  m.def(
      "codebook_embedding_sum(Tensor! out, Tensor codes, Tensor weight, "
      "int codebook_size) -> ()");
  m.impl("codebook_embedding_sum", torch::kCUDA, &codebook_embedding_sum);
}

// Importable as `vllm._speech_C` (ops are registered by the library above).
static struct PyModuleDef speech_module = {PyModuleDef_HEAD_INIT, "_speech_C",
                                           nullptr, 0, nullptr};
PyMODINIT_FUNC PyInit__speech_C(void) { return PyModule_Create(&speech_module); }
