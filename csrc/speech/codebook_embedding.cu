// SPDX-License-Identifier: Apache-2.0
// Summed codebook embeddings of a multi-codebook audio frame.
//
// One block per row n; threads stride over the hidden dimension and
// accumulate the K gathered rows in fp32, so the K-way gather + add that
// torch runs as K embedding launches and K-1 adds is a single launch.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/all.h>

#include "ops.h"

namespace {

template <typename scalar_t, typename index_t>
__global__ void codebook_embedding_sum_kernel(
    scalar_t* __restrict__ out, const index_t* __restrict__ codes,
    const scalar_t* __restrict__ weight, const int64_t num_codebooks,
    const int64_t codebook_size, const int64_t hidden,
    const int64_t weight_rows) {
  const int64_t n = blockIdx.x;
  const index_t* row_codes = codes + n * num_codebooks;
  for (int64_t h = threadIdx.x; h < hidden; h += blockDim.x) {
    float acc = 0.f;
    for (int64_t k = 0; k < num_codebooks; ++k) {
      int64_t row = static_cast<int64_t>(row_codes[k]) + k * codebook_size;
      // Out-of-range codes contribute nothing (the torch path raises).
      if (row >= 0 && row < weight_rows) {
        acc += static_cast<float>(weight[row * hidden + h]);
      }
    }
    out[n * hidden + h] = static_cast<scalar_t>(acc);
  }
}

}  // namespace

void codebook_embedding_sum(torch::Tensor& out, const torch::Tensor& codes,
                            const torch::Tensor& weight,
                            int64_t codebook_size) {
  TORCH_CHECK(codes.dim() == 2, "codes must be [N, K]");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(),
              "weight must be a contiguous [K * codebook_size, H] matrix");
  TORCH_CHECK(out.is_contiguous() && out.size(0) == codes.size(0) &&
                  out.size(1) == weight.size(1),
              "out must be a contiguous [N, H] tensor");
  TORCH_CHECK(out.scalar_type() == weight.scalar_type(),
              "out and weight dtypes differ");
  const int64_t num_rows = codes.size(0);
  if (num_rows == 0) return;
  const auto codes_c = codes.contiguous();
  const at::cuda::OptionalCUDAGuard guard(device_of(weight));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t hidden = weight.size(1);
  const int threads = static_cast<int>(std::min<int64_t>(1024, hidden));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, weight.scalar_type(),
      "codebook_embedding_sum", [&] {
        if (codes_c.scalar_type() == at::kInt) {
          codebook_embedding_sum_kernel<scalar_t, int32_t>
              <<<num_rows, threads, 0, stream>>>(
                  out.data_ptr<scalar_t>(), codes_c.data_ptr<int32_t>(),
                  weight.data_ptr<scalar_t>(), codes_c.size(1), codebook_size,
                  hidden, weight.size(0));
        } else {
          TORCH_CHECK(codes_c.scalar_type() == at::kLong,
                      "codes must be int32 or int64");
          codebook_embedding_sum_kernel<scalar_t, int64_t>
              <<<num_rows, threads, 0, stream>>>(
                  out.data_ptr<scalar_t>(), codes_c.data_ptr<int64_t>(),
                  weight.data_ptr<scalar_t>(), codes_c.size(1), codebook_size,
                  hidden, weight.size(0));
        }
      });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
