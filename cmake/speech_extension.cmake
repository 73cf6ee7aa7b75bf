# SPDX-License-Identifier: Apache-2.0
#
# _speech_C: CUDA kernels of the speech models (dual text/codebook heads).
# Included from the top-level CMakeLists.txt for CUDA builds. Every op here
# also has a torch reference path, so precompiled (Python-only) builds stay
# complete; setup.py marks the extension optional.
#
set(VLLM_SPEECH_EXT_SRC
  "csrc/speech/torch_bindings.cpp"
  "csrc/speech/codebook_embedding.cu")

message(STATUS "Enabling speech extension (_speech_C).")
define_extension_target(
  _speech_C
  DESTINATION vllm
  LANGUAGE ${VLLM_GPU_LANG}
  SOURCES ${VLLM_SPEECH_EXT_SRC}
  COMPILE_FLAGS ${VLLM_GPU_FLAGS}
  ARCHITECTURES ${VLLM_GPU_ARCHES}
  USE_SABI 3
  WITH_SOABI)
