#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Write small random FireRedASR (v1) checkpoints in the ORIGINAL release layout.

    python tools/make_fireredasr_checkpoint.py {aed,llm} OUT_DIR

AED: ``model.pth.tar`` ({"args": Namespace, "model_state_dict": ...}),
``cmvn.ark`` (Kaldi binary stats), ``dict.txt``, ``train_bpe1000.model``.

The model is the reference implementation's own class (PyPI ``fireredasr==0.0.2``,
``FireRedAsrAed.from_args``) at small dimensions, with random weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

SPECIALS = ["<blank>", "<unk>", "<pad>", "<sos>", "<eos>"]
CJK = "我们你好今天天气很不错的是在有一个这中国人大小上下来去说话听音频文字请转写为"
ENGLISH = [
    "hello world this is a test of speech recognition",
    "the quick brown fox jumps over the lazy dog",
    "we transcribe audio into text with a small model",
    "open source speech models run fast on gpus",
]


def _train_spm(out: Path, vocab_size: int = 48) -> list[str]:
    import sentencepiece as spm

    prefix = out / "train_bpe1000"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([s.upper() for s in ENGLISH] * 8),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        bos_id=-1,
        eos_id=-1,
        unk_id=0,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor()
    sp.Load(str(prefix) + ".model")
    (out / "train_bpe1000.vocab").unlink(missing_ok=True)
    return [sp.IdToPiece(i) for i in range(1, sp.GetPieceSize())]


def write_cmvn(path: Path, dim: int = 80, seed: int = 0) -> None:
    import kaldiio

    rng = np.random.default_rng(seed)
    count = 1000.0
    mean = rng.uniform(8.0, 14.0, dim)
    var = rng.uniform(2.0, 9.0, dim)
    stats = np.zeros((2, dim + 1), dtype=np.float64)
    stats[0, :dim] = mean * count
    stats[0, dim] = count
    stats[1, :dim] = (var + mean * mean) * count
    kaldiio.save_mat(str(path), stats)


def write_dict(out: Path) -> int:
    pieces = _train_spm(out)
    words = SPECIALS + list(dict.fromkeys(CJK)) + [p for p in pieces if p not in SPECIALS]
    with open(out / "dict.txt", "w", encoding="utf8") as f:
        for i, w in enumerate(words):
            f.write(f"{w} {i}\n")
    return len(words)


def _randomize(model: torch.nn.Module, seed: int, gain: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.02 * noise)
            elif p.dim() == 1:
                p.copy_(0.02 * noise)
            elif name.endswith("tgt_word_emb.weight"):
                # Small (tied) embeddings: the scaled input embedding must not
                # dominate the output projection (greedy would copy its input).
                p.copy_(0.02 * noise)
            else:
                fan_in = p[0].numel()
                p.copy_(noise * gain * fan_in**-0.5)


def aed_args(odim: int, **over) -> argparse.Namespace:
    a = dict(
        idim=80, odim=odim, n_layers_enc=2, n_layers_dec=2, n_head=2, d_model=128,
        d_inner=512, kernel_size=33, pe_maxlen=5000, residual_dropout=0.1,
        dropout_rate=0.1, sos_id=3, eos_id=4, pad_id=2, blank_id=0,
        input_length_max=60.0, output_length_max=250,
        sos_token="<sos>", eos_token="<eos>", pad_token="<pad>",
    )
    a.update(over)
    return argparse.Namespace(**a)


def make_aed(out: str | Path, seed: int = 0, gain: float = 3.0,
             eos_scale: float = -2.0, **over) -> Path:
    from fireredasr.models.fireredasr_aed import FireRedAsrAed

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    odim = write_dict(out)
    write_cmvn(out / "cmvn.ark", seed=seed)
    args = aed_args(odim, **over)
    torch.manual_seed(seed)
    model = FireRedAsrAed.from_args(args)
    _randomize(model, seed, gain=gain)
    with torch.no_grad():
        # Rescale the <eos> row of the (tied) output projection so that greedy
        # decoding ends hypotheses by itself, after ~10 tokens on 2-4 s
        # inputs (found by trial with the default seed and gain).
        model.decoder.tgt_word_emb.weight[args.eos_id] *= eos_scale
    torch.save({"args": args, "model_state_dict": model.state_dict()},
               out / "model.pth.tar")
    return out


def _make_qwen2(out: Path, seed: int) -> Path:
    """A tiny random Qwen2 + byte-level BPE tokenizer standing in for
    ``Qwen2-7B-Instruct/`` (same special tokens: <|endoftext|> pad,
    <|im_start|>, <|im_end|>)."""
    from make_demo_checkpoint import make_tokenizer
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    n_tokens = make_tokenizer(out, vocab_size=512)
    cfg = Qwen2Config(
        vocab_size=max(512, n_tokens + 8),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=2,
        torch_dtype="float32",
    )
    cfg.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    _randomize(model, seed + 1, gain=1.0)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(out)
    return out


def make_llm(out: str | Path, seed: int = 0) -> Path:
    """FireRedASR-LLM-L layout: model.pth.tar (encoder + projector + PEFT
    LoRA tensors only, as released), asr_encoder.pth.tar (an AED package),
    cmvn.ark, Qwen2-7B-Instruct/."""
    from fireredasr.models.fireredasr_aed import FireRedAsrAed
    from fireredasr.models.fireredasr_llm import FireRedAsrLlm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_cmvn(out / "cmvn.ark", seed=seed)
    llm_dir = _make_qwen2(out / "Qwen2-7B-Instruct", seed)

    enc_args = aed_args(odim=64)
    torch.manual_seed(seed)
    aed = FireRedAsrAed.from_args(enc_args)
    _randomize(aed, seed + 2, gain=3.0)
    torch.save({"args": enc_args, "model_state_dict": aed.state_dict()},
               out / "asr_encoder.pth.tar")

    args = argparse.Namespace(
        encoder_path=str(out / "asr_encoder.pth.tar"), llm_dir=str(llm_dir),
        freeze_encoder=0, freeze_llm=0, use_lora=1, use_fp16=0,
        use_flash_attn=0, encoder_downsample_rate=2,
        input_length_max=30.0, output_length_max=150,
    )
    # The original's load_encoder calls torch.load with the default
    # weights_only=True: allow-list the Namespace it holds.
    with torch.serialization.safe_globals([argparse.Namespace]):
        model = FireRedAsrLlm.from_args(args)
    # Fine-tuned encoder differs from asr_encoder.pth.tar; LoRA B is zero at
    # init in PEFT: randomize so that the merge matters.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 3)
        for name, p in model.named_parameters():
            if name.startswith("llm.") and "lora_" not in name:
                continue
            noise = torch.randn(p.shape, generator=g)
            if "lora_" in name:
                p.copy_(noise * 0.5 * p.shape[-1] ** -0.5)
            elif p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.02 * noise)
            elif p.dim() == 1:
                p.copy_(0.02 * noise)
            else:
                p.copy_(noise * 3.0 * p[0].numel() ** -0.5)
    state = {
        k: v for k, v in model.state_dict().items()
        if not k.startswith("llm.") or "lora_" in k
    }
    # encoder_path / llm_dir are overwritten at load time by the original.
    args.encoder_path, args.llm_dir = "", ""
    torch.save({"args": args, "model_state_dict": state}, out / "model.pth.tar")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["aed", "llm"])
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    path = (make_aed if a.kind == "aed" else make_llm)(a.out, a.seed)
    print(path)


if __name__ == "__main__":
    sys.exit(main())
