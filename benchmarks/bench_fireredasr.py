#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""FireRedASR-AED-L / -LLM-L: vLLM's /v1/audio/transcriptions vs the original, same run.

``--model aed`` (default) -- random weights at FireRedASR-AED-L size
(Conformer encoder 16 x d_model 1280, 20 heads, d_inner 5120, kernel 33;
Transformer decoder 16 x 1280; vocab 7832; about 1.14 B parameters), written at run time in the ORIGINAL release layout
(``model.pth.tar`` fp32 package, ``cmvn.ark``, ``dict.txt``,
``train_bpe1000.model``) into a temporary directory, then, on one GPU:

* the original: PyPI ``fireredasr==0.0.2``, its own loader
  (``load_fireredasr_aed_model``) and its ``FireRedAsr("aed", ...)
  .transcribe(uttids, wav_paths, args)`` (kaldiio WAV reading, fbank + CMVN,
  encoder, ``batch_beam_search``) with ``use_gpu=1``, ``beam_size=1``
  (greedy), batch size = the concurrency level, batches in file order.
  0.0.2 has no half-precision switch: for ``bfloat16``/``float16`` the model is
  cast with ``.to(dtype)`` and a one-line wrapper casts the (fp32) features
  before its ``model.transcribe``; ``float32`` is the package as shipped
  (torch defaults: TF32 matmuls off). Default on a GPU: both, loaded once,
  float32 first.
* vLLM (this patch set): ``python -m vllm.entrypoints.openai.api_server`` on
  the same directory, ``c`` concurrent clients (``openai.AsyncOpenAI``, as
  users call it) posting 16-bit WAV files to ``/v1/audio/transcriptions``
  (``temperature=0``: greedy), each client sending its next file when the
  previous answer arrived.

``--model llm`` -- random weights at FireRedASR-LLM-L size in ITS release
layout: ``model.pth.tar`` (``args`` with ``use_fp16=1`` as released; the
fine-tuned encoder -- the AED-L Conformer, 710.5 M -- the Adapter projector
2560 -> 3584 -> 3584, and the PEFT LoRA tensors r=64 of all 7 projections of
the 28 layers, fp32), ``asr_encoder.pth.tar`` (the AED-L ``args`` and its
encoder tensors; the decoder, which the original builds and throws away, is
left out), ``cmvn.ark`` and ``Qwen2-7B-Instruct/`` (Qwen2-7B dims: hidden
3584, 28 layers, 28 / 4 KV heads, intermediate 18944, vocab 152064, untied;
bf16 safetensors shards + index, ``config.json`` and a byte-level BPE
tokenizer with Qwen's three specials -- the real 151643-token vocabulary
cannot be fetched, so the tokenizer is the small one of
tools/make_demo_checkpoint.py). The weights are drawn on the GPU and the
shards written by two threads; by default under /dev/shm when it has room.

* the original: ``FireRedAsr.from_pretrained("llm")`` -- 0.0.2 has no
  directory argument and fetches from modelscope, so its module's
  ``snapshot_download`` is pointed at the local directory -- then
  ``.transcribe(uttids, wav_paths, args)`` with ``use_gpu=1``,
  ``beam_size=1``, ``repetition_penalty=1.0`` (greedy), batch =
  concurrency. Precision is the package's: the LLM in float16
  (``use_fp16=1``, ``AutoModelForCausalLM.from_pretrained(torch_dtype=
  float16)``), PEFT's LoRA branches unmerged in float32 (peft's adapter
  autocast), encoder and projector in float32. One compatibility shim: under
  transformers 5, ``apply_chat_template(tokenize=True)`` returns a
  BatchEncoding that 0.0.2's ``preprocess_texts`` cannot pad, so the
  tokenizer's ``apply_chat_template`` gets ``return_dict=False`` by default.
* vLLM: the in-tree ``FireRedASRLLMForConditionalGeneration`` on the same
  directory (LoRA merged at load), served and driven as for the AED.

Both systems get the same synthetic utterances (gliding tones with noise,
durations uniform in 5-15 s, 16 kHz mono PCM-16 WAV, a fresh file for every
request so that no cache sees one twice) and decode EXACTLY ``--tokens``
tokens per utterance: AED -- the ``<eos>`` row of the (tied) output projection
is zeroed in the checkpoint, so its logit is 0 while the maximum over the other
7831 random logits is positive; LLM -- the ``lm_head`` rows of every id that
is not a regular token of the tokenizer (``<|endoftext|>``, ``<|im_start|>``,
``<|im_end|>``, ``<speech>`` and the unused rows up to 152064) are zeroed in
the safetensors, so neither eos can win and every token decodes. Neither
system ever stops early, and the
length is capped on both sides with the same number: ``decode_max_len=T`` in
the original, ``max_completion_tokens=T`` in the request (vLLM). The script
checks it: the original's hypotheses (warm-up) have T tokens, and vLLM's
``vllm:generation_tokens_total`` grows by T per request.

Reported per system and concurrency (default 1, 16, 64; ``--levels``): RTFx =
seconds of audio transcribed / wall seconds, tokens/s, request latency (vLLM),
the ratio vLLM / original, and a roofline estimate (AED: decoder bytes per
step -- weights + cross/self KV of the batch -- over HBM bandwidth; LLM: the
Qwen2 weights + the batch's KV per step over HBM bandwidth, the encoder's
weights once per batch; encoder and prefill FLOPs over peak bf16 FLOP/s),
device name, torch / vLLM / fireredasr versions, and the time of every phase.
Each level prints one line as it completes, and the JSON is rewritten after
each level and phase, so a run cut short still reports what it measured.

GPU machine (no network; vLLM staged in /tmp/devsite as ../shared/device/README.md
says; the original travels as wheels in ``.whl/``, an ignored folder, so the
call must carry it: ``carry: [".whl"]``), from the repository root:

    source /tmp/devenv.sh && python3 -m pip install -q --no-index --no-deps \
        --target /tmp/site .whl/fireredasr-0.0.2-*.whl .whl/kaldiio-*.whl \
        && export PYTHONPATH=/tmp/site:$PYTHONPATH \
        && python3 setup.py device-overlay --site /tmp/devsite && cd /tmp \
        && python3 $OLDPWD/benchmarks/bench_fireredasr.py \
        --out $OUT/fireredasr_aed_h200.json

(The original's wheels, made with ``pip download --no-deps --only-binary=:all:
--python-version 3.12 ... -d .whl fireredasr==0.0.2 kaldiio``:
fireredasr-0.0.2-py3-none-any.whl, kaldiio-2.18.1-py3-none-any.whl; torch,
numpy, sentencepiece, transformers and peft are in the GPU image,
kaldi_native_fbank and soundfile in the vLLM bundle; modelscope, imported by
``fireredasr.models.fireredasr`` for downloads only, is stubbed if absent.) The server log is
written next to ``--out`` (``*.server.log``). Expected on an
H200: about 1 min to make the checkpoint, 1 min for the original, 2-3 min for
the vLLM server start and its levels. ``--model llm`` the same way with
``--model llm --out $OUT/fireredasr_llm_h200.json`` (estimated, not yet
measured: 22 GB of checkpoint in under a minute, 1-1.5 min for the original
to load and 1-1.5 min for its levels, 2.5-3.5 min for vLLM's server start
with the 7B and its levels: 5.5-8 min in all; GPU memory: the original about
25 GB, then vLLM --gpu-memory-utilization 0.6 of the device). ``--levels
1,16``, or ``--skip-original`` / ``--skip-vllm`` in two calls with the same
kept ``--model-dir /dev/shm/...``, when time is short.

CPU smoke runs (tiny checkpoints: tools/make_fireredasr_checkpoint.py for the
AED; for the LLM the same maker as the real size at tiny dims):

    cd /tmp && PYTHONSAFEPATH=1 /work/main/.venv/bin/python \
        /work/main/benchmarks/bench_fireredasr.py --tiny --out /tmp/ffr_tiny.json
    cd /tmp && PYTHONSAFEPATH=1 /work/main/.venv/bin/python \
        /work/main/benchmarks/bench_fireredasr.py --tiny --model llm \
        --out /tmp/ffr_llm_tiny.json

Run from outside the repository root (or with PYTHONSAFEPATH=1) so that the
repository's ``vllm/`` overlay directory does not shadow the installed package.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import types
import urllib.request
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

SR = 16000
# FireRedASR-AED-L's ``args`` (reference doc B.2); odim 7832.
AED_L = dict(
    idim=80, n_layers_enc=16, n_layers_dec=16, n_head=20, d_model=1280,
    d_inner=5120, kernel_size=33, pe_maxlen=5000, residual_dropout=0.1,
    dropout_rate=0.1, sos_id=3, eos_id=4, pad_id=2, blank_id=0,
    input_length_max=60.0, output_length_max=250,
)
AED_L_ODIM = 7832
# FireRedASR-LLM-L's ``args`` (reference doc B.2); encoder_path / llm_dir are
# overwritten by the original's loader.
LLM_L = dict(
    encoder_path="", llm_dir="", freeze_encoder=0, freeze_llm=0, use_lora=1,
    use_fp16=1, use_flash_attn=0, encoder_downsample_rate=2,
    input_length_max=30.0, output_length_max=150,
)
# Qwen2-7B-Instruct's config.json (reference doc B.4); tiny: the tool's.
QWEN2_7B = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944,
    num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
    max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
    tie_word_embeddings=False, torch_dtype="bfloat16",
)
QWEN2_TINY = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256,
    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
    max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1000000.0,
    tie_word_embeddings=False, torch_dtype="float32",
)
# PEFT LoraConfig of FireRedAsrLlm.from_args (r=64 whatever the size).
LORA_R = 64
LORA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LLM_DIR = "Qwen2-7B-Instruct"
SPEECH_TOKEN = "<speech>"
# LlmTokenizerWrapper.preprocess_texts(decode=True)'s prompt
LLM_PROMPT = ("<|im_start|>user\n" + SPEECH_TOKEN + "请转写音频为文字<|im_end|>\n"
              "<|im_start|>assistant\n")
# Peak HBM bandwidth (bytes/s) and dense bf16 FLOP/s by device name fragment.
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}

T0 = time.monotonic()


def log(*msg) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s]", *msg, flush=True)


def _device_lookup(table: dict) -> float | None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in table.items() if k in name), None)


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


# ------------------------------------------------------- checkpoint ----
def _load_package(path: Path, mmap: bool = False) -> dict:
    import argparse as ap

    # the package pickles an argparse.Namespace: allow-list that one class
    with torch.serialization.safe_globals([ap.Namespace]):
        return torch.load(path, map_location="cpu", mmap=mmap)


def _zero_eos(state: dict, eos_id: int) -> None:
    """<eos> logit := 0 (tied projection): greedy never picks it."""
    with torch.no_grad():
        for key in ("decoder.tgt_word_emb.weight", "decoder.tgt_word_prj.weight"):
            if key in state:
                state[key][eos_id].zero_()


def make_real_release(out: Path, seed: int) -> Path:
    """FireRedASR-AED-L dims, random weights, in the release layout.

    Built with the original's own class (``FireRedAsrAed.from_args``) and the
    helpers of tools/make_fireredasr_checkpoint.py; ``dict.txt`` has the real
    vocabulary size (specials, the English BPE pieces, then CJK characters).
    """
    import make_fireredasr_checkpoint as mfc
    from fireredasr.models.fireredasr_aed import FireRedAsrAed

    out.mkdir(parents=True, exist_ok=True)
    pieces = mfc._train_spm(out)  # writes train_bpe1000.model
    words = list(mfc.SPECIALS)
    seen = set(words)
    for p in pieces:
        if p not in seen:
            words.append(p)
            seen.add(p)
    cp = 0x4E00
    while len(words) < AED_L_ODIM:
        ch = chr(cp)
        cp += 1
        if ch not in seen:
            words.append(ch)
            seen.add(ch)
    with open(out / "dict.txt", "w", encoding="utf8") as f:
        f.writelines(f"{w} {i}\n" for i, w in enumerate(words))
    mfc.write_cmvn(out / "cmvn.ark", seed=seed)
    args = mfc.aed_args(AED_L_ODIM, **AED_L)
    torch.manual_seed(seed)
    model = FireRedAsrAed.from_args(args)
    # gain 3 as the tool's tiny checkpoints: with gain 1 the scaled input
    # embedding dominates and greedy copies <sos>; with 3 each utterance gets
    # its own tokens (residual |x| < ~200: safe in fp16 too)
    mfc._randomize(model, seed, gain=3.0)
    state = model.state_dict()
    _zero_eos(state, args.eos_id)
    torch.save({"args": args, "model_state_dict": state}, out / "model.pth.tar")
    return out


def make_tiny_release(out: Path, seed: int) -> Path:
    import make_fireredasr_checkpoint as mfc

    mfc.make_aed(out, seed=seed)
    pkg = _load_package(out / "model.pth.tar")
    _zero_eos(pkg["model_state_dict"], pkg["args"].eos_id)
    torch.save(pkg, out / "model.pth.tar")
    return out


def _random_(name: str, p: torch.Tensor, gen: torch.Generator, gain: float) -> None:
    """The rules of tools/make_fireredasr_checkpoint.py, drawn on p's device:
    norms 1 + 0.1 N, other vectors 0.02 N, LoRA 0.5 N / sqrt(fan_in),
    matrices gain N / sqrt(fan_in)."""
    noise = torch.randn(
        p.shape, generator=gen, device=gen.device, dtype=torch.float32
    ).to(p.device)
    if "lora_" in name:
        noise *= 0.5 * p.shape[-1] ** -0.5
    elif p.dim() == 1 and "norm" in name:
        noise = 1.0 + 0.1 * noise if name.endswith("weight") else 0.02 * noise
    elif p.dim() == 1:
        noise *= 0.02
    else:
        noise *= gain * p[0].numel() ** -0.5
    p.copy_(noise)


def _llm_tokenizer_ids(llm_dir: Path) -> dict:
    """Regular ids (every id a generated token may have) and the specials
    of the tokenizer in ``llm_dir``; ``<speech>`` is the id the original
    adds (the tokenizer's length)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(llm_dir / "tokenizer.json"))
    added = {a.content: i for i, a in tok.get_added_tokens_decoder().items()}
    vocab = tok.get_vocab(with_added_tokens=True)
    regular = sorted(set(vocab.values()) - set(added.values()))
    head, tail = LLM_PROMPT.split(SPEECH_TOKEN)
    prompt = (len(tok.encode(head, add_special_tokens=False).ids) + 1
              + len(tok.encode(tail, add_special_tokens=False).ids))
    return {"regular": regular, "specials": added, "size": len(vocab),
            "speech": len(vocab), "prompt_tokens": prompt}


def make_llm_release(out: Path, seed: int, tiny: bool) -> Path:
    """FireRedASR-LLM-L (or tiny) dims, random weights, in the release layout.

    Weights drawn on the GPU when there is one (CPU otherwise). Qwen2 bf16
    shards (fp32 when tiny) + index, written by a 2-thread pool while the
    next shard is drawn; encoder, projector and LoRA in fp32 as the
    original's state_dict. Shapes and names come from the classes: the
    original's ConformerEncoder and Adapter, HF's Qwen2ForCausalLM on the
    meta device, PEFT's ``base_model.model.`` LoRA naming.
    """
    import argparse as ap
    from collections import OrderedDict
    from concurrent.futures import ThreadPoolExecutor

    import make_fireredasr_checkpoint as mfc
    from fireredasr.models.module.adapter import Adapter
    from fireredasr.models.module.conformer_encoder import ConformerEncoder
    from make_demo_checkpoint import make_tokenizer
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(dev).manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    llm_dir = out / LLM_DIR
    llm_dir.mkdir(exist_ok=True)
    mfc.write_cmvn(out / "cmvn.ark", seed=seed)
    make_tokenizer(llm_dir, vocab_size=512)
    ids = _llm_tokenizer_ids(llm_dir)
    dims = dict(QWEN2_TINY if tiny else QWEN2_7B)
    cfg = Qwen2Config(**dims, bos_token_id=ids["specials"]["<|endoftext|>"],
                      eos_token_id=ids["specials"]["<|im_end|>"])
    cfg.architectures = ["Qwen2ForCausalLM"]
    assert ids["speech"] < cfg.vocab_size
    llm_dtype = getattr(torch, dims["torch_dtype"])
    with torch.device("meta"):
        shapes = [(k, tuple(v.shape)) for k, v in Qwen2ForCausalLM(cfg).state_dict().items()]
    keep = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=dev)
    keep[ids["regular"]] = True

    # shard plan (bytes known up front): ~4 GB shards, a few small ones when tiny
    limit = (1 << 20) if tiny else (4 << 30)
    shards, size, total = [[]], 0, 0
    for k, shp in shapes:
        nbytes = int(np.prod(shp)) * llm_dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((k, shp))
        size += nbytes
        total += nbytes
    n = len(shards)
    weight_map = {}
    pending = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            tensors = {}
            for k, shp in shard:
                t = torch.empty(shp, dtype=torch.float32, device=dev)
                _random_(k, t, gen, gain=1.0)
                if k == "lm_head.weight":
                    # no id but the regular tokens can win greedy: neither
                    # eos (<|im_end|>, <|endoftext|>) nor unused rows
                    t[~keep] = 0.0
                tensors[k] = t.to(llm_dtype).cpu()
                weight_map[k] = fname
            while len(pending) >= 2:
                pending.pop(0).result()
            pending.append(pool.submit(save_file, tensors, str(llm_dir / fname),
                                       {"format": "pt"}))
            del tensors

        (llm_dir / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        cfg.save_pretrained(llm_dir)

        # encoder (fine-tuned in model.pth.tar; the same tensors in
        # asr_encoder.pth.tar), projector, LoRA -- fp32
        enc_args = mfc.aed_args(64) if tiny else mfc.aed_args(AED_L_ODIM, **AED_L)
        with torch.device(dev):
            encoder = ConformerEncoder(
                enc_args.idim, enc_args.n_layers_enc, enc_args.n_head,
                enc_args.d_model, enc_args.residual_dropout, enc_args.dropout_rate,
                enc_args.kernel_size, enc_args.pe_maxlen)
            projector = Adapter(enc_args.d_model, cfg.hidden_size,
                                LLM_L["encoder_downsample_rate"])
        state = OrderedDict()
        with torch.no_grad():
            for prefix, mod in (("encoder.", encoder), ("encoder_projector.", projector)):
                for k, p in mod.named_parameters():
                    _random_(k, p, gen, gain=3.0)
            enc_state = {"encoder." + k: v.cpu() for k, v in encoder.state_dict().items()}
            pending.append(pool.submit(
                torch.save, {"args": enc_args, "model_state_dict": enc_state},
                out / "asr_encoder.pth.tar"))
            state.update(enc_state)
            h = cfg.hidden_size
            kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
            io = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                  "gate_proj": (h, cfg.intermediate_size),
                  "up_proj": (h, cfg.intermediate_size),
                  "down_proj": (cfg.intermediate_size, h)}
            for layer in range(cfg.num_hidden_layers):
                for target in LORA_TARGETS:
                    fan_in, fan_out = io[target.split(".")[1]]
                    base = f"llm.base_model.model.model.layers.{layer}.{target}"
                    for ab, shp in (("A", (LORA_R, fan_in)), ("B", (fan_out, LORA_R))):
                        k = f"{base}.lora_{ab}.default.weight"
                        t = torch.empty(shp, device=dev)
                        _random_(k, t, gen, gain=1.0)
                        state[k] = t.cpu()
            state.update({"encoder_projector." + k: v.cpu()
                          for k, v in projector.state_dict().items()})
        args = ap.Namespace(**dict(LLM_L, use_fp16=0 if tiny else 1))
        pending.append(pool.submit(torch.save, {"args": args, "model_state_dict": state},
                                   out / "model.pth.tar"))
        del encoder, projector
        for f in pending:
            f.result()
    return out


def _llm_dims(ckpt: Path) -> dict:
    """Dims + parameter counts of a FireRedASR-LLM release dir (Qwen2
    config.json and the packages, memory-mapped)."""
    cfg = json.loads((ckpt / LLM_DIR / "config.json").read_text())
    enc = _load_package(ckpt / "asr_encoder.pth.tar", mmap=True)["args"]
    pkg = _load_package(ckpt / "model.pth.tar", mmap=True)
    args, state = pkg["args"], pkg["model_state_dict"]

    def count(pred) -> int:
        return sum(v.numel() for k, v in state.items() if pred(k))

    h, i_, L, V = (cfg["hidden_size"], cfg["intermediate_size"],
                   cfg["num_hidden_layers"], cfg["vocab_size"])
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i_ + 2 * h
    return {
        "encoder": {k: getattr(enc, k) for k in (
            "idim", "n_layers_enc", "n_head", "d_model", "d_inner", "kernel_size")},
        "llm": {k: cfg[k] for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "vocab_size")},
        "encoder_downsample_rate": int(args.encoder_downsample_rate),
        "lora_r": LORA_R, "use_fp16": args.use_fp16,
        "params": {
            # the positional table is a buffer, not a weight
            "encoder": count(lambda k: k.startswith("encoder.")
                             and not k.endswith("positional_encoding.pe")),
            "projector": count(lambda k: k.startswith("encoder_projector.")),
            "lora": count(lambda k: "lora_" in k),
            "llm_layers": L * layer, "llm_embed": V * h, "llm_lm_head": V * h,
            "llm_norm": h,
        },
    }


# ------------------------------------------------------------ audio ----
def synth_utterance(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """A gliding, amplitude-modulated tone plus noise, int16."""
    t = np.arange(int(SR * seconds)) / SR
    base = rng.uniform(150, 500)
    f = base + 120 * np.sin(2 * np.pi * rng.uniform(0.3, 1.2) * t)
    x = 0.3 * np.sin(2 * np.pi * np.cumsum(f) / SR)
    x *= 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.8, 2.0) * t)
    x += 0.02 * rng.standard_normal(t.size)
    return (np.clip(x, -1, 1) * 32767).astype(np.int16)


def make_utterances(out: Path, n: int, lo: float, hi: float, seed: int) -> list[dict]:
    import soundfile as sf

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    utts = []
    for i in range(n):
        sec = float(rng.uniform(lo, hi))
        x = synth_utterance(sec, rng)
        path = out / f"utt{i:04d}.wav"
        sf.write(path, x, SR, subtype="PCM_16")
        utts.append({"id": f"utt{i:04d}", "path": str(path),
                     "seconds": len(x) / SR})
    return utts


def plan_levels(levels: list[int], rounds: int, min_requests: int) -> dict:
    """Disjoint slices of one utterance list: a warm-up slice (c files) and
    a timed slice (max(c * rounds, min_requests) files) per level."""
    plan, i = {}, 0
    for c in levels:
        n = max(c * rounds, min_requests)
        plan[c] = {"warmup": (i, i + c), "timed": (i + c, i + c + n)}
        i += c + n
    return plan, i


# --------------------------------------------------------- roofline ----
def encoder_flops(a, frames: float) -> float:
    """FLOPs of the Conformer encoder on ``frames`` subsampled frames."""
    d, di, k, T = a.d_model, a.d_inner, a.kernel_size, frames
    per_frame = (
        2 * 2 * d * di      # ffn1 + ffn2 (two matmuls each)
        + 4 * d * d         # w_qs, w_ks, w_vs, fc
        + 6 * d * d         # pointwise_conv1 (d -> 4d), pointwise_conv2 (2d -> d)
        + 2 * d * k         # depthwise conv
    )
    layer = 2 * T * per_frame + 2 * (2 * T - 1) * d * d + 8 * T * T * d
    front = 2 * T * 608 * d + 2 * (4 * T) * 32 * 32 * 9 * 19
    return a.n_layers_enc * layer + front


def encoder_frames(seconds: float) -> int:
    """Encoder output frames (padding included) of an utterance: kaldi fbank
    (25 ms / 10 ms, snip_edges), 6 frames of right context, two Conv2d(3, s2)."""
    fbank = 1 + (round(seconds * SR) - 400) // 160
    t = (fbank + 6 - 3) // 2 + 1
    return (t - 3) // 2 + 1


def roofline(a, enc_frames: float, audio_s: float, tokens: int, levels: list[int],
             dtype_bytes: int = 2) -> dict:
    d, di, L = a.d_model, a.d_inner, a.n_layers_dec
    dec_layer = (4 * d * d + 3 * d) + (2 * d * d + 2 * d) + (2 * d * di + di + d) + 6 * d
    head = a.odim * d + 2 * d
    weights = (L * dec_layer + head) * dtype_bytes
    cross_kv = L * 2 * d * enc_frames * dtype_bytes          # per request per step
    self_kv = L * 2 * d * (tokens / 2 + 1) * dtype_bytes     # mean over the steps
    enc_fl = encoder_flops(a, enc_frames)
    out = {
        "assumptions": (
            "vLLM decode step reads all decoder weights once plus, per "
            "request, its cross-attention K/V (encoder frames) and self K/V; "
            "cross K/V projections run once per request (not per step); "
            "encoder at peak dense bf16 FLOP/s; mean utterance"),
        "decoder_weight_bytes_per_step": weights,
        "cross_kv_bytes_per_request_step": cross_kv,
        "self_kv_bytes_per_request_step_mean": self_kv,
        "encoder_flops_per_utterance": enc_fl,
        "mean_encoder_frames": enc_frames,
        "mean_audio_s": audio_s,
        # the original recomputes cross K/V of every layer at every step
        "original_cross_kv_recompute_flops_per_utterance_step": (
            L * 2 * 2 * enc_frames * d * d),
    }
    bw, peak = _device_lookup(BANDWIDTH), _device_lookup(PEAK_BF16)
    if bw and peak:
        out["bandwidth_bytes_per_s"] = bw
        out["peak_bf16_flops"] = peak
        out["by_concurrency"] = {}
        for b in levels:
            step_s = (weights + b * (cross_kv + self_kv)) / bw
            dec_s = tokens * step_s / b
            enc_s = enc_fl / peak
            out["by_concurrency"][str(b)] = {
                "decode_step_s": step_s,
                "tokens_per_s": b / step_s,
                "rtfx": audio_s / (dec_s + enc_s),
            }
    return out


def roofline_llm(dims: dict, enc_args, enc_frames: float, prompt_tokens: int,
                 audio_s: float, tokens: int, levels: list[int],
                 dtype_bytes: int = 2) -> dict:
    """FireRedASR-LLM: a decode step reads the Qwen2 weights once (LoRA
    merged; the embedding table only by row) plus each request's KV; the
    encoder + projector weights once per batch; encoder and prefill FLOPs at
    peak."""
    llm, p = dims["llm"], dims["params"]
    h, L = llm["hidden_size"], llm["num_hidden_layers"]
    kv = llm["num_key_value_heads"] * h // llm["num_attention_heads"]
    speech = enc_frames / dims["encoder_downsample_rate"]
    ctx0 = prompt_tokens - 1 + speech                       # prefill length
    weights = (p["llm_layers"] + p["llm_lm_head"] + p["llm_norm"]) * dtype_bytes
    kv_step = L * 2 * kv * (ctx0 + tokens / 2) * dtype_bytes  # mean over the steps
    enc_weights = (p["encoder"] + p["projector"]) * dtype_bytes
    enc_fl = encoder_flops(enc_args, enc_frames) + 2 * speech * p["projector"]
    prefill_fl = (2 * ctx0 * p["llm_layers"] + 4 * L * ctx0 * ctx0 * h
                  + 2 * p["llm_lm_head"])
    out = {
        "assumptions": (
            "vLLM decode step reads all Qwen2 weights once (LoRA merged, "
            "embedding rows only) plus, per request, its KV (prompt + speech "
            "+ half the output); encoder + projector weights once per batch of "
            "c; encoder, projector and prefill at peak dense bf16 FLOP/s; "
            "mean utterance"),
        "llm_weight_bytes_per_step": weights,
        "kv_bytes_per_request_step_mean": kv_step,
        "encoder_weight_bytes_per_batch": enc_weights,
        "encoder_flops_per_utterance": enc_fl,
        "prefill_flops_per_utterance": prefill_fl,
        "mean_encoder_frames": enc_frames,
        "mean_speech_tokens": speech,
        "prompt_text_tokens": prompt_tokens - 1,
        "mean_audio_s": audio_s,
        # the original keeps LoRA unmerged in fp32: read again every step
        "original_lora_bytes_per_step_fp32": p["lora"] * 4,
    }
    bw, peak = _device_lookup(BANDWIDTH), _device_lookup(PEAK_BF16)
    if bw and peak:
        out["bandwidth_bytes_per_s"] = bw
        out["peak_bf16_flops"] = peak
        out["by_concurrency"] = {}
        for b in levels:
            step_s = (weights + b * kv_step) / bw
            dec_s = tokens * step_s / b
            enc_s = (enc_fl + prefill_fl) / peak + enc_weights / (bw * b)
            out["by_concurrency"][str(b)] = {
                "decode_step_s": step_s,
                "tokens_per_s": b / step_s,
                "rtfx": audio_s / (dec_s + enc_s),
            }
    return out


# ------------------------------------------------------------ original ----
def import_original():
    """fireredasr.models.fireredasr imports modelscope at module level for
    ``from_pretrained`` (a modelscope download) only; the benchmark builds
    ``FireRedAsr`` from a local directory, so a stub stands in if needed."""
    try:
        import modelscope  # noqa: F401
    except ImportError:
        stub = types.ModuleType("modelscope")

        def snapshot_download(*a, **k):
            raise RuntimeError("modelscope stub: no downloads in the benchmark")

        stub.snapshot_download = snapshot_download
        sys.modules["modelscope"] = stub
    from fireredasr.data.asr_feat import ASRFeatExtractor
    from fireredasr.models import fireredasr as fr
    from fireredasr.tokenizer.aed_tokenizer import ChineseCharEnglishSpmTokenizer

    return fr, ASRFeatExtractor, ChineseCharEnglishSpmTokenizer


def _batches(utts: list[dict], lo: int, hi: int, c: int):
    """(uttids, wav paths) of utts[lo:hi] in batches of c, file order."""
    for i in range(lo, hi, c):
        chunk = utts[i:min(i + c, hi)]
        yield [u["id"] for u in chunk], [u["path"] for u in chunk]


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _original_levels(asr, args: dict, utts: list[dict], plan: dict, tokens: int,
                     name: str, cuda: bool, on_level=None) -> dict:
    """Time ``asr.transcribe`` (the original's FireRedAsr) at each level:
    warm-up slice, then the timed slice in batches of c. ``on_level(res)``
    after each level."""
    c1 = min(plan)
    res: dict = {"dtype": name, "by_concurrency": {}, "texts_c1": {}}
    for c, p in plan.items():
        for ids, paths in _batches(utts, *p["warmup"], c):
            asr.transcribe(ids, paths, args)
        _sync(cuda)
        lo, hi = p["timed"]
        t = time.monotonic()
        n_out = 0
        for ids, paths in _batches(utts, lo, hi, c):
            got = asr.transcribe(ids, paths, args)
            n_out += len(got)
            if c == c1:
                res["texts_c1"].update({r["uttid"]: r["text"] for r in got})
        _sync(cuda)
        wall = time.monotonic() - t
        audio = sum(u["seconds"] for u in utts[lo:hi])
        assert n_out == hi - lo
        res["by_concurrency"][str(c)] = {
            "requests": hi - lo, "batch_size": c, "audio_s": round(audio, 3),
            "wall_s": round(wall, 4), "rtfx": round(audio / wall, 2),
            "tokens_per_s": round((hi - lo) * tokens / wall, 1),
        }
        log(f"original {name} c={c}", res["by_concurrency"][str(c)])
        if on_level:
            on_level(res)
    return res


def _free(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def run_original(ckpt: Path, utts: list[dict], plan: dict, tokens: int,
                 dtype_names: list[str], cuda: bool, on_result=None) -> dict:
    """The original pipeline, loaded once, timed at each dtype in turn
    (float32 first: the model is cast down between passes)."""
    import argparse as ap

    fr, ASRFeatExtractor, Tok = import_original()
    t0 = time.monotonic()
    # the original's loader; its torch.load needs argparse.Namespace
    # allow-listed under torch>=2.6 (weights_only=True by default)
    with torch.serialization.safe_globals([ap.Namespace]):
        model = fr.load_fireredasr_aed_model(str(ckpt / "model.pth.tar"))
    model.eval()
    params = {
        "encoder": sum(p.numel() for p in model.encoder.parameters()),
        "decoder": sum(p.numel() for p in model.decoder.parameters()),
    }
    if cuda:
        model.cuda()
    asr = fr.FireRedAsr(
        "aed", ASRFeatExtractor(str(ckpt / "cmvn.ark")), model,
        Tok(str(ckpt / "dict.txt"), str(ckpt / "train_bpe1000.model")))
    out: dict = {"load_s": round(time.monotonic() - t0, 2), "params": params,
                 "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    log(f"original: loaded in {out['load_s']}s, params {params}")
    args = {"use_gpu": int(cuda), "beam_size": 1, "nbest": 1,
            "decode_max_len": tokens, "softmax_smoothing": 1.0,
            "aed_length_penalty": 0.0, "eos_penalty": 1.0}
    inner = model.transcribe
    dev = "cuda" if cuda else "cpu"
    c1 = min(plan)

    order = sorted(dtype_names, key=lambda n: n != "float32")
    for name in order:
        dtype = getattr(torch, name)
        model.to(dtype)
        if dtype != torch.float32:
            # 0.0.2 feeds fp32 features: cast them for a half model
            @functools.wraps(inner)
            def transcribe(feats, *a, _dtype=dtype, **k):
                return inner(feats.to(_dtype), *a, **k)

            model.transcribe = transcribe

        # every hypothesis has exactly `tokens` tokens (checked on one batch)
        ids, paths = next(_batches(utts, *plan[c1]["warmup"], c1))
        feats, lengths, _ = asr.feat_extractor(paths)
        with torch.no_grad():
            hyps = model.transcribe(feats.to(dev), lengths.to(dev), 1, 1, tokens,
                                    1.0, 0.0, 1.0)
        n_tok = [len(h[0]["yseq"]) for h in hyps]
        assert n_tok == [tokens] * len(n_tok), f"original decoded {n_tok} tokens"

        def level_done(res: dict, _name: str = name) -> None:
            out[_name] = res
            if on_result:
                on_result(out)

        _original_levels(asr, args, utts, plan, tokens, name, cuda, level_done)
    model.transcribe = inner
    del asr, model
    _free(cuda)
    return out


def run_original_llm(ckpt: Path, utts: list[dict], plan: dict, tokens: int,
                     cuda: bool, on_result=None) -> dict:
    """FireRedASR-LLM through the original's own entry points:
    ``FireRedAsr.from_pretrained("llm")`` on the local dir and
    ``FireRedAsr.transcribe``, at the package's precision."""
    import argparse as ap

    fr, _, _ = import_original()
    import transformers
    from fireredasr.tokenizer.llm_tokenizer import LlmTokenizerWrapper

    # generate() warns per call about sampling flags the original passes
    # with do_sample=False (temperature, top_p, length_penalty)
    transformers.logging.set_verbosity_error()
    t0 = time.monotonic()
    # 0.0.2's from_pretrained(asr_type) takes no directory: it asks
    # modelscope's snapshot_download, which here answers with the local dir
    download = fr.snapshot_download
    fr.snapshot_download = lambda *a, **k: str(ckpt)
    try:
        with torch.serialization.safe_globals([ap.Namespace]):
            asr = fr.FireRedAsr.from_pretrained("llm")
    finally:
        fr.snapshot_download = download
    model, tok = asr.model, asr.tokenizer
    load_s = time.monotonic() - t0

    # every tensor of model.pth.tar landed in the model (the original loads
    # with strict=False, which would hide a misnamed LoRA tensor)
    pkg_keys = set(_load_package(ckpt / "model.pth.tar", mmap=True)["model_state_dict"])
    model_keys = set(model.state_dict())
    assert pkg_keys <= model_keys, sorted(pkg_keys - model_keys)[:4]
    left = model_keys - pkg_keys
    assert all(k.startswith("llm.") and "lora_" not in k for k in left), \
        sorted(k for k in left if not k.startswith("llm.") or "lora_" in k)[:4]

    # transformers 5: apply_chat_template(tokenize=True) returns a
    # BatchEncoding unless return_dict=False; 0.0.2 pads it as a list
    inner_act = tok.apply_chat_template

    def apply_chat_template(*a, **k):
        k.setdefault("return_dict", False)
        return inner_act(*a, **k)

    tok.apply_chat_template = apply_chat_template
    t1 = time.monotonic()
    if cuda:
        model.cuda()   # the original's transcribe() does it on its first call
    dtypes = {
        "llm": str(model.llm.get_input_embeddings().weight.dtype),
        "lora": str(next(p for n, p in model.named_parameters() if "lora_A" in n).dtype),
        "encoder": str(next(model.encoder.parameters()).dtype),
        "projector": str(next(model.encoder_projector.parameters()).dtype),
    }
    name = dtypes["llm"].removeprefix("torch.")
    out: dict = {
        "load_s": round(load_s, 2), "to_device_s": round(time.monotonic() - t1, 2),
        "params": {
            "encoder": sum(p.numel() for p in model.encoder.parameters()),
            "projector": sum(p.numel() for p in model.encoder_projector.parameters()),
            "llm_with_lora": sum(p.numel() for p in model.llm.parameters()),
        },
        "precision": dtypes,
        "lora": "peft, unmerged",
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "transformers": transformers.__version__, "peft": _version("peft"),
    }
    log(f"original: loaded in {out['load_s']}s (+{out['to_device_s']}s to device), "
        f"precision {dtypes}")
    args = {"use_gpu": int(cuda), "beam_size": 1, "decode_max_len": tokens,
            "decode_min_len": 0, "repetition_penalty": 1.0,
            "llm_length_penalty": 0.0, "temperature": 1.0}

    # every hypothesis has exactly `tokens` regular tokens (one batch)
    regular = set(_llm_tokenizer_ids(ckpt / LLM_DIR)["regular"])
    dev = "cuda" if cuda else "cpu"
    c1 = min(plan)
    ids, paths = next(_batches(utts, *plan[c1]["warmup"], c1))
    feats, lengths, _ = asr.feat_extractor(paths)
    input_ids, mask, _, _ = LlmTokenizerWrapper.preprocess_texts(
        origin_texts=[""] * len(paths), tokenizer=tok, max_len=128, decode=True)
    with torch.no_grad():
        gen = model.transcribe(feats.to(dev), lengths.to(dev), input_ids.to(dev),
                               mask.to(dev), 1, tokens, 0, 1.0, 0.0, 1.0)
    assert gen.shape == (len(paths), tokens), f"original generated {tuple(gen.shape)}"
    assert set(gen.flatten().tolist()) <= regular, "original generated a special id"

    def level_done(res: dict) -> None:
        out[name] = res
        if on_result:
            on_result(out)

    _original_levels(asr, args, utts, plan, tokens, name, cuda, level_done)
    del asr, model, tok, gen, feats, lengths, input_ids, mask
    _free(cuda)
    if cuda:
        log(f"original: freed, {torch.cuda.memory_allocated() / 2**30:.2f} GiB "
            "still allocated")
    return out


# ---------------------------------------------------------------- vLLM ----
def _generation_tokens(base: str) -> float:
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("vllm:generation_tokens_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _vllm_levels(base: str, utts: list[dict], plan: dict, tokens: int,
                       on_level=None) -> dict:
    import openai

    data = {}
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="EMPTY",
                                max_retries=0, timeout=900.0)
    model = (await client.models.list()).data[0].id

    def payload(u: dict) -> bytes:
        if u["id"] not in data:
            data[u["id"]] = Path(u["path"]).read_bytes()
        return data[u["id"]]

    async def one(u: dict, fmt: str = "json"):
        t = time.monotonic()
        r = await client.audio.transcriptions.create(
            model=model, file=(Path(u["path"]).name, payload(u)),
            response_format=fmt, temperature=0.0,
            extra_body={"max_completion_tokens": tokens})
        return r, time.monotonic() - t

    async def level(lo: int, hi: int, c: int):
        todo = list(range(lo, hi))[::-1]
        lat, texts = [], {}

        async def client_loop():
            while todo:
                i = todo.pop()
                r, dt = await one(utts[i])
                lat.append(dt)
                texts[utts[i]["id"]] = r.text

        t = time.monotonic()
        await asyncio.gather(*[client_loop() for _ in range(c)])
        return time.monotonic() - t, lat, texts

    # token count check: verbose_json lists the segment's tokens
    u0 = utts[plan[min(plan)]["warmup"][0]]
    r, _ = await one(u0, "verbose_json")
    got = sum(len(s.tokens) for s in r.segments)
    assert got == tokens, f"vLLM decoded {got} tokens, want {tokens}"

    res: dict = {"by_concurrency": {}, "texts_c1": {}}
    for c, p in plan.items():
        for _ in range(2 if c == min(plan) else 1):
            await level(*p["warmup"], c)
        lo, hi = p["timed"]
        before = _generation_tokens(base)
        wall, lat, texts = await level(lo, hi, c)
        gen = _generation_tokens(base) - before
        assert gen == (hi - lo) * tokens, f"generated {gen} tokens, want {(hi - lo) * tokens}"
        if c == min(plan):
            res["texts_c1"] = texts
        audio = sum(u["seconds"] for u in utts[lo:hi])
        lat.sort()
        res["by_concurrency"][str(c)] = {
            "requests": hi - lo, "audio_s": round(audio, 3),
            "wall_s": round(wall, 4), "rtfx": round(audio / wall, 2),
            "tokens_per_s": round(gen / wall, 1), "generated_tokens": int(gen),
            "latency_mean_s": round(statistics.mean(lat), 4),
            "latency_p50_s": round(lat[len(lat) // 2], 4),
            "latency_p90_s": round(lat[min(len(lat) - 1, int(0.9 * len(lat)))], 4),
        }
        log(f"vllm c={c}", res["by_concurrency"][str(c)])
        if on_level:
            on_level(res)
    await client.close()
    return res


def run_vllm(ckpt: Path, utts: list[dict], plan: dict, tokens: int, a,
             log_path: Path, on_level=None) -> dict:
    from demo import serve

    cuda = torch.cuda.is_available()
    server_args = ["--dtype", a.dtype, "--max-num-seqs", str(max(plan)),
                   "--disable-uvicorn-access-log"]
    if cuda:
        server_args += ["--gpu-memory-utilization", str(a.gpu_memory_utilization)]
    else:
        server_args += ["--enforce-eager", "--max-model-len", "2048",
                        "--kv-cache-memory-bytes", str((256 if a.tiny else 4096) << 20)]
    server_args += shlex.split(a.server_args)
    t0 = time.monotonic()
    log("vllm: starting the API server, log", log_path)
    with serve(ckpt, server_args, timeout=a.server_timeout, log_path=log_path) as base:
        startup = time.monotonic() - t0
        log(f"vllm: server up after {startup:.1f}s")
        res = asyncio.run(_vllm_levels(base, utts, plan, tokens, on_level))
    res.update(dtype=a.dtype, server_args=server_args, startup_s=round(startup, 2))
    return res


def _agreement(a: dict, b: dict) -> dict:
    keys = sorted(set(a) & set(b))
    same = sum(a[k] == b[k] for k in keys)

    def prefix(x: str, y: str) -> int:
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        return n

    return {"utterances": len(keys), "identical_text": same,
            "mean_common_prefix_chars": round(
                statistics.mean(prefix(a[k], b[k]) for k in keys), 2) if keys else 0,
            "mean_text_chars": round(
                statistics.mean(len(a[k]) for k in keys), 2) if keys else 0}


def _tmp_root(llm: bool, tiny: bool) -> str | None:
    """Where the temporary dir goes: /dev/shm for the real-size LLM
    (about 22 GB of checkpoint, written and read at memory speed) when it has
    room, else the default temporary directory."""
    if llm and not tiny and os.path.isdir("/dev/shm"):
        if shutil.disk_usage("/dev/shm").free > (36 << 30):
            return "/dev/shm"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="result JSON")
    ap.add_argument("--model", choices=["aed", "llm"], default="aed",
                    help="FireRedASR-AED-L (default) or FireRedASR-LLM-L")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny checkpoint (AED: tools/make_fireredasr_checkpoint.py; "
                    "LLM: this script's maker at tiny dims), "
                    "few short utterances (CPU smoke run)")
    ap.add_argument("--model-dir", type=Path,
                    help="release dir to use (made there, and kept, if missing); "
                    "default: a temporary dir, deleted at the end")
    ap.add_argument("--concurrency", "--levels", dest="concurrency", default=None,
                    help="comma list of concurrency levels, default 1,16,64 (tiny 1,4)")
    ap.add_argument("--tokens", type=int, default=None,
                    help="tokens decoded per utterance by both systems "
                    "(default 48, about 5 per audio second; tiny 8)")
    ap.add_argument("--rounds", type=int, default=4,
                    help="timed requests per concurrency slot (default 4)")
    ap.add_argument("--min-requests", type=int, default=None,
                    help="at least this many timed requests per level "
                    "(default 16; tiny 4)")
    ap.add_argument("--min-seconds", type=float, default=None,
                    help="shortest utterance (default 5; tiny 2)")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="longest utterance (default 15; tiny 4)")
    ap.add_argument("--dtype", default=None,
                    help="vLLM dtype (default bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--original-dtypes", default=None,
                    help="AED only: comma list of the original's dtypes (default "
                    "bfloat16,float32 on GPU; float32 on CPU). The LLM original "
                    "runs at its package's precision (use_fp16)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.6)
    ap.add_argument("--server-args", default="",
                    help="extra arguments for the vLLM API server, one string: "
                    "--server-args=\"--enforce-eager --max-num-batched-tokens 16384\"")
    ap.add_argument("--server-timeout", type=float, default=480.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-original", action="store_true")
    ap.add_argument("--skip-vllm", action="store_true")
    a = ap.parse_args()
    llm = a.model == "llm"
    if llm and a.original_dtypes:
        ap.error("--original-dtypes is for --model aed: the LLM original runs "
                 "at its package's precision")
    cuda = torch.cuda.is_available()
    a.concurrency = a.concurrency or ("1,4" if a.tiny else "1,16,64")
    a.tokens = a.tokens or (8 if a.tiny else 48)
    a.min_requests = a.min_requests or (4 if a.tiny else 16)
    a.min_seconds = a.min_seconds or (2.0 if a.tiny else 5.0)
    a.max_seconds = a.max_seconds or (4.0 if a.tiny else 15.0)
    a.dtype = a.dtype or ("bfloat16" if cuda else "float32")
    a.original_dtypes = a.original_dtypes or ("bfloat16,float32" if cuda else "float32")
    levels = sorted({int(c) for c in a.concurrency.split(",")})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

    if llm:
        size = ("tiny (this script's FireRedASR-LLM maker at tiny dims)" if a.tiny
                else "FireRedASR-LLM-L dims (Qwen2-7B + AED-L encoder), random weights")
        length_control = (
            "lm_head rows of every id that is no regular token (the tokenizer's "
            "specials incl. <|im_end|>/<|endoftext|>, <speech>, the unused rows "
            "up to vocab_size) zeroed in the Qwen2 safetensors (never argmax); "
            "original decode_max_len = vLLM max_completion_tokens = "
            "tokens_per_utterance; checked")
        decoding = ("greedy (original beam_size=1, repetition_penalty=1.0; "
                    "vLLM temperature=0)")
    else:
        size = ("tiny (tools/make_fireredasr_checkpoint.py)" if a.tiny
                else "FireRedASR-AED-L dims, random weights")
        length_control = (
            "<eos> row of the tied output projection zeroed in model.pth.tar "
            "(never argmax); original decode_max_len = vLLM "
            "max_completion_tokens = tokens_per_utterance; checked")
        decoding = "greedy (original beam_size=1, vLLM temperature=0)"
    result: dict = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "versions": {"torch": torch.__version__, "vllm": _version("vllm"),
                     "fireredasr": _version("fireredasr"),
                     "python": sys.version.split()[0]},
        "size": size,
        "tokens_per_utterance": a.tokens,
        "length_control": length_control,
        "decoding": decoding,
        "phases_s": {},
    }
    if llm:
        result = {"model": "FireRedASR-LLM-L", **result}

    def save() -> None:
        a.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")

    def phase(name: str, t: float) -> None:
        result["phases_s"][name] = round(time.monotonic() - t, 2)
        log(f"phase {name}: {result['phases_s'][name]}s")
        save()

    tmp = Path(tempfile.mkdtemp(prefix="bench-fireredasr-",
                                dir=_tmp_root(llm, a.tiny)))
    try:
        t = time.monotonic()
        ckpt = a.model_dir or tmp / ("FireRedASR-LLM-L" if llm else "FireRedASR-AED-L")
        if not (ckpt / "model.pth.tar").exists():
            log("making the release dir", ckpt)
            if llm:
                make_llm_release(ckpt, a.seed, a.tiny)
            else:
                (make_tiny_release if a.tiny else make_real_release)(ckpt, a.seed)
        phase("make_checkpoint", t)
        if llm:
            result["checkpoint"] = {
                "dir": str(ckpt),
                "bytes": sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()),
            }
            result["dims"] = _llm_dims(ckpt)
            ckpt_args = _load_package(ckpt / "asr_encoder.pth.tar", mmap=True)["args"]
        else:
            ckpt_args = _load_package(ckpt / "model.pth.tar", mmap=True)["args"]
            result["dims"] = {k: getattr(ckpt_args, k) for k in (
                "idim", "odim", "n_layers_enc", "n_layers_dec", "n_head", "d_model",
                "d_inner", "kernel_size")}

        t = time.monotonic()
        plan, n_utts = plan_levels(levels, a.rounds, a.min_requests)
        utts = make_utterances(tmp / "wavs", n_utts, a.min_seconds, a.max_seconds,
                               a.seed)
        timed = [u for p in plan.values() for u in utts[slice(*p["timed"])]]
        result["audio"] = {
            "utterances_total": n_utts, "timed_utterances": len(timed),
            "duration_range_s": [a.min_seconds, a.max_seconds],
            "mean_s": round(statistics.mean(u["seconds"] for u in timed), 3),
            "signal": "gliding AM tone + noise, 16 kHz PCM-16 WAV, one file per request",
            "levels": {str(c): {"warmup": p["warmup"], "timed": p["timed"]}
                       for c, p in plan.items()},
        }
        phase("make_audio", t)

        frames = statistics.mean(encoder_frames(u["seconds"]) for u in timed)
        if llm:
            ds = result["dims"]["encoder_downsample_rate"]
            fewest = min(encoder_frames(u["seconds"]) for u in utts) // ds
            # vLLM bounds a transcription by its speech length (the
            # original's default max_new_tokens): stay below it
            assert a.tokens <= fewest, (
                f"--tokens {a.tokens} > {fewest} speech embeddings of the "
                f"shortest utterance: raise --min-seconds")
            prompt = _llm_tokenizer_ids(ckpt / LLM_DIR)["prompt_tokens"]
            result["roofline"] = roofline_llm(
                result["dims"], ckpt_args, frames, prompt,
                result["audio"]["mean_s"], a.tokens, levels)
        else:
            result["roofline"] = roofline(ckpt_args, frames, result["audio"]["mean_s"],
                                          a.tokens, levels)
        save()

        if not a.skip_original:
            t = time.monotonic()
            log("original " + ("(package precision)" if llm else f"({a.original_dtypes})")
                + " ...")

            def partial(res: dict) -> None:
                result["original"] = {k: v for k, v in res.items()
                                      if isinstance(v, dict) and "by_concurrency" in v}
                result["original_load"] = {
                    k: v for k, v in res.items()
                    if not (isinstance(v, dict) and "by_concurrency" in v)}
                save()

            try:
                if llm:
                    run_original_llm(ckpt, utts, plan, a.tokens, cuda, partial)
                else:
                    run_original(ckpt, utts, plan, a.tokens,
                                 a.original_dtypes.split(","), cuda, partial)
            except Exception as e:  # noqa: BLE001 -- the vLLM half still runs
                log("original FAILED:", traceback.format_exc())
                result["original_error"] = f"{type(e).__name__}: {e}"
                _free(cuda)
            phase("original", t)

        if not a.skip_vllm:
            t = time.monotonic()
            log_path = a.out.with_name(a.out.stem + ".server.log")

            def vllm_level(res: dict) -> None:
                result["vllm"] = dict(res)
                save()

            try:
                result["vllm"] = run_vllm(ckpt, utts, plan, a.tokens, a, log_path,
                                          vllm_level)
            except Exception as e:  # noqa: BLE001 -- report it in the JSON
                log("vLLM FAILED:", traceback.format_exc())
                result["vllm_error"] = f"{type(e).__name__}: {e}"[:4000]
            phase("vllm", t)

        if "vllm" in result and result.get("original"):
            ratios = {}
            for c, ours in result["vllm"]["by_concurrency"].items():
                ratios[c] = {
                    f"vs_original_{dt}": round(
                        ours["rtfx"] / ref["by_concurrency"][c]["rtfx"], 2)
                    for dt, ref in result["original"].items()
                    if c in ref["by_concurrency"]}
            result["ratios_rtfx_vllm_over_original"] = ratios
            result["text_agreement_c1"] = {
                f"vllm_vs_original_{dt}": _agreement(
                    result["vllm"]["texts_c1"], ref["texts_c1"])
                for dt, ref in result["original"].items()}
        result["phases_s"]["total"] = round(time.monotonic() - T0, 2)
        save()
        summary = {k: v for k, v in result.items()}
        for key in ("original", "vllm"):
            if key in summary:
                summary[key] = json.loads(json.dumps(summary[key]))
                for v in (summary[key].values() if key == "original"
                          else [summary[key]]):
                    v.pop("texts_c1", None)
        print(json.dumps(summary, indent=2, ensure_ascii=False), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
