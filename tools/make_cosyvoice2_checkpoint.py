#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Write a random-weight CosyVoice2 release directory in the original format.

    cosyvoice2.yaml          hyperpyyaml as released (llm / flow / hift)
    llm.pt                   Qwen2LM.state_dict() keys (llm_embedding,
                             llm.model.model.*, llm.model.lm_head.weight,
                             llm_decoder.{weight,bias}, speech_embedding)
    CosyVoice-BlankEN/       Qwen2 config.json + model.safetensors + tokenizer
    flow.pt, hift.pt         built with the original classes
                             (cosyvoice-minicpmo), saved as state dicts
    speech_tokenizer_v2.onnx, campplus.onnx
                             tiny random graphs with the originals'
                             interfaces (when the onnx package is present)
    spk2info.pt              one zero-shot speaker ("spk_a", the layout
                             CosyVoice2.add_zero_shot_spk saves) and one SFT
                             speaker ("spk_sft": embedding only)

``--size tiny`` (tests, CPU) or ``real`` (CosyVoice2-0.5B dimensions, for
benchmarks). The flow/HiFT need the oracle package ``cosyvoice`` (plus its
``matcha``) importable.

    python tools/make_cosyvoice2_checkpoint.py OUT [--size tiny|real]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import types
from pathlib import Path

TINY = dict(
    hidden=128,
    intermediate=256,
    layers=2,
    heads=2,
    kv_heads=1,
    text_vocab=640,
    speech_token_size=100,
    flow_linear_units=64,
    flow_blocks=2,
    est_channels=32,
    est_head_dim=8,
    est_blocks=1,
    est_mid=2,
    est_heads=2,
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
    flow_linear_units=2048,
    flow_blocks=6,
    est_channels=256,
    est_head_dim=64,
    est_blocks=4,
    est_mid=12,
    est_heads=8,
    hift_base=512,
    f0_cond=512,
)

YAML = """\
# hyperpyyaml as in the CosyVoice2 release (random-weight {size} copy)
__set_seed1: !apply:random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]
sample_rate: 24000
llm_input_size: {hidden}
llm_output_size: {hidden}
spk_embed_dim: 192
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: 2
chunk_size: 25

llm: !new:cosyvoice.llm.llm.Qwen2LM
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

flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec
    input_size: 512
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: {speech_token_size}
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
        output_size: 512
        attention_heads: 8
        linear_units: {flow_linear_units}
        num_blocks: {flow_blocks}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: 512
        use_cnn_module: False
        macaron_style: False
        use_dynamic_chunk: True
        static_chunk_size: !ref <chunk_size>
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
        estimator: !new:cosyvoice.flow.decoder.CausalConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [{est_channels}]
            dropout: 0.0
            attention_head_dim: {est_head_dim}
            n_blocks: {est_blocks}
            num_mid_blocks: {est_mid}
            num_heads: {est_heads}
            act_fn: 'gelu'
            static_chunk_size: !ref <token_frame_rate> * <token_mel_ratio>
            num_decoding_left_chunks: -1

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
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
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: {f0_cond}
"""


def install_matcha_logger_shim() -> None:
    """``matcha.utils`` pulls lightning/hydra just for a logger factory;
    the oracle's flow modules need only that factory."""
    if "matcha.utils.pylogger" in sys.modules:
        return
    import matcha  # noqa: F401

    utils = types.ModuleType("matcha.utils")
    utils.__path__ = []  # type: ignore[attr-defined]
    pylogger = types.ModuleType("matcha.utils.pylogger")
    pylogger.get_pylogger = lambda name=__name__: logging.getLogger(name)
    sys.modules["matcha.utils"] = utils
    sys.modules["matcha.utils.pylogger"] = pylogger


def _make_blank_en(out: Path, d: dict, seed: int) -> None:
    from make_demo_checkpoint import make_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    n_tokens = make_tokenizer(out, vocab_size=512)
    assert n_tokens + 32 <= d["text_vocab"]  # + the 17 CosyVoice specials
    write_blank_en_qwen2(out, d, seed, eos_id=0)


def write_blank_en_qwen2(out: Path, d: dict, seed: int, eos_id: int) -> None:
    """The Qwen2 part of ``CosyVoice-BlankEN/`` (shared with
    make_cosyvoice3_checkpoint.py): ``config.json`` and ``model.safetensors``
    of a ``Qwen2ForCausalLM`` with the dims of ``d``, default init under
    ``seed``, the tied ``lm_head.weight`` not saved; ``eos_id`` is both the
    bos and the eos id (the tokenizer's ``<|endoftext|>``)."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=d["text_vocab"],
        hidden_size=d["hidden"],
        intermediate_size=d["intermediate"],
        num_hidden_layers=d["layers"],
        num_attention_heads=d["heads"],
        num_key_value_heads=d["kv_heads"],
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        torch_dtype="float32",
        use_sliding_window=False,
    )
    cfg.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    state = {
        k: v.contiguous()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(out)


def _llm_state(model_dir: Path, d: dict, seed: int) -> dict:
    """Qwen2LM.state_dict() of a randomly initialised LM (keys in the
    original's order)."""
    import torch
    from transformers import Qwen2ForCausalLM

    qwen = Qwen2ForCausalLM.from_pretrained(model_dir / "CosyVoice-BlankEN")
    g = torch.Generator().manual_seed(seed)
    h, s = d["hidden"], d["speech_token_size"]
    with torch.no_grad():
        for name, p in qwen.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    dec_b = 0.5 * torch.randn(s + 3, generator=g)
    # The unused id S+1 and the fill token S+2 never come out of a trained
    # unistream model; keep them unlikely here too.
    dec_b[s + 1 :] = -20.0
    state = {"llm_embedding.weight": torch.randn(2, h, generator=g)}
    for k, v in qwen.state_dict().items():  # model.* then lm_head (tied)
        state["llm.model." + k] = v.clone()
    state["llm_decoder.weight"] = torch.randn(s + 3, h, generator=g) / h**0.5 * 3
    state["llm_decoder.bias"] = dec_b
    state["speech_embedding.weight"] = torch.randn(s + 3, h, generator=g)
    return state


def _flow_hift(d: dict, seed: int):
    import torch

    install_matcha_logger_shim()
    from cosyvoice.flow.decoder import CausalConditionalDecoder
    from cosyvoice.flow.flow import CausalMaskedDiffWithXvec
    from cosyvoice.flow.flow_matching import CausalConditionalCFM
    from cosyvoice.hifigan.f0_predictor import ConvRNNF0Predictor
    from cosyvoice.hifigan.generator import HiFTGenerator
    from cosyvoice.transformer.upsample_encoder import UpsampleConformerEncoder
    from omegaconf import DictConfig

    enc = UpsampleConformerEncoder(
        output_size=512,
        attention_heads=8,
        linear_units=d["flow_linear_units"],
        num_blocks=d["flow_blocks"],
        dropout_rate=0.1,
        positional_dropout_rate=0.1,
        attention_dropout_rate=0.1,
        normalize_before=True,
        input_layer="linear",
        pos_enc_layer_type="rel_pos_espnet",
        selfattention_layer_type="rel_selfattn",
        input_size=512,
        use_cnn_module=False,
        macaron_style=False,
        use_dynamic_chunk=True,
        static_chunk_size=25,
    )
    est = CausalConditionalDecoder(
        in_channels=320,
        out_channels=80,
        channels=[d["est_channels"]],
        dropout=0.0,
        attention_head_dim=d["est_head_dim"],
        n_blocks=d["est_blocks"],
        num_mid_blocks=d["est_mid"],
        num_heads=d["est_heads"],
        act_fn="gelu",
        static_chunk_size=50,
        num_decoding_left_chunks=-1,
    )
    cfm = CausalConditionalCFM(
        in_channels=240,
        n_spks=1,
        spk_emb_dim=80,
        cfm_params=DictConfig(
            {
                "sigma_min": 1e-06,
                "solver": "euler",
                "t_scheduler": "cosine",
                "training_cfg_rate": 0.2,
                "inference_cfg_rate": 0.7,
                "reg_loss_type": "l1",
            }
        ),
        estimator=est,
    )
    flow = CausalMaskedDiffWithXvec(
        input_size=512,
        output_size=80,
        spk_embed_dim=192,
        output_type="mel",
        vocab_size=d["speech_token_size"],
        input_frame_rate=25,
        only_mask_loss=True,
        token_mel_ratio=2,
        pre_lookahead_len=3,
        encoder=enc,
        decoder=cfm,
    )
    torch.manual_seed(seed + 11)
    with torch.no_grad():
        for name, p in flow.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0 / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.1)
    torch.manual_seed(seed + 12)
    hift = HiFTGenerator(
        in_channels=80,
        base_channels=d["hift_base"],
        nb_harmonics=8,
        sampling_rate=24000,
        nsf_alpha=0.1,
        nsf_sigma=0.003,
        nsf_voiced_threshold=10,
        upsample_rates=[8, 5, 3],
        upsample_kernel_sizes=[16, 11, 7],
        istft_params={"n_fft": 16, "hop_len": 4},
        resblock_kernel_sizes=[3, 7, 11],
        resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
        source_resblock_kernel_sizes=[7, 7, 11],
        source_resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
        lrelu_slope=0.1,
        audio_limit=0.99,
        f0_predictor=ConvRNNF0Predictor(1, 80, d["f0_cond"]),
    )
    with torch.no_grad():
        for name, p in hift.named_parameters():
            if "alpha" in name:
                p.uniform_(0.5, 1.5)
            elif p.dim() > 1:
                p.normal_(0.0, 0.5 / max(1, p[0].numel()) ** 0.5)
        hift.f0_predictor.classifier.weight.normal_(0.0, 150.0)
        hift.f0_predictor.classifier.bias.fill_(15.0)
    return flow.eval(), hift.eval()


def make_onnx_frontend(out: Path, speech_token_size: int, seed: int = 0) -> None:
    """Tiny random stand-ins for ``speech_tokenizer_v2.onnx`` and
    ``campplus.onnx`` with the originals' interfaces: (feats [1, 128, T] f32,
    feats_length [1] int32) -> tokens [1, ceil(T / 4)] (25 Hz), and fbank
    [1, T, 80] f32 -> x-vector [1, 192]. Needs the ``onnx`` package."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(
        rng.standard_normal((128, speech_token_size)).astype(np.float32), "w"
    )
    starts = numpy_helper.from_array(np.array([0], np.int64), "starts")
    ends = numpy_helper.from_array(np.array([1 << 30], np.int64), "ends")
    axes = numpy_helper.from_array(np.array([2], np.int64), "axes")
    steps = numpy_helper.from_array(np.array([4], np.int64), "steps")
    graph = helper.make_graph(
        [
            helper.make_node(
                "Slice", ["feats", "starts", "ends", "axes", "steps"], ["s"]
            ),
            helper.make_node("Transpose", ["s"], ["t"], perm=[0, 2, 1]),
            helper.make_node("MatMul", ["t", "w"], ["logits"]),
            helper.make_node("ArgMax", ["logits"], ["a"], axis=2, keepdims=0),
            helper.make_node("Cast", ["a"], ["indices"], to=TensorProto.INT32),
        ],
        "speech_tokenizer",
        [
            helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, 128, "T"]),
            helper.make_tensor_value_info("feats_length", TensorProto.INT32, [1]),
        ],
        [helper.make_tensor_value_info("indices", TensorProto.INT32, [1, "N"])],
        [w, starts, ends, axes, steps],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(out / "speech_tokenizer_v2.onnx"))

    wc = numpy_helper.from_array(
        rng.standard_normal((80, 192)).astype(np.float32) / 9.0, "wc"
    )
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input"], ["m"], axes=[1], keepdims=0),
            helper.make_node("MatMul", ["m", "wc"], ["output"]),
        ],
        "campplus",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, "T", 80])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 192])],
        [wc],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(out / "campplus.onnx"))


def make_release_dir(
    out: str | Path, size: str = "tiny", seed: int = 0, audio: bool = True
) -> Path:
    import torch

    d = TINY if size == "tiny" else REAL
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cosyvoice2.yaml").write_text(YAML.format(size=size, **d))
    _make_blank_en(out / "CosyVoice-BlankEN", d, seed)
    torch.save(_llm_state(out, d, seed + 1), out / "llm.pt")
    if audio:
        flow, hift = _flow_hift(d, seed)
        torch.save(flow.state_dict(), out / "flow.pt")
        torch.save(hift.state_dict(), out / "hift.pt")
    # without the onnx package the directory has no zero-shot frontend
    with contextlib.suppress(ImportError):
        make_onnx_frontend(out, d["speech_token_size"], seed)
    g = torch.Generator().manual_seed(seed + 2)
    s = d["speech_token_size"]
    n_prompt = 12
    prompt_tokens = torch.randint(0, s, (1, n_prompt), generator=g, dtype=torch.int32)
    emb = torch.randn(1, 192, generator=g)
    torch.save(
        {
            "spk_a": {
                "prompt_text": torch.tensor([[5, 6, 7, 8]], dtype=torch.int32),
                "prompt_text_len": torch.tensor([4], dtype=torch.int32),
                "llm_prompt_speech_token": prompt_tokens,
                "llm_prompt_speech_token_len": torch.tensor(
                    [n_prompt], dtype=torch.int32
                ),
                "flow_prompt_speech_token": prompt_tokens,
                "flow_prompt_speech_token_len": torch.tensor(
                    [n_prompt], dtype=torch.int32
                ),
                "prompt_speech_feat": torch.randn(1, 2 * n_prompt, 80, generator=g),
                "prompt_speech_feat_len": torch.tensor(
                    [2 * n_prompt], dtype=torch.int32
                ),
                "llm_embedding": emb,
                "flow_embedding": emb,
            },
            "spk_sft": {"embedding": torch.randn(1, 192, generator=g)},
        },
        out / "spk2info.pt",
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--size", choices=["tiny", "real"], default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(make_release_dir(a.out, a.size, a.seed))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
