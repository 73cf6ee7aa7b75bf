// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <torch/all.h>

// out[n, :] = sum_k weight[codes[n, k] + k * codebook_size, :]
// codes: [N, K] int32/int64, weight: [K * codebook_size, H], out: [N, H].
void codebook_embedding_sum(torch::Tensor& out, const torch::Tensor& codes,
                            const torch::Tensor& weight, int64_t codebook_size);
