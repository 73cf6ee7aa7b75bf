#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Write a random-weight CosyVoice3 release directory in the original format
(the layout of ``FunAudioLLM/Fun-CosyVoice3-0.5B-2512``).

    cosyvoice3.yaml          hyperpyyaml in the release's layout, shrunk
                             (llm: CosyVoice3LM; flow: CausalMaskedDiffWithDiT;
                             hift: CausalHiFTGenerator)
    llm.pt                   CosyVoice3LM.state_dict() keys
                             (llm.model.model.*, llm.model.lm_head.weight,
                             llm_decoder.weight (no bias),
                             speech_embedding.weight [S + 200, H])
    CosyVoice-BlankEN/       Qwen2 config.json + model.safetensors + a
                             tokenizer with 151643 regular ids and the 3 Qwen
                             specials, so that the CosyVoice3 specials land
                             where the original expects them
                             (<|endofprompt|> = 151646, hard-coded upstream)
    speech_tokenizer_v3.onnx, campplus.onnx
                             tiny random graphs with the originals'
                             interfaces (when the onnx package is present)
    spk2info.pt              a zero-shot speaker ("spk_a") and an SFT speaker
                             ("spk_sft")
    flow.pt, hift.pt         only when tools/cosyvoice3_audio_weights.py is
                             there (write_cv3_flow_hift); otherwise the
                             directory holds the LM part only

The text vocabulary keeps the real 151936 rows (the original checks for id
151646 in the text), so ``--size tiny`` shrinks the hidden size instead.
The tiny decoder keeps the 200 stop rows (sos, eos, task_id, fill,
reserved) near zero so that greedy decoding runs to the length limits;
``set_decoder_rows`` makes stop-row variants for tests.

    python tools/make_cosyvoice3_checkpoint.py OUT [--size tiny|real]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

TINY = dict(
    hidden=64,
    intermediate=128,
    layers=2,
    heads=2,
    kv_heads=1,
    text_vocab=151936,
    speech_token_size=300,
    lookahead_channels=64,
    dit_dim=64,
    dit_depth=2,
    dit_heads=2,
    dit_dim_head=32,
    hift_base=32,
    f0_cond=16,
)
REAL = dict(
    hidden=896,
    intermediate=4864,
    layers=24,
    heads=14,
    kv_heads=2,
    text_vocab=151936,
    speech_token_size=6561,
    lookahead_channels=1024,
    dit_dim=1024,
    dit_depth=22,
    dit_heads=16,
    dit_dim_head=64,
    hift_base=512,
    f0_cond=512,
)
# Qwen2: 151643 regular ids, then <|endoftext|>, <|im_start|>, <|im_end|>.
NUM_REGULAR_TOKENS = 151643
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
NUM_SPECIAL_SPEECH_ROWS = 200
SPEECH_TOKENIZER_NAME = "speech_tokenizer_v3.onnx"
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs.",
    "You are a helpful assistant. Please speak slowly and softly.",
    "hello world, this is a tiny random CosyVoice3 checkpoint.",
    "0123456789 ,.;:!? -_'\"()[]{}",
]

LLM_YAML = """\
# hyperpyyaml in the layout of the CosyVoice3 release (random-weight {size} copy)
__set_seed1: !apply:random.seed [1986]
__set_seed2: !apply:numpy.random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]
__set_seed4: !apply:torch.cuda.manual_seed_all [1986]

sample_rate: 24000
llm_input_size: {hidden}
llm_output_size: {hidden}
spk_embed_dim: 192
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: 2

chunk_size: 25
num_decoding_left_chunks: -1

llm: !new:cosyvoice.llm.llm.CosyVoice3LM
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    speech_token_size: {speech_token_size}
    length_normalized_loss: True
    lsm_weight: 0
    mix_ratio: [5, 15]
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
        top_k: 25
        win_size: 10
        tau_r: 0.1

"""

# The flow and hift sections (also tools/cosyvoice3_audio_weights.py's
# CV3_AUDIO_YAML, the yaml its flow.pt / hift.pt are built from).
AUDIO_YAML = """\
flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithDiT
    input_size: 80
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: {speech_token_size}
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    pre_lookahead_layer: !new:cosyvoice.transformer.upsample_encoder.PreLookaheadLayer
        in_channels: 80
        channels: {lookahead_channels}
        pre_lookahead_len: 3
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.DiT.dit.DiT
            dim: {dit_dim}
            depth: {dit_depth}
            heads: {dit_heads}
            dim_head: {dit_dim_head}
            ff_mult: 2
            mel_dim: 80
            mu_dim: 80
            spk_dim: 80
            out_channels: 80
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>

hift: !new:cosyvoice.hifigan.generator.CausalHiFTGenerator
    in_channels: 80
    base_channels: {hift_base}
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    conv_pre_look_right: 4
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.CausalConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: {f0_cond}
"""

TAIL_YAML = """
get_tokenizer: !name:cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer
    token_path: !ref <qwen_pretrain_path>
    skip_special_tokens: True
    version: cosyvoice3
allowed_special: 'all'
feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: 480
    win_size: 1920
    fmin: 0
    fmax: null
    center: False
"""


def _audio_module() -> Any:
    """``tools/cosyvoice3_audio_weights.py`` (flow + HiFT), if present."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        import cosyvoice3_audio_weights
    except ImportError:
        return None
    return cosyvoice3_audio_weights


def make_tokenizer(out: Path) -> None:
    """A byte-level BPE (trained on ``CORPUS``) padded with unused regular
    tokens to 151643 ids, then the three Qwen specials at 151643..151645,
    as in the released CosyVoice-BlankEN tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    for i in range(len(vocab), NUM_REGULAR_TOKENS):
        vocab[f"<unused_{i}>"] = i
    assert len(vocab) == NUM_REGULAR_TOKENS
    data["added_tokens"] = [
        {
            "id": NUM_REGULAR_TOKENS + i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, t in enumerate(QWEN_SPECIALS)
    ]
    Tokenizer.from_str(json.dumps(data)).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "model_max_length": 32768,
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
    )


def _make_blank_en(out: Path, d: dict, seed: int) -> None:
    from make_cosyvoice2_checkpoint import write_blank_en_qwen2

    out.mkdir(parents=True, exist_ok=True)
    make_tokenizer(out)
    write_blank_en_qwen2(out, d, seed, eos_id=NUM_REGULAR_TOKENS)


def llm_state(d: dict, seed: int) -> dict:
    """``CosyVoice3LM.state_dict()`` of a randomly initialised LM, keys in the
    original's order (the Qwen2 backbone, its tied lm_head copy,
    llm_decoder, speech_embedding)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    h, s = d["hidden"], d["speech_token_size"]
    cfg = Qwen2Config(
        vocab_size=d["text_vocab"],
        hidden_size=h,
        intermediate_size=d["intermediate"],
        num_hidden_layers=d["layers"],
        num_attention_heads=d["heads"],
        num_key_value_heads=d["kv_heads"],
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Qwen2ForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if name == "lm_head.weight":
            continue
        if len(shape) > 1:
            w = torch.randn(shape, generator=g) / shape[-1] ** 0.5
        elif "norm" in name:
            w = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            w = 0.1 * torch.randn(shape, generator=g)
        state["llm.model." + name] = w
    state["llm.model.lm_head.weight"] = state["llm.model.model.embed_tokens.weight"]
    rows = s + NUM_SPECIAL_SPEECH_ROWS
    dec = torch.randn(rows, h, generator=g) / h**0.5 * 3
    # sos/eos/task_id/fill/reserved: near-zero logits, far below the best
    # speech token, so that random greedy decoding runs to max_len
    dec[s:] *= 0.01
    state["llm_decoder.weight"] = dec
    state["speech_embedding.weight"] = torch.randn(rows, h, generator=g)
    return {k: v.clone().contiguous() for k, v in state.items()}


def set_decoder_rows(state: dict, rows: dict[int, Any]) -> dict:
    """A copy of ``state`` with ``llm_decoder`` rows replaced (speech-token
    index -> weight row), e.g. to make a stop id likely at some step."""
    import torch

    out = dict(state)
    dec = state["llm_decoder.weight"].clone()
    for i, w in rows.items():
        dec[int(i)] = torch.as_tensor(w, dtype=dec.dtype)
    out["llm_decoder.weight"] = dec
    return out


def write_llm(out: Path, state: dict) -> Path:
    import torch

    torch.save(state, out / "llm.pt")
    return out / "llm.pt"


def make_release_dir(
    out: str | Path, size: str = "tiny", seed: int = 0, audio: bool = True
) -> Path:
    """Write the directory; returns it. ``audio``: also flow.pt + hift.pt
    (only possible with tools/cosyvoice3_audio_weights.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    d = TINY if size == "tiny" else REAL
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cosyvoice3.yaml").write_text(
        LLM_YAML.format(size=size, **d) + AUDIO_YAML.format(**d) + TAIL_YAML,
        encoding="utf-8",
    )
    _make_blank_en(out / "CosyVoice-BlankEN", d, seed)
    write_llm(out, llm_state(d, seed + 1))
    if audio:
        mod = _audio_module()
        if mod is None:
            print(
                "tools/cosyvoice3_audio_weights.py not found: wrote the LM part "
                "only (no flow.pt / hift.pt)",
                file=sys.stderr,
            )
        else:
            mod.write_cv3_flow_hift(out, size, seed)
    # without the onnx package the directory has no zero-shot frontend
    with contextlib.suppress(ImportError):
        from make_cosyvoice2_checkpoint import make_onnx_frontend

        make_onnx_frontend(out, d["speech_token_size"], seed)
        (out / "speech_tokenizer_v2.onnx").rename(out / SPEECH_TOKENIZER_NAME)
    _write_spk2info(out, d, seed)
    return out


def _write_spk2info(out: Path, d: dict, seed: int) -> None:
    """``spk_a`` as ``add_zero_shot_spk`` saves it (its prompt text carries
    the system prompt and <|endofprompt|>), ``spk_sft`` an embedding only."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "CosyVoice-BlankEN")
    tok.add_special_tokens({"additional_special_tokens": ["<|endofprompt|>"]})
    prompt = tok(["You are a helpful assistant.<|endofprompt|>hello world"])
    prompt_ids = list(prompt["input_ids"][0])
    g = torch.Generator().manual_seed(seed + 2)
    n_prompt = 12
    tokens = torch.randint(
        0, d["speech_token_size"], (1, n_prompt), generator=g, dtype=torch.int32
    )
    emb = torch.randn(1, 192, generator=g)
    i32 = torch.int32
    torch.save(
        {
            "spk_a": {
                "prompt_text": torch.tensor([prompt_ids], dtype=i32),
                "prompt_text_len": torch.tensor([len(prompt_ids)], dtype=i32),
                "llm_prompt_speech_token": tokens,
                "llm_prompt_speech_token_len": torch.tensor([n_prompt], dtype=i32),
                "flow_prompt_speech_token": tokens,
                "flow_prompt_speech_token_len": torch.tensor([n_prompt], dtype=i32),
                "prompt_speech_feat": torch.randn(1, 2 * n_prompt, 80, generator=g),
                "prompt_speech_feat_len": torch.tensor([2 * n_prompt], dtype=i32),
                "llm_embedding": emb,
                "flow_embedding": emb,
            },
            "spk_sft": {"embedding": torch.randn(1, 192, generator=g)},
        },
        out / "spk2info.pt",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--size", choices=["tiny", "real"], default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-audio", action="store_true", help="LM part only")
    a = ap.parse_args()
    print(make_release_dir(a.out, a.size, a.seed, audio=not a.no_audio))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
