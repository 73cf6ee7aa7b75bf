# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""FireRedASR-LLM-L (v1, FireRedTeam/FireRedASR), loaded from its release directory.

The network is FireRedASR2's (Conformer encoder, frame-stacking Adapter,
Qwen2), so this reuses ``FireRedASR2ForConditionalGeneration``; what differs
is the packaging and the prompt:

* ``model.pth.tar``: ``{"args", "model_state_dict"}`` with the fine-tuned
  encoder, the projector and PEFT LoRA tensors of the LLM
  (``llm.base_model.model.*.lora_{A,B}.default.weight``, r=64, alpha=16);
  ``asr_encoder.pth.tar`` gives the encoder dimensions; ``Qwen2-7B-Instruct/``
  the base LLM weights and tokenizer. LoRA is merged at load time
  (``W + alpha/r * B @ A`` in fp32).
* the prompt is the original chat template with the ``<speech>`` token the
  original adds to the tokenizer (id ``len(tokenizer)``), replaced by one
  placeholder per Adapter output frame.
* front end: kaldi fbank + CMVN from ``cmvn.ark`` (as the AED).
"""

import re
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from typing import cast

import torch
from transformers import BatchFeature

from vllm.config import ModelConfig, SpeechToTextConfig, VllmConfig
from vllm.config.speech_to_text import SpeechToTextParams
from vllm.inputs import PromptType
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)
from vllm.tokenizers import cached_tokenizer_from_config
from vllm.transformers_utils.fireredasr import LLM_DIR_NAME
from vllm.transformers_utils.processors.fireredasr2 import (
    FireRedASR2FeatureExtractor,
)

from .fireredasr2 import (
    FireRedASR2DummyInputsBuilder,
    FireRedASR2ForConditionalGeneration,
    FireRedASR2MultiModalProcessor,
    FireRedASR2ProcessingInfo,
)
from .fireredasr_aed import (
    _SAMPLE_RATE,
    build_feature_extractor,
    extract_features,
    fbank_num_frames,
    fireredasr_padded_encoder_length,
)

SPEECH_TOKEN = "<speech>"
PROMPT = (
    "<|im_start|>user\n" + SPEECH_TOKEN + "请转写音频为文字<|im_end|>\n"
    "<|im_start|>assistant\n"
)
# peft LoraConfig of the original (FireRedAsrLlm.from_args): r=64, alpha=16.
LORA_ALPHA = 16.0

_LORA_RE = re.compile(r"^(llm\..+)\.lora_([AB])\.default\.weight$")


def speech_token_id(tokenizer) -> int:
    """``<speech>`` is added to the stock Qwen2 tokenizer by the original,
    so its id is the tokenizer's length (151646 for Qwen2-7B-Instruct)."""
    vocab = tokenizer.get_vocab()
    return vocab.get(SPEECH_TOKEN, len(tokenizer))


def encode_prompt(tokenizer, prompt: str = PROMPT) -> list[int]:
    """Token ids of ``prompt``; each ``<speech>`` becomes its (added) id."""
    ids: list[int] = []
    for i, part in enumerate(prompt.split(SPEECH_TOKEN)):
        if i:
            ids.append(speech_token_id(tokenizer))
        if part:
            ids += tokenizer.encode(part, add_special_tokens=False)
    return ids


class FireRedASRLLMProcessingInfo(FireRedASR2ProcessingInfo):
    @cached_property
    def _feature_extractor(self) -> FireRedASR2FeatureExtractor:
        model_config = self.ctx.model_config
        hf_config = model_config.hf_config
        return build_feature_extractor(
            model_config.model,
            float(getattr(hf_config, "input_length_max", 30.0)),
            downsample_rate=int(hf_config.encoder_downsample_rate),
        )

    def get_feature_extractor(self, **kwargs: object) -> FireRedASR2FeatureExtractor:
        return self._feature_extractor

    def speech_token_id(self) -> int:
        return speech_token_id(self.get_tokenizer())


class FireRedASRLLMDummyInputsBuilder(FireRedASR2DummyInputsBuilder):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return SPEECH_TOKEN * mm_counts.get("audio", 0)


class FireRedASRLLMMultiModalProcessor(FireRedASR2MultiModalProcessor):
    info: FireRedASRLLMProcessingInfo

    def _call_hf_processor(
        self,
        prompt: str | list[int],
        mm_data: Mapping[str, object],
        mm_kwargs: Mapping[str, object],
        tok_kwargs: Mapping[str, object],
    ) -> BatchFeature:
        if isinstance(prompt, str):
            # <speech> is not in the stock tokenizer: encode around it.
            input_ids = encode_prompt(self.info.get_tokenizer(), prompt)
        else:
            input_ids = list(prompt)
        outputs = BatchFeature({"input_ids": [input_ids]}, tensor_type="pt")
        audios = mm_data.get("audios") or mm_data.get("audio")
        if audios:
            fe = self.info.get_feature_extractor()
            outputs.update(extract_features(fe, list(audios)))
        return outputs

    def _hf_processor_applies_updates(self, *args, **kwargs) -> bool:
        return False

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        speech_id = self.info.speech_token_id()
        lengths = out_mm_kwargs.get_data().get("fake_token_lengths")
        counts = [] if lengths is None else [int(n) for n in lengths.tolist()]

        def replacement(item_idx: int):
            return PromptUpdateDetails.select_token_id(
                [speech_id] * counts[item_idx], embed_token_id=speech_id
            )

        return [
            PromptReplacement(
                modality="audio", target=[speech_id], replacement=replacement
            )
        ]


@MULTIMODAL_REGISTRY.register_processor(
    FireRedASRLLMMultiModalProcessor,
    info=FireRedASRLLMProcessingInfo,
    dummy_inputs=FireRedASRLLMDummyInputsBuilder,
)
class FireRedASRLLMForConditionalGeneration(FireRedASR2ForConditionalGeneration):
    """FireRedASR-LLM-L from its original release directory."""

    supports_segment_timestamp = False
    # No timestamp tokens: verbose_json gets one segment per audio chunk.
    supports_chunk_segments = True
    supported_languages = {"zh": "Chinese", "en": "English"}

    # Encoder + projector + LoRA; the encoder in model.pth.tar is the
    # fine-tuned one (asr_encoder.pth.tar is only read for its dimensions).
    allow_patterns_overrides = ["model.pth.tar"]

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        model_config = vllm_config.model_config
        # Base LLM weights, named as inside the original's PEFT wrapper.
        self.secondary_weights = [
            DefaultModelLoader.Source(
                model_config.model,
                revision=None,
                subfolder=LLM_DIR_NAME,
                prefix="llm.base_model.model.",
                fall_back_to_pt=False,
            )
        ]

    @classmethod
    def validate_language(cls, language: str | None) -> str | None:
        if language is None:
            return None
        return super(FireRedASR2ForConditionalGeneration, cls).validate_language(
            language
        )

    @classmethod
    def get_generation_prompt(cls, stt_params: SpeechToTextParams) -> PromptType:
        tokenizer = cached_tokenizer_from_config(stt_params.model_config)
        prompt = {
            # Token ids: text prompts are tokenized before the multimodal
            # processor sees them, and <speech> is no token of the tokenizer.
            "prompt_token_ids": encode_prompt(tokenizer),
            "multi_modal_data": {
                "audio": (stt_params.audio, int(stt_params.stt_config.sample_rate)),
            },
        }
        return cast(PromptType, prompt)

    @classmethod
    def get_speech_to_text_config(
        cls, model_config: ModelConfig, task_type: str
    ) -> SpeechToTextConfig:
        max_s = float(getattr(model_config.hf_config, "input_length_max", 30.0))
        return SpeechToTextConfig(max_audio_clip_s=int(max_s), sample_rate=_SAMPLE_RATE)

    @classmethod
    def get_num_audio_tokens(
        cls,
        audio_duration_s: float,
        stt_config: SpeechToTextConfig,
        model_config: ModelConfig,
    ) -> int | None:
        n = int(audio_duration_s * _SAMPLE_RATE)
        ds = int(model_config.hf_config.encoder_downsample_rate)
        return fireredasr_padded_encoder_length(fbank_num_frames(n)) // ds

    @classmethod
    def get_max_output_tokens(
        cls,
        num_samples: int,
        stt_config: SpeechToTextConfig,
        model_config: ModelConfig,
    ) -> int | None:
        # The original's max_new_tokens: the number of speech embeddings.
        ds = int(model_config.hf_config.encoder_downsample_rate)
        frames = fireredasr_padded_encoder_length(fbank_num_frames(num_samples))
        return max(1, frames // ds)

    @classmethod
    def post_process_output(cls, text: str) -> str:
        return text.strip()

    def embed_multimodal(self, **kwargs: object):
        """Unpadded per-request features -> one padded batch through the
        Conformer and the Adapter; one embedding row per placeholder."""
        feats = kwargs.get("input_features")
        lengths = kwargs.get("fake_token_lengths")
        if feats is None:
            return []
        if isinstance(feats, torch.Tensor):
            feats = list(feats.unbind(0)) if feats.dim() == 3 else [feats]
        feats = [f.squeeze(0) if f.dim() == 3 else f for f in feats]
        speech_lengths = torch.tensor(
            [f.size(0) for f in feats], dtype=torch.int32, device=feats[0].device
        )
        speech = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True).to(self.dtype)
        out = self.model.get_encoder_outputs(
            speech=speech, speech_lengths=speech_lengths
        )
        counts = torch.as_tensor(lengths).reshape(-1).tolist()
        return tuple(out[i, : int(n)] for i, n in enumerate(counts))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        lora: dict[str, dict[str, torch.Tensor]] = {}
        merged: set[str] = set()

        def merge_lora(
            stream: Iterable[tuple[str, torch.Tensor]],
        ) -> Iterable[tuple[str, torch.Tensor]]:
            for name, w in stream:
                name = name.replace("llm.base_model.model.", "llm.", 1)
                m = _LORA_RE.match(name)
                if m:
                    lora.setdefault(m.group(1) + ".weight", {})[m.group(2)] = w
                    continue
                pair = lora.get(name)
                if pair is not None:
                    a, b = pair["A"].float(), pair["B"].float()
                    scale = LORA_ALPHA / a.shape[0]
                    w = (w.float() + scale * (b @ a)).to(w.dtype)
                    merged.add(name)
                yield name, w

        loaded = super().load_weights(merge_lora(weights))
        missing = sorted(set(lora) - merged)
        if missing:
            raise ValueError(
                f"LoRA tensors without a base weight in {LLM_DIR_NAME}/: {missing[:4]}"
            )
        return loaded
