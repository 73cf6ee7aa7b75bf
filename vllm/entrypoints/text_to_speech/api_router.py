# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Routes: ``POST /v1/audio/speech``, ``GET|POST /v1/audio/voices``,
``DELETE /v1/audio/voices/{name}``."""

from http import HTTPStatus
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response, StreamingResponse

from vllm.entrypoints.openai.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.utils.api_utils import load_aware_call, with_cancellation
from vllm.entrypoints.serve.utils.error_response import create_error_response
from vllm.exceptions import VLLMNotFoundError, VLLMValidationError
from vllm.logger import init_logger

from .protocol import MEDIA_TYPES, SpeechRequest, VoiceInfo, VoiceList
from .serving import OpenAIServingSpeech

logger = init_logger(__name__)

router = APIRouter()

# Uploaded reference audio is read into memory: bound it.
MAX_VOICE_UPLOAD_BYTES = 50 << 20

_ERRORS = {
    HTTPStatus.BAD_REQUEST.value: {"model": ErrorResponse},
    HTTPStatus.NOT_FOUND.value: {"model": ErrorResponse},
    HTTPStatus.INTERNAL_SERVER_ERROR.value: {"model": ErrorResponse},
}


def speech(request: Request) -> OpenAIServingSpeech:
    return request.app.state.openai_serving_speech


def _error(e: ErrorResponse | Exception) -> JSONResponse:
    if isinstance(e, Exception):
        e = create_error_response(e)
    return JSONResponse(content=e.model_dump(), status_code=e.error.code)


@router.post(
    "/v1/audio/speech",
    responses={
        HTTPStatus.OK.value: {"content": {m: {} for m in MEDIA_TYPES.values()}},
        **_ERRORS,
    },
)
@with_cancellation
@load_aware_call
async def create_speech(request: SpeechRequest, raw_request: Request):
    result = await speech(raw_request).create_speech(request, raw_request)
    if isinstance(result, ErrorResponse):
        return _error(result)
    if isinstance(result, tuple):
        body, media_type = result
        return Response(content=body, media_type=media_type)
    if request.stream_format == "sse":
        return StreamingResponse(result, media_type="text/event-stream")
    return StreamingResponse(result, media_type=MEDIA_TYPES[request.response_format])


@router.get("/v1/audio/voices", response_model=VoiceList)
async def list_voices(raw_request: Request):
    try:
        data = [VoiceInfo(**v) for v in speech(raw_request).list_voices()]
    except (VLLMValidationError, VLLMNotFoundError) as e:
        return _error(e)
    return VoiceList(data=data)


@router.post("/v1/audio/voices", response_model=VoiceInfo, responses=_ERRORS)
async def create_voice(
    raw_request: Request,
    name: Annotated[str, Form()],
    ref_text: Annotated[str, Form()],
    audio: Annotated[UploadFile, File()],
):
    data = await audio.read(MAX_VOICE_UPLOAD_BYTES + 1)
    if len(data) > MAX_VOICE_UPLOAD_BYTES:
        return _error(
            VLLMValidationError("reference audio file is too large", parameter="audio")
        )
    try:
        info = await speech(raw_request).add_voice(name, data, ref_text)
    except (VLLMValidationError, VLLMNotFoundError, ValueError) as e:
        return _error(e)
    return VoiceInfo(**info)


@router.delete("/v1/audio/voices/{name}", responses=_ERRORS)
async def delete_voice(name: str, raw_request: Request):
    try:
        speech(raw_request).delete_voice(name)
    except (VLLMValidationError, VLLMNotFoundError) as e:
        return _error(e)
    return {"name": name, "object": "voice", "deleted": True}


# Attached instead of the routes above when the model cannot speak, so that
# a speech call gets a clear 400 rather than a bare 404.
unsupported_router = APIRouter()


@unsupported_router.post("/v1/audio/speech", include_in_schema=False)
@unsupported_router.api_route(
    "/v1/audio/voices", methods=["GET", "POST"], include_in_schema=False
)
async def speech_unsupported(raw_request: Request):
    model = (
        raw_request.app.state.openai_serving_models.base_model_paths[0].name
        if getattr(raw_request.app.state, "openai_serving_models", None)
        else "model"
    )
    return _error(
        create_error_response(
            f"The model `{model}` does not support speech generation "
            "(/v1/audio/speech needs a text-to-speech model).",
            err_type="BadRequestError",
            status_code=HTTPStatus.BAD_REQUEST,
        )
    )
