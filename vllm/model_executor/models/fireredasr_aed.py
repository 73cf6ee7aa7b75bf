# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""FireRedASR-AED (v1, FireRedTeam/FireRedASR) as a vLLM encoder-decoder model.

Architecture: Conformer encoder (``conformer_encoder.ConformerEncoder``) and a
pre-LN Transformer decoder with cross-attention. The decoder is the same
``TransformerDecoder`` class that FireRedLID uses, so the whole model is
FireRedLID's vLLM implementation with the AED's dimensions, front end,
prompt and release-format loading:

* the release directory (``model.pth.tar``, ``cmvn.ark``, ``dict.txt``,
  ``train_bpe1000.model``) is read as published: the config comes from the
  ``args`` Namespace of ``model.pth.tar`` (``config_format="fireredasr"``),
  the weights from its ``model_state_dict``, the tokenizer from ``dict.txt``
  (``tokenizer_mode="fireredasr"``);
* front end: kaldi fbank (80 bins, 25/10 ms, no dither) + global CMVN from
  ``cmvn.ark``, via ``FireRedASR2FeatureExtractor``;
* prompt: the decoder starts from ``<sos>`` alone; vLLM's greedy decoding is
  the original's ``beam_size=1``.
"""

import math
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import cast

import torch
from transformers import BatchFeature

from vllm.config import ModelConfig, SpeechToTextConfig, VllmConfig
from vllm.config.speech_to_text import SpeechToTextParams
from vllm.inputs import PromptType
from vllm.logger import init_logger
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.transformers_utils.fireredasr import CMVN_NAME, read_cmvn
from vllm.transformers_utils.processors.fireredasr2 import (
    FireRedASR2FeatureExtractor,
)

from .fireredlid import (
    FireRedLIDDummyInputsBuilder,
    FireRedLIDForConditionalGeneration,
    FireRedLIDMultiModalProcessor,
    FireRedLIDProcessingInfo,
)
from .interfaces import MultiModalEmbeddings
from .utils import WeightsMapper

logger = init_logger(__name__)

_SAMPLE_RATE = 16000
_FRAME_SHIFT_S = 0.01
_SUBSAMPLING = 4


def fireredasr_encoder_length(num_frames: int) -> int:
    """Valid encoder frames for ``num_frames`` fbank frames.

    The Conv2d subsampling keeps every other frame of the length mask twice
    (``mask[:, :, :-2:2][:, :, :-2:2]`` over ``T + 6`` frames), i.e.
    ``ceil(ceil(T / 2) / 2)``.
    """
    half = (num_frames + 1) // 2
    return (half + 1) // 2


def fbank_num_frames(num_samples: int) -> int:
    """Kaldi fbank frames (25 ms window, 10 ms shift, snip_edges) at 16 kHz."""
    win, hop = 400, 160
    return 0 if num_samples < win else 1 + (num_samples - win) // hop


def fireredasr_padded_encoder_length(num_frames: int) -> int:
    """Encoder output length (masked frames included) for ``num_frames``:
    two Conv2d(3, stride 2) over the input padded by 6 frames."""
    t = (num_frames + 6 - 3) // 2 + 1
    return max(0, (t - 3) // 2 + 1)


def build_feature_extractor(
    model_dir: str | Path, max_audio_s: float, downsample_rate: int = 1
) -> FireRedASR2FeatureExtractor:
    """Kaldi fbank (80 bins, 25/10 ms, dither 0) + CMVN from ``cmvn.ark``.

    ``fake_token_lengths`` of its output is the number of encoder frames
    divided by ``downsample_rate`` (1 for the AED: no adapter).
    """
    dim, means, istd = read_cmvn(Path(model_dir) / CMVN_NAME)
    return FireRedASR2FeatureExtractor(
        feature_size=dim,
        sampling_rate=_SAMPLE_RATE,
        chunk_length=int(math.ceil(max_audio_s)),
        dim=dim,
        means=means,
        inverse_std_variences=istd,
        num_mel_bins=dim,
        dither=0.0,
        max_length=int(math.ceil(max_audio_s / _FRAME_SHIFT_S)),
        downsample_rate=downsample_rate,
    )


def extract_features(fe: FireRedASR2FeatureExtractor, audios: list) -> BatchFeature:
    """Features of float audio in [-1, 1] at 16 kHz, unpadded per item.
    Audio shorter than one fbank frame is a ValueError: the Conformer front
    end cannot run on zero frames."""
    min_samples = fe.frame_length * fe.sampling_rate // 1000
    for audio in audios:
        if len(audio) < min_samples:
            raise ValueError(
                f"Audio too short: {len(audio)} samples; FireRedASR "
                f"needs at least {min_samples} ({fe.frame_length} ms)."
            )
    return fe(
        list(audios),
        sampling_rate=fe.sampling_rate,
        padding="longest",
        truncation=False,
        return_tensors="pt",
    )


class FireRedASRAEDProcessingInfo(FireRedLIDProcessingInfo):
    """No HF processor: features and CMVN come from the release files."""

    @cached_property
    def _feature_extractor(self) -> FireRedASR2FeatureExtractor:
        model_config = self.ctx.model_config
        max_s = float(getattr(model_config.hf_config, "input_length_max", 60.0))
        return build_feature_extractor(model_config.model, max_s)

    def get_feature_extractor(self, **kwargs: object) -> FireRedASR2FeatureExtractor:
        return self._feature_extractor

    def get_num_audio_tokens(self) -> int:
        # Longest accepted audio, for encoder profiling.
        fe = self._feature_extractor
        return fireredasr_encoder_length(fe.max_length)


class FireRedASRAEDDummyInputsBuilder(FireRedLIDDummyInputsBuilder):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return "<sos>"


class FireRedASRAEDMultiModalProcessor(FireRedLIDMultiModalProcessor):
    def _call_hf_processor(
        self,
        prompt: str | list[int],
        mm_data: Mapping[str, object],
        mm_kwargs: Mapping[str, object],
        tok_kwargs: Mapping[str, object],
    ) -> BatchFeature:
        tokenizer = self.info.get_tokenizer()
        if isinstance(prompt, str):
            input_ids = tokenizer.encode(prompt, add_special_tokens=False)
        else:
            input_ids = list(prompt)
        outputs = BatchFeature({"input_ids": [input_ids]}, tensor_type="pt")
        audios = mm_data.get("audios") or mm_data.get("audio")
        if audios:
            fe = self.info.get_feature_extractor()
            outputs.update(extract_features(fe, list(audios)))
        return outputs


@MULTIMODAL_REGISTRY.register_processor(
    FireRedASRAEDMultiModalProcessor,
    info=FireRedASRAEDProcessingInfo,
    dummy_inputs=FireRedASRAEDDummyInputsBuilder,
)
class FireRedASRAEDForConditionalGeneration(FireRedLIDForConditionalGeneration):
    """FireRedASR-AED-L loaded from its original release directory."""

    supports_transcription_only = True
    supports_segment_timestamp = False
    # No timestamp tokens: verbose_json gets one segment per audio chunk.
    supports_chunk_segments = True
    # Mandarin (and Chinese dialects) and English.
    supported_languages = {"zh": "Chinese", "en": "English"}

    # The release's only weight file; a torch.save package whose
    # ``model_state_dict`` the pt iterator yields.
    allow_patterns_overrides = ["model.pth.tar"]

    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_substr={
            "decoder.": "model.decoder.",
            "encoder.": "model.encoder.",
            # Conformer FFN: nn.Sequential indices -> named children
            "net.0": "pre_layer_norm",
            "net.1": "linear_expand",
            "net.4": "linear_project",
        }
    )

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        self.sos_id = config.sos_id
        self.eos_id = config.eos_id

    @classmethod
    def validate_language(cls, language: str | None) -> str | None:
        # The model has no language token; the language is not needed.
        if language is None:
            return None
        return super().validate_language(language)

    @classmethod
    def get_generation_prompt(cls, stt_params: SpeechToTextParams) -> PromptType:
        hf_config = stt_params.model_config.hf_config
        prompt = {
            "encoder_prompt": {
                "prompt": "",
                "multi_modal_data": {
                    "audio": (stt_params.audio, int(stt_params.stt_config.sample_rate)),
                },
            },
            "decoder_prompt": {"prompt_token_ids": [int(hf_config.sos_id)]},
        }
        return cast(PromptType, prompt)

    @classmethod
    def get_speech_to_text_config(
        cls, model_config: ModelConfig, task_type: str
    ) -> SpeechToTextConfig:
        max_s = float(getattr(model_config.hf_config, "input_length_max", 60.0))
        return SpeechToTextConfig(
            max_audio_clip_s=int(max_s),
            sample_rate=_SAMPLE_RATE,
        )

    @classmethod
    def get_num_audio_tokens(
        cls,
        audio_duration_s: float,
        stt_config: SpeechToTextConfig,
        model_config: ModelConfig,
    ) -> int | None:
        frames = int(audio_duration_s / _FRAME_SHIFT_S)
        return fireredasr_encoder_length(frames)

    @classmethod
    def get_max_output_tokens(
        cls,
        num_samples: int,
        stt_config: SpeechToTextConfig,
        model_config: ModelConfig,
    ) -> int | None:
        # The original decodes at most one token per encoder frame (its
        # ``maxlen`` is the padded encoder length).
        return fireredasr_padded_encoder_length(fbank_num_frames(num_samples))

    @classmethod
    def post_process_output(cls, text: str) -> str:
        return text.strip()

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        feats = kwargs.get("input_features")
        if isinstance(feats, torch.Tensor):
            kwargs["input_features"] = feats.to(self.dtype)
        elif isinstance(feats, (list, tuple)):
            kwargs["input_features"] = [f.to(self.dtype) for f in feats]
        return super().embed_multimodal(**kwargs)
