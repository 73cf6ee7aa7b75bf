# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Prometheus metrics of speech generation, exported beside vLLM's own on
``/metrics``: time to first audio, real-time factor, audio seconds produced."""

from prometheus_client import Counter, Histogram

_TTFA_BUCKETS = (
    0.02,
    0.05,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.0,
    5.0,
    10.0,
    30.0,
)
_RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 10.0)

time_to_first_audio = Histogram(
    "vllm:speech_time_to_first_audio_seconds",
    "Time from request arrival to the first audio sent (whole response when "
    "not streaming).",
    buckets=_TTFA_BUCKETS,
)
real_time_factor = Histogram(
    "vllm:speech_real_time_factor",
    "Generation + decoding time divided by the duration of the audio produced.",
    buckets=_RTF_BUCKETS,
)
audio_seconds = Counter(
    "vllm:speech_audio_seconds",
    "Seconds of audio generated.",
)
requests_total = Counter(
    "vllm:speech_requests",
    "Speech generation requests completed.",
)


def observe_request(first_audio_s: float, total_s: float, audio_s: float) -> None:
    time_to_first_audio.observe(first_audio_s)
    if audio_s > 0:
        real_time_factor.observe(total_s / audio_s)
    audio_seconds.inc(audio_s)
    requests_total.inc()
