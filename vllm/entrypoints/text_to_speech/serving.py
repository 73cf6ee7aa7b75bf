# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""``/v1/audio/speech``: text in, audio out, for ``SupportsSpeechGeneration``
models.

Generation runs in the engine like any completion. The model's decoder
(codec / vocoder) runs here, in the API server process, on one worker thread
that batches the decode calls of concurrent requests, so audio decoding never
blocks the event loop or the engine. Streaming feeds the newly generated
frames to a per-request decoder session (``SpeechDecoder.open_stream``) that
carries the decoder's causal state, so the chunks join seamlessly.
"""

import asyncio
import base64
import json
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from functools import cached_property
from http import HTTPStatus
from typing import Any, cast

import numpy as np
import torch
from fastapi import Request

import vllm.envs as envs
from vllm.config.text_to_speech import (
    TextToSpeechConfig,
    TextToSpeechParams,
    VoicePrompt,
)
from vllm.engine.protocol import EngineClient
from vllm.entrypoints.generate.base.serving import GenerateBaseServing
from vllm.entrypoints.openai.engine.protocol import ErrorResponse
from vllm.entrypoints.openai.models.serving import OpenAIServingModels
from vllm.entrypoints.serve.utils.request_logger import RequestLogger
from vllm.entrypoints.text_to_speech import metrics
from vllm.entrypoints.text_to_speech.audio import (
    change_tempo,
    encode_audio,
    load_reference_audio,
    pcm16,
    read_reference_source,
    wav_stream_header,
)
from vllm.entrypoints.text_to_speech.protocol import (
    MEDIA_TYPES,
    SPEED_MAX,
    SPEED_MIN,
    SpeechRequest,
)
from vllm.entrypoints.text_to_speech.segments import split_speech_request
from vllm.entrypoints.text_to_speech.voices import VoiceStore
from vllm.exceptions import VLLMNotFoundError, VLLMValidationError
from vllm.logger import init_logger
from vllm.model_executor.models.interfaces import (
    SpeechDecoder,
    SupportsSpeechGeneration,
)
from vllm.outputs import RequestOutput
from vllm.renderers.inputs.preprocess import parse_model_prompt
from vllm.utils import random_uuid

logger = init_logger(__name__)

# Frames decoded per streamed chunk (after the first, which is shorter so
# the first audio comes early).
STREAM_FIRST_CHUNK_FRAMES = 8
STREAM_CHUNK_FRAMES = 32


_STREAM_END = object()


class _StreamCall:
    """One ``DecodeWorker.stream`` call: a session, the frames it brought
    (None: finish), and the queue its audio chunks go back through."""

    def __init__(
        self, session: Any, frames: np.ndarray | None, loop: asyncio.AbstractEventLoop
    ):
        self.session = session
        self.frames = frames
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self._taken = False

    def take(self) -> np.ndarray | None:
        """The frames for this round: the call's own the first time, none
        (but the same finish flag) after that."""
        if self._taken and self.frames is not None:
            return self.frames[:0]
        self._taken = True
        return self.frames

    def send(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is gone
            self.cancelled = True


class DecodeWorker:
    """Runs a ``SpeechDecoder`` on one thread, batching concurrent jobs.

    Decoders are not assumed thread-safe: every call (decode and reference
    encoding) goes through this single thread. Streaming sessions are
    served in rounds, as the engine schedules requests: a round advances
    every session with work by one chunk, in one ``decode_streams`` call
    when the decoder has it, so sessions that start at different times or
    bring many frames at once still share batches, and each chunk goes out
    as soon as its round is done.
    """

    def __init__(self, decoder: SpeechDecoder, max_batch: int = 16):
        self.decoder = decoder
        self.max_batch = max_batch
        # The decoder's float32 matmuls follow the engine's setting
        # (VLLM_FLOAT32_MATMUL_PRECISION; "high": TF32 on GPUs).
        torch.set_float32_matmul_precision(envs.VLLM_FLOAT32_MATMUL_PRECISION)
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(
            target=self._loop, name="speech-decode", daemon=True
        )
        self._thread.start()

    async def decode(
        self, frames: np.ndarray, voice: VoicePrompt | None = None
    ) -> np.ndarray:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._jobs.put(("decode", (frames, voice), fut, loop))
        return await fut

    async def stream(
        self, session: Any, frames: np.ndarray | None
    ) -> AsyncGenerator[np.ndarray, None]:
        """The audio chunks of ``session.decode(frames)`` (of
        ``session.finish()`` when ``frames`` is None), each as soon as it
        is decoded. One call per session at a time."""
        call = _StreamCall(session, frames, asyncio.get_running_loop())
        self._jobs.put(("stream", call, None, None))
        try:
            while True:
                item = await call.queue.get()
                if item is _STREAM_END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            call.cancelled = True  # the worker drops what is left

    async def call(self, fn: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._jobs.put(("call", fn, fut, loop))
        return await fut

    def call_sync(self, fn: Callable[[], Any]) -> Any:
        done = threading.Event()
        box: dict = {}

        def run():
            try:
                box["v"] = fn()
            except BaseException as e:  # noqa: BLE001
                box["e"] = e
            done.set()

        self._jobs.put(("sync", run, None, None))
        done.wait()
        if "e" in box:
            raise box["e"]
        return box["v"]

    @staticmethod
    def _resolve(fut, loop, value=None, exc=None) -> None:
        def set_():
            if fut.done():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(value)

        with suppress(RuntimeError):  # the caller's loop is gone
            loop.call_soon_threadsafe(set_)

    def _loop(self) -> None:
        streams: list[_StreamCall] = []
        while True:
            # Take what is queued (waiting only when no session has work):
            # other jobs run at once, decodes are batched, stream calls
            # join the sessions of the next round.
            decodes: list = []
            block = not streams
            while len(decodes) < self.max_batch:
                try:
                    job = self._jobs.get() if block else self._jobs.get_nowait()
                except queue.Empty:
                    break
                block = False
                if job[0] == "decode":
                    decodes.append(job)
                elif job[0] == "stream":
                    streams.append(job[1])
                else:
                    self._run_one(job)
            if decodes:
                self._run_batch(decodes)
            if streams:
                streams = self._stream_round(streams)

    def _run_one(self, job) -> None:
        kind, fn, fut, loop = job
        if kind == "sync":
            fn()
            return
        try:
            self._resolve(fut, loop, value=fn())
        except Exception as e:  # noqa: BLE001
            self._resolve(fut, loop, exc=e)

    def _run_batch(self, batch) -> None:
        try:
            with torch.inference_mode():
                outs = self.decoder.decode(
                    [j[1][0] for j in batch], [j[1][1] for j in batch]
                )
            for (_, _, fut, loop), audio in zip(batch, outs):
                self._resolve(fut, loop, value=np.asarray(audio, dtype=np.float32))
        except Exception as e:  # noqa: BLE001
            logger.exception("speech decoder failed")
            for _, _, fut, loop in batch:
                self._resolve(fut, loop, exc=e)

    def _stream_round(self, streams: list[_StreamCall]) -> list[_StreamCall]:
        """One round over (at most ``max_batch`` of) the sessions; returns
        the calls still to serve, those left out of this round first."""
        streams = [c for c in streams if not c.cancelled]
        batch, rest = streams[: self.max_batch], streams[self.max_batch :]
        batched = getattr(self.decoder, "decode_streams", None)
        if batched is None:  # a whole call per session
            outs = [self._stream_one(c.session, c.take()) for c in batch]
        else:
            try:
                with torch.inference_mode():
                    outs = batched(
                        [c.session for c in batch], [c.take() for c in batch]
                    )
            except Exception as e:  # noqa: BLE001
                logger.exception("speech decoder failed")
                outs = [e] * len(batch)
        for c, out in zip(batch, outs):
            if isinstance(out, BaseException):
                c.send(out)
                continue
            audio = np.asarray(out, dtype=np.float32)
            if audio.size:
                c.send(audio)
            if batched is not None and getattr(c.session, "has_work", False):
                rest.append(c)
            else:
                c.send(_STREAM_END)
        return rest

    @staticmethod
    def _stream_one(session: Any, frames: np.ndarray | None) -> Any:
        try:
            if frames is not None:
                return session.decode(frames)
            finish = getattr(session, "finish", None)
            return finish() if finish is not None else np.zeros(0, np.float32)
        except Exception as e:  # noqa: BLE001
            return e


class LeftContextStream:
    """A streaming session for decoders that are causal with a bounded
    receptive field: each chunk is decoded together with the decoder's
    ``stream_left_context`` previous frames, whose audio is dropped."""

    def __init__(
        self,
        decoder: Any,
        voice: VoicePrompt | None = None,
        left_context: int | None = None,
    ):
        self.decoder = decoder
        self.voice = voice
        self.context = (
            decoder.stream_left_context if left_context is None else left_context
        )
        self.history: np.ndarray | None = None

    def decode(self, frames: np.ndarray) -> np.ndarray:
        ctx = (
            self.history[-self.context :]
            if (self.history is not None and self.context > 0)
            else frames[:0]
        )
        audio = self.decoder.decode([np.concatenate([ctx, frames])], [self.voice])[0]
        self.history = (
            frames
            if self.history is None
            else np.concatenate([self.history, frames])[-max(self.context, 1) :]
        )
        return audio[len(ctx) * self.decoder.samples_per_frame :]


@dataclass
class _Segment:
    """One engine request of a speech request (``split_speech_text``)."""

    request_id: str
    params: TextToSpeechParams
    engine_input: Any
    """None until built, for segments spoken in context (see _Prepared)."""
    sampling_params: Any
    output_token_ids: Any = None
    """The tokens generated so far (set while generating)."""


@dataclass
class _Prepared:
    request_id: str
    segments: list[_Segment]
    speed: float
    fmt: str
    in_context: bool = False
    """The model's ``speech_segments_in_context``: each segment's prompt
    holds the segments before it and their generated tokens, so they are
    generated one after another and each prompt is built when its turn
    comes."""
    prelude: list[_Segment] = field(default_factory=list)
    """Engine requests generated (concurrently) before the first segment
    and not spoken (the model's ``get_speech_prelude``); their tokens reach
    every segment as ``TextToSpeechParams.prelude``."""


class OpenAIServingSpeech(GenerateBaseServing):
    """Handler of ``/v1/audio/speech`` and ``/v1/audio/voices``."""

    request_id_prefix = "speech"

    def __init__(
        self,
        engine_client: EngineClient,
        models: OpenAIServingModels,
        *,
        request_logger: RequestLogger | None,
        voices_dir: str | None = None,
        decode_device: str | None = None,
    ):
        super().__init__(
            engine_client=engine_client, models=models, request_logger=request_logger
        )
        self.tts_config: TextToSpeechConfig = self.model_cls.get_speech_config(
            self.model_config
        )
        device = (
            torch.device(decode_device)
            if decode_device
            else (
                torch.device("cuda")
                if torch.cuda.is_available()
                else torch.device("cpu")
            )
        )
        self.decoder = self.model_cls.get_speech_decoder(self.model_config, device)
        self.worker = DecodeWorker(self.decoder)
        self.ref_sample_rate = (
            self.tts_config.ref_audio_sample_rate or self.tts_config.sample_rate
        )
        self.allowed_media_dir = self.model_config.allowed_local_media_path or None
        self.voices: VoiceStore | None = None
        if voices_dir:
            self.voices = VoiceStore(
                voices_dir, self.ref_sample_rate, self._encode_sync
            )
        logger.info(
            "Speech generation ready: %d Hz, decoder on %s, voices in %s",
            self.tts_config.sample_rate,
            device,
            voices_dir or "(none)",
        )

    @cached_property
    def model_cls(self) -> type[SupportsSpeechGeneration]:
        from vllm.model_executor.model_loader import get_model_cls

        return cast(type[SupportsSpeechGeneration], get_model_cls(self.model_config))

    def _encode_sync(self, audio: np.ndarray, sr: int, ref_text: str) -> VoicePrompt:
        # Called from the voice store (an executor thread): run on the
        # decoder's thread like every decoder call.
        return self.worker.call_sync(
            lambda: self.decoder.encode_reference(audio, sr, ref_text)
        )

    # ------------------------------------------------------------ voices
    async def add_voice(self, name: str, audio_bytes: bytes, ref_text: str) -> dict:
        store = self._require_voices()
        if not self.tts_config.supports_voice_cloning:
            raise VLLMValidationError(
                "this model does not support voice cloning", parameter="audio"
            )
        audio = load_reference_audio(
            audio_bytes, self.ref_sample_rate, self.tts_config.max_ref_audio_s
        )
        return await asyncio.to_thread(store.add, name, audio, ref_text)

    def list_voices(self) -> list[dict]:
        store = self._require_voices()
        return [store.info(n) for n in store.names()]

    def delete_voice(self, name: str) -> None:
        self._require_voices().delete(name)

    def _require_voices(self) -> VoiceStore:
        if self.voices is None:
            raise VLLMValidationError(
                "named voices need the server to be started with --speech-voices-dir",
                parameter="voice",
            )
        return self.voices

    # ------------------------------------------------------------ speech
    async def _prepare(
        self, request: SpeechRequest, raw_request: Request | None
    ) -> _Prepared:
        cfg = self.tts_config
        text = request.input.strip() if request.input else ""
        if not text:
            raise VLLMValidationError("input is empty", parameter="input")
        if len(request.input) > cfg.max_input_chars:
            raise VLLMValidationError(
                f"input is {len(request.input)} characters; the limit is "
                f"{cfg.max_input_chars}",
                parameter="input",
            )
        fmt = request.response_format.lower()
        if fmt not in MEDIA_TYPES:
            raise VLLMValidationError(
                f"unsupported response_format {request.response_format!r}; "
                f"use one of {', '.join(MEDIA_TYPES)}",
                parameter="response_format",
            )
        if request.stream_format is not None and fmt not in ("wav", "pcm"):
            raise VLLMValidationError(
                "streaming supports response_format wav or pcm",
                parameter="response_format",
            )
        if not (SPEED_MIN <= request.speed <= SPEED_MAX):
            raise VLLMValidationError(
                f"speed must be in [{SPEED_MIN}, {SPEED_MAX}]", parameter="speed"
            )
        if request.instructions:
            raise VLLMValidationError(
                "this model does not take instructions", parameter="instructions"
            )
        if (
            request.max_new_tokens is not None
            and request.max_new_tokens > self.model_config.max_model_len
        ):
            raise VLLMValidationError(
                f"max_new_tokens exceeds the model's max_model_len "
                f"({self.model_config.max_model_len})",
                parameter="max_new_tokens",
            )

        voice: VoicePrompt | None = None
        speaker: str | None = None
        if request.ref_audio is not None:
            if not cfg.supports_voice_cloning:
                raise VLLMValidationError(
                    "this model does not support voice cloning", parameter="ref_audio"
                )
            if not request.ref_text or not request.ref_text.strip():
                raise VLLMValidationError(
                    "ref_text (the transcript of ref_audio) is required",
                    parameter="ref_text",
                )
            data = read_reference_source(request.ref_audio, self.allowed_media_dir)
            audio = await asyncio.to_thread(
                load_reference_audio, data, self.ref_sample_rate, cfg.max_ref_audio_s
            )
            ref_text = request.ref_text.strip()
            voice = await self.worker.call(
                lambda: self.decoder.encode_reference(
                    audio, self.ref_sample_rate, ref_text
                )
            )
        elif request.voice in (None, "", "default"):
            pass  # the model's default voice
        elif self.voices is not None and self.voices.exists(request.voice):
            voice = await asyncio.to_thread(self.voices.get, request.voice)
        elif request.voice not in self.model_voices():
            raise VLLMNotFoundError(
                f"voice {request.voice!r} does not exist; registered voices: "
                f"{self.voices.names() if self.voices else []}"
            )
        else:
            speaker = request.voice

        voices: list[VoicePrompt | str] | None = None
        if request.voices is not None:
            if not getattr(self.model_cls, "supports_multi_speaker", False):
                raise VLLMValidationError(
                    "this model takes one voice (`voice`); `voices` is for "
                    "multi-speaker models",
                    parameter="voices",
                )
            voices = [await self._speaker_voice(n) for n in request.voices]
        params = TextToSpeechParams(
            text=text,
            model_config=self.model_config,
            voice=voice,
            speaker=speaker,
            extra=dict(request.extra_args or {}),
            voices=voices,
        )
        sampling_kwargs: dict[str, Any] = dict(cfg.default_sampling)
        for key in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
            value = getattr(request, key)
            if value is not None:
                sampling_kwargs[key] = value
        sampling_kwargs["max_tokens"] = (
            request.max_new_tokens or cfg.default_max_new_tokens
        )
        # A model may speak a long text as several segments (e.g. sentence
        # splitting), each its own engine request with the same voice and
        # options; max_new_tokens and the model's length rules are per
        # segment.
        seg_params = split_speech_request(self.model_cls, params)
        # In context: only the first prompt can be built now (the others
        # hold the tokens generated before them; see _segment_input).
        in_context = bool(getattr(self.model_cls, "speech_segments_in_context", False))
        get_prelude = getattr(self.model_cls, "get_speech_prelude", None)
        prelude = (
            list(get_prelude(params, dict(sampling_kwargs))) if get_prelude else []
        )
        if prelude and not in_context:
            raise RuntimeError("get_speech_prelude needs speech_segments_in_context")
        prompts, sampling = [], []
        for i, sp in enumerate(seg_params):
            if (i == 0 and not prelude) or not in_context:
                prompts.append(self.model_cls.get_speech_generation_prompt(sp))
            sampling.append(
                self.model_cls.get_speech_sampling_params(sp, dict(sampling_kwargs))
            )
        engine_inputs = (
            await self.renderer.render_cmpl_async(
                [parse_model_prompt(self.model_config, pr) for pr in prompts]
            )
            if prompts
            else []
        )
        engine_inputs += [None] * (len(seg_params) - len(engine_inputs))
        base_id = self._base_request_id(raw_request, random_uuid())
        request_id = f"{self.request_id_prefix}-{base_id}"
        segments = [
            _Segment(
                request_id if len(seg_params) == 1 else f"{request_id}-{i}", sp, ei, spp
            )
            for i, (sp, ei, spp) in enumerate(zip(seg_params, engine_inputs, sampling))
        ]
        pre_inputs = (
            await self.renderer.render_cmpl_async(
                [parse_model_prompt(self.model_config, pr) for pr, _ in prelude]
            )
            if prelude
            else []
        )
        pre = [
            _Segment(f"{request_id}-pre{i}", params, ei, spp)
            for i, (ei, (_, spp)) in enumerate(zip(pre_inputs, prelude))
        ]
        if len(segments) > 1:
            logger.debug("speech request %s: %d segments", request_id, len(segments))
        return _Prepared(request_id, segments, request.speed, fmt, in_context, pre)

    def model_voices(self) -> list[str]:
        """Preset speakers the model knows without reference audio."""
        getter = getattr(self.model_cls, "get_speech_presets", None)
        return list(getter(self.model_config)) if getter else []

    async def _speaker_voice(self, name: str) -> VoicePrompt | str:
        """One entry of ``voices``: a registered voice, or a preset name."""
        if self.voices is not None and self.voices.exists(name):
            return await asyncio.to_thread(self.voices.get, name)
        if name in self.model_voices():
            return name
        raise VLLMNotFoundError(
            f"voice {name!r} does not exist; registered voices: "
            f"{self.voices.names() if self.voices else []}, presets: "
            f"{self.model_voices()}"
        )

    async def _segment_input(self, p: _Prepared, index: int) -> _Segment:
        """Segment ``index`` with its engine input, for segments spoken in
        context: its prompt holds the texts and generated tokens of the
        segments before it (``TextToSpeechParams.context``)."""
        seg = p.segments[index]
        if seg.engine_input is None:
            seg.params.context = [
                (s.params.text, list(s.output_token_ids or []))
                for s in p.segments[:index]
            ]
            prompt = self.model_cls.get_speech_generation_prompt(seg.params)
            (seg.engine_input,) = await self.renderer.render_cmpl_async(
                [parse_model_prompt(self.model_config, prompt)]
            )
        return seg

    async def _run_prelude(self, p: _Prepared) -> None:
        """Generate the request's prelude (together) and hand its tokens to
        every segment (``TextToSpeechParams.prelude``)."""
        if not p.prelude:
            return
        tasks = [asyncio.ensure_future(self._final_output(s)) for s in p.prelude]
        try:
            finals = await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        ids = [list(f.outputs[0].token_ids) for f in finals]
        for seg in p.segments:
            seg.params.prelude = ids

    async def _generate(self, seg: _Segment) -> AsyncGenerator[RequestOutput, None]:
        gen = self.engine_client.generate(
            seg.engine_input, seg.sampling_params, seg.request_id
        )
        try:
            async for out in gen:
                seg.output_token_ids = out.outputs[0].token_ids
                yield out
        except asyncio.CancelledError:
            await self.engine_client.abort(seg.request_id)
            raise

    async def _speak_segment(self, seg: _Segment, speed: float) -> np.ndarray:
        return await self._decode_output(seg, await self._final_output(seg), speed)

    async def _final_output(self, seg: _Segment) -> RequestOutput:
        final: RequestOutput | None = None
        async for out in self._generate(seg):
            final = out
        assert final is not None
        return final

    async def _decode_output(
        self, seg: _Segment, final: RequestOutput, speed: float
    ) -> np.ndarray:
        frames = self._frames(final)
        if len(frames) == 0:
            audio = np.zeros(0, np.float32)
        else:
            audio = await self.worker.decode(frames, seg.params.voice)
        return change_tempo(audio, speed, self.tts_config.sample_rate)

    async def _speak(self, p: _Prepared) -> np.ndarray:
        """One-shot audio: the segments are generated concurrently (the
        engine batches them) and decoded each on its own, then joined.
        Segments spoken in context are generated one after another, each
        decoded while the next one generates."""
        tasks: list[asyncio.Future] = []
        try:
            if p.in_context:
                await self._run_prelude(p)
                for i in range(len(p.segments)):
                    seg = await self._segment_input(p, i)
                    final = await self._final_output(seg)
                    tasks.append(
                        asyncio.ensure_future(self._decode_output(seg, final, p.speed))
                    )
            else:
                tasks = [
                    asyncio.ensure_future(self._speak_segment(seg, p.speed))
                    for seg in p.segments
                ]
            audios = await asyncio.gather(*tasks)
        finally:
            # on an error or a cancellation, stop (and abort) the others
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return audios[0] if len(audios) == 1 else np.concatenate(audios)

    def _frames(self, out: RequestOutput) -> np.ndarray:
        return self.model_cls.get_speech_frames(out.outputs[0], self.model_config)

    async def create_speech(
        self, request: SpeechRequest, raw_request: Request | None = None
    ) -> tuple[bytes, str] | AsyncGenerator[bytes, None] | ErrorResponse:
        error = await self._check_model(request)
        if error is not None:
            return error
        try:
            prepared = await self._prepare(request, raw_request)
        except (VLLMValidationError, VLLMNotFoundError, ValueError) as e:
            return self.create_error_response(e)
        if request.stream_format is not None:
            return self._stream(prepared, request.stream_format)
        try:
            t0 = time.monotonic()
            audio = await self._speak(prepared)
            elapsed = time.monotonic() - t0
            metrics.observe_request(
                elapsed, elapsed, audio.size / self.tts_config.sample_rate
            )
            body = await asyncio.to_thread(
                encode_audio, audio, self.tts_config.sample_rate, prepared.fmt
            )
        except (VLLMValidationError, ValueError) as e:
            return self.create_error_response(e)
        except Exception as e:  # noqa: BLE001
            logger.exception("speech request %s failed", prepared.request_id)
            return self.create_error_response(
                f"speech generation failed: {e}",
                err_type="InternalServerError",
                status_code=HTTPStatus.INTERNAL_SERVER_ERROR,
            )
        return body, MEDIA_TYPES[prepared.fmt]

    async def _stream(
        self, p: _Prepared, stream_format: str
    ) -> AsyncGenerator[bytes, None]:
        """The segments one after another, each through its own decoder
        session (as the original streams sentence after sentence)."""
        sr = self.tts_config.sample_rate
        t0 = time.monotonic()
        first_audio_s: float | None = None
        sent = {"frames": 0}
        total_samples = 0

        def emit(audio: np.ndarray) -> bytes:
            if stream_format == "sse":
                event = {
                    "type": "speech.audio.delta",
                    "audio": base64.b64encode(pcm16(audio)).decode(),
                }
                return f"data: {json.dumps(event)}\n\n".encode()
            return pcm16(audio)

        try:
            if stream_format == "audio" and p.fmt == "wav":
                yield wav_stream_header(sr)
            await self._run_prelude(p)
            for i, seg in enumerate(p.segments):
                if p.in_context:
                    seg = await self._segment_input(p, i)
                async for audio in self._stream_segment(seg, p.speed, sent):
                    if first_audio_s is None:
                        first_audio_s = time.monotonic() - t0
                    total_samples += audio.size
                    yield emit(audio)
            elapsed = time.monotonic() - t0
            metrics.observe_request(
                first_audio_s or elapsed, elapsed, total_samples / sr
            )
            if stream_format == "sse":
                input_tokens = sum(
                    len(seg.engine_input.get("prompt_token_ids", []))
                    if isinstance(seg.engine_input, dict)
                    else 0
                    for seg in p.prelude + p.segments
                )
                done = {
                    "type": "speech.audio.done",
                    "usage": {
                        "input_tokens": input_tokens,
                        "output_tokens": sent["frames"],
                        "audio_seconds": round(total_samples / sr, 3),
                    },
                }
                yield f"data: {json.dumps(done)}\n\n".encode()
        except Exception as e:  # noqa: BLE001
            logger.exception("speech stream %s failed", p.request_id)
            if stream_format == "sse":
                err = {"type": "error", "error": {"message": str(e)}}
                yield f"data: {json.dumps(err)}\n\n".encode()
            raise

    async def _stream_segment(
        self, seg: _Segment, speed: float, sent: dict[str, int]
    ) -> AsyncGenerator[np.ndarray, None]:
        """Audio chunks of one segment; adds its frames to ``sent``."""
        sr = self.tts_config.sample_rate
        sent_frames = 0
        session = await self.worker.call(
            lambda: self.decoder.open_stream(seg.params.voice)
        )
        # A decoder with its own chunking (e.g. CosyVoice2's token hop and
        # look-ahead) may ask for frames as soon as they come.
        first_chunk, next_chunk = getattr(
            self.decoder,
            "stream_chunk_frames",
            (STREAM_FIRST_CHUNK_FRAMES, STREAM_CHUNK_FRAMES),
        )

        async def chunks(new: np.ndarray | None) -> AsyncGenerator[np.ndarray, None]:
            async with aclosing(self.worker.stream(session, new)) as decoded:
                async for audio in decoded:
                    audio = change_tempo(audio, speed, sr)
                    if audio.size:
                        yield audio

        frames = None
        async for out in self._generate(seg):
            frames = self._frames(out)
            target = first_chunk if sent_frames == 0 else next_chunk
            if len(frames) - sent_frames >= target and not out.finished:
                new, sent_frames = frames[sent_frames:], len(frames)
                sent["frames"] += len(new)
                async for audio in chunks(new):
                    yield audio
        if frames is not None and len(frames) > sent_frames:
            new, sent_frames = frames[sent_frames:], len(frames)
            sent["frames"] += len(new)
            async for audio in chunks(new):
                yield audio
        # Optional: audio a session holds back (look-ahead, cross-fade)
        # until it knows that no frames follow.
        if getattr(session, "finish", None) is not None:
            async for audio in chunks(None):
                yield audio
