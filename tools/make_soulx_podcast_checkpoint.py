#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Write a random-weight SoulX-Podcast release directory in the original format.

    config.json, model.safetensors   a plain Qwen3ForCausalLM (tied lm_head)
    tokenizer.json, tokenizer_config.json
                                     byte-level BPE + Qwen-style specials +
                                     the SoulX added tokens (speakers, text /
                                     semantic markers, task, dialect and
                                     paralinguistic tags, the speech eos)
    soulxpodcast_config.json         the SoulXPodcastLLMConfig values
                                     (speech_token_offset, speech eos, dims);
                                     tiny releases also carry the flow / hift
                                     dims (``flow``, ``hift``: the original
                                     ignores unknown keys)
    flow.pt, hift.pt                 CosyVoice2's CausalMaskedDiffWithXvec /
                                     HiFTGenerator state dicts, as
                                     make_cosyvoice2_checkpoint.py writes them
    campplus.onnx                    tiny random CAM++ stand-in
    speech_tokenizer_v2.onnx         tiny s3tokenizer-v2 stand-in (not in the
                                     real release: the original downloads it)
    spk2info.pt                      two preset speakers ("spk_a", "spk_b")

Token layout (as the release, scaled down): ids ``[0, offset)`` are text
(base vocab, specials, SoulX added tokens, unused rows), speech token ``s``
is ``offset + s`` for ``s < speech_token_size`` (the flow's vocabulary), and
``vocab_size = offset + speech_token_size``. The real release: offset
152927, 6561 speech tokens, vocab 159488, eos 151675.

``--size tiny`` (tests, CPU) or ``real`` (SoulX-Podcast-1.7B dimensions for
the LM, CosyVoice2-0.5B for the audio side; for benchmarks). The flow/HiFT
need the oracle package ``cosyvoice`` (plus its ``matcha``) importable.

    python tools/make_soulx_podcast_checkpoint.py OUT [--size tiny|real]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_cosyvoice2_checkpoint import (  # noqa: E402
    REAL as CV2_REAL,
)
from make_cosyvoice2_checkpoint import (  # noqa: E402
    TINY as CV2_TINY,
)
from make_cosyvoice2_checkpoint import (  # noqa: E402
    YAML as CV2_YAML,
)
from make_cosyvoice2_checkpoint import (  # noqa: E402
    _flow_hift,
    make_onnx_frontend,
)

# The tokens soulxpodcast's code and scripts use; the speech eos string is
# not named by the code (only its id, 151675), "<|semantic_token_end|>" here.
SOULX_TOKENS = [
    "<|SPEAKER_0|>",
    "<|SPEAKER_1|>",
    "<|SPEAKER_2|>",
    "<|SPEAKER_3|>",
    "<|text_start|>",
    "<|text_end|>",
    "<|semantic_token_start|>",
    "<|semantic_token_end|>",
    "<|task_podcast|>",
    "<|Henan|>",
    "<|Sichuan|>",
    "<|Yue|>",
    "<|laughter|>",
    "<|sigh|>",
    "<|breathing|>",
    "<|coughing|>",
    "<|throat_clearing|>",
]
SPEECH_EOS = "<|semantic_token_end|>"
CORPUS = [
    "Hello everyone, welcome to our podcast about artificial intelligence.",
    "The quick brown fox jumps over the lazy dog.",
    "Today we talk about speech synthesis and dialogue.",
    "哈喽，欢迎收听我们的节目。今天我们聊聊人工智能。",
    "0123456789 ,.;:!? -_'\"()",
]

TINY = dict(
    CV2_TINY,
    hidden=128,
    intermediate=256,
    layers=2,
    heads=4,
    kv_heads=2,
    head_dim=32,
    text_vocab=640,
    speech_token_size=100,
)
REAL = dict(
    CV2_REAL,
    hidden=2048,
    intermediate=6144,
    layers=28,
    heads=16,
    kv_heads=8,
    head_dim=128,
    text_vocab=152927,
    speech_token_size=6561,
)


def make_tokenizer(out: Path, text_vocab: int) -> dict[str, int]:
    """A byte-level BPE with Qwen's leading specials, then the SoulX added
    tokens; returns the ids of every special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(512, text_vocab - len(SOULX_TOKENS)),
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=40960,
        clean_up_tokenization_spaces=False,
    )
    fast.add_special_tokens({"additional_special_tokens": SOULX_TOKENS})
    fast.save_pretrained(out)
    ids = {t: fast.convert_tokens_to_ids(t) for t in specials + SOULX_TOKENS}
    assert max(ids.values()) < text_vocab, "text_vocab too small for the tokens"
    return ids


def _qwen3(out: Path, d: dict, eos_id: int, bos_id: int, seed: int) -> None:
    """config.json + model.safetensors of the LM, random weights scaled so
    that greedy decoding varies; text rows of the tied embedding are smaller
    than speech rows, so it mostly emits speech tokens."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3Config, Qwen3ForCausalLM

    vocab = d["text_vocab"] + d["speech_token_size"]
    cfg = Qwen3Config(
        vocab_size=vocab,
        hidden_size=d["hidden"],
        intermediate_size=d["intermediate"],
        num_hidden_layers=d["layers"],
        num_attention_heads=d["heads"],
        num_key_value_heads=d["kv_heads"],
        head_dim=d["head_dim"],
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        torch_dtype="bfloat16" if d is REAL else "float32",
        use_sliding_window=False,
    )
    cfg.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(seed)
    with torch.device("meta" if d is REAL else "cpu"):
        model = Qwen3ForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        shape = p.shape
        if name == "model.embed_tokens.weight":
            w = 0.2 * torch.randn(shape, generator=g)
            w[: d["text_vocab"]] *= 0.3
            w[eos_id] = 0.2 * torch.randn(shape[1], generator=g)
        elif len(shape) > 1:
            w = torch.randn(shape, generator=g) / shape[-1] ** 0.5
            if "o_proj" in name or "down_proj" in name:
                # the layers, not the residual input, shape the output: a
                # random tied LM otherwise keeps repeating its input token
                w *= 3.0
        elif "norm" in name:
            w = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            w = 0.1 * torch.randn(shape, generator=g)
        state[name] = w.to(torch.bfloat16 if d is REAL else torch.float32)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(out)


def _audio_sections(d: dict) -> dict:
    """The flow / hift dims in the layout of cosyvoice2.yaml's sections."""
    import tempfile

    from vllm.model_executor.models.cosyvoice_token2wav import load_cosyvoice_yaml

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cosyvoice2.yaml"
        path.write_text(CV2_YAML.format(size="soulx", **d))
        conf = load_cosyvoice_yaml(str(path))
    return json.loads(json.dumps({"flow": conf["flow"], "hift": conf["hift"]}))


def make_release_dir(
    out: str | Path, size: str = "tiny", seed: int = 0, audio: bool = True
) -> Path:
    import torch

    d = TINY if size == "tiny" else REAL
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = make_tokenizer(out, d["text_vocab"])
    eos = ids[SPEECH_EOS]
    _qwen3(out, d, eos_id=eos, bos_id=ids["<|endoftext|>"], seed=seed)
    soulx = {
        "architectures": ["Qwen3ForCausalLM"],
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": eos,
        "hidden_size": d["hidden"],
        "intermediate_size": d["intermediate"],
        "num_attention_heads": d["heads"],
        "num_hidden_layers": d["layers"],
        "num_key_value_heads": d["kv_heads"],
        "head_dim": d["head_dim"],
        "vocab_size": d["text_vocab"] + d["speech_token_size"],
        "speech_token_offset": d["text_vocab"],
        "tie_word_embeddings": True,
    }
    if size == "tiny":
        soulx.update(_audio_sections(d))
    (out / "soulxpodcast_config.json").write_text(json.dumps(soulx, indent=2))
    if audio:
        flow, hift = _flow_hift(d, seed)
        torch.save(flow.state_dict(), out / "flow.pt")
        torch.save(hift.state_dict(), out / "hift.pt")
    with contextlib.suppress(ImportError):
        make_onnx_frontend(out, d["speech_token_size"], seed)
    g = torch.Generator().manual_seed(seed + 2)
    s = d["speech_token_size"]
    presets = {}
    for name, text, n in (
        ("spk_a", "Hello everyone, welcome to our podcast", 12),
        ("spk_b", "哈喽，欢迎收听我们的节目", 10),
    ):
        tokens = torch.randint(0, s, (1, n), generator=g, dtype=torch.int32)
        emb = torch.randn(1, 192, generator=g)
        presets[name] = {
            "prompt_text": text,
            "llm_prompt_speech_token": tokens,
            "flow_prompt_speech_token": tokens,
            "prompt_speech_feat": torch.randn(1, 2 * n, 80, generator=g),
            "llm_embedding": emb,
            "flow_embedding": emb,
        }
    torch.save(presets, out / "spk2info.pt")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--size", choices=["tiny", "real"], default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(make_release_dir(a.out, a.size, a.seed))


if __name__ == "__main__":
    main()
