# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""One speech request as the segments its model speaks one after another
(``SupportsSpeechGeneration.split_speech_text``, e.g. CosyVoice's sentence
splitting), shared by ``/v1/audio/speech`` and the offline API."""

import dataclasses

from vllm.config.text_to_speech import TextToSpeechParams


def split_speech_request(
    model_cls: type, params: TextToSpeechParams
) -> list[TextToSpeechParams]:
    """``params`` once per segment (same voice, speaker and options, the
    segment's text). A model without ``split_speech_text`` gets one segment,
    the text as is. Raises ``ValueError`` when nothing is left to speak."""
    split = getattr(model_cls, "split_speech_text", None)
    texts = [params.text] if split is None else list(split(params))
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError(
            "the input has nothing to speak once normalised (only punctuation "
            "or symbols)"
        )
    return [
        dataclasses.replace(params, text=t, extra=dict(params.extra)) for t in texts
    ]
