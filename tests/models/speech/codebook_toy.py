# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""A test-only multi-codebook model for the V1 runner's codebook path.

``ToyCodebookLM`` is the tiny demo Qwen2 plus two auxiliary codebooks of
five codes each. A position's codes are added to its token embedding (fixed
sinusoidal tables), so a wrong feed-back changes later tokens. The model's
sampler takes the greedy main token and derives each code from it and from
the history window, so a wrong history changes the codes.
``reference_generate`` recomputes the same sequence with HF transformers.

Served with ``--model-class-overrides '{"Qwen2ForCausalLM":
"codebook_toy:ToyCodebookLM"}'`` and this directory on PYTHONPATH.
"""

import torch

from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

NUM_AUX = 2
BOOK = 5
WINDOW = 3


def aux_table(hidden: int, device, dtype) -> torch.Tensor:
    k = torch.arange(NUM_AUX * BOOK, dtype=torch.float64, device=device)[:, None]
    j = torch.arange(hidden, dtype=torch.float64, device=device)[None, :]
    return (0.5 * torch.sin((k + 1) * (j + 1) * 0.37)).to(dtype)


def add_aux(embeds: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    table = aux_table(embeds.shape[-1], embeds.device, embeds.dtype)
    offsets = torch.arange(NUM_AUX, device=aux.device) * BOOK
    return embeds + table[aux.long() + offsets].sum(-2)


def derive_codes(main: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """codes[r, k] from the main token and the valid history frames."""
    valid = history[..., 0] >= 0
    hist_sum = torch.where(valid[..., None], history, 0).sum(dim=1)  # [R, K]
    ks = torch.arange(NUM_AUX, device=main.device)
    return (
        main[:, None] * (ks + 2)
        + hist_sum[:, 0:1]
        + hist_sum[:, 1:]
        + valid.sum(1, keepdim=True)
        + ks
    ) % BOOK


class ToyCodebookLM(Qwen2ForCausalLM):
    supports_multi_codebook = True

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.num_aux_codebooks = NUM_AUX
        self.codebook_history_window = WINDOW

    @classmethod
    def get_aux_codebook_sizes(cls, model_config):
        return [BOOK] * NUM_AUX

    def embed_input_ids(self, input_ids, aux_codes=None):
        embeds = self.model.embed_input_ids(input_ids)
        return embeds if aux_codes is None else add_aux(embeds, aux_codes)

    def sample_codebooks(self, logits, hidden_states, sampling_metadata, history):
        main = logits.argmax(dim=-1)
        return main, derive_codes(main, history)


@torch.no_grad()
def reference_generate(hf_model, prompt_ids, prompt_aux, steps):
    """Greedy tokens [steps] and codes [steps, NUM_AUX] with HF transformers,
    recomputing the whole sequence at every step."""
    ids = list(prompt_ids)
    aux = [list(r) for r in prompt_aux]
    out_ids, out_aux = [], []
    for _ in range(steps):
        t_ids = torch.tensor(ids)[None]
        emb = add_aux(hf_model.get_input_embeddings()(t_ids), torch.tensor(aux)[None])
        logits = hf_model(inputs_embeds=emb).logits[0, -1].float()
        main = logits.argmax()[None]
        hist = torch.full((1, WINDOW, 1 + NUM_AUX), -1, dtype=torch.long)
        recent = list(zip(out_ids, out_aux))[-WINDOW:]
        for i, (t, a) in enumerate(recent):
            hist[0, i, 0] = t
            hist[0, i, 1:] = torch.tensor(a)
        codes = derive_codes(main, hist)[0].tolist()
        ids.append(int(main))
        aux.append(codes)
        out_ids.append(int(main))
        out_aux.append(codes)
    return out_ids, out_aux
