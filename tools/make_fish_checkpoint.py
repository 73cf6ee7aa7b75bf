#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Write small random Fish Speech dual-AR LM checkpoints in the ORIGINAL
release layouts.

    python tools/make_fish_checkpoint.py {s1,v15,s2} OUT_DIR [--seed N] [--dtype bf16]

* ``s1`` (openaudio-s1-mini layout): ``config.json`` (``BaseModelArgs.save``:
  every field, sorted, no ``architectures``), ``model.pth`` (plain state dict),
  ``tokenizer.tiktoken`` + ``special_tokens.json`` (``FishTokenizer.
  save_pretrained``). Made with the reference code itself (PyPI
  ``fish_speech==0.1.0`` = the S1 code state: ``DualARTransformer``) at tiny
  dims. codebook_size 1040 > 1024 so the S1 residual-code limit matters.
* ``v15`` (fish-speech-1.5 layout): the 1.5 config key set (no qk-norm /
  o-bias / codebook-scaling fields; ``head_dim = dim // n_head``), 1.5's
  hard-coded special-token order (1024 semantic tokens). The weights have the
  1.5 names and shapes (the S1 class without qk-norm has the same ones).
* ``s2`` (s2-pro layout): nested ``fish_qwen3_omni`` config, safetensors with
  ``text_model.model.*`` / ``audio_decoder.*`` names, and a Hugging Face
  ``tokenizer.json`` whose added tokens hold ``<|im_end|>`` and the semantic
  tokens.

The BPE is 256 byte tokens plus a few merges, so every id is small.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import types
from pathlib import Path

import torch

MERGES = [b"th", b"he", b"in", b"er", b"an", b" t", b" a", b"the", b" the",
          b"ing", b"nd", b"and", b" and", b"is", b" is", b"ll", b"llo", b"hello"]


def byte_ranks() -> dict[bytes, int]:
    ranks = {bytes([i]): i for i in range(256)}
    for m in MERGES:
        ranks[m] = len(ranks)
    return ranks


def write_tiktoken(path: Path, ranks: dict[bytes, int]) -> None:
    with open(path, "w") as f:
        for tok, rank in ranks.items():
            f.write(f"{base64.b64encode(tok).decode() or '='} {rank}\n")


S1_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|im_start|>",
    "<|im_end|>", "<|phoneme_start|>", "<|phoneme_end|>", "<|tool_call_start|>",
    "<|tool_call_end|>", "<|text|>", "<|voice|>", "<|interleave|>",
    "<|audio_start|>", "<|audio_end|>", "<|audio|>",
]
V15_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|im_start|>",
    "<|im_end|>", *[f"<|placeholder:{i}|>" for i in range(4)], "<|text|>",
    "<|voice|>", "<|interleave|>",
]

TINY = dict(
    dim=64, n_layer=2, n_head=4, n_local_heads=2, head_dim=32,
    intermediate_size=128, n_fast_layer=2, fast_dim=64, fast_n_head=4,
    fast_n_local_heads=2, fast_head_dim=32, fast_intermediate_size=96,
    max_seq_len=512, rope_base=1000000.0, norm_eps=1e-6, num_codebooks=4,
    dropout=0.0, tie_word_embeddings=False, use_gradient_checkpointing=True,
    is_reward_model=False,
)


def import_reference_llama():
    """fish_speech 0.1.0's llama module. Its lora.py imports ``loralib`` at
    module level for LoRA fine-tuning only; a stub stands in when absent."""
    try:
        import loralib  # noqa: F401
    except ImportError:
        sys.modules["loralib"] = types.ModuleType("loralib")
    from fish_speech.models.text2semantic import llama

    return llama


def gpt2_byte_symbols() -> dict[int, str]:
    """Byte -> printable symbol of byte-level BPE vocabularies (GPT-2 scheme:
    printable latin-1 bytes map to themselves, the rest to U+0100 onwards)."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD))
            + list(range(0xAE, 0x100)))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


def _spread(sd: dict, seed: int) -> dict:
    """Random weights with wide logit margins (greedy parity needs clear
    winners): larger output heads."""
    for k in ("output.weight", "fast_output.weight"):
        if k in sd:
            sd[k] = sd[k] * 8.0
    return sd


def sized_ranks(n: int) -> dict[bytes, int]:
    """``n`` BPE ranks: the byte tokens, then all byte pairs and triples in
    order (a release-sized vocabulary for benchmarks; S1 has 151643)."""
    ranks = byte_ranks()
    width = 2
    while len(ranks) < n:
        for i in range(256 ** width):
            tok = i.to_bytes(width, "big")
            if tok not in ranks:
                ranks[tok] = len(ranks)
                if len(ranks) == n:
                    break
        width += 1
    return ranks


def make_s1(out: Path, seed: int, dtype: torch.dtype, dims: dict | None = None,
            codebook_size: int = 1040, n_ranks: int | None = None) -> None:
    """``dims`` overrides TINY (e.g. the S1-mini sizes, or num_codebooks=10 to
    pair with a release-layout codec); ``n_ranks`` sizes the BPE."""
    llama = import_reference_llama()
    DualARModelArgs, DualARTransformer = llama.DualARModelArgs, llama.DualARTransformer
    from fish_speech.tokenizer import FishTokenizer

    out.mkdir(parents=True, exist_ok=True)
    ranks = sized_ranks(n_ranks) if n_ranks else byte_ranks()
    write_tiktoken(out / "tokenizer.tiktoken", ranks)
    specials = S1_SPECIALS + [f"<|semantic:{i}|>" for i in range(codebook_size)]
    tok = FishTokenizer(str(out / "tokenizer.tiktoken"), specials)
    tok.save_pretrained(str(out))  # rewrites tokenizer.tiktoken, special_tokens.json
    # The releases pad the vocabulary past the last semantic token; trained
    # weights never pick those rows, random ones would (and the original then
    # indexes the codebook embedding out of range), so no padding here.
    vocab = len(ranks) + len(specials)
    cfg = DualARModelArgs(
        model_type="dual_ar", vocab_size=vocab, codebook_size=codebook_size,
        attention_qk_norm=True, attention_o_bias=False, attention_qkv_bias=False,
        fast_attention_qk_norm=False, fast_attention_o_bias=False,
        fast_attention_qkv_bias=False, scale_codebook_embeddings=True,
        initializer_range=0.08, **{**TINY, **(dims or {})},
    )
    torch.manual_seed(seed)
    model = DualARTransformer(cfg, tokenizer=tok)
    # q/k norm weights are ones at init: make them random too
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("norm.weight",)):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    cfg.save(str(out / "config.json"))
    sd = _spread(dict(model.state_dict()), seed)
    torch.save({k: v.to(dtype) for k, v in sd.items()}, out / "model.pth")


def _v15_state_dict(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    std = cfg["initializer_range"]

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * std

    def norm(n):
        return 1.0 + 0.2 * torch.randn(n, generator=g)

    d, fd = cfg["dim"], cfg["fast_dim"]
    sd: dict[str, torch.Tensor] = {
        "embeddings.weight": rnd(cfg["vocab_size"], d),
        "codebook_embeddings.weight": rnd(cfg["codebook_size"] * cfg["num_codebooks"], d),
    }

    def block(prefix, dim, nh, nkv, hd, inter):
        sd[f"{prefix}.attention.wqkv.weight"] = rnd((nh + 2 * nkv) * hd, dim)
        sd[f"{prefix}.attention.wo.weight"] = rnd(dim, nh * hd)
        sd[f"{prefix}.feed_forward.w1.weight"] = rnd(inter, dim)
        sd[f"{prefix}.feed_forward.w3.weight"] = rnd(inter, dim)
        sd[f"{prefix}.feed_forward.w2.weight"] = rnd(dim, inter)
        sd[f"{prefix}.ffn_norm.weight"] = norm(dim)
        sd[f"{prefix}.attention_norm.weight"] = norm(dim)

    for i in range(cfg["n_layer"]):
        block(f"layers.{i}", d, cfg["n_head"], cfg["n_local_heads"], cfg["head_dim"],
              cfg["intermediate_size"])
    sd["norm.weight"] = norm(d)
    sd["output.weight"] = rnd(cfg["vocab_size"], d) * 8.0
    sd["fast_embeddings.weight"] = rnd(cfg["codebook_size"], fd)
    for i in range(cfg["n_fast_layer"]):
        block(f"fast_layers.{i}", fd, cfg["fast_n_head"], cfg["fast_n_local_heads"],
              cfg["fast_head_dim"], cfg["fast_intermediate_size"])
    sd["fast_norm.weight"] = norm(fd)
    sd["fast_output.weight"] = rnd(cfg["codebook_size"], fd) * 8.0
    return sd


def make_v15(out: Path, seed: int, dtype: torch.dtype) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ranks = byte_ranks()
    write_tiktoken(out / "tokenizer.tiktoken", ranks)
    specials = V15_SPECIALS + [f"<|semantic:{i}|>" for i in range(1024)]
    # 1.5 writes special_tokens.json but never reads it
    with open(out / "special_tokens.json", "w") as f:
        json.dump({t: len(ranks) + i for i, t in enumerate(specials)}, f, indent=2)
    t = dict(TINY, dim=128, fast_dim=128)  # head_dim 32 (CPU attention sizes)
    t["head_dim"] = t["dim"] // t["n_head"]  # 1.5 forces it
    t["fast_head_dim"] = t["fast_dim"] // t["fast_n_head"]
    cfg = dict(
        attention_qkv_bias=False, codebook_size=1024, fast_attention_qkv_bias=False,
        initializer_range=0.08, model_type="dual_ar",
        vocab_size=len(ranks) + len(specials), **t,
    )
    with open(out / "config.json", "w") as f:
        json.dump(dict(sorted(cfg.items())), f, indent=4)
    sd = _v15_state_dict(cfg, seed)
    torch.save({k: v.to(dtype) for k, v in sd.items()}, out / "model.pth")


def make_s2(out: Path, seed: int, dtype: torch.dtype, dims: dict | None = None,
            codebook_size: int = 64, vocab_size: int | None = None) -> None:
    """``dims`` overrides TINY (e.g. the S2-Pro sizes); ``vocab_size`` pads the
    text embedding past the tokenizer's ids (S2-Pro: 155776)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    out.mkdir(parents=True, exist_ok=True)
    # HF byte-level BPE: base vocab = the 256 byte symbols
    b2u = gpt2_byte_symbols()
    vocab = {b2u[i]: i for i in range(256)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|voice|>",
                "<|pad|>", "<|audio_pad|>"]
    specials += [f"<|semantic:{i}|>" for i in range(codebook_size)]
    tk.add_special_tokens(specials)
    tk.save(str(out / "tokenizer.json"))
    with open(out / "tokenizer_config.json", "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast",
                   "eos_token": "<|im_end|>", "pad_token": "<|pad|>"}, f)
    ids = {t: 256 + i for i, t in enumerate(specials)}
    t = {**TINY, **(dims or {})}
    text_config = dict(
        vocab_size=vocab_size or 256 + len(specials) + 4, n_layer=t["n_layer"], n_head=t["n_head"],
        n_local_heads=t["n_local_heads"], head_dim=t["head_dim"], dim=t["dim"],
        intermediate_size=t["intermediate_size"], rope_base=t["rope_base"],
        norm_eps=t["norm_eps"], max_seq_len=t["max_seq_len"],
        attention_qk_norm=True, tie_word_embeddings=True,
    )
    audio_decoder_config = dict(
        dim=t["fast_dim"], n_layer=t["n_fast_layer"], n_head=t["fast_n_head"],
        n_local_heads=t["fast_n_local_heads"], head_dim=t["fast_head_dim"],
        intermediate_size=t["fast_intermediate_size"], vocab_size=codebook_size,
        num_codebooks=t["num_codebooks"], max_seq_len=t["num_codebooks"] + 1,
        rope_base=t["rope_base"], attention_qk_norm=False,
    )
    cfg = dict(
        model_type="fish_qwen3_omni", text_config=text_config,
        audio_decoder_config=audio_decoder_config,
        semantic_start_token_id=ids["<|semantic:0|>"],
        semantic_end_token_id=ids[f"<|semantic:{codebook_size - 1}|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|pad|>"],
        audio_pad_token_id=ids["<|audio_pad|>"],
    )
    with open(out / "config.json", "w") as f:
        json.dump(cfg, f, indent=2)
    flat = dict(
        vocab_size=text_config["vocab_size"], codebook_size=codebook_size,
        num_codebooks=t["num_codebooks"], initializer_range=0.08, **{
            k: v for k, v in t.items() if k not in ("num_codebooks",)
        },
    )
    sd = _v15_state_dict(flat, seed)
    # q/k norms (qk_norm on the slow model)
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(t["n_layer"]):
        for n in ("q_norm", "k_norm"):
            sd[f"layers.{i}.attention.{n}.weight"] = 1.0 + 0.2 * torch.randn(
                t["head_dim"], generator=g)
    sd.pop("output.weight")  # tied
    named = {}
    for k, v in sd.items():
        if k.startswith("fast_"):
            named["audio_decoder." + k[len("fast_"):]] = v
        elif k.startswith("codebook_embeddings."):
            named["audio_decoder." + k] = v
        else:
            named["text_model.model." + k] = v
    named = {k: v.to(dtype).contiguous() for k, v in named.items()}
    keys = sorted(named)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half],
              "model-00002-of-00002.safetensors": keys[half:]}
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: named[k] for k in ks}, str(out / fname))
        weight_map.update({k: fname for k in ks})
    with open(out / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kind", choices=["s1", "v15", "s2"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    a = ap.parse_args()
    dtype = torch.float32 if a.dtype == "fp32" else torch.bfloat16
    {"s1": make_s1, "v15": make_v15, "s2": make_s2}[a.kind](a.out, a.seed, dtype)
    print(f"wrote {a.kind} checkpoint to {a.out}")


if __name__ == "__main__":
    main()
