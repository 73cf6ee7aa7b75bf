# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Configs of Fish Speech's dual-AR text-to-semantic LM, read from the
``config.json`` of the original release directories.

* ``model_type: dual_ar`` (flat): fish-speech-1.5 and the OpenAudio S1 family
  (openaudio-s1-mini). The two are told apart by the ``attention_qk_norm`` key,
  which only the S1 code state writes (``BaseModelArgs.save`` dumps every
  field): a config without it is a 1.5 config, whose code forces
  ``head_dim = dim // n_head``. S1 keeps ``head_dim`` as written (default 64).
* ``model_type: fish_qwen3_omni`` (nested ``text_config`` /
  ``audio_decoder_config``): S2-Pro. Flattened as the original's
  ``_from_fish_qwen3_omni`` does (``scale_codebook_embeddings`` and
  ``norm_fastlayer_input`` forced on).

Both expose the flat ``DualARModelArgs`` field names (``dim``, ``n_head``,
``fast_dim``, ...) after the original's ``__post_init__`` fallbacks, plus the
attribute names vLLM reads (``hidden_size``, ``num_attention_heads``, ...).
"""

from __future__ import annotations

from typing import Any

from transformers.configuration_utils import PretrainedConfig

FISH_DUAL_AR_ARCH = "FishSpeechForCausalLM"

# Fields of the original DualARModelArgs with the dataclass defaults (S1 code).
_DUAL_AR_DEFAULTS: dict[str, Any] = dict(
    vocab_size=32000,
    n_layer=32,
    n_head=32,
    dim=4096,
    intermediate_size=None,
    n_local_heads=-1,
    head_dim=64,
    rope_base=10000,
    norm_eps=1e-5,
    max_seq_len=2048,
    dropout=0.0,
    tie_word_embeddings=True,
    attention_qkv_bias=False,
    attention_o_bias=False,
    attention_qk_norm=False,
    codebook_size=160,
    num_codebooks=4,
    use_gradient_checkpointing=True,
    initializer_range=0.02,
    is_reward_model=False,
    scale_codebook_embeddings=False,
    n_fast_layer=4,
    fast_dim=None,
    fast_n_head=None,
    fast_n_local_heads=None,
    fast_head_dim=None,
    fast_intermediate_size=None,
    fast_attention_qkv_bias=None,
    fast_attention_qk_norm=None,
    fast_attention_o_bias=None,
    norm_fastlayer_input=False,
)

# Not in any released config.json: filled by the model from the tokenizer
# files (positional special ids) unless present (S2 / converted checkpoints).
_SEMANTIC_KEYS = ("semantic_begin_id", "semantic_end_id", "im_end_id")


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


def resolve_dual_ar_args(args: dict[str, Any], version: str) -> dict[str, Any]:
    """The original ``DualARModelArgs.__post_init__`` fallbacks."""
    a = dict(_DUAL_AR_DEFAULTS)
    a.update({k: v for k, v in args.items() if k in _DUAL_AR_DEFAULTS})
    if a["n_local_heads"] == -1:
        a["n_local_heads"] = a["n_head"]
    if a["intermediate_size"] is None:
        a["intermediate_size"] = find_multiple(int(2 * (4 * a["dim"]) / 3), 256)
    if version == "1.5":
        # fish-speech 1.5's BaseModelArgs.__post_init__ overrides head_dim
        a["head_dim"] = a["dim"] // a["n_head"]
    elif a["head_dim"] is None:
        a["head_dim"] = a["dim"] // a["n_head"]
    # `x or slow` as the original (0 falls back too)
    for f in ("dim", "n_head", "n_local_heads", "head_dim", "intermediate_size"):
        a[f"fast_{f}"] = a[f"fast_{f}"] or a[f]
    for f in ("attention_qkv_bias", "attention_qk_norm", "attention_o_bias"):
        if a[f"fast_{f}"] is None:
            a[f"fast_{f}"] = a[f]
    # the fast block re-runs __post_init__ with these values
    if a["fast_n_local_heads"] == -1:
        a["fast_n_local_heads"] = a["fast_n_head"]
    if version == "1.5":
        a["fast_head_dim"] = a["fast_dim"] // a["fast_n_head"]
    return a


# The fields vLLM reads, set by ``_set_dual_ar`` from the release's own: a
# saved config holds them too, and they are derived again, not read back.
_HF_VIEW_KEYS = (
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_hidden_layers",
    "max_position_embeddings",
    "rope_theta",
    "rope_parameters",
    "rms_norm_eps",
    "hidden_act",
    "head_dim",
)


class _FishDualARConfigBase(PretrainedConfig):
    def _set_dual_ar(self, flat: dict[str, Any]) -> None:
        for k, v in flat.items():
            setattr(self, k, v)
        # vLLM's names
        self.hidden_size = self.dim
        self.num_attention_heads = self.n_head
        self.num_key_value_heads = self.n_local_heads
        self.num_hidden_layers = self.n_layer
        self.max_position_embeddings = self.max_seq_len
        self.rope_theta = float(self.rope_base)
        self.rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        self.rms_norm_eps = self.norm_eps
        self.hidden_act = "silu"

    @property
    def num_aux_codebooks(self) -> int:
        return self.num_codebooks - 1


class FishSpeechConfig(_FishDualARConfigBase):
    """``model_type: dual_ar`` (fish-speech-1.5, OpenAudio S1 family)."""

    model_type = "dual_ar"

    def __init__(
        self,
        fish_version: str | None = None,
        architectures: list[str] | None = None,
        semantic_begin_id: int | None = None,
        semantic_end_id: int | None = None,
        im_end_id: int | None = None,
        **kwargs,
    ):
        if fish_version is None:
            # 1.5's BaseModelArgs has no qk-norm field, so its config.json
            # (dumped from the dataclass) never has the key.
            fish_version = "s1" if "attention_qk_norm" in kwargs else "1.5"
        if fish_version not in ("1.5", "s1"):
            raise ValueError(f"dual_ar config: unknown fish_version {fish_version!r}")
        self.fish_version = fish_version
        flat = resolve_dual_ar_args(kwargs, fish_version)
        for k in _DUAL_AR_DEFAULTS:
            kwargs.pop(k, None)
        self._set_dual_ar(flat)
        self.semantic_begin_id = semantic_begin_id
        self.semantic_end_id = semantic_end_id
        self.im_end_id = im_end_id
        for k in _HF_VIEW_KEYS:
            kwargs.pop(k, None)
        super().__init__(
            architectures=architectures or [FISH_DUAL_AR_ARCH],
            tie_word_embeddings=flat["tie_word_embeddings"],
            **kwargs,
        )
        # PretrainedConfig.__init__ may reset these
        self._set_dual_ar(flat)


class FishQwen3OmniConfig(_FishDualARConfigBase):
    """``model_type: fish_qwen3_omni`` (Fish Audio S2-Pro), flattened."""

    model_type = "fish_qwen3_omni"

    def __init__(
        self,
        text_config: dict[str, Any] | None = None,
        audio_decoder_config: dict[str, Any] | None = None,
        semantic_start_token_id: int | None = None,
        semantic_end_token_id: int | None = None,
        architectures: list[str] | None = None,
        **kwargs,
    ):
        # Kept under other names: an attribute called `text_config` would be
        # taken by transformers/vLLM for a sub-config object.
        tc = dict(text_config or kwargs.pop("fish_text_config", None) or {})
        adc = dict(
            audio_decoder_config or kwargs.pop("fish_audio_decoder_config", None) or {}
        )
        kwargs.pop("fish_text_config", None)
        kwargs.pop("fish_audio_decoder_config", None)
        self.fish_text_config = tc
        self.fish_audio_decoder_config = adc
        self.fish_version = "s2"
        kwargs.pop("fish_version", None)
        flat_in: dict[str, Any] = {}
        if tc:
            flat_in = dict(
                vocab_size=tc["vocab_size"],
                n_layer=tc["n_layer"],
                n_head=tc["n_head"],
                n_local_heads=tc.get("n_local_heads", -1),
                head_dim=tc.get("head_dim"),
                dim=tc["dim"],
                intermediate_size=tc.get("intermediate_size"),
                rope_base=tc.get("rope_base", 10000),
                norm_eps=tc.get("norm_eps", 1e-5),
                max_seq_len=tc.get("max_seq_len", 2048),
                dropout=tc.get("dropout", 0.0),
                tie_word_embeddings=tc.get("tie_word_embeddings", True),
                attention_qkv_bias=tc.get("attention_qkv_bias", False),
                attention_o_bias=tc.get("attention_o_bias", False),
                attention_qk_norm=tc.get("attention_qk_norm", False),
                initializer_range=tc.get("initializer_range", 0.02),
                scale_codebook_embeddings=True,
                norm_fastlayer_input=True,
                codebook_size=adc["vocab_size"],
                num_codebooks=adc["num_codebooks"],
                n_fast_layer=adc["n_layer"],
                fast_dim=adc.get("dim"),
                fast_n_head=adc.get("n_head"),
                fast_n_local_heads=adc.get("n_local_heads"),
                fast_head_dim=adc.get("head_dim"),
                fast_intermediate_size=adc.get("intermediate_size"),
                fast_attention_qkv_bias=adc.get("attention_qkv_bias"),
                fast_attention_qk_norm=adc.get("attention_qk_norm"),
                fast_attention_o_bias=adc.get("attention_o_bias"),
            )
            flat_in = {k: v for k, v in flat_in.items() if v is not None}
        flat = resolve_dual_ar_args(flat_in, "s2")
        for k in (
            *_DUAL_AR_DEFAULTS,
            *_HF_VIEW_KEYS,
            "semantic_begin_id",
            "semantic_end_id",
            "im_end_id",
        ):
            kwargs.pop(k, None)
        self._set_dual_ar(flat)
        self.semantic_start_token_id = semantic_start_token_id
        self.semantic_end_token_id = semantic_end_token_id
        self.semantic_begin_id = semantic_start_token_id
        self.semantic_end_id = semantic_end_token_id
        eos = kwargs.pop("eos_token_id", None)
        pad = kwargs.pop("pad_token_id", None)
        self.im_end_id = eos
        # The release's own architecture name (if any) is not a vLLM class.
        self.fish_original_architectures = architectures
        kwargs.pop("fish_original_architectures", None)
        super().__init__(
            architectures=[FISH_DUAL_AR_ARCH],
            tie_word_embeddings=flat["tie_word_embeddings"],
            **kwargs,
        )
        self.eos_token_id = eos
        self.pad_token_id = pad
        self._set_dual_ar(flat)
