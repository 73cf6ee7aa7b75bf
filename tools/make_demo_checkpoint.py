#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Write the embedded demo checkpoint: a tiny random Qwen2 in HF format.

No weights can be downloaded, so the demo (and the build tests) use a model
made here, deterministically: a byte-level BPE tokenizer trained on a few
sentences, and a 2-layer Qwen2ForCausalLM with seeded random weights, saved
as config.json + model.safetensors + tokenizer.json + tokenizer_config.json.

    python tools/make_demo_checkpoint.py build/demo/qwen2-tiny
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CORPUS = [
    "vLLM speech serves text to speech and speech recognition.",
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a tiny demo checkpoint with random weights.",
    "Fish Speech, CosyVoice, SoulX-Podcast and FireRedASR run in vLLM.",
    "0123456789 ,.;:!? -_'\"()[]{}",
]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(out: Path, vocab_size: int) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
    }, indent=2))
    return tok.get_vocab_size()


def make_checkpoint(out: Path, seed: int = 0) -> Path:
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    n_tokens = make_tokenizer(out, vocab_size=512)
    vocab = max(512, n_tokens)
    eos = SPECIAL.index("<|endoftext|>")
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=eos,
        eos_token_id=eos,
        torch_dtype="float32",
    )
    cfg.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    make_checkpoint(a.out, a.seed)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
