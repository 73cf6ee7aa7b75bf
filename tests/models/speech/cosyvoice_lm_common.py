# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Checks shared by the CosyVoice2 and CosyVoice3 LM tests
(``test_cosyvoice2_lm.py``, ``test_cosyvoice3_lm.py``)."""

from typing import Any


def check_seeded_sampling(llm: Any, model_cls: type, vocab: Any, params: Any) -> None:
    """Sampling (RAS through the runner's model-sampler hook) is seeded per
    request: two requests with one seed agree, another seed differs; the
    output holds speech ids only (then at most one stop id) and its length
    honours min/max tokens.

    ``model_cls``: the model class (``get_speech_generation_prompt``,
    ``get_speech_sampling_params``); ``vocab``: its vocab (``speech_offset``,
    ``speech_token_size``, ``stop_token_ids``); ``params``: the request's
    ``TextToSpeechParams``."""
    from vllm.inputs import TokensPrompt

    prompt = TokensPrompt(**model_cls.get_speech_generation_prompt(params))

    def run(seed):
        sp = model_cls.get_speech_sampling_params(
            params,
            {
                "temperature": 1.0,
                "top_p": 0.8,
                "top_k": 25,
                "seed": seed,
                "max_tokens": 4096,
            },
        )
        return sp, llm.generate([prompt, prompt], sp, use_tqdm=False)

    sp, outs = run(1)
    a, b = (o.outputs[0].token_ids for o in outs)
    assert a == b
    assert a != run(2)[1][0].outputs[0].token_ids
    body = a[:-1] if a[-1] in vocab.stop_token_ids else a
    lo = vocab.speech_offset
    assert all(lo <= t < lo + vocab.speech_token_size for t in body)
    assert sp.min_tokens <= len(a) <= sp.max_tokens
