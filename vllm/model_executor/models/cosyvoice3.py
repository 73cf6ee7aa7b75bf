# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""CosyVoice3 text-to-speech LM (``FunAudioLLM/Fun-CosyVoice3-0.5B-2512``).

Loads the original release directory (``cosyvoice3.yaml``, ``llm.pt``,
``CosyVoice-BlankEN/``, ``flow.pt``, ``hift.pt``) without conversion. The LM
is the original ``cosyvoice.llm.llm.CosyVoice3LM``, a ``Qwen2LM`` whose
specials all live in ``speech_embedding`` (no ``llm_embedding``): with
``S = speech_token_size``, sos = S, eos = S + 1, task_id = S + 2, fill =
S + 3, S + 4 .. S + 199 reserved, and every id >= S stops. ``llm_decoder``
has no bias. The unified id space is therefore::

    [0, V_text)          text ids -> Qwen2 embed_tokens rows
    V_text + s           speech row s (s < S + 200): tokens, then specials

Differences from CosyVoice2 (``cosyvoice2.py``, which this extends):

* below the minimum length the original masks only row S (the sos row; it
  is CosyVoice2's eos row), so eos and the other stop ids can still end the
  utterance early. vLLM does not stop a request below ``min_tokens``, so a
  row that has drawn a stop id early repeats it ("latched") until the
  scheduler stops it at ``min_tokens``; ``get_speech_frames`` cuts at the
  first stop id, giving the original's tokens;
* its ``ras_sampling`` excludes the repeated token from the fallback draw;
* the text must hold ``<|endofprompt|>`` (id 151646, hard-coded by the
  original): without one, ``You are a helpful assistant.<|endofprompt|>``
  goes before the prompt text, as the original's serving runtime does;
  instruct2 prompts read ``You are a helpful assistant. <instruction>
  <|endofprompt|>``;
* the tokenizer adds 278 specials (``<|endofsystem|>``, ARPAbet and pinyin
  tokens such as ``[AA1]``, ``[iǎng]``);
* the output drops silent tokens after 5 in a row (``CosyVoice3Model``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from vllm.model_executor.models.cosyvoice2 import (
    COSYVOICE2_SPECIAL_TOKENS,
    ENDOFPROMPT,
    CosyVoice2ForCausalLM,
    CosyVoice2SpeechDecoder,
    CosyVoice2Vocab,
    _qwen_dir,
)

if TYPE_CHECKING:
    from vllm.config import ModelConfig
    from vllm.v1.sample.metadata import SamplingMetadata

SPEECH_TOKENIZER_V3_NAME = "speech_tokenizer_v3.onnx"
# CosyVoice3LM.inference hard-codes the id of <|endofprompt|>.
ENDOFPROMPT_ID = 151646
SYSTEM_PROMPT = "You are a helpful assistant."
# CosyVoice3LM: speech_embedding / llm_decoder rows after the speech tokens.
NUM_SPECIAL_SPEECH_ROWS = 200
# CosyVoice3Model.silent_tokens (FSQ silence and breath tokens).
SILENT_TOKENS = (1, 2, 28, 29, 55, 248, 494, 2241, 2242, 2322, 2323)

_ARPABET = (
    "AA AA0 AA1 AA2 AE AE0 AE1 AE2 AH AH0 AH1 AH2 AO AO0 AO1 AO2 AW AW0 AW1 "
    "AW2 AY AY0 AY1 AY2 B CH D DH EH EH0 EH1 EH2 ER ER0 ER1 ER2 EY EY0 EY1 "
    "EY2 F G HH IH IH0 IH1 IH2 IY IY0 IY1 IY2 JH K L M N NG OW OW0 OW1 OW2 "
    "OY OY0 OY1 OY2 P R S SH T TH UH UH0 UH1 UH2 UW UW0 UW1 UW2 V W Y Z ZH"
)
_PINYIN = (
    "a ai an ang ao b c ch d e ei en eng f g h i ian in ing iu ià iàn iàng "
    "iào iá ián iáng iáo iè ié iòng ióng iù iú iā iān iāng iāo iē iě iōng "
    "iū iǎ iǎn iǎng iǎo iǒng iǔ j k l m n o ong ou p q r s sh t u uang ue "
    "un uo uà uài uàn uàng uá uái uán uáng uè ué uì uí uò uó uā uāi uān "
    "uāng uē uě uī uō uǎ uǎi uǎn uǎng uǐ uǒ vè w x y z zh à ài àn àng ào "
    "á ái án áng áo è èi èn èng èr é éi én éng ér ì ìn ìng í ín íng ò òng "
    "òu ó óng óu ù ùn ú ún ā āi ān āng āo ē ēi ēn ēng ě ěi ěn ěng ěr ī īn "
    "īng ō ōng ōu ū ūn ǎ ǎi ǎn ǎng ǎo ǐ ǐn ǐng ǒ ǒng ǒu ǔ ǔn ǘ ǚ ǜ"
)
# cosyvoice/tokenizer/tokenizer.py (CosyVoice3Tokenizer): the CosyVoice2
# specials, <|endofsystem|>, then ARPAbet and pinyin units in brackets.
COSYVOICE3_SPECIAL_TOKENS: dict[str, Any] = {
    **COSYVOICE2_SPECIAL_TOKENS,
    "additional_special_tokens": [
        *COSYVOICE2_SPECIAL_TOKENS["additional_special_tokens"],
        "<|endofsystem|>",
        *(f"[{u}]" for u in _ARPABET.split()),
        *(f"[{u}]" for u in _PINYIN.split()),
    ],
}


class CosyVoice3Vocab(CosyVoice2Vocab):
    """Unified id space of ``CosyVoice3LM`` (specials are speech rows)."""

    silent_tokens = SILENT_TOKENS

    def __init__(self, config: Any):
        self.text_vocab_size = int(config.cosyvoice_text_vocab_size)
        self.speech_token_size = int(config.cosyvoice_speech_token_size)
        self.speech_offset = self.text_vocab_size
        self.num_speech_rows = self.speech_token_size + NUM_SPECIAL_SPEECH_ROWS
        self.vocab_size = self.speech_offset + self.num_speech_rows
        first_special = self.speech_offset + self.speech_token_size
        self.sos = first_special
        self.eos = first_special + 1
        self.task_id = first_special + 2
        self.fill = first_special + 3
        self.stop_token_ids = [
            first_special + i for i in range(NUM_SPECIAL_SPEECH_ROWS)
        ]


class CosyVoice3ForCausalLM(CosyVoice2ForCausalLM):
    """CosyVoice3's ``CosyVoice3LM`` on a unified text + speech vocabulary."""

    vocab_cls: ClassVar[type[CosyVoice2Vocab]] = CosyVoice3Vocab
    decoder_bias: ClassVar[bool] = False
    special_tokens: ClassVar[dict[str, Any]] = COSYVOICE3_SPECIAL_TOKENS
    speech_tokenizer_name: ClassVar[str] = SPEECH_TOKENIZER_V3_NAME

    # ---- weights ---------------------------------------------------------
    def _embedding_tables(self) -> dict[str, int]:
        v = self.vocab
        return {
            "llm.model.model.embed_tokens.weight": v.text_vocab_size,
            "speech_embedding.weight": v.num_speech_rows,
        }

    # ---- sampling --------------------------------------------------------
    def _sample_speech(
        self,
        speech: torch.Tensor,
        banned: torch.Tensor | None,
        hist: torch.Tensor,
        md: SamplingMetadata,
    ) -> torch.Tensor:
        """``CosyVoice3LM``'s ``sampling_ids``: below the minimum length only
        row S gets ``-inf`` (before RAS, whose repetition fallback excludes
        the repeated token). A row whose last token is a stop id (drawn
        below ``min_tokens``, where vLLM does not stop yet) repeats it."""
        s = self.vocab.speech_token_size
        if banned is not None:
            below = banned.any(dim=-1, keepdim=True)
            col = torch.zeros_like(banned[:1])
            col[0, s] = True
            speech = speech.masked_fill(below & col, float("-inf"))
        ids = self._draw(speech, hist, md, exclude_repeated=True)
        # hist is padded with -1 at the end: the last entry is the newest
        n = (hist >= 0).sum(dim=-1, keepdim=True)
        last = hist.gather(1, (n - 1).clamp_min(0))[:, 0]
        latched = (n[:, 0] > 0) & (last >= s)
        return torch.where(latched, last, ids)

    # ---- speech generation glue -----------------------------------------
    @classmethod
    def _tokenizer(cls, model_config: ModelConfig) -> Any:
        tok = super()._tokenizer(model_config)
        got = tok.token_id(ENDOFPROMPT)
        if got != ENDOFPROMPT_ID:
            raise ValueError(
                f"{_qwen_dir(model_config.model)}: {ENDOFPROMPT} is id {got} "
                f"once the CosyVoice3 specials are added; CosyVoice3LM needs "
                f"{ENDOFPROMPT_ID} (a Qwen2 tokenizer with 151643 regular ids "
                "and the 3 Qwen specials)"
            )
        return tok

    @classmethod
    def _instruct_prompt_text(cls, instruct: str) -> str:
        if ENDOFPROMPT in instruct:
            return instruct
        return f"{SYSTEM_PROMPT} {instruct}{ENDOFPROMPT}"

    @classmethod
    def _lm_prompt_text(
        cls, model_config: ModelConfig, prompt_text_ids: list[int], text_ids: list[int]
    ) -> list[int]:
        if ENDOFPROMPT_ID in prompt_text_ids or ENDOFPROMPT_ID in text_ids:
            return prompt_text_ids
        return cls._text_ids(model_config, SYSTEM_PROMPT + ENDOFPROMPT) + list(
            prompt_text_ids
        )

    @classmethod
    def get_speech_decoder(
        cls, model_config: ModelConfig, device: torch.device
    ) -> CosyVoice3SpeechDecoder:
        return CosyVoice3SpeechDecoder(model_config.model, device)


class CosyVoice3SpeechDecoder(CosyVoice2SpeechDecoder):
    """Speech tokens -> 24 kHz audio with CosyVoice3's token2wav; zero-shot
    references go through ``speech_tokenizer_v3.onnx`` and a prompt mel
    without an fmax (``cosyvoice3.yaml``)."""

    speech_tokenizer_name = SPEECH_TOKENIZER_V3_NAME
    mel_fmax = None

    def __init__(self, model_dir: str, device: torch.device, token2wav_cls: Any = None):
        if token2wav_cls is None:
            from vllm.model_executor.models.cosyvoice_token2wav import (
                CosyVoice3Token2Wav as token2wav_cls,
            )
        super().__init__(model_dir, device, token2wav_cls)


__all__ = ["CosyVoice3ForCausalLM"]
