# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
from typing import TYPE_CHECKING

from fastapi import FastAPI

if TYPE_CHECKING:
    from argparse import Namespace

    from starlette.datastructures import State

    from vllm.engine.protocol import EngineClient
    from vllm.entrypoints.serve.utils.request_logger import RequestLogger
    from vllm.tasks import SupportedTask
else:
    RequestLogger = object


def register_text_to_speech_api_routers(
    app: FastAPI, supported_tasks: tuple["SupportedTask", ...]
) -> None:
    if "speech" in supported_tasks:
        from .api_router import router

        app.include_router(router)
    else:
        from .api_router import unsupported_router

        app.include_router(unsupported_router)


def init_text_to_speech_state(
    engine_client: "EngineClient",
    state: "State",
    args: "Namespace",
    request_logger: RequestLogger | None,
    supported_tasks: tuple["SupportedTask", ...],
) -> None:
    if "speech" not in supported_tasks:
        return
    from .serving import OpenAIServingSpeech

    state.openai_serving_speech = OpenAIServingSpeech(
        engine_client,
        state.openai_serving_models,
        request_logger=request_logger,
        voices_dir=getattr(args, "speech_voices_dir", None),
        decode_device=getattr(args, "speech_decode_device", None),
    )
